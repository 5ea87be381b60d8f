"""Parity of a backend against ONNX Runtime on the CPU: the same inputs through both, errors per output.

The core (``compare_outputs``, ``detections_agree``) is pure; ``verify_bundle`` feeds both engine
sets random batches and realistic ones (tiles and crops of a synthetic slide) and collects reports.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.engines import EngineSet
from edge.engines.base import Engine
from edge.engines.manifest import Bundle, DetectorSpec, ModelSpec

log = logging.getLogger(__name__)

DEFAULT_ATOL = 1e-3
DEFAULT_RTOL = 1e-3
FP16_TOLERANCE = 2e-2  # atol and rtol suggested for fp16 / int8 plans
MIN_DETECTION_AGREEMENT = 0.98


@dataclass(frozen=True)
class OutputReport:
    """Worst disagreement on one output of one model over every input batch."""

    model: str
    output: str
    inputs: str  # "random" or "slide"
    max_abs_error: float
    max_rel_error: float
    worst_excess: float  # max of |a - b| - (atol + rtol * |ref|); > 0 fails
    elements: int

    @property
    def passed(self) -> bool:
        return self.worst_excess <= 0


@dataclass(frozen=True)
class DetectionReport:
    """How many detections above the score threshold the two backends share."""

    inputs: str
    reference: int
    candidate: int
    agreed: int

    @property
    def agreement(self) -> float:
        """Shared detections over the larger of the two counts (1.0 when both found none)."""
        most = max(self.reference, self.candidate)
        return self.agreed / most if most else 1.0


@dataclass
class VerifyReport:
    bundle: str
    backend: str
    atol: float
    rtol: float
    outputs: list[OutputReport] = field(default_factory=list)
    detections: list[DetectionReport] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs) and all(
            d.agreement >= MIN_DETECTION_AGREEMENT for d in self.detections
        )

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle,
            "backend": self.backend,
            "atol": self.atol,
            "rtol": self.rtol,
            "passed": self.passed,
            "outputs": [{**asdict(o), "passed": o.passed} for o in self.outputs],
            "detections": [{**asdict(d), "agreement": d.agreement} for d in self.detections],
        }


def compare_outputs(
    reference: np.ndarray, candidate: np.ndarray, atol: float, rtol: float
) -> tuple[float, float, float]:
    """(max absolute error, max relative error, worst excess over ``atol + rtol * |reference|``).

    >>> compare_outputs(np.array([1.0, 2.0]), np.array([1.0, 2.5]), 0.1, 0.1)
    (0.5, 0.25, 0.2)
    """
    ref = np.asarray(reference, np.float64)
    got = np.asarray(candidate, np.float64)
    if ref.shape != got.shape:
        return float("inf"), float("inf"), float("inf")
    if ref.size == 0:
        return 0.0, 0.0, -atol
    diff = np.abs(ref - got)
    diff[np.isnan(ref) != np.isnan(got)] = np.inf
    diff[np.isnan(ref) & np.isnan(got)] = 0.0
    rel = diff / np.maximum(np.abs(ref), 1e-6)
    excess = diff - (atol + rtol * np.abs(ref))
    return float(round(diff.max(), 12)), float(round(rel.max(), 12)), float(round(excess.max(), 12))


AGREE_RADIUS_PX = 1.0  # two backends' detections of one figure lie this close in tile px


def detections_agree(reference: np.ndarray, candidate: np.ndarray, spec: DetectorSpec, inputs: str) -> DetectionReport:
    """Decode both outputs tile by tile with the pipeline's own decoder and match the candidates one to one."""
    from edge.detect import decode
    from edge.evaluate import match_points

    counts = [0, 0, 0]
    for ref_tile, got_tile in zip(reference, candidate, strict=True):
        ref, got = decode(ref_tile, spec), decode(got_tile, spec)
        matched = match_points(np.column_stack([ref.cx, ref.cy]), np.column_stack([got.cx, got.cy]), AGREE_RADIUS_PX)
        counts = [counts[0] + len(ref), counts[1] + len(got), counts[2] + matched.tp]
    return DetectionReport(inputs, *counts)


