"""Detection and subtyping metrics against ground truth, by the MIDOG protocol.

A prediction within 7.5 µm of a true mitotic figure is a true positive; each truth and each
prediction is matched at most once. The matching is an optimal assignment: the most matches,
then the smallest total distance (scipy's `linear_sum_assignment` on each connected group of
points within the radius). TP, FP and FN are summed over images before F1 is computed.

Pure cores (`match_points`, `evaluate`) take arrays; the readers turn this project's
result.json, MIDOG "Multiple points" JSON, synthetic truth JSON or MIDOG++ COCO JSON into
`PointSet`s.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from edge.analysis.scoring import DEFAULT_HOTSPOT_AREA_MM2, find_hotspot, hotspot_radius_um
from edge.devtools.synth.truth import TRUTH_SCHEMA as SYNTH_TRUTH_SCHEMA
from edge.devtools.synth.truth import SynthTruth
from edge.errors import ConfigError

__all__ = [
    "DEFAULT_MATCH_RADIUS_UM",
    "DEFAULT_TRUTH_MPP",
    "EvaluationReport",
    "ImageEvaluation",
    "Matching",
    "PointSet",
    "SubtypingScores",
    "evaluate",
    "evaluate_image",
    "match_points",
    "predictions_from_json",
    "read_json",
    "read_predictions",
    "read_truth",
    "truth_from_json",
]

logger = logging.getLogger(__name__)

DEFAULT_MATCH_RADIUS_UM = 7.5  # MIDOG: 30 px at 0.25 µm/px
DEFAULT_TRUTH_MPP = 0.25  # µm/px of MIDOG++ images (roughly; scanners differ a little)
RESULT_SCHEMA = "mitosis-edge/result/1"

FloatArray = NDArray[np.float64]


# --- matching ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Matching:
    """Matched (prediction index, truth index) pairs, unmatched predictions (FP) and truths (FN)."""

    tp_pairs: list[tuple[int, int]]
    fp_indices: list[int]
    fn_indices: list[int]

    @property
    def tp(self) -> int:
        return len(self.tp_pairs)

    @property
    def fp(self) -> int:
        return len(self.fp_indices)

    @property
    def fn(self) -> int:
        return len(self.fn_indices)


def _as_points(points: NDArray[np.floating] | Sequence[Sequence[float]], name: str) -> FloatArray:
    array = np.asarray(points, dtype=np.float64)
    if array.size == 0:
        return np.empty((0, 2), dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2), got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains nan or inf")
    return array


def match_points(
    pred_um: NDArray[np.floating] | Sequence[Sequence[float]],
    truth_um: NDArray[np.floating] | Sequence[Sequence[float]],
    radius_um: float = DEFAULT_MATCH_RADIUS_UM,
) -> Matching:
    """Match predictions to truths within `radius_um` (inclusive), each at most once.

    Optimal: the most pairs, and among those the smallest summed distance. Points are split
    into groups connected by within-radius links, so the assignment stays small on whole slides.

    >>> m = match_points([[0.0, 7.4], [50.0, 0.0]], [[0.0, 0.0], [0.0, 100.0]])
    >>> m.tp_pairs, m.fp_indices, m.fn_indices
    ([(0, 0)], [1], [1])
    """
    pred = _as_points(pred_um, "pred_um")
    truth = _as_points(truth_um, "truth_um")
    radius = float(radius_um)
    if not math.isfinite(radius) or radius <= 0:
        raise ConfigError(f"radius_um={radius_um!r} must be a positive number of µm")
    n_pred, n_truth = len(pred), len(truth)
    pairs: list[tuple[int, int]] = []
    if n_pred and n_truth:
        links = cKDTree(pred).sparse_distance_matrix(cKDTree(truth), radius, output_type="ndarray")
        if len(links):
            p_idx = links["i"].astype(np.int64)
            t_idx = links["j"].astype(np.int64)
            distance = links["v"].astype(np.float64)
            # Bipartite graph: predictions are nodes 0..P-1, truths P..P+T-1.
            graph = coo_matrix(
                (np.ones(len(p_idx)), (p_idx, t_idx + n_pred)), shape=(n_pred + n_truth, n_pred + n_truth)
            )
            _, labels = connected_components(graph, directed=False)
            link_group = labels[p_idx]
            order = np.argsort(link_group, kind="stable")
            bounds = np.flatnonzero(np.diff(link_group[order])) + 1
            for chunk in np.split(order, bounds):
                pairs.extend(_assign(p_idx[chunk], t_idx[chunk], distance[chunk], radius))
    pairs.sort()
    matched_pred = {p for p, _ in pairs}
    matched_truth = {t for _, t in pairs}
    return Matching(
        tp_pairs=pairs,
        fp_indices=[i for i in range(n_pred) if i not in matched_pred],
        fn_indices=[j for j in range(n_truth) if j not in matched_truth],
    )


def _assign(
    p_idx: NDArray[np.int64], t_idx: NDArray[np.int64], distance: FloatArray, radius: float
) -> list[tuple[int, int]]:
    """Optimal assignment within one connected group of links."""
    if len(p_idx) == 1:
        return [(int(p_idx[0]), int(t_idx[0]))]
    preds, p_local = np.unique(p_idx, return_inverse=True)
    truths, t_local = np.unique(t_idx, return_inverse=True)
    # A missing link costs more than any set of real links, so the assignment first maximises
    # the number of real links, then minimises their summed distance.
    forbidden = radius * (min(len(preds), len(truths)) + 1) * 2.0
    cost = np.full((len(preds), len(truths)), forbidden)
    cost[p_local, t_local] = distance
    rows, cols = linear_sum_assignment(cost)
    keep = cost[rows, cols] < forbidden
    return [(int(preds[r]), int(truths[c])) for r, c in zip(rows[keep], cols[keep], strict=True)]


# --- points of one image -------------------------------------------------------------------------


@dataclass(frozen=True)
class PointSet:
    """Mitotic figures of one image: centres in µm, subtypes, and the hotspot count when recorded.

    `subtypes[i]` is "normal", "atypical", "uncertain" or None (unknown). `hotspot_count` and
    `hotspot_area_mm2` come from the file when it records them (None otherwise).
    """

    image: str
    points_um: FloatArray
    subtypes: tuple[str | None, ...]
    hotspot_count: int | None = None
    hotspot_area_mm2: float | None = None
    source: str = ""

    def __post_init__(self) -> None:
        points = _as_points(self.points_um, "points_um")
        object.__setattr__(self, "points_um", points)
        if len(self.subtypes) != len(points):
            raise ValueError(f"{len(self.subtypes)} subtypes for {len(points)} points in {self.image!r}")


def _hotspot_count(points: PointSet, area_mm2: float) -> int:
    recorded = points.hotspot_area_mm2
    if points.hotspot_count is not None and recorded is not None and math.isclose(recorded, area_mm2, rel_tol=1e-6):
        return points.hotspot_count
    return find_hotspot(points.points_um, hotspot_radius_um(area_mm2)).mitotic_count


# --- metrics -------------------------------------------------------------------------------------


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _f1(tp: int, fp: int, fn: int) -> float | None:
    return _ratio(2 * tp, 2 * tp + fp + fn)


class DetectionMetrics:
    """F1, precision and recall from the (TP, FP, FN) that ``counts`` gives (None where a denominator is 0)."""

    def counts(self) -> tuple[int, int, int]:
        raise NotImplementedError

    @property
    def f1(self) -> float | None:
        return _f1(*self.counts())

    @property
    def precision(self) -> float | None:
        tp, fp, _ = self.counts()
        return _ratio(tp, tp + fp)

    @property
    def recall(self) -> float | None:
        tp, _, fn = self.counts()
        return _ratio(tp, tp + fn)

    def metrics_dict(self) -> dict[str, Any]:
        tp, fp, fn = self.counts()
        return {"tp": tp, "fp": fp, "fn": fn, "f1": self.f1, "precision": self.precision, "recall": self.recall}


@dataclass(frozen=True)
class SubtypingScores:
    """Subtype agreement on matched figures whose truth is normal or atypical.

    Only confident predictions (normal or atypical) count in the rates; `uncertain` is how many
    such matched predictions had an uncertain (or no) subtype.
    """

    atypical_correct: int = 0  # truth atypical, predicted atypical
    atypical_total: int = 0  # truth atypical, predicted confidently
    normal_correct: int = 0
    normal_total: int = 0
    uncertain: int = 0

    @property
    def sensitivity(self) -> float | None:
        """Atypical recall."""
        return _ratio(self.atypical_correct, self.atypical_total)

    @property
    def specificity(self) -> float | None:
        """Normal recall."""
        return _ratio(self.normal_correct, self.normal_total)

    @property
    def balanced_accuracy(self) -> float | None:
        if self.sensitivity is None or self.specificity is None:
            return None
        return (self.sensitivity + self.specificity) / 2.0

    @property
    def matched_with_subtype(self) -> int:
        return self.atypical_total + self.normal_total + self.uncertain

    def __add__(self, other: SubtypingScores) -> SubtypingScores:
        return SubtypingScores(
            self.atypical_correct + other.atypical_correct,
            self.atypical_total + other.atypical_total,
            self.normal_correct + other.normal_correct,
            self.normal_total + other.normal_total,
            self.uncertain + other.uncertain,
        )

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "sensitivity": self.sensitivity,
            "specificity": self.specificity,
            "balanced_accuracy": self.balanced_accuracy,
            "atypical_correct": self.atypical_correct,
            "atypical_total": self.atypical_total,
            "normal_correct": self.normal_correct,
            "normal_total": self.normal_total,
            "uncertain": self.uncertain,
            "matched_with_subtype": self.matched_with_subtype,
        }


def _subtyping(pred: PointSet, truth: PointSet, pairs: Sequence[tuple[int, int]]) -> SubtypingScores:
    counts = {"ac": 0, "at": 0, "nc": 0, "nt": 0, "u": 0}
    for p, t in pairs:
        true_subtype, predicted = truth.subtypes[t], pred.subtypes[p]
        if true_subtype not in ("normal", "atypical"):
            continue
        if predicted not in ("normal", "atypical"):
            counts["u"] += 1
        elif true_subtype == "atypical":
            counts["at"] += 1
            counts["ac"] += predicted == "atypical"
        else:
            counts["nt"] += 1
            counts["nc"] += predicted == "normal"
    return SubtypingScores(counts["ac"], counts["at"], counts["nc"], counts["nt"], counts["u"])


@dataclass(frozen=True)
class ImageEvaluation(DetectionMetrics):
    """Counts and metrics of one image."""

    image: str
    tp: int
    fp: int
    fn: int
    hotspot_count_pred: int
    hotspot_count_true: int
    subtyping: SubtypingScores = field(default_factory=SubtypingScores)

    def counts(self) -> tuple[int, int, int]:
        return self.tp, self.fp, self.fn

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            **self.metrics_dict(),
            "hotspot_count_pred": self.hotspot_count_pred,
            "hotspot_count_true": self.hotspot_count_true,
            "subtyping": self.subtyping.to_json_dict(),
        }


@dataclass(frozen=True)
class EvaluationReport(DetectionMetrics):
    """Metrics over all images: TP, FP, FN summed first, then F1 (MIDOG), never an average of F1s.

    With several images `hotspot_count_pred` / `_true` are sums; `hotspot_count_mae` is the mean
    absolute per-image error.
    """

    images: tuple[ImageEvaluation, ...]
    radius_um: float
    hotspot_area_mm2: float

    @property
    def tp(self) -> int:
        return sum(i.tp for i in self.images)

    @property
    def fp(self) -> int:
        return sum(i.fp for i in self.images)

    @property
    def fn(self) -> int:
        return sum(i.fn for i in self.images)

    def counts(self) -> tuple[int, int, int]:
        return self.tp, self.fp, self.fn

    @property
    def hotspot_count_pred(self) -> int:
        return sum(i.hotspot_count_pred for i in self.images)

    @property
    def hotspot_count_true(self) -> int:
        return sum(i.hotspot_count_true for i in self.images)

    @property
    def hotspot_count_mae(self) -> float | None:
        if not self.images:
            return None
        return sum(abs(i.hotspot_count_pred - i.hotspot_count_true) for i in self.images) / len(self.images)

    @property
    def subtyping(self) -> SubtypingScores:
        total = SubtypingScores()
        for image in self.images:
            total = total + image.subtyping
        return total

    def to_json_dict(self) -> dict[str, Any]:
        return {
            **self.metrics_dict(),
            "radius_um": self.radius_um,
            "hotspot_area_mm2": self.hotspot_area_mm2,
            "hotspot_count_pred": self.hotspot_count_pred,
            "hotspot_count_true": self.hotspot_count_true,
            "hotspot_count_mae": self.hotspot_count_mae,
            "subtyping": self.subtyping.to_json_dict(),
            "images": [i.to_json_dict() for i in self.images],
        }


def evaluate_image(
    pred: PointSet,
    truth: PointSet,
    *,
    radius_um: float = DEFAULT_MATCH_RADIUS_UM,
    hotspot_area_mm2: float | None = None,
) -> ImageEvaluation:
    """Match one image's predictions to its truth and count.

    The hotspot area is `hotspot_area_mm2`, else the prediction's recorded one, else 2 mm²; a
    recorded hotspot count is used when its area matches, otherwise the hotspot is recomputed.
    """
    area = hotspot_area_mm2 or pred.hotspot_area_mm2 or DEFAULT_HOTSPOT_AREA_MM2
    matching = match_points(pred.points_um, truth.points_um, radius_um)
    return ImageEvaluation(
        image=truth.image or pred.image,
        tp=matching.tp,
        fp=matching.fp,
        fn=matching.fn,
        hotspot_count_pred=_hotspot_count(pred, area),
        hotspot_count_true=_hotspot_count(truth, area),
        subtyping=_subtyping(pred, truth, matching.tp_pairs),
    )


def evaluate(
    pairs: Sequence[tuple[PointSet, PointSet]],
    *,
    radius_um: float = DEFAULT_MATCH_RADIUS_UM,
    hotspot_area_mm2: float | None = None,
) -> EvaluationReport:
    """Evaluate (prediction, truth) pairs, one per image; metrics from counts summed over images.

    >>> truth = PointSet("a", np.array([[0.0, 0.0], [100.0, 0.0]]), ("normal", "atypical"))
    >>> pred = PointSet("a", np.array([[1.0, 1.0], [100.0, 2.0]]), ("normal", "atypical"))
    >>> report = evaluate([(pred, truth)])
    >>> report.f1, report.subtyping.balanced_accuracy
    (1.0, 1.0)
    """
    images = tuple(evaluate_image(p, t, radius_um=radius_um, hotspot_area_mm2=hotspot_area_mm2) for p, t in pairs)
    area = hotspot_area_mm2 or next(
        (p.hotspot_area_mm2 for p, _ in pairs if p.hotspot_area_mm2), DEFAULT_HOTSPOT_AREA_MM2
    )
    return EvaluationReport(images=images, radius_um=float(radius_um), hotspot_area_mm2=float(area))


# --- readers -------------------------------------------------------------------------------------


def read_json(path: str | Path, what: str) -> Any:
    """Load a JSON file, with errors that name the file, what it was for and what to do."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} file {str(file)!r} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} file {str(file)!r} cannot be read: {exc}") from None
    if not text.strip():
        raise ConfigError(f"{what} file {str(file)!r} is empty; give a JSON file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} file {str(file)!r} is not valid JSON ({exc}); give a JSON file") from None


