"""Slide-level scoring of mitotic figures; for now the hotspot search.

The hotspot is the circular field of a given area (2 mm² by default) that holds the most
mitotic figures. Pure numpy/scipy: points in, a `Hotspot` out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.spatial import cKDTree

from edge.errors import ConfigError

__all__ = [
    "BOUNDARY_TOLERANCE",
    "DEFAULT_HOTSPOT_AREA_MM2",
    "Hotspot",
    "TieBreak",
    "find_hotspot",
    "hotspot_radius_um",
]

DEFAULT_HOTSPOT_AREA_MM2 = 2.0  # the seed paper's field, ≈ 10 HPF
# A point this far outside the circle (relative to its radius) still counts: detections
# exactly on the boundary must not flicker in and out with float rounding.
BOUNDARY_TOLERANCE = 1e-6
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
