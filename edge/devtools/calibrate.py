"""Calibration as in the paper: choose ensemble weights and the MF threshold that maximise F1 on validation slides.

The detector's score threshold is searched too: every candidate the detector drops is one crop less to
classify, so the highest detector threshold that still reaches the best F1 is chosen.
Filtering the cached candidates by detector score is exact: NMS and the merge across tiles keep the
higher score, so a lower-scoring box never removed a higher one.

One inference pass per slide caches every candidate's position and per-model p(MF); the grid search
then only recombines those numbers (no engine runs per grid point). The result is written as a new
bundle version beside a calibration report; a bundle is never edited in place.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.devtools.evaluate import DEFAULT_MATCH_RADIUS_UM, DetectionMetrics, match_points
from edge.engines.manifest import (
    MANIFEST_NAME,
    Bundle,
    load_bundle,
    manifest_tables,
    new_bundle_folder,
    set_toml_key,
    source_bundle_json,
    writing_bundle_version,
)
from edge.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_WEIGHT_STEP = 0.05
DEFAULT_THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.05, 0.995, 0.01))
TIE_TOLERANCE = 0.005  # F1 this close to the best counts as a tie: on a small validation set it is one figure
REPORT_NAME = "calibration.json"


@dataclass(frozen=True)
class CachedSlide:
    """One validation slide after a single inference pass: candidates, per-model p(MF), and the truth."""

    name: str
    points_um: np.ndarray  # (N, 2) candidate centres
    p_mitotic: dict[str, np.ndarray]  # model name -> (N,)
    truth_um: np.ndarray  # (T, 2) true mitotic figures
    detector_score: np.ndarray | None = None  # (N,); None: detector thresholds are not searched

    def above(self, detector_threshold: float) -> CachedSlide:
        """The candidates a detector with this score threshold would have proposed."""
        if self.detector_score is None:
            return self
        keep = self.detector_score >= detector_threshold
        return CachedSlide(
            self.name, self.points_um[keep], {m: p[keep] for m, p in self.p_mitotic.items()}, self.truth_um,
            self.detector_score[keep],
        )


@dataclass(frozen=True)
class GridPoint(DetectionMetrics):
    weights: tuple[float, ...]
    threshold: float
    tp: int
    fp: int
    fn: int
    detector_threshold: float | None = None  # None: the bundle's own
    candidates: int = 0  # candidates over all slides at this detector threshold (classifier work)

    def counts(self) -> tuple[int, int, int]:
        return self.tp, self.fp, self.fn

    @property
    def score(self) -> float:
        """F1, with 0 where it is undefined (no figures at all)."""
        return self.f1 or 0.0


@dataclass
class Calibration:
    models: tuple[str, ...]
    best: GridPoint
    grid: list[GridPoint] = field(default_factory=list)
    slides: list[str] = field(default_factory=list)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "models": list(self.models),
            "best": {"weights": dict(zip(self.models, self.best.weights, strict=True)),
                     "mitotic_threshold": self.best.threshold, "detector_score_threshold": self.best.detector_threshold,
                     "candidates": self.best.candidates, "f1": self.best.score,
                     "tp": self.best.tp, "fp": self.best.fp, "fn": self.best.fn},
            "slides": self.slides,
            "detector": self.detector_summary(),
            "grid": [{"weights": list(g.weights), "threshold": g.threshold, "detector_threshold": g.detector_threshold,
                      "f1": round(g.score, 6), "tp": g.tp, "fp": g.fp, "fn": g.fn} for g in self.grid],
        }


    def detector_summary(self) -> list[dict[str, Any]]:
        """Per detector threshold: the candidates left and the best F1 reachable with them."""
        rows: dict[float | None, dict[str, Any]] = {}
        for g in self.grid:
            row = rows.setdefault(g.detector_threshold, {"score_threshold": g.detector_threshold,
                                                         "candidates": g.candidates, "best_f1": 0.0})
            row["best_f1"] = max(row["best_f1"], round(g.score, 6))
        return list(rows.values())


def slides_from_reviews(store: Any, models: Sequence[str]) -> list[CachedSlide]:
    """Signed reviews (the newest of each job) as validation slides: no inference, the stored candidates are cached.

    Each reviewed hotspot is one "slide": its candidates with their stored per-model p(MF) and detector
    score; the truth is every figure the pathologist left mitotic, changed subtype, accepted or added.
    Rejected candidates are the negatives. Raises ConfigError when no review exists or a model's scores
    are missing (the results came from another bundle).
    """
    from edge.analysis.review import reviewed_class
    from edge.service.store import result_mpp

    newest: dict[int, Any] = {}
    for review in store.list_reviews():
        newest.setdefault(review.job_id, review)  # newest first
    if not newest:
        raise ConfigError(f"no signed review in {store.path}; sign reviews on the review page first")
    slides = []
    for job_id, review in sorted(newest.items()):
        result = store.get_result(job_id)
        decisions = {c.get("detection_id"): c.get("decision") for c in review.changes if "detection_id" in c}
        candidates = store.hotspot_detections(result)
        missing = sorted({m for _, _, f in candidates for m in models if f"mitotic:{m}" not in f.scores})
        if missing:
            raise ConfigError(
                f"job {job_id}'s detections have no scores of model(s) {', '.join(missing)}: they came from another "
                "bundle; calibrate the bundle that produced the reviewed results"
            )
        mpp_x, mpp_y = result_mpp(result)
        truth = [[f.x_um, f.y_um] for i, kind, f in candidates
                 if reviewed_class(kind, decisions.get(i)) != "non_mitotic"]
        truth += [[float(c["x_px"]) * mpp_x, float(c["y_px"]) * mpp_y] for c in review.changes
                  if c["decision"] == "add"]
        slides.append(CachedSlide(
            name=f"job {job_id} ({Path(result.slide_path).name}, review {review.review_id} by {review.reviewer})",
            points_um=np.array([[f.x_um, f.y_um] for _, _, f in candidates], dtype=float).reshape(-1, 2),
            p_mitotic={m: np.array([f.scores[f"mitotic:{m}"] for _, _, f in candidates], dtype=float) for m in models},
            truth_um=np.array(truth, dtype=float).reshape(-1, 2),
            detector_score=np.array([f.detector_score for _, _, f in candidates], dtype=float),
        ))
    return slides


def detector_threshold_grid(current: float, *, step: float = 0.05, highest: float = 0.6) -> list[float]:
    """The bundle's detector threshold and every multiple of ``step`` above it up to ``highest``.

    >>> detector_threshold_grid(0.14, step=0.1, highest=0.4)
    [0.14, 0.2, 0.3, 0.4]
    """
    above = [round(k * step, 6) for k in range(1, round(highest / step) + 1) if k * step > current + 1e-9]
    return [current, *above]


def weight_grid(models: int, step: float) -> list[tuple[float, ...]]:
    """Every weight vector on the simplex with the given step (weights sum to 1).

    >>> weight_grid(2, 0.5)
    [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)]
    >>> len(weight_grid(3, 0.1))
    66
    """
    if not 0 < step <= 1:
        raise ConfigError(f"weight step={step} must be in (0, 1]")
    n = round(1 / step)
    if models == 1:
        return [(1.0,)]
    combos = [c for c in itertools.product(range(n + 1), repeat=models - 1) if sum(c) <= n]
    return [tuple(round(k / n, 6) for k in (*c, n - sum(c))) for c in sorted(combos)]


def grid_search(
    slides: Sequence[CachedSlide],
    models: Sequence[str],
    *,
    weight_step: float = DEFAULT_WEIGHT_STEP,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    detector_thresholds: Sequence[float] = (),
    radius_um: float = DEFAULT_MATCH_RADIUS_UM,
) -> Calibration:
    """F1 (TP, FP, FN summed over slides, MIDOG matching) for every detector threshold x weights x MF
    threshold; the best wins. No ``detector_thresholds``: the candidates as cached.

    Ties are broken by ``choose_best``: the highest detector threshold with the best F1, then the
    middle of the widest plateau of best F1 over weights and MF thresholds.
    """
    if not slides:
        raise ConfigError("calibration needs at least one slide with truth")
    if not any(len(s.truth_um) for s in slides):
        raise ConfigError(
            f"the {len(slides)} validation slide(s) hold no true mitotic figure, so F1 is undefined for every "
            "setting: add slides with mitoses (mitosis-free slides are welcome beside them, they count false positives)"
        )
    grid: list[GridPoint] = []
    for detector_threshold in detector_thresholds or (None,):
        kept = [s if detector_threshold is None else s.above(detector_threshold) for s in slides]
        candidates = sum(len(s.points_um) for s in kept)
        for weights in weight_grid(len(models), weight_step):
            per_slide = [_weighted(s, models, weights) for s in kept]
            for threshold in thresholds:
                tp = fp = fn = 0
                for slide, p in zip(kept, per_slide, strict=True):
                    m = match_points(slide.points_um[p >= threshold], slide.truth_um, radius_um)
                    tp, fp, fn = tp + m.tp, fp + m.fp, fn + m.fn
                grid.append(GridPoint(weights, float(threshold), tp, fp, fn, detector_threshold, candidates))
    return Calibration(tuple(models), choose_best(grid), grid, [s.name for s in slides])


def choose_best(grid: Sequence[GridPoint], tolerance: float = TIE_TOLERANCE) -> GridPoint:
    """The best F1; among near-equals (within ``tolerance``), the most robust point: the weights whose
    best-F1 thresholds form the widest run, then the most even weights, and the threshold in the middle
    of that run.

    Validation sets are small, so many points tie or differ by one figure; the middle of a wide plateau
    is the choice least likely to fall off it on new slides.
    """
    best = max(round(g.score, 9) for g in grid)
    top = best - tolerance
    detector_thresholds = sorted({g.detector_threshold for g in grid if g.detector_threshold is not None})
    if detector_thresholds:
        # The detector threshold trades recall for work, so no tolerance here: the highest threshold
        # that still reaches the very best F1 (no validation figure lost), classifying the fewest crops.
        chosen = max(d for d in detector_thresholds
                     if max(round(g.score, 9) for g in grid if g.detector_threshold == d) >= best)
        grid = [g for g in grid if g.detector_threshold == chosen]
    by_weights: dict[tuple[float, ...], list[GridPoint]] = {}
    for g in grid:
        by_weights.setdefault(g.weights, []).append(g)
    best_run: list[GridPoint] = []
    best_key: tuple[int, float] | None = None
    for weights, points in by_weights.items():
        run: list[GridPoint] = []
        for g in sorted(points, key=lambda g: g.threshold):
            if round(g.score, 9) >= top:
                run.append(g)
                continue
            best_key, best_run = _longer(run, weights, best_key, best_run)
            run = []
        best_key, best_run = _longer(run, weights, best_key, best_run)
    return best_run[(len(best_run) - 1) // 2]


def _longer(
    run: list[GridPoint], weights: tuple[float, ...], best_key: tuple[int, float] | None, best_run: list[GridPoint]
) -> tuple[tuple[int, float] | None, list[GridPoint]]:
    if not run:
        return best_key, best_run
    key = (len(run), -float(np.ptp(weights)))
    return (key, run) if best_key is None or key > best_key else (best_key, best_run)


def _weighted(slide: CachedSlide, models: Sequence[str], weights: tuple[float, ...]) -> np.ndarray:
    total = np.zeros(len(slide.points_um))
    for name, w in zip(models, weights, strict=True):
        total += w * slide.p_mitotic[name]
    return total / max(sum(weights), 1e-12)


# --- writing the calibrated bundle ----------------------------------------------------------------


def calibrated_manifest(
    text: str, weights: dict[str, float], threshold: float, version: str, detector_threshold: float | None = None
) -> str:
    """The manifest text with new classifier weights, MF threshold, detector score threshold (when given)
    and version; comments and order kept."""
    out = []
    for header, name, block in manifest_tables(text):
        new = block
        if header == "[bundle]":
            new = set_toml_key(block, "version", json.dumps(version))
        elif header == "[[classifier]]" and name in weights:
            new = set_toml_key(block, "weight", f"{weights[name]:g}")
        elif header == "[detector]" and detector_threshold is not None:
            new = set_toml_key(block, "score_threshold", f"{detector_threshold:g}")
        elif header == "[decision]":
            new = set_toml_key(block, "mitotic_threshold", f"{threshold:g}")
        out.append(new)
    return "".join(out)


def write_calibrated_bundle(
    bundle: Bundle, calibration: Calibration, out: str | Path, *, version: str | None = None
) -> Bundle:
    """Copy the bundle to ``out`` with the calibrated values and a calibration report; returns it loaded."""
    target = new_bundle_folder(bundle, out, "calibration")
    stamp = _dt.datetime.now(_dt.UTC)
    version = version or f"{bundle.version}+cal.{stamp:%Y%m%d.%H%M%S}"  # unique: two calibrations never clash
    weights = dict(zip(calibration.models, calibration.best.weights, strict=True))
    with writing_bundle_version(bundle, target, REPORT_NAME) as partial:
        manifest = partial / MANIFEST_NAME
        manifest.write_text(
            calibrated_manifest(
                manifest.read_text(encoding="utf-8"), weights, calibration.best.threshold, version,
                calibration.best.detector_threshold,
            ),
            encoding="utf-8",
        )
        report = {
            "source_bundle": source_bundle_json(bundle),
            "version": version,
            "created_at": stamp.isoformat(timespec="seconds"),
            "matching_radius_um": DEFAULT_MATCH_RADIUS_UM,
            **calibration.to_json_dict(),
        }
        (partial / REPORT_NAME).write_text(json.dumps(report, indent=1), encoding="utf-8")
    loaded = load_bundle(target)
    log.info("calibrated bundle %s %s written to %s (F1 %.3f)", loaded.name, version, target, calibration.best.score)
    return loaded