def _shape_error(what: str, name: str, data: Any, expected: str) -> ConfigError:
    keys = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
    return ConfigError(f"{what} {name!r} has an unknown shape (top level: {keys}); expected {expected}")


def predictions_from_json(data: Any, name: str = "predictions") -> PointSet:
    """Mitotic figures from this project's result.json or a MIDOG "Multiple points" JSON (mm)."""
    if isinstance(data, dict) and data.get("schema") == RESULT_SCHEMA:
        figures = [f for f in data.get("figures", []) if f.get("is_mitotic")]
        hotspot = data.get("scores", {}).get("hotspot", {})
        return PointSet(
            image=PurePath(str(data.get("slide_path", ""))).name,
            points_um=np.array([(float(f["x_um"]), float(f["y_um"])) for f in figures]).reshape(-1, 2),
            subtypes=tuple(f.get("subtype") for f in figures),
            hotspot_count=None if "mitotic" not in hotspot else int(hotspot["mitotic"]),
            hotspot_area_mm2=None if "area_mm2" not in hotspot else float(hotspot["area_mm2"]),
            source="result.json",
        )
    if isinstance(data, dict) and data.get("type") == "Multiple points" and isinstance(data.get("points"), list):
        try:
            points = [(float(p["point"][0]) * 1000.0, float(p["point"][1]) * 1000.0) for p in data["points"]]
        except (KeyError, IndexError, TypeError, ValueError):
            raise ConfigError(
                f"predictions {name!r}: a MIDOG point lacks 'point': [x_mm, y_mm, z]; check the file"
            ) from None
        return PointSet(
            image="",
            points_um=np.array(points, dtype=np.float64).reshape(-1, 2),
            subtypes=(None,) * len(points),
            source="midog.json",
        )
    raise _shape_error(
        "predictions",
        name,
        data,
        f'a result.json (schema {RESULT_SCHEMA!r}) or a MIDOG JSON ({{"type": "Multiple points", "points": [...]}})',
    )


