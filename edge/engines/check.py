"""The probe run of `engines check`: each model once on a small batch, its real outputs against the manifest.

Loading compares declared graph shapes, which an exporter often leaves symbolic (``[batch, 6, anchors]``),
so a wrong ``output_format`` or score type would otherwise surface only when a slide ran. Here every model runs
on two inputs (all zeros and a synthetic H&E-like image) and the concrete shapes and values are judged by
pure functions: ``detector_output_problems`` and ``score_type_findings``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edge.engines.manifest import Bundle, ClassifierSpec, DetectorSpec, HeadSpec, ScoreKind

if TYPE_CHECKING:
    from edge.engines.base import Engine

PROBE_BATCH = 2  # zeros and a synthetic image: a concrete batch that is not 1


@dataclass
class ProbeReport:
    """What the probe run found: ``problems`` make `engines check` fail, ``warnings`` and ``notes`` do not."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shapes: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # model -> output -> concrete shape

    def to_json_dict(self) -> dict[str, Any]:
        return {"problems": self.problems, "warnings": self.warnings, "notes": self.notes, "shapes": self.shapes}


def synthetic_image(size: int, seed: int = 0) -> np.ndarray:
    """A uint8 ``[size, size, 3]`` H&E-like image: pink stroma with dark purple nuclei (deterministic)."""
    rng = np.random.default_rng(seed)
    image = np.empty((size, size, 3), np.float32)
    image[:] = (232, 180, 210)
    image += rng.normal(0, 8, (size, size, 1)).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(max(3, size * size // 20000)):
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(4, 12)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (80, 40, 120)
    return np.clip(image, 0, 255).astype(np.uint8)


def _expected_detector_shape(output_format: str, classes: int) -> tuple[int, int]:
    """(axis, size) that identifies a format: 5+C columns last (yolo_raw), 4+C rows (yolov8), 6 columns (boxes)."""
    return {"yolo_raw": (2, 5 + classes), "yolov8": (1, 4 + classes), "boxes": (2, 6)}[output_format]


def detector_output_problems(shape: tuple[int, ...], spec: DetectorSpec, batch: int) -> list[str]:
    """Problems with a detector output's concrete shape for ``batch`` inputs; names the format it looks like.

    >>> from pathlib import Path
    >>> spec = DetectorSpec("detector", "detector", Path("d.onnx"), "", "images", 1024, 0.25,
    ...                     output="output0", output_format="yolo_raw", classes=("mitotic_figure", "imposter"))
    >>> print(detector_output_problems((2, 6, 21504), spec, 2)[0].split("; ")[-1])
    this output looks like yolov8 (21504 anchors): set output_format = "yolov8"
    """
    c = len(spec.classes)
    where = f"{spec.path.name} (detector)"
    if len(shape) != 3:
        return [f"{where}: output {spec.output} is {list(shape)} for a probe batch of {batch}; expected rank 3"]
    problems = []
    if shape[0] != batch:
        problems.append(
            f"{where}: output {spec.output} has {shape[0]} rows on the batch axis for a probe batch of {batch}"
            " (a fixed batch inside the graph: re-export with a dynamic batch axis)"
        )
    axis, size = _expected_detector_shape(spec.output_format, c)
    if shape[axis] == size:
        return problems
    label = {"yolo_raw": f"[B, N, 5+C] = [{batch}, N, {5 + c}]", "yolov8": f"[B, 4+C, N] = [{batch}, {4 + c}, N]",
             "boxes": f"[B, K, 6] = [{batch}, K, 6]"}[spec.output_format]
    message = (
        f"{where}: output {spec.output} is {list(shape)} for a probe batch of {batch}, but output_format ="
        f' "{spec.output_format}" expects {label} with C={c} classes {list(spec.classes)}'
    )
    guesses = [f for f in ("yolov8", "yolo_raw", "boxes") if f != spec.output_format
               and shape[_expected_detector_shape(f, c)[0]] == _expected_detector_shape(f, c)[1]]
    if guesses:
        fmt = guesses[0]
        anchors = shape[2] if fmt == "yolov8" else shape[1]
        message += f'; this output looks like {fmt} ({anchors} anchors): set output_format = "{fmt}"'
    elif spec.output_format == "yolov8" and shape[1] > 4:
        message += f"; if it is yolov8, it has {shape[1] - 4} class rows: list that many classes"
    elif spec.output_format == "yolo_raw" and shape[2] > 5:
        message += f"; if it is yolo_raw, it has {shape[2] - 5} class columns: list that many classes"
    return [*problems, message]


def detector_candidate_scores(output: np.ndarray, spec: DetectorSpec) -> np.ndarray:
    """The score values the decoder reads (objectness and candidate-class scores), flattened."""
    if spec.output_format == "yolov8":
        return output[:, [4 + i for i in spec.candidate_indices], :].ravel()
    if spec.output_format == "yolo_raw":
        return output[..., [4] + [5 + i for i in spec.candidate_indices]].ravel()
    return output[..., 4].ravel()


def score_type_findings(values: np.ndarray, scores: ScoreKind, what: str) -> tuple[list[str], list[str]]:
    """(problems, warnings) about ``scores`` given the values a head or detector really produced.

    Probabilities outside [0, 1] are logits (a problem: every threshold would be wrong). Logits that
    all lie in [0, 1] are most likely probabilities already (a warning: the sigmoid would squash them
    into 0.5..0.73).

    >>> score_type_findings(np.array([0.1, 0.9]), "logits", "x")[1][0]  # doctest: +ELLIPSIS
    'x: scores = "logits" but every probe score lies in [0, 1] (0.1 .. 0.9)...'
    >>> score_type_findings(np.array([-3.0, 2.0]), "probabilities", "x")[0][0]  # doctest: +ELLIPSIS
    'x: scores = "probabilities" but probe scores lie outside [0, 1] (-3 .. 2)...'
    """
    finite = values[np.isfinite(values)]
    if finite.size != values.size:
        return [f"{what}: the probe gave {values.size - finite.size} NaN or infinite scores"], []
    if finite.size == 0:
        return [], []
    lo, hi = float(finite.min()), float(finite.max())
    if scores == "probabilities" and (lo < 0 or hi > 1):
        return [
            f'{what}: scores = "probabilities" but probe scores lie outside [0, 1] ({lo:.3g} .. {hi:.3g}):'
            ' these are logits; set scores = "logits" (mitosis-edge then applies the sigmoid/softmax)'
        ], []
    if scores == "logits" and lo >= 0 and hi <= 1:
        return [], [
            f'{what}: scores = "logits" but every probe score lies in [0, 1] ({lo:.3g} .. {hi:.3g}); an export'
            ' that already applies the sigmoid (Ultralytics does) needs scores = "probabilities"'
        ]
    return [], []


def probe_batch(size: int) -> np.ndarray:
    """The probe inputs: one all-zero image and one synthetic H&E-like image, uint8 NHWC."""
    return np.stack([np.zeros((size, size, 3), np.uint8), synthetic_image(size)])


def probe_bundle(bundle: Bundle, engines: dict[str, Engine]) -> ProbeReport:
    """Run each model in ``engines`` (by model name) once on ``probe_batch`` and judge its outputs."""
    report = ProbeReport()
    for clf in bundle.unused_classifiers:
        report.notes.append(
            f"classifier {clf.name} is not run: its MF weight is 0"
            f"{'' if clf.mitotic else ' (it has no MF head)'} and it has no atypical head in use"
            f" (decision.atypical_heads = {list(bundle.decision.atypical_heads)})"
        )
    for clf in bundle.subtype_only:
        report.notes.append(f"classifier {clf.name} subtypes only: it runs on candidates that passed the MF threshold")
    for model in bundle.models:
        engine = engines.get(model.name)
        if engine is None:
            continue
        outputs = engine.infer(probe_batch(model.size))
        report.shapes[model.name] = {name: list(np.shape(v)) for name, v in outputs.items()}
        if isinstance(model, DetectorSpec):
            out = np.asarray(outputs[model.output])
            problems = detector_output_problems(out.shape, model, PROBE_BATCH)
            report.problems.extend(problems)
            if not problems:
                found, warned = score_type_findings(
                    detector_candidate_scores(out, model).astype(np.float64), model.scores,
                    f"{model.path.name} (detector) output {model.output}",
                )
                report.problems.extend(found)
                report.warnings.extend(warned)
        elif isinstance(model, ClassifierSpec):
            for label, head in (("mitotic", model.mitotic), ("atypical", model.atypical)):
                if head is not None:
                    _probe_head(report, model, label, head, np.asarray(outputs[head.output]))
    return report


def _probe_head(report: ProbeReport, model: ClassifierSpec, label: str, head: HeadSpec, value: np.ndarray) -> None:
    where = f"{model.path.name} ({model.name}) {label} head {head.output}"
    if value.ndim == 0 or value.shape[0] != PROBE_BATCH:
        report.problems.append(
            f"{where}: gave shape {list(value.shape)} for a probe batch of {PROBE_BATCH}; expected [B] or [B, K]"
        )
        return
    found, warned = score_type_findings(value.astype(np.float64).ravel(), head.scores, where)
    report.problems.extend(found)
    report.warnings.extend(warned)


def probe_bundle_on_cpu(bundle: Bundle, intra_op_threads: int = 0) -> ProbeReport:
    """``probe_bundle`` with ONNX Runtime on the CPU, for every model that the pipeline runs."""
    from edge.engines.onnxrt import OnnxRuntimeEngine

    unused = {c.name for c in bundle.unused_classifiers}
    engines: dict[str, Engine] = {}
    try:
        for model in bundle.models:
            if model.name not in unused:
                engines[model.name] = OnnxRuntimeEngine(
                    model.path, name=model.name, intra_op_threads=intra_op_threads, max_batch=PROBE_BATCH
                )
        return probe_bundle(bundle, engines)
    finally:
        for engine in engines.values():
            engine.close()