def random_batches(model: ModelSpec, batches: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    for _ in range(batches):
        yield rng.integers(0, 256, (batch_size, model.size, model.size, 3), dtype=np.uint8)


def slide_inputs(bundle: Bundle, folder: Path, seed: int, max_tiles: int) -> dict[str, list[np.ndarray]]:
    """Realistic inputs: detector tiles and classifier crops (at planted objects) from a synthetic slide."""
    from edge.config import Config, StreamConfig, TilingConfig
    from edge.slide import open_slide
    from edge.stream import open_stream, plan_slide
    from edge.synth import SynthParams, default_truth_path, generate_slide

    side = max(4096, 4 * bundle.detector.size)
    path = folder / "verify-slide.tiff"
    truth = generate_slide(path, SynthParams(width=side, height=side, seed=seed), default_truth_path(path))
    config = Config(tiling=TilingConfig(tile_size=bundle.detector.size, overlap=0), stream=StreamConfig(batch_size=1))
    inputs: dict[str, list[np.ndarray]] = {}
    with open_slide(path) as slide:
        sp = plan_slide(slide, config)
        tiles: list[np.ndarray] = []
        with open_stream(slide, sp, config) as stream:
            for batch in stream:
                tiles.append(batch.pixels.copy())
                if len(tiles) >= max_tiles:
                    break
        inputs[bundle.detector.name] = tiles
        for clf in bundle.classifiers:
            crops = []
            half = clf.size // 2
            for obj in truth.objects[: 4 * max_tiles]:
                x0 = min(max(0, int(obj.x_px) - half), slide.info.width - clf.size)
                y0 = min(max(0, int(obj.y_px) - half), slide.info.height - clf.size)
                crops.append(slide.read_level(0, x0, y0, clf.size, clf.size))
            inputs[clf.name] = [np.stack(crops[i : i + 8]) for i in range(0, len(crops), 8)]
    return inputs


def verify_engines(
    reference: EngineSet,
    candidate: EngineSet,
    inputs: dict[str, dict[str, list[np.ndarray]]],
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> VerifyReport:
    """Run ``inputs[kind][model]`` batches through both engine sets and compare every output."""
    bundle = reference.bundle
    report = VerifyReport(bundle.name, candidate.backend, atol, rtol)
    for kind, per_model in inputs.items():
        for model in bundle.models:
            batches = per_model.get(model.name, [])
            if not batches:
                continue
            ref_engine = _engine(reference, model.name)
            got_engine = _engine(candidate, model.name)
            worst: dict[str, tuple[float, float, float, int]] = {}
            agreement = [0, 0, 0]
            for batch in batches:
                ref_out = ref_engine.infer(batch)
                got_out = got_engine.infer(batch)
                for name, ref_value in ref_out.items():
                    got_value = got_out.get(name)
                    errs = (
                        compare_outputs(ref_value, got_value, atol, rtol)
                        if got_value is not None
                        else (float("inf"),) * 3
                    )
                    prev = worst.get(name, (0.0, 0.0, float("-inf"), 0))
                    worst[name] = (
                        max(prev[0], errs[0]),
                        max(prev[1], errs[1]),
                        max(prev[2], errs[2]),
                        prev[3] + int(ref_value.size),
                    )
                if isinstance(model, DetectorSpec) and model.output in got_out:
                    d = detections_agree(ref_out[model.output], got_out[model.output], model, kind)
                    agreement = [agreement[0] + d.reference, agreement[1] + d.candidate, agreement[2] + d.agreed]
            for name, (abs_err, rel_err, excess, n) in worst.items():
                report.outputs.append(OutputReport(model.name, name, kind, abs_err, rel_err, excess, n))
            if isinstance(model, DetectorSpec):
                report.detections.append(DetectionReport(kind, *agreement))
    return report


def _engine(engines: EngineSet, name: str) -> Engine:
    return engines.detector if name == engines.bundle.detector.name else engines.classifiers[name]


def verify_bundle(
    bundle: Bundle,
    reference: EngineSet,
    candidate: EngineSet,
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    random_count: int = 2,
    slide_tiles: int = 4,
    seed: int = 7,
) -> VerifyReport:
    """Random batches and synthetic-slide tiles and crops through both engine sets (0 tiles: random only)."""
    inputs: dict[str, dict[str, list[np.ndarray]]] = {"random": {}}
    for model in bundle.models:
        size = min(2 if model.role == "detector" else 8, _engine(candidate, model.name).max_batch)
        inputs["random"][model.name] = list(random_batches(model, random_count, size, seed))
    if slide_tiles:
        with tempfile.TemporaryDirectory(prefix="mitosis-edge-verify-") as tmp:
            inputs["slide"] = slide_inputs(bundle, Path(tmp), seed, slide_tiles)
    return verify_engines(reference, candidate, inputs, atol=atol, rtol=rtol)