def read_predictions(path: str | Path) -> PointSet:
    """Read predictions from result.json or midog.json."""
    return predictions_from_json(read_json(path, "predictions"), str(path))


def truth_from_json(
    data: Any,
    name: str = "truth",
    *,
    image: str | None = None,
    truth_mpp: float = DEFAULT_TRUTH_MPP,
    image_hint: str = "",
) -> PointSet:
    """Truth from a synthetic truth JSON, or one image of a MIDOG++ COCO JSON.

    For COCO, `image` is an image id or file name; without it, the image named `image_hint`
    (the prediction's slide file name) or the only image is taken. Box centres in px times
    `truth_mpp` give µm. Look-alikes (imposters, "not mitotic figure") are never truth.
    """
    if isinstance(data, dict) and data.get("schema") == SYNTH_TRUTH_SCHEMA:
        try:
            truth = SynthTruth.from_json_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"truth {name!r} is a damaged synthetic truth file ({exc}); regenerate it") from None
        mitoses = [o for o in truth.objects if o.is_mitosis]
        return PointSet(
            image=truth.slide,
            points_um=np.array([(o.x_um, o.y_um) for o in mitoses], dtype=np.float64).reshape(-1, 2),
            subtypes=tuple(o.object_class for o in mitoses),
            hotspot_count=truth.hotspot.mitotic_count,
            hotspot_area_mm2=truth.hotspot.area_mm2,
            source="synth truth",
        )
    if isinstance(data, dict) and isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list):
        return _coco_truth(data, name, image=image, truth_mpp=truth_mpp, image_hint=image_hint)
    raise _shape_error(
        "truth",
        name,
        data,
        f"a synthetic truth JSON (schema {SYNTH_TRUTH_SCHEMA!r}) or a COCO JSON with 'images' and 'annotations'",
    )


