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
INT8_MIN_DETECTION_AGREEMENT = 0.9  # an INT8 bundle against its FP32 source: F1 on slides with truth decides


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


@dataclass(frozen=True)
class F1Report:
    """MF detection F1 (MIDOG matching, counts summed over the slides) of the reference and the candidate."""

    slides: tuple[str, ...]
    reference: tuple[int, int, int]  # TP, FP, FN
    candidate: tuple[int, int, int]

    @staticmethod
    def _f1(counts: tuple[int, int, int]) -> float:
        tp, fp, fn = counts
        return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0

    @property
    def reference_f1(self) -> float:
        return self._f1(self.reference)

    @property
    def candidate_f1(self) -> float:
        return self._f1(self.candidate)

    @property
    def change(self) -> float:
        """Candidate F1 minus reference F1 (negative: the candidate finds fewer figures correctly)."""
        return self.candidate_f1 - self.reference_f1

    def to_json_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reference_f1": self.reference_f1, "candidate_f1": self.candidate_f1,
                "f1_change": self.change}


@dataclass
class VerifyReport:
    bundle: str
    backend: str
    atol: float
    rtol: float
    outputs: list[OutputReport] = field(default_factory=list)
    detections: list[DetectionReport] = field(default_factory=list)
    reference: str = "onnxruntime (CPU)"  # what the candidate was compared with
    judge_outputs: bool = True  # False: output errors are reported, detections and F1 decide (INT8 against FP32)
    min_agreement: float = MIN_DETECTION_AGREEMENT
    f1: F1Report | None = None
    max_f1_drop: float = 0.01

    @property
    def passed(self) -> bool:
        return (
            (not self.judge_outputs or all(o.passed for o in self.outputs))
            and all(d.agreement >= self.min_agreement for d in self.detections)
            and (self.f1 is None or self.f1.change >= -self.max_f1_drop)
        )

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle,
            "backend": self.backend,
            "reference": self.reference,
            "atol": self.atol,
            "rtol": self.rtol,
            "passed": self.passed,
            "outputs_judged": self.judge_outputs,
            "min_detection_agreement": self.min_agreement,
            "outputs": [{**asdict(o), "passed": o.passed} for o in self.outputs],
            "detections": [{**asdict(d), "agreement": d.agreement} for d in self.detections],
            "f1": None if self.f1 is None else {**self.f1.to_json_dict(), "max_f1_drop": self.max_f1_drop},
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


def detections_agree(
    reference: np.ndarray, candidate: np.ndarray, spec: DetectorSpec, inputs: str, radius_px: float = AGREE_RADIUS_PX
) -> DetectionReport:
    """Decode both outputs tile by tile with the pipeline's own decoder and match the candidates one to one
    (within ``radius_px``)."""
    from edge.analysis.detect import decode
    from edge.devtools.evaluate import match_points

    counts = [0, 0, 0]
    for ref_tile, got_tile in zip(reference, candidate, strict=True):
        ref, got = decode(ref_tile, spec), decode(got_tile, spec)
        matched = match_points(np.column_stack([ref.cx, ref.cy]), np.column_stack([got.cx, got.cy]), radius_px)
        counts = [counts[0] + len(ref), counts[1] + len(got), counts[2] + matched.tp]
    return DetectionReport(inputs, *counts)


def random_batches(model: ModelSpec, batches: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    for _ in range(batches):
        yield rng.integers(0, 256, (batch_size, model.size, model.size, 3), dtype=np.uint8)


def slide_inputs(bundle: Bundle, folder: Path, seed: int, max_tiles: int) -> dict[str, list[np.ndarray]]:
    """Realistic inputs: detector tiles and classifier crops (at planted objects) from a synthetic slide."""
    from edge.config import Config, StreamConfig, TilingConfig
    from edge.devtools.synth import SynthParams, default_truth_path, generate_slide
    from edge.wsi.slide import open_slide
    from edge.wsi.stream import open_stream, plan_slide

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
    agree_radius_px: float = AGREE_RADIUS_PX,
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
                    d = detections_agree(ref_out[model.output], got_out[model.output], model, kind, agree_radius_px)
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
    agree_radius_px: float = AGREE_RADIUS_PX,
) -> VerifyReport:
    """Random batches and synthetic-slide tiles and crops through both engine sets (0 tiles: random only)."""
    inputs: dict[str, dict[str, list[np.ndarray]]] = {"random": {}}
    for model in bundle.models:
        size = min(2 if model.role == "detector" else 8, _engine(candidate, model.name).max_batch)
        inputs["random"][model.name] = list(random_batches(model, random_count, size, seed))
    if slide_tiles:
        with tempfile.TemporaryDirectory(prefix="mitosis-edge-verify-") as tmp:
            inputs["slide"] = slide_inputs(bundle, Path(tmp), seed, slide_tiles)
    return verify_engines(reference, candidate, inputs, atol=atol, rtol=rtol, agree_radius_px=agree_radius_px)


def f1_on_slides(
    reference: EngineSet, candidate: EngineSet, slides: list[tuple[str, str]], config: Any
) -> F1Report:
    """Analyze each (slide, truth) with both engine sets through the whole pipeline; F1 of each against truth."""
    from edge.analysis.pipeline import analyze_slide
    from edge.devtools.evaluate import DEFAULT_MATCH_RADIUS_UM, match_points, read_truth

    counts = {"reference": [0, 0, 0], "candidate": [0, 0, 0]}
    for slide, truth_path in slides:
        truth = read_truth(truth_path)  # read first: a bad truth file fails before minutes of inference
        for label, engines in (("reference", reference), ("candidate", candidate)):
            figures = analyze_slide(slide, config, engines=engines).result.figures
            points = np.array([(f.x_um, f.y_um) for f in figures if f.is_mitotic], np.float64).reshape(-1, 2)
            m = match_points(points, truth.points_um, DEFAULT_MATCH_RADIUS_UM)
            counts[label] = [counts[label][0] + m.tp, counts[label][1] + m.fp, counts[label][2] + m.fn]
    ref, got = counts["reference"], counts["candidate"]
    return F1Report(tuple(s for s, _ in slides), (ref[0], ref[1], ref[2]), (got[0], got[1], got[2]))
