"""Detector output to mitotic-figure candidates: decode one tile, NMS, tile -> slide px, merge across tiles.

Pure numpy/scipy. Frames: *tile px* are the detector's input pixels of one tile (output mpp, origin at
the tile's top-left); *output px* add the tile's (x, y); *level-0 px* are the slide file's pixels.
The pipeline runs ``decode -> nms -> keep_owned -> to_slide`` per tile, then merges across tiles with
``merge_indices`` (the index form of ``merge_across_tiles``, so each candidate's classifier probabilities
follow the merge).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from scipy.spatial import cKDTree
from scipy.special import expit

from edge.errors import EngineError
from edge.wsi.tiling import Tile, TilePlan

if TYPE_CHECKING:
    from edge.engines.manifest import DetectorSpec

__all__ = [
    "Boxes",
    "TileOwnership",
    "decode",
    "keep_owned",
    "merge_across_tiles",
    "nms",
    "owner_tiles",
    "to_slide",
]

FloatArray = NDArray[np.floating[Any]]
IntArray = NDArray[np.int64]

# Nearest tile centres fetched per point before ties are settled; more than this many tiles tied at
# the same distance (possible only where a shifted last row or column crowds the grid) falls back
# to a ball query for that point.
_OWNER_CANDIDATES = 9


@dataclass(frozen=True, eq=False)
class Boxes:
    """Detections as parallel 1-D arrays: centre, size, score and class index, in one pixel frame.

    Which frame (tile px or level-0 px) is stated by each function that takes or returns them.

    >>> b = Boxes(np.array([10.0, 50.0]), np.array([10.0, 50.0]), np.full(2, 8.0), np.full(2, 8.0),
    ...           np.array([0.9, 0.4]), np.array([0, 0]))
    >>> len(b), b.take(b.score > 0.5).cx.tolist()
    (2, [10.0])
    """

    cx: FloatArray
    cy: FloatArray
    w: FloatArray
    h: FloatArray
    score: FloatArray
    label: IntArray

    def __post_init__(self) -> None:
        n = np.shape(self.cx)[0] if np.ndim(self.cx) else -1
        for name in ("cx", "cy", "w", "h", "score", "label"):
            value = np.asarray(getattr(self, name))
            if value.ndim != 1:
                raise ValueError(f"Boxes.{name} must be 1-D, got shape {value.shape}")
            if len(value) != n:
                raise ValueError(f"Boxes fields differ in length: cx has {n}, {name} has {len(value)}")
            if name == "label":
                if not (np.issubdtype(value.dtype, np.integer) or len(value) == 0):
                    raise TypeError(f"Boxes.label must hold integer class indices, got dtype {value.dtype}")
                value = value.astype(np.int64, copy=False)
            elif not np.issubdtype(value.dtype, np.floating):
                value = value.astype(np.float64)
            object.__setattr__(self, name, value)

    def __len__(self) -> int:
        return len(self.cx)

    def take(self, index_or_mask: NDArray[Any] | Sequence[int] | slice) -> Boxes:
        """The boxes selected by an index array, a boolean mask or a slice (always a copy for arrays)."""
        i = index_or_mask if isinstance(index_or_mask, slice) else np.asarray(index_or_mask)
        return Boxes(self.cx[i], self.cy[i], self.w[i], self.h[i], self.score[i], self.label[i])

    @classmethod
    def empty(cls) -> Boxes:
        zero = np.empty(0, np.float64)
        return cls(zero, zero, zero, zero, zero, np.empty(0, np.int64))

    @classmethod
    def concat(cls, parts: Sequence[Boxes]) -> Boxes:
        """All boxes of ``parts`` in order (float32 and float64 parts give float64)."""
        if not parts:
            return cls.empty()
        return cls(
            *(np.concatenate([getattr(p, name) for p in parts]) for name in ("cx", "cy", "w", "h", "score", "label"))
        )


# --- decoding ------------------------------------------------------------------------------------


def decode(output: np.ndarray, spec: DetectorSpec) -> Boxes:
    """MF candidates in tile px from ONE tile's raw detector output (no batch axis).

    Keeps the candidate classes (``spec.candidate_indices``) with score >= ``spec.score_threshold``;
    ``label`` is the class index in ``spec.classes``. Formats (``spec.output_format``):

    - ``yolo_raw`` ``[N, 5+C]``: score = objectness x the best candidate class score;
    - ``yolov8`` ``[4+C, N]``: score = the best candidate class score (no objectness);
    - ``boxes`` ``[K, 6]`` x1, y1, x2, y2, score, class after NMS; padding rows (score 0, or an empty
      box) are dropped.

    With ``spec.class_rule == "argmax"`` a row also needs its best class over all classes to be a
    candidate class (a look-alike that outscores the MF class is dropped, whatever its MF score).
    With ``spec.scores == "logits"`` scores pass through a sigmoid first; since it is monotone, the
    best class is picked on the raw values and only the winners are transformed. float16 outputs are
    computed in float32. The result never aliases ``output``, so an engine may reuse its buffer.
    """
    raw = np.asarray(output)
    n_classes = len(spec.classes)
    fmt = spec.output_format
    if fmt == "yolo_raw":
        expected, ok = f"[N, {5 + n_classes}]", raw.ndim == 2 and raw.shape[1] == 5 + n_classes
    elif fmt == "yolov8":
        expected, ok = f"[{4 + n_classes}, N]", raw.ndim == 2 and raw.shape[0] == 4 + n_classes
    elif fmt == "boxes":
        expected, ok = "[K, 6]", raw.ndim == 2 and raw.shape[1] == 6
    else:
        raise EngineError(f"detector output_format={fmt!r} is not one of yolo_raw, yolov8, boxes")
    if not ok:
        raise EngineError(
            f"detector output {spec.output!r} ({fmt}, {n_classes} classes) must have shape {expected} "
            f"for one tile, found {list(raw.shape)}"
        )
    values: FloatArray = raw.astype(np.float64 if raw.dtype == np.float64 else np.float32, copy=False)
    logits = spec.scores == "logits"
    threshold = spec.score_threshold
    candidates = np.asarray(spec.candidate_indices, dtype=np.int64)

    if fmt == "boxes":
        return _decode_boxes(values, candidates, logits, threshold)
    if fmt == "yolo_raw":
        objectness: FloatArray = values[:, 4]
        if logits:
            objectness = expit(objectness)
        # Class scores are at most 1, so objectness alone already rules most rows out.
        rows = np.flatnonzero(objectness >= threshold)
        class_scores = values[np.ix_(rows, 5 + candidates)]
        prior = objectness[rows]
    else:
        values = values.T
        rows = np.arange(len(values))
        class_scores = values[:, 4 + candidates]
        prior = None
    if len(candidates) == 0:
        return Boxes.empty()
    best = class_scores.argmax(axis=1)
    score: FloatArray = np.take_along_axis(class_scores, best[:, None], axis=1)[:, 0]
    if logits:
        score = expit(score)
    if prior is not None:
        score = score * prior
    xywh = values[rows, :4]
    keep = (score >= threshold) & np.isfinite(xywh).all(axis=1)
    if spec.class_rule == "argmax" and len(candidates) < n_classes:  # the row's best class must be a candidate
        first = 5 if fmt == "yolo_raw" else 4
        keep &= np.isin(values[rows, first:first + n_classes].argmax(axis=1), candidates)
    xywh = xywh[keep]
    return Boxes(xywh[:, 0], xywh[:, 1], xywh[:, 2], xywh[:, 3], score[keep], candidates[best[keep]])


def _decode_boxes(values: FloatArray, candidates: IntArray, logits: bool, threshold: float) -> Boxes:
    x1, y1, x2, y2, score, cls = values.T
    if logits:
        score = expit(score)
    finite_class = np.isfinite(cls)
    # Clipping keeps a wild class value from overflowing the integer cast; -1 is never a candidate.
    cls_index = np.rint(np.clip(np.where(finite_class, cls, -1.0), -1.0, 2.0**31)).astype(np.int64)
    keep = (
        np.isfinite(values[:, :4]).all(axis=1)
        & (x2 > x1)
        & (y2 > y1)
        & (score > 0)
        & (score >= threshold)
        & np.isin(cls_index, candidates)
    )
    x1, y1, x2, y2 = x1[keep], y1[keep], x2[keep], y2[keep]
    return Boxes((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, score[keep], cls_index[keep])


# --- NMS -----------------------------------------------------------------------------------------


def nms(boxes: Boxes, iou_threshold: float, max_detections: int) -> Boxes:
    """Class-agnostic greedy non-maximum suppression, best score first.

    Class-agnostic because every candidate class proposes the same thing, an MF candidate: two
    overlapping boxes of different classes are still one figure. A box is dropped when its IoU with
    a kept, higher-scoring box exceeds ``iou_threshold``. Equal scores keep their input order
    (stable sort). Returns at most ``max_detections`` boxes, sorted by score descending.
    """
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold={iou_threshold!r} must be in [0, 1]")
    if max_detections < 0:
        raise ValueError(f"max_detections={max_detections!r} must be >= 0")
    order = np.argsort(-boxes.score, kind="stable")
    ranked = boxes.take(order)
    n = len(ranked)
    if n == 0 or max_detections == 0:
        return ranked.take(slice(0, 0))
    cx, cy = ranked.cx.astype(np.float64), ranked.cy.astype(np.float64)
    half_w, half_h = np.maximum(ranked.w, 0) / 2.0, np.maximum(ranked.h, 0) / 2.0
    x1, y1, x2, y2 = cx - half_w, cy - half_h, cx + half_w, cy + half_h
    area = (x2 - x1) * (y2 - y1)
    suppressed = np.zeros(n, dtype=bool)
    kept: list[int] = []
    for i in range(n):
        if suppressed[i]:
            continue
        kept.append(i)
        if len(kept) == max_detections:
            break
        rest = slice(i + 1, n)
        inter_w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0.0, None)
        inter_h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0.0, None)
        inter = inter_w * inter_h
        union = area[i] + area[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        suppressed[rest] |= iou > iou_threshold
    return ranked.take(np.asarray(kept, dtype=np.int64))


# --- tile -> slide -------------------------------------------------------------------------------


def to_slide(boxes: Boxes, tile: Tile, px0_per_out: tuple[float, float]) -> Boxes:
    """Boxes in ``tile``'s px -> level-0 px: ``x0 + cx * px0_per_out_x`` (sizes scaled alike), float64.

    A tile smaller than the detector input (at the slide's right or bottom edge) is padded
    right/bottom; a centre in the padding, or outside the tile, is no slide content and is dropped.
    """
    fx, fy = px0_per_out
    inside = (boxes.cx >= 0) & (boxes.cx < tile.width) & (boxes.cy >= 0) & (boxes.cy < tile.height)
    kept = boxes.take(inside)
    return Boxes(
        tile.x0 + kept.cx.astype(np.float64) * fx,
        tile.y0 + kept.cy.astype(np.float64) * fy,
        kept.w.astype(np.float64) * fx,
        kept.h.astype(np.float64) * fy,
        kept.score,
        kept.label,
    )


# --- ownership of the overlap band ---------------------------------------------------------------


class TileOwnership:
    """Which tile of a plan owns a point: the tile whose centre is nearest in the Chebyshev (L∞) metric.

    Points are in output px. Ties go to the lower tile index (the position in ``plan.tiles``).

    Why this works. ``owner`` is a function of the point alone, so every point has exactly one
    owner: the owners' cells partition the plane, and a figure seen by two overlapping tiles is kept
    by one of them (both evaluate the same function of nearly the same centre; the residual jitter
    at a cell border is what :func:`merge_across_tiles` cleans up). All tiles of a plan have the same
    size s, and a point lies in a tile exactly when its L∞ distance to the tile's centre is at most
    s/2; the nearest centre is at least as near as the centre of any tile that holds the point, so
    the owner always holds the point whenever any tile of the plan does. Tiles without tissue are
    absent from the plan and so never own anything: a point in the overlap band whose other
    neighbour is absent goes to the present tile, which holds it, and no detection is lost. Cells of
    a full grid are the tile cores (the overlap split down its middle), so each tile keeps the
    figures far from its own edges, where they are whole.
    """

    def __init__(self, plan: TilePlan) -> None:
        self.plan = plan
        self.centres = np.array(
            [(t.x + t.width / 2.0, t.y + t.height / 2.0) for t in plan.tiles], dtype=np.float64
        ).reshape(-1, 2)
        self._tree = cKDTree(self.centres) if len(self.centres) else None

    def owner(self, cx_out: np.ndarray, cy_out: np.ndarray) -> IntArray:
        """Index of the owning tile for each point (output px); -1 for every point of an empty plan."""
        points = np.column_stack([np.asarray(cx_out, np.float64).ravel(), np.asarray(cy_out, np.float64).ravel()])
        if not np.isfinite(points).all():
            raise ValueError(f"{int((~np.isfinite(points)).any(axis=1).sum())} points have a nan or inf coordinate")
        n_tiles = len(self.centres)
        if self._tree is None or len(points) == 0:
            return np.full(len(points), -1, dtype=np.int64)
        k = min(n_tiles, _OWNER_CANDIDATES)
        _, nearest = self._tree.query(points, k=k, p=np.inf)
        nearest = np.asarray(nearest, dtype=np.int64).reshape(len(points), k)
        # Distances recomputed here, so ties are judged by one formula, not the tree's internals.
        gap = np.abs(points[:, None, :] - self.centres[nearest]).max(axis=2)
        best = gap.min(axis=1)
        tied = gap == best[:, None]
        owners: IntArray = np.where(tied, nearest, n_tiles).min(axis=1)
        for i in np.flatnonzero(tied.all(axis=1) & (k < n_tiles)):
            # Every fetched candidate is tied: more may be, beyond the k fetched.
            ball = np.asarray(self._tree.query_ball_point(points[i], best[i] * (1 + 1e-9) + 1e-9, p=np.inf))
            ball_gap = np.abs(points[i] - self.centres[ball]).max(axis=1)
            owners[i] = ball[ball_gap == ball_gap.min()].min()
        return owners

    def owned_by(self, tile_index: int, cx_out: np.ndarray, cy_out: np.ndarray) -> NDArray[np.bool_]:
        """Mask of the points (output px) that tile ``tile_index`` owns."""
        if not 0 <= tile_index < len(self.centres):
            raise IndexError(f"tile_index={tile_index} out of range for a plan of {len(self.centres)} tiles")
        owned: NDArray[np.bool_] = self.owner(cx_out, cy_out) == tile_index
        return owned


def owner_tiles(cx_out: np.ndarray, cy_out: np.ndarray, plan: TilePlan) -> IntArray:
    """Owning tile index per point in output px (see :class:`TileOwnership`; builds one each call)."""
    return TileOwnership(plan).owner(cx_out, cy_out)


def keep_owned(boxes: Boxes, tile: Tile, plan: TilePlan | TileOwnership) -> NDArray[np.bool_]:
    """Mask of the boxes (in ``tile``'s px) that ``tile`` keeps: the centre lies in the tile's pixels and
    the tile owns it (:class:`TileOwnership`).

    The first clause matters for a tile smaller than the detector's input (a slide smaller than one
    tile): the batch pads it with white, and a box in that padding lies off the slide, though the
    nearest tile centre is still this tile's. Pass a :class:`TileOwnership` built once per plan to avoid
    rebuilding its k-d tree per tile.
    """
    ownership = plan if isinstance(plan, TileOwnership) else TileOwnership(plan)
    cx_out = tile.x + boxes.cx.astype(np.float64)
    cy_out = tile.y + boxes.cy.astype(np.float64)
    in_tile = (boxes.cx < tile.width) & (boxes.cy < tile.height)
    return ownership.owned_by(tile.index, cx_out, cy_out) & in_tile


# --- merge across tiles --------------------------------------------------------------------------


def merge_across_tiles(boxes: Boxes, radius_px: float) -> Boxes:
    """One box per figure: boxes whose centres lie within ``radius_px`` of a better one are dropped.

    ``boxes`` are in level-0 px, from all tiles. Greedy by score descending (stable), like NMS on
    centre distance: a figure whose halves two tiles each saw keeps the higher score, while two
    figures farther apart than the radius stay two. Returns the kept boxes sorted by score descending.
    """
    return boxes.take(merge_indices(boxes, radius_px))


def merge_indices(boxes: Boxes, radius_px: float) -> NDArray[np.int64]:
    """Indices into ``boxes`` of what ``merge_across_tiles`` keeps, best score first (so per-candidate
    data kept beside the boxes, such as classifier probabilities, can follow the merge)."""
    if not math.isfinite(radius_px) or radius_px < 0:
        raise ValueError(f"radius_px={radius_px!r} must be a finite number >= 0")
    order = np.argsort(-boxes.score, kind="stable").astype(np.int64)
    if len(order) < 2:
        return order
    points = np.column_stack([boxes.cx[order], boxes.cy[order]]).astype(np.float64)
    pairs = cKDTree(points).query_pairs(radius_px, output_type="ndarray")
    if len(pairs) == 0:
        return order
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]  # query_pairs gives i < j, i ranked better
    starts = np.searchsorted(pairs[:, 0], np.arange(len(order) + 1))
    keep = np.ones(len(order), dtype=bool)
    for i in np.unique(pairs[:, 0]):
        if keep[i]:
            keep[pairs[starts[i] : starts[i + 1], 1]] = False
    return order[keep]