def _coco_truth(
    data: Mapping[str, Any], name: str, *, image: str | None, truth_mpp: float, image_hint: str
) -> PointSet:
    mpp = float(truth_mpp)
    if not math.isfinite(mpp) or mpp <= 0:
        raise ConfigError(f"truth_mpp={truth_mpp!r} must be a positive number of µm per pixel")
    images: list[Mapping[str, Any]] = data["images"]
    if not images:
        raise ConfigError(f"truth {name!r} lists no images")

    def examples() -> str:
        shown = ", ".join(f"{i.get('id')} ({i.get('file_name')})" for i in images[:5])
        return f"e.g. {shown}" + (f" ... ({len(images)} images)" if len(images) > 5 else "")

    if image is not None:
        chosen = [i for i in images if str(i.get("id")) == str(image) or str(i.get("file_name")) == str(image)]
        if not chosen:
            raise ConfigError(f"image {image!r} is not in truth {name!r}; give an image id or file name, {examples()}")
    elif len(images) == 1:
        chosen = images
    else:
        chosen = [i for i in images if image_hint and str(i.get("file_name")) == image_hint]
        if not chosen:
            raise ConfigError(f"truth {name!r} has {len(images)} images; choose one with --image ID, {examples()}")
    entry = chosen[0]
    mitotic_ids = {c["id"] for c in data.get("categories", []) if str(c.get("name", "")).lower() == "mitotic figure"}
    mitotic_ids = mitotic_ids or {1}
    centres = []
    for ann in data["annotations"]:
        if ann.get("image_id") != entry.get("id") or ann.get("category_id") not in mitotic_ids:
            continue
        x1, y1, x2, y2 = (float(v) for v in ann["bbox"])  # MIDOG++ boxes are [x1, y1, x2, y2]
        centres.append(((x1 + x2) / 2.0 * mpp, (y1 + y2) / 2.0 * mpp))
    return PointSet(
        image=str(entry.get("file_name", entry.get("id"))),
        points_um=np.array(centres, dtype=np.float64).reshape(-1, 2),
        subtypes=(None,) * len(centres),
        source="COCO",
    )


def read_truth(
    path: str | Path, *, image: str | None = None, truth_mpp: float = DEFAULT_TRUTH_MPP, image_hint: str = ""
) -> PointSet:
    """Read truth from a synthetic truth JSON or a MIDOG++ COCO JSON (see `truth_from_json`)."""
    return truth_from_json(read_json(path, "truth"), str(path), image=image, truth_mpp=truth_mpp, image_hint=image_hint)
