"""Model bundles and inference engines.

A bundle (``engines/<name>/manifest.toml`` plus ONNX files) names one detector and a classifier
ensemble. Engines run those models behind one protocol (:class:`Engine`), on ONNX Runtime (the
CPU default) or TensorRT. Heavy imports (onnxruntime, tensorrt, cuda) happen lazily in one
module each.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edge.engines.base import Engine, Outputs, Pending, TensorSpec
from edge.engines.fake import FakeEngine
from edge.engines.manifest import (
    Bundle,
    ClassifierSpec,
    DecisionSpec,
    DetectorSpec,
    HeadSpec,
    ModelSpec,
    Normalisation,
    find_bundle,
    list_bundles,
    load_bundle,
)
from edge.errors import ConfigError

if TYPE_CHECKING:
    from edge.config import EnginesConfig

log = logging.getLogger(__name__)

DETECTOR_MAX_BATCH = 8
CLASSIFIER_MAX_BATCH = 64

__all__ = [
    "Bundle",
    "ClassifierSpec",
    "DecisionSpec",
    "DetectorSpec",
    "Engine",
    "EngineSet",
    "FakeEngine",
    "HeadSpec",
    "ModelSpec",
    "Normalisation",
    "Outputs",
    "Pending",
    "TensorSpec",
    "default_max_batch",
    "find_bundle",
    "list_bundles",
    "load_bundle",
    "open_engines",
]


def default_max_batch(model: ModelSpec, configured: int = 0) -> int:
    """The largest batch an engine for this model accepts: the configured value, else by role."""
    if configured:
        return configured
    return DETECTOR_MAX_BATCH if model.role == "detector" else CLASSIFIER_MAX_BATCH


@dataclass
class EngineSet:
    """The open engines of one bundle: the detector and each classifier by name. Close it when done."""

    bundle: Bundle
    detector: Engine
    classifiers: dict[str, Engine] = field(default_factory=dict)
    backend: str = "onnxruntime"
    plan_keys: dict[str, str] = field(default_factory=dict)  # TensorRT cache key per model

    def close(self) -> None:
        for engine in (self.detector, *self.classifiers.values()):
            engine.close()

    def __enter__(self) -> EngineSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_engines(bundle: Bundle, config: EnginesConfig | None = None, *, detector_batch: int = 0) -> EngineSet:
    """Open every model of a bundle on the configured backend.

    ``detector_batch`` is the number of tiles the pipeline sends per batch (the detector's
    ``max_batch`` is at least that). With TensorRT, a missing plan is built or refused according
    to ``engines.on_missing_plan``.
    """
    from edge.config import EnginesConfig

    config = config or EnginesConfig()
    if config.backend == "tensorrt":
        from edge.engines.build import open_tensorrt_engines

        return open_tensorrt_engines(bundle, config, detector_batch=detector_batch)
    if config.backend not in ("onnxruntime", "onnxruntime-cuda"):
        raise ConfigError(f"engines.backend={config.backend!r} is not one of onnxruntime, onnxruntime-cuda, tensorrt")
    from edge.engines.onnxrt import Device, OnnxRuntimeEngine

    device: Device = "cuda" if config.backend == "onnxruntime-cuda" else "cpu"
    opened: list[OnnxRuntimeEngine] = []
    try:
        for model in bundle.models:
            size = max(
                default_max_batch(model, config.max_batch),
                detector_batch if model.role == "detector" else 0,
                config.classifier_batch if model.role == "classifier" else 0,
            )
            opened.append(
                OnnxRuntimeEngine(
                    model.path,
                    name=model.name,
                    device=device,
                    intra_op_threads=config.intra_op_threads,
                    max_batch=size,
                    in_flight=config.in_flight,
                )
            )
    except BaseException:
        for engine in opened:
            engine.close()
        raise
    detector, *classifiers = opened
    log.info(
        "opened bundle %s %s on %s: %s", bundle.name, bundle.version, config.backend, ", ".join(e.name for e in opened)
    )
    return EngineSet(bundle, detector, {e.name: e for e in classifiers}, backend=detector.backend)
