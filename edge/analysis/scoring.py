"""Slide-level scoring of mitotic figures: hotspot search, subtype counts, ratios, density.

The hotspot is the circular field of a given area (2 mm² by default) that holds the most
mitotic figures. Pure numpy/scipy: classified figures in, `SlideScores` out; `SlideResult`
bundles them with the slide's metadata and provenance for the exports and the store.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.spatial import cKDTree

from edge.errors import ConfigError
from edge.vocab import SUBTYPES, DetectionClass, Subtype, detection_class

__all__ = [
    "BOUNDARY_TOLERANCE",
    "DEFAULT_HOTSPOT_AREA_MM2",
    "NOTTINGHAM_CUTOFFS",
    "NOTTINGHAM_FIELD_AREA_MM2",
    "NO_MITOTIC_FIGURE",
    "NO_TISSUE",
    "SCORE_HINT_NOTE",
    "Figure",
    "Hotspot",
    "HotspotScore",
    "MitoticScoreHint",
    "SlideResult",
    "SlideScores",
    "Subtype",
    "SubtypeCounts",
    "TieBreak",
    "find_hotspot",
    "hotspot_radius_um",
    "mitotic_score_hint",
    "points_in_hotspot",
    "score_slide",
    "tissue_fraction_in_circles",
]

DEFAULT_HOTSPOT_AREA_MM2 = 2.0  # the seed paper's field, ≈ 10 HPF
# A point this far outside the circle (relative to its radius) still counts: detections
# exactly on the boundary must not flicker in and out with float rounding.
BOUNDARY_TOLERANCE = 1e-6
# Why a slide has no hotspot (HotspotScore.null_reason): both are valid results, not failures.
NO_TISSUE = "no tissue found on the slide"
NO_MITOTIC_FIGURE = "no mitotic figure found on the slide"
# Directed neighbour pairs swept per batch in find_hotspot; bounds its memory (~100 B each).
_SWEEP_BATCH_PAIRS = 1 << 21

TieBreak = Callable[[NDArray[np.float64]], NDArray[np.float64]]


def hotspot_radius_um(area_mm2: float) -> float:
    """Radius in µm of the circle with area `area_mm2` (2 mm² -> ≈ 797.9 µm)."""
    if not math.isfinite(area_mm2) or area_mm2 <= 0:
        raise ConfigError(f"hotspot area_mm2={area_mm2!r} must be a positive number of mm²")
    return math.sqrt(area_mm2 / math.pi) * 1000.0


@dataclass(frozen=True)
class Hotspot:
    """The circular field with the highest mitotic count, in slide µm.

    With no points at all the centre is (nan, nan) and the count 0.
    """

    center_x_um: float
    center_y_um: float
    radius_um: float
    mitotic_count: int

    @property
    def area_mm2(self) -> float:
        return math.pi * (self.radius_um / 1000.0) ** 2


def find_hotspot(
    points_um: NDArray[np.floating] | list[tuple[float, float]],
    radius_um: float,
    tie_break: TieBreak | None = None,
) -> Hotspot:
    """Return the circle of radius `radius_um` that contains the most points.

    `points_um` is an (N, 2) array of x, y in µm. A point counts when its distance to the
    centre is at most ``radius_um * (1 + BOUNDARY_TOLERANCE)``.

    Exact: an optimal circle can always be moved until two points lie on its boundary (or,
    for a lone point, centred on it), so the candidate centres are every point and, for every
    pair closer than 2r, the two centres of radius-r circles through both. Counting every pair
    candidate with a k-d tree costs O(n) per candidate, which is too slow inside a dense
    cluster; instead each point p sweeps the circle of centres at distance r around it, on
    which every neighbour q covers one arc, and a pair candidate's count is the number of arcs
    over its angle (binary searches in sorted arc ends).

    Ties between candidates with the maximal count: ``tie_break(centres)`` (K, 2) -> (K,)
    scores, the highest wins; remaining ties go to the lowest (y, x), so the result is
    deterministic.
    """
    points = np.asarray(points_um, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points_um must have shape (N, 2), got {points.shape}")
    if not np.all(np.isfinite(points)):
        raise ValueError("points_um contains nan or inf")
    radius = float(radius_um)
    if not math.isfinite(radius) or radius <= 0:
        raise ConfigError(f"radius_um={radius_um!r} must be a positive number of µm")
    if len(points) == 0:
        return Hotspot(math.nan, math.nan, radius, 0)

    counting_radius = radius * (1.0 + BOUNDARY_TOLERANCE)
    tree = cKDTree(points)
    point_counts = np.asarray(tree.query_ball_point(points, counting_radius, return_length=True), dtype=np.int64)
    pairs = tree.query_pairs(2.0 * counting_radius, output_type="ndarray")
    pair_centres, pair_counts = _best_pair_candidates(
        points, pairs.astype(np.int64), radius, counting_radius, int(point_counts.max())
    )
    centres = np.concatenate([points, pair_centres])
    counts = np.concatenate([point_counts, pair_counts])
    maximal = centres[counts == counts.max()]
    # Recount the few finalists directly so the reported count follows the definition
    # above exactly, whatever rounding the sweep saw.
    recount = np.asarray(tree.query_ball_point(maximal, counting_radius, return_length=True), dtype=np.int64)
    best_count = int(recount.max())
    finalists = maximal[recount == best_count]
    if tie_break is not None and len(finalists) > 1:
        scores = np.asarray(tie_break(finalists.copy()), dtype=np.float64)
        if scores.shape != (len(finalists),):
            raise ValueError(f"tie_break returned shape {scores.shape}, expected ({len(finalists)},)")
        finalists = finalists[scores == scores.max()]
    winner = finalists[np.lexsort((finalists[:, 0], finalists[:, 1]))[0]]
    return Hotspot(float(winner[0]), float(winner[1]), radius, best_count)


def _best_pair_candidates(
    points: NDArray[np.float64],
    pairs: NDArray[np.int64],
    radius: float,
    counting_radius: float,
    floor_count: int,
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Centres of circles through two points whose count is at least `floor_count`.

    Returns (centres (K, 2), counts (K,)); candidates below the running best are dropped
    as soon as they are known, so memory follows the number of near-best candidates.
    """
    empty = (np.empty((0, 2)), np.empty(0, dtype=np.int64))
    if len(pairs) == 0:
        return empty
    # Both directions: p sweeps the arcs of all its neighbours q.
    src = np.concatenate([pairs[:, 0], pairs[:, 1]])
    dst = np.concatenate([pairs[:, 1], pairs[:, 0]])
    order = np.argsort(src, kind="stable")
    src, dst = src[order], dst[order]
    n_points = len(points)
    starts = np.searchsorted(src, np.arange(n_points + 1))

    kept_centres: list[NDArray[np.float64]] = []
    kept_counts: list[NDArray[np.int64]] = []
    best = floor_count
    first = 0
    while first < n_points:
        # Group whole points into batches of about _SWEEP_BATCH_PAIRS directed pairs.
        last = int(np.searchsorted(starts, starts[first] + _SWEEP_BATCH_PAIRS, side="right"))
        last = min(max(last - 1, first + 1), n_points)
        lo, hi = int(starts[first]), int(starts[last])
        if hi > lo:
            centres, counts = _sweep_batch(points, src[lo:hi] - first, src[lo:hi], dst[lo:hi], radius, counting_radius)
            if len(counts):
                top = int(counts.max())
                if top >= best:
                    best = top
                    keep = counts == top
                    kept_centres.append(centres[keep])
                    kept_counts.append(counts[keep])
        first = last
    if not kept_counts:
        return empty
    centres = np.concatenate(kept_centres)
    counts = np.concatenate(kept_counts)
    keep = counts == counts.max()
    return centres[keep], counts[keep]


