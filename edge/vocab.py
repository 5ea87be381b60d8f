"""The project's vocabulary, each word defined once; other modules, CLI choices and the store derive from it.

Pure (stdlib only), so every layer may import it.
"""

from __future__ import annotations

from typing import Literal, get_args

# --- jobs and the event stream (edge.service, edge.client) ----------------------------------


# --- slides and detections (edge.wsi, edge.analysis) -----------------------------------------


# --- engines (edge.engines: backends, TensorRT) ----------------------------------------------
BackendName = Literal["onnxruntime", "onnxruntime-cuda", "tensorrt"]  # onnxruntime = CPU, the default
BACKENDS: tuple[BackendName, ...] = get_args(BackendName)
QuantizeTarget = Literal["onnxruntime", "tensorrt"]  # whose int8 scheme `engines quantize` writes
QUANTIZE_TARGETS: tuple[QuantizeTarget, ...] = get_args(QuantizeTarget)
PrecisionName = Literal["fp32", "fp16", "int8"]  # TensorRT build precision
PRECISIONS: tuple[PrecisionName, ...] = get_args(PrecisionName)
HardwareCompat = Literal["none", "ampere+"]  # ampere+: one plan runs on any Ampere or newer GPU
HARDWARE_COMPAT: tuple[HardwareCompat, ...] = get_args(HardwareCompat)
AMPERE_PLUS: HardwareCompat = "ampere+"
OnMissingPlan = Literal["build", "fail"]  # a missing TensorRT plan at start: build it, or stop and say how
ON_MISSING_PLAN: tuple[OnMissingPlan, ...] = get_args(OnMissingPlan)


# --- the command line (edge.cli) -------------------------------------------------------------
