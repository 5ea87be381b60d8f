"""The open engines of one bundle (:class:`EngineSet`) and the one way to open them, on any backend.

ONNX Runtime engines open here; TensorRT ones go through :mod:`edge.engines.build` (plans found in
the cache or built), imported only when that backend is asked for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edge.engines.base import CLASSIFIER_MAX_BATCH, DETECTOR_MAX_BATCH, Engine
from edge.engines.manifest import Bundle, ModelSpec
from edge.errors import ConfigError
from edge.vocab import BACKENDS

if TYPE_CHECKING:
    from edge.config import EnginesConfig
    from edge.engines.probe import GpuProbe

log = logging.getLogger(__name__)

__all__ = ["EngineSet", "default_max_batch", "open_engines", "open_tensorrt_engines"]


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
        return open_tensorrt_engines(bundle, config, detector_batch=detector_batch)
    if config.backend not in BACKENDS:
        raise ConfigError(f"engines.backend={config.backend!r} is not one of {', '.join(BACKENDS)}")
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


def open_tensorrt_engines(
    bundle: Bundle,
    config: EnginesConfig | None = None,
    *,
    detector_batch: int = 0,
    device: int = 0,
    trt: Any | None = None,
    cudart: Any | None = None,
    probe: GpuProbe | None = None,
) -> EngineSet:
    """The bundle's engines on TensorRT, as ``edge.engines.open_engines`` returns them, from ``[engines]`` settings.

    Plans are found in ``engines.plan_cache`` or built (``engines.on_missing_plan``). ``detector_batch``
    (tiles per detector batch) must fit the detector plan's max batch: a plan cannot take more.
    """
    from edge.config import EnginesConfig
    from edge.engines.build import build_options, open_tensorrt_plans

    config = config or EnginesConfig()
    options = build_options(config)
    largest = options.max_batch_for("detector")
    if detector_batch > largest:
        raise ConfigError(
            f"the tile stream sends {detector_batch} tiles per batch (stream.batch_size) but TensorRT detector plans "
            f"take at most {largest}: lower stream.batch_size to {largest} or less, or set engines.max_batch to "
            f"{detector_batch} or more (plans are then rebuilt)"
        )
    engines = open_tensorrt_plans(
        bundle,
        options,
        config.plan_cache_dir,
        on_missing=config.on_missing_plan,
        in_flight=config.in_flight,
        cuda_graphs=config.cuda_graphs,
        device=device,
        trt=trt,
        cudart=cudart,
        probe=probe,
    )
    detector = engines.pop(bundle.detector.name)
    keys = {name: str(e.sidecar.get("key", "")) for name, e in [(detector.name, detector), *engines.items()]}
    log.info("opened bundle %s %s on TensorRT: %s", bundle.name, bundle.version, ", ".join([detector.name, *engines]))
    return EngineSet(bundle, detector, dict(engines), backend="tensorrt", plan_keys=keys)