def _sweep_batch(
    points: NDArray[np.float64],
    group: NDArray[np.int64],
    src: NDArray[np.int64],
    dst: NDArray[np.int64],
    radius: float,
    counting_radius: float,
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Counts of the pair candidates of one batch of sweeping points.

    `group` numbers the sweeping point of each directed pair (src -> dst) from 0 within
    the batch; pairs are sorted by it.
    """
    two_pi = 2.0 * math.pi
    # Offsetting each group's angles by group * span keeps all groups in one sorted array,
    # so one searchsorted answers every group's query at once. Arc ends lie in [0, 4π)
    # and queries in [0, 4π), so a span of 8π separates groups with room to spare.
    span = 4.0 * two_pi
    delta = points[dst] - points[src]
    distance = np.hypot(delta[:, 0], delta[:, 1])
    theta = np.arctan2(delta[:, 1], delta[:, 0])
    n_groups = int(group[-1]) + 1

    # Centre c on the circle of radius r around p holds q iff
    # |c - q|² = r² + d² - 2 r d cos(φ - θ) <= r_count², i.e. cos(φ - θ) >= bound.
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = (radius**2 + distance**2 - counting_radius**2) / (2.0 * radius * distance)
    always = ~(bound > -1.0)  # also catches duplicates (d = 0 gives -inf or nan)
    arcs = ~always & (bound <= 1.0)
    half_width = np.arccos(np.clip(bound[arcs], -1.0, 1.0))
    arc_group = group[arcs].astype(np.float64)
    arc_start = np.mod(theta[arcs] - half_width, two_pi)
    arc_end = arc_start + 2.0 * half_width
    sorted_starts = np.sort(arc_start + arc_group * span)
    sorted_ends = np.sort(arc_end + arc_group * span)
    group_offsets = np.arange(n_groups, dtype=np.float64) * span
    first_start = np.searchsorted(sorted_starts, group_offsets, side="left")
    first_end = np.searchsorted(sorted_ends, group_offsets, side="left")
    arcs_in_group = np.bincount(group[arcs], minlength=n_groups)
    constant = 1 + np.bincount(group[always], minlength=n_groups)  # p itself + arcs all around

    # Each unordered pair is evaluated once, from its lower index; its two centres are
    # m ± h n (m the midpoint, n the unit normal). Pairs just beyond 2r (within the
    # tolerance) get the one centre at r from p towards q, which stays on p's sweep circle.
    # Duplicates have no such circle; their candidate is the point itself.
    once = (src < dst) & (distance > 0)
    p, g = src[once], group[once]
    d = distance[once]
    unit = delta[once] / d[:, None]
    normal = np.stack([unit[:, 1], -unit[:, 0]], axis=1)
    h = np.sqrt(np.maximum(radius**2 - (d / 2.0) ** 2, 0.0))
    mid = points[p] + np.minimum(d / 2.0, radius)[:, None] * unit
    centres = np.concatenate([mid + h[:, None] * normal, mid - h[:, None] * normal])
    groups = np.concatenate([g, g])
    offset = np.concatenate([points[p], points[p]])
    towards = centres - offset
    phi = np.mod(np.arctan2(towards[:, 1], towards[:, 0]), two_pi)
    base = groups.astype(np.float64) * span

    # Arcs over φ: start <= φ <= end, or, for arcs wrapping past 2π, end >= φ + 2π.
    # Sorted needles make searchsorted cache-friendly (about 10x faster on millions).
    query = phi + base
    order = np.argsort(query)
    query = query[order]
    started = np.searchsorted(sorted_starts, query, side="right")
    ended = np.searchsorted(sorted_ends, query, side="left")
    not_wrapped = np.searchsorted(sorted_ends, query + two_pi, side="left")
    sorted_groups = groups[order]
    counts = np.empty(len(query), dtype=np.int64)
    counts[order] = (
        (started - first_start[sorted_groups])
        - (ended - first_end[sorted_groups])
        + arcs_in_group[sorted_groups]
        - (not_wrapped - first_end[sorted_groups])
        + constant[sorted_groups]
    )
    return centres, counts


# --- hotspot membership and tissue ---------------------------------------------------------------


def points_in_hotspot(hotspot: Hotspot, points_um: NDArray[np.floating]) -> NDArray[np.bool_]:
    """Which of the (N, 2) points in µm lie in the hotspot circle (same tolerance as `find_hotspot`).

    >>> points_in_hotspot(Hotspot(0.0, 0.0, 5.0, 1), np.array([[3.0, 4.0], [3.0, 4.1]])).tolist()
    [True, False]
    """
    points = np.asarray(points_um, dtype=np.float64).reshape(-1, 2)
    if not math.isfinite(hotspot.center_x_um):
        return np.zeros(len(points), dtype=bool)
    distance = np.hypot(points[:, 0] - hotspot.center_x_um, points[:, 1] - hotspot.center_y_um)
    return np.asarray(distance <= hotspot.radius_um * (1.0 + BOUNDARY_TOLERANCE), dtype=bool)


def tissue_fraction_in_circles(
    mask: NDArray[np.bool_],
    mask_mpp: tuple[float, float],
    centres_um: NDArray[np.floating],
    radius_um: float,
) -> NDArray[np.float64]:
    """Fraction of tissue in each circle of radius `radius_um` around the (M, 2) `centres_um`.

    `mask` is a boolean tissue mask covering the whole slide at `mask_mpp` = (µm per mask
    pixel in x, in y); mask pixel (i, j) covers x in [j, j+1) * mpp_x and y in [i, i+1) * mpp_y
    and counts as inside a circle when its centre does. Parts of a circle beyond the mask
    (outside the slide) count as non-tissue, so a circle half off the slide holds at most 0.5.
    A circle too small to hold any pixel centre takes the value of the pixel under its centre.

    Each circle is summed row by row on the mask's prefix sums: O(M x rows) work, vectorised.

    >>> mask = np.zeros((10, 10), dtype=bool); mask[:, :5] = True
    >>> tissue_fraction_in_circles(mask, (1.0, 1.0), np.array([[5.0, 5.0], [2.5, 5.0]]), 2.0).round(2).tolist()
    [0.5, 1.0]
    """
    tissue = np.asarray(mask, dtype=bool)
    if tissue.ndim != 2:
        raise ValueError(f"mask must be 2-D (rows, columns), got shape {tissue.shape}")
    mpp_x, mpp_y = (float(v) for v in mask_mpp)
    if not (math.isfinite(mpp_x) and math.isfinite(mpp_y) and mpp_x > 0 and mpp_y > 0):
        raise ConfigError(f"mask_mpp={mask_mpp!r} must be two positive µm-per-pixel values")
    radius = float(radius_um)
    if not math.isfinite(radius) or radius <= 0:
        raise ConfigError(f"radius_um={radius_um!r} must be a positive number of µm")
    centres = np.asarray(centres_um, dtype=np.float64)
    if centres.ndim != 2 or centres.shape[1] != 2:
        raise ValueError(f"centres_um must have shape (M, 2), got {centres.shape}")
    if not np.all(np.isfinite(centres)):
        raise ValueError("centres_um contains nan or inf")
    if len(centres) == 0:
        return np.empty(0, dtype=np.float64)

    height, width = tissue.shape
    prefix = np.zeros((height, width + 1), dtype=np.int64)
    np.cumsum(tissue, axis=1, out=prefix[:, 1:])
    cx, cy = centres[:, 0], centres[:, 1]
    # Rows whose pixel centres (i + 0.5) * mpp_y lie within the radius of each centre.
    first_row = np.ceil((cy - radius) / mpp_y - 0.5).astype(np.int64)
    last_row = np.floor((cy + radius) / mpp_y - 0.5).astype(np.int64)
    n_rows = int(max(1, (last_row - first_row).max() + 1))
    rows = first_row[:, None] + np.arange(n_rows)[None, :]  # (M, R)
    valid_row = rows <= last_row[:, None]
    dy = (rows + 0.5) * mpp_y - cy[:, None]
    half = np.sqrt(np.maximum(radius**2 - dy**2, 0.0))
    first_col = np.ceil((cx[:, None] - half) / mpp_x - 0.5).astype(np.int64)
    last_col = np.floor((cx[:, None] + half) / mpp_x - 0.5).astype(np.int64)
    spans = np.where(valid_row, np.maximum(last_col - first_col + 1, 0), 0)
    inside = (rows >= 0) & (rows < height) & valid_row
    clipped_first = np.clip(first_col, 0, width)
    clipped_last = np.clip(last_col + 1, 0, width)
    safe_rows = np.clip(rows, 0, height - 1)
    tissue_in_row = prefix[safe_rows, clipped_last] - prefix[safe_rows, clipped_first]
    tissue_in_row = np.where(inside & (clipped_last > clipped_first), tissue_in_row, 0)
    pixels = spans.sum(axis=1)
    counted = tissue_in_row.sum(axis=1)

    fractions: NDArray[np.float64] = np.divide(counted, pixels, out=np.zeros(len(centres)), where=pixels > 0)
    tiny = pixels == 0
    if np.any(tiny):
        col = np.floor(cx[tiny] / mpp_x).astype(np.int64)
        row = np.floor(cy[tiny] / mpp_y).astype(np.int64)
        on_mask = (col >= 0) & (col < width) & (row >= 0) & (row < height)
        fractions[tiny] = np.where(
            on_mask, tissue[np.clip(row, 0, height - 1), np.clip(col, 0, width - 1)], False
        ).astype(np.float64)
    return fractions


# --- classified figures and their counts ---------------------------------------------------------



@dataclass(frozen=True)
class Figure:
    """One classified candidate (a detection), mitotic or not.

    `x_px`, `y_px` are the centre in level-0 pixels; `x_um`, `y_um` the same in slide µm.
    `p_atypical` is the mean of the atypical heads (None without one); `subtype` is None when
    the figure is not mitotic. `scores` keeps each model's output, e.g. ``{"mitotic:resnet": 0.93}``.
    """

    x_px: float
    y_px: float
    x_um: float
    y_um: float
    width_px: float
    height_px: float
    detector_score: float
    p_mitotic: float
    p_atypical: float | None
    is_mitotic: bool
    subtype: Subtype | None
    scores: Mapping[str, float] = field(default_factory=dict)

    @property
    def detection_class(self) -> DetectionClass:
        """What the store, exports, gRPC and the review page call this candidate (vocab.detection_class)."""
        return detection_class(self.is_mitotic, self.subtype)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "x_px": self.x_px,
            "y_px": self.y_px,
            "x_um": self.x_um,
            "y_um": self.y_um,
            "width_px": self.width_px,
            "height_px": self.height_px,
            "detector_score": self.detector_score,
            "p_mitotic": self.p_mitotic,
            "p_atypical": self.p_atypical,
            "is_mitotic": self.is_mitotic,
            "subtype": self.subtype,
            "scores": dict(self.scores),
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> Figure:
        subtype = data.get("subtype")
        if subtype is not None and subtype not in SUBTYPES:
            raise ValueError(f"figure subtype={subtype!r} must be one of {SUBTYPES} or null")
        p_atypical = data.get("p_atypical")
        return cls(
            x_px=float(data["x_px"]),
            y_px=float(data["y_px"]),
            x_um=float(data["x_um"]),
            y_um=float(data["y_um"]),
            width_px=float(data["width_px"]),
            height_px=float(data["height_px"]),
            detector_score=float(data["detector_score"]),
            p_mitotic=float(data["p_mitotic"]),
            p_atypical=None if p_atypical is None else float(p_atypical),
            is_mitotic=bool(data["is_mitotic"]),
            subtype=subtype,
            scores={str(k): float(v) for k, v in (data.get("scores") or {}).items()},
        )


@dataclass(frozen=True)
class SubtypeCounts:
    """Mitotic figures and their subtypes; uncertain ones are left out of the ratio.

    >>> SubtypeCounts(mitotic=5, atypical=1, normal=2, uncertain=2).atypical_ratio
    0.5
    >>> SubtypeCounts(mitotic=1, atypical=1, normal=0, uncertain=0).atypical_ratio is None
    True
    """

    mitotic: int
    atypical: int
    normal: int
    uncertain: int

    @property
    def atypical_ratio(self) -> float | None:
        """AMF / NMF; None (undefined) when there is no normal figure."""
        return self.atypical / self.normal if self.normal else None

    @classmethod
    def of(cls, figures: Sequence[Figure]) -> SubtypeCounts:
        """Count the mitotic figures among `figures` (others are ignored) by subtype.

        A mitotic figure without a subtype (no atypical head) counts as uncertain.
        """
        kinds = [f.detection_class for f in figures if f.is_mitotic]
        return cls(
            mitotic=len(kinds),
            atypical=kinds.count(DetectionClass.ATYPICAL),
            normal=kinds.count(DetectionClass.NORMAL),
            uncertain=kinds.count(DetectionClass.UNCERTAIN),
        )

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "mitotic": self.mitotic,
            "atypical": self.atypical,
            "normal": self.normal,
            "uncertain": self.uncertain,
            "atypical_ratio": self.atypical_ratio,
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> SubtypeCounts:
        return cls(
            mitotic=int(data["mitotic"]),
            atypical=int(data["atypical"]),
            normal=int(data["normal"]),
            uncertain=int(data["uncertain"]),
        )


# --- mitotic score hint --------------------------------------------------------------------------

# Nottingham (Elston-Ellis) mitotic score for breast cancer, for 10 HPF of 0.55 mm field
# diameter: 1 for <= 8 mitoses, 2 for 9-17, 3 for >= 18. The half-way cut-offs 8.5 and 17.5
# rescale linearly with the field area.
NOTTINGHAM_FIELD_AREA_MM2 = 2.376  # 10 x pi x 0.275² mm²
NOTTINGHAM_CUTOFFS = (8.5, 17.5)  # mitoses per NOTTINGHAM_FIELD_AREA_MM2
SCORE_HINT_NOTE = (
    "hint only: breast grading cut-offs for 10 HPF of 0.55 mm diameter rescaled to the field area; not a diagnosis"
)


@dataclass(frozen=True)
class MitoticScoreHint:
    """A Nottingham-style mitotic score (1-3) for the hotspot count; a hint, never a grade.

    `cutoffs` are the rescaled (score 1|2, score 2|3) boundaries for `field_area_mm2`;
    `score` is None when there was no tissue to count in.
    """

    score: int | None
    count: int
    field_area_mm2: float
    cutoffs: tuple[float, float]
    note: str

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "count": self.count,
            "field_area_mm2": self.field_area_mm2,
            "cutoffs": list(self.cutoffs),
            "note": self.note,
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> MitoticScoreHint:
        low, high = (float(v) for v in data["cutoffs"])
        score = data.get("score")
        return cls(
            score=None if score is None else int(score),
            count=int(data["count"]),
            field_area_mm2=float(data["field_area_mm2"]),
            cutoffs=(low, high),
            note=str(data["note"]),
        )


def mitotic_score_hint(count: int, field_area_mm2: float, *, has_tissue: bool = True) -> MitoticScoreHint:
    """The mitotic score hint for `count` mitoses in a field of `field_area_mm2`.

    >>> mitotic_score_hint(8, NOTTINGHAM_FIELD_AREA_MM2).score, mitotic_score_hint(9, NOTTINGHAM_FIELD_AREA_MM2).score
    (1, 2)
    >>> mitotic_score_hint(15, 2.0).score  # cut-offs 7.15 and 14.73 at 2 mm²
    3
    """
    area = float(field_area_mm2)
    if not math.isfinite(area) or area <= 0:
        raise ConfigError(f"field_area_mm2={field_area_mm2!r} must be a positive number of mm²")
    if count < 0:
        raise ValueError(f"count={count!r} must not be negative")
    scale = area / NOTTINGHAM_FIELD_AREA_MM2
    low, high = NOTTINGHAM_CUTOFFS[0] * scale, NOTTINGHAM_CUTOFFS[1] * scale
    score = (1 if count < low else 2 if count < high else 3) if has_tissue else None
    return MitoticScoreHint(
        score=score, count=int(count), field_area_mm2=area, cutoffs=(low, high), note=SCORE_HINT_NOTE
    )


# --- slide scores --------------------------------------------------------------------------------


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class HotspotScore:
    """The hotspot circle, the figures in it by subtype, and its tissue fraction (None when not measured).

    Without a mitotic figure there is no hotspot: its centre is null and ``null_reason`` says why
    (NO_TISSUE or NO_MITOTIC_FIGURE); the counts are 0 and the ratio undefined.
    """

    hotspot: Hotspot
    counts: SubtypeCounts
    tissue_fraction: float | None
    null_reason: str | None = None

    def to_json_dict(self) -> dict[str, Any]:
        spot = self.hotspot
        return {
            "area_mm2": spot.area_mm2,
            "radius_um": spot.radius_um,
            "center_x_um": _finite_or_none(spot.center_x_um),
            "center_y_um": _finite_or_none(spot.center_y_um),
            **self.counts.to_json_dict(),
            "tissue_fraction": self.tissue_fraction,
            "null_reason": self.null_reason,
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> HotspotScore:
        counts = SubtypeCounts.from_json_dict(data)
        x, y = data.get("center_x_um"), data.get("center_y_um")
        hotspot = Hotspot(
            center_x_um=math.nan if x is None else float(x),
            center_y_um=math.nan if y is None else float(y),
            radius_um=float(data["radius_um"]),
            mitotic_count=counts.mitotic,
        )
        fraction = data.get("tissue_fraction")
        reason = data.get("null_reason")
        return cls(hotspot=hotspot, counts=counts, tissue_fraction=None if fraction is None else float(fraction),
                   null_reason=None if reason is None else str(reason))


@dataclass(frozen=True)
class SlideScores:
    """What a pathologist reads for one slide: the hotspot, whole-slide counts, density and a score hint."""

    hotspot: HotspotScore
    totals: SubtypeCounts
    candidates: int
    tissue_area_mm2: float
    mitotic_density_per_mm2: float | None
    mitotic_score_hint: MitoticScoreHint

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "hotspot": self.hotspot.to_json_dict(),
            "totals": self.totals.to_json_dict(),
            "candidates": self.candidates,
            "tissue_area_mm2": self.tissue_area_mm2,
            "mitotic_density_per_mm2": self.mitotic_density_per_mm2,
            "mitotic_score_hint": self.mitotic_score_hint.to_json_dict(),
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> SlideScores:
        density = data.get("mitotic_density_per_mm2")
        return cls(
            hotspot=HotspotScore.from_json_dict(data["hotspot"]),
            totals=SubtypeCounts.from_json_dict(data["totals"]),
            candidates=int(data["candidates"]),
            tissue_area_mm2=float(data["tissue_area_mm2"]),
            mitotic_density_per_mm2=None if density is None else float(density),
            mitotic_score_hint=MitoticScoreHint.from_json_dict(data["mitotic_score_hint"]),
        )


def score_slide(
    figures: Sequence[Figure],
    *,
    tissue_area_mm2: float,
    hotspot_area_mm2: float = DEFAULT_HOTSPOT_AREA_MM2,
    tissue_fraction: TieBreak | None = None,
) -> SlideScores:
    """Score one slide's classified figures.

    The hotspot is the circle of `hotspot_area_mm2` holding the most mitotic figures (exact,
    `find_hotspot` on their µm centres). Ties go to the circle with the most tissue when
    ``tissue_fraction(centres_um (M, 2)) -> (M,)`` is given (e.g. `tissue_fraction_in_circles`
    bound to the slide's mask and this radius), then to the lowest (y, x). Its tissue fraction
    is recorded too. Density is mitotic figures per mm² of tissue, None without tissue.

    >>> f = Figure(0, 0, 10.0, 10.0, 32, 32, 0.9, 0.95, 0.95, True, "atypical")
    >>> scores = score_slide([f], tissue_area_mm2=4.0)
    >>> scores.hotspot.counts.mitotic, scores.totals.atypical_ratio, scores.mitotic_density_per_mm2
    (1, None, 0.25)
    """
    area = float(tissue_area_mm2)
    if not math.isfinite(area) or area < 0:
        raise ConfigError(f"tissue_area_mm2={tissue_area_mm2!r} must be a finite number of mm², 0 or more")
    radius = hotspot_radius_um(hotspot_area_mm2)
    mitotic = [f for f in figures if f.is_mitotic]
    points = np.array([(f.x_um, f.y_um) for f in mitotic], dtype=np.float64).reshape(-1, 2)
    hotspot = find_hotspot(points, radius, tie_break=tissue_fraction)
    inside = points_in_hotspot(hotspot, points)
    counts = SubtypeCounts.of([f for f, keep in zip(mitotic, inside, strict=True) if keep])
    fraction: float | None = None
    if tissue_fraction is not None and math.isfinite(hotspot.center_x_um):
        fraction = float(np.asarray(tissue_fraction(np.array([[hotspot.center_x_um, hotspot.center_y_um]])))[0])
    totals = SubtypeCounts.of(figures)
    null_reason = None
    if not math.isfinite(hotspot.center_x_um):
        null_reason = NO_TISSUE if area <= 0 else NO_MITOTIC_FIGURE
    return SlideScores(
        hotspot=HotspotScore(hotspot=hotspot, counts=counts, tissue_fraction=fraction, null_reason=null_reason),
        totals=totals,
        candidates=len(figures),
        tissue_area_mm2=area,
        mitotic_density_per_mm2=totals.mitotic / area if area > 0 else None,
        mitotic_score_hint=mitotic_score_hint(counts.mitotic, hotspot.area_mm2, has_tissue=area > 0),
    )


@dataclass(frozen=True)
class SlideResult:
    """Everything one slide produced: its metadata, scores, every classified candidate and provenance.

    `slide` holds width, height (level-0 px), mpp_x, mpp_y, format, vendor. `provenance` holds
    the package version, bundle name/version/sha256s, backend, settings, per-stage timings and
    created_at. Both are plain JSON-able mappings.
    """

    slide_path: str
    slide: Mapping[str, Any]
    scores: SlideScores
    figures: tuple[Figure, ...]
    provenance: Mapping[str, Any]
    qc: Mapping[str, Any] | None = None  # scan QC (edge.analysis.qc): verdict, reasons, fractions; None with QC off

    def to_json_dict(self) -> dict[str, Any]:
        out = {
            "slide_path": self.slide_path,
            "slide": dict(self.slide),
            "scores": self.scores.to_json_dict(),
            "figures": [f.to_json_dict() for f in self.figures],
            "provenance": dict(self.provenance),
        }
        if self.qc is not None:
            out["qc"] = dict(self.qc)
        return out

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> SlideResult:
        """Read back `to_json_dict` output (extra keys such as "schema" are ignored)."""
        return cls(
            slide_path=str(data["slide_path"]),
            slide=dict(data["slide"]),
            scores=SlideScores.from_json_dict(data["scores"]),
            figures=tuple(Figure.from_json_dict(f) for f in data["figures"]),
            provenance=dict(data.get("provenance") or {}),
            qc=dict(data["qc"]) if data.get("qc") is not None else None,
        )
