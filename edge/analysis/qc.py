"""Scan QC at scan time: focus, folds, pen and dirt, over-exposure and stain vectors; a verdict per slide.

Computed from what the pipeline already has in memory: each decoded tile (fed to a
:class:`QcAccumulator`, no second read of the slide) and the thumbnail the tissue mask came from.

Focus: the no-reference blur measure of Crete et al. (2007, "The blur effect: perception and
estimation with a new no-reference perceptual blur metric", SPIE 6492; also
``skimage.measure.blur_effect``): re-blur the image with a 9-px box and see how much of each
neighbour difference survives. It is a ratio, so faint or sparse tissue does not read as blurred
the way an absolute sharpness (Laplacian variance, Tenengrad) does; 0 = sharp, 1 = flat. It is
measured at ``focus_mpp`` (0.5 µm/px: 2x2 binned 0.25 µm/px tiles), which also suppresses JPEG and
sensor noise, and per cell of ``cell_um`` (32 µm), pooled over 3x3 cells. Unlike Crete, the
smaller of the horizontal and vertical blur is kept: defocus blurs both, fibres only one.

Folds: tissue whose optical density and eosin are ``fold_od_ratio`` times the tissue around it and
above the slide's median density and eosin (doubled tissue), on the thumbnail; see :func:`fold_mask`.
Pen and dirt: dense pixels whose colour is not a mix of the slide's own stains (far from the H-E
plane, outside the H-E cone, or dark grey). Over-exposure:
tissue pixels with two or more channels clipped at 255 (or any at 0). Stains: Macenko et al.
(2009, "A method for normalizing histology slides for quantitative analysis", ISBI) on optical
density pixels sampled from every tile; see :func:`macenko`.

Everything here is pure numpy/scipy except the accumulator's running state.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from edge.analysis.scoring import Figure, find_hotspot, hotspot_radius_um, points_in_hotspot
from edge.config import QcConfig
from edge.errors import QcError
from edge.wsi.tiling import Tile

__all__ = [
    "REFERENCE_STAINS",
    "VERDICTS",
    "QcAccumulator",
    "QcMaps",
    "SlideQc",
    "StainVectors",
    "angle_deg",
    "crete_blur",
    "direction_focus_sums",
    "focus_sums",
    "fold_mask",
    "macenko",
    "optical_density",
    "pen_mask",
    "summary_lines",
    "verdict_of",
]

Verdict = Literal["pass", "review", "rescan"]
VERDICTS: tuple[Verdict, ...] = ("pass", "review", "rescan")
CRETE_WINDOW = 9  # px of the re-blurring box filter (Crete et al.)
MIN_STAIN_OD = 0.15  # Macenko's beta: mean optical density below this is glass or noise
MACENKO_PERCENTILE = 1.0  # Macenko's alpha: robust extremes of the angle distribution
MIN_STAIN_PIXELS = 200
FOCUS_LINE_STEP = 32  # focus from every 32nd row at focus_mpp: 2 rows of a 32 µm cell, 18 of a pooled 96 µm field
# (dy, dx) of the neighbour differences focus is measured along: horizontal, vertical and both diagonals.
FOCUS_DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1))
COLOUR_STEP = 32  # colour measures from every 32nd pixel of each 32nd row (8 µm apart at 0.25 µm/px): 16 a cell
POOL_CELLS = 3  # focus sums pooled over 3x3 cells: a decision per cell from ~100 µm of tissue
# Ruifrok & Johnston (2001) H&E optical density vectors: the fallback when a slide has too little stain.
REFERENCE_STAINS = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]])
REFERENCE_STAINS = REFERENCE_STAINS / np.linalg.norm(REFERENCE_STAINS, axis=1, keepdims=True)


# --- pure cores ----------------------------------------------------------------------------------


def optical_density(rgb: NDArray[Any], glass: NDArray[Any] | float = 255.0) -> NDArray[np.float32]:
    """Per-channel optical density -ln(I / I0) against the glass colour, I floored at 1 grey level.

    >>> [round(float(v), 3) for v in optical_density(np.array([[255.0, 25.5, 2.55]]))[0]]
    [0.0, 2.303, 4.605]
    """
    i0 = np.asarray(glass, np.float32)
    pixels = np.asarray(rgb)
    if pixels.dtype == np.uint8 and pixels.ndim >= 2 and i0.ndim <= 1:
        # 8-bit pixels: the same formula on each of the 256 levels of each channel, then looked up (exact, ~2x faster)
        channels = pixels.shape[-1]
        table = optical_density(np.broadcast_to(np.arange(256, dtype=np.float32)[:, None], (256, channels)),
                                np.broadcast_to(i0, (channels,)))
        out = np.empty(pixels.shape, np.float32)
        for c in range(channels):
            np.take(table[:, c], pixels[..., c], out=out[..., c], mode="clip")
        return out
    ratio = np.clip(pixels.astype(np.float32, copy=False), 1.0, None) / i0
    return np.asarray(-np.log(np.clip(ratio, 1e-3, 1.0)) + 0.0, np.float32)  # + 0.0: no -0.0


def focus_sums(grey: NDArray[np.float32], cell: int, step: int = 1) -> NDArray[np.float32]:
    """Crete's sums per cell along each of FOCUS_DIRECTIONS: (8, rows, cols) = [D, V] per direction.

    D is the absolute neighbour difference of the image, V how much of it the re-blurred image lost
    (max(0, D - D_blurred)); the image is cut into cells of ``cell`` px (a remainder is dropped) and
    measured on every ``step``-th row (Crete's ratio from a sample of rows is the ratio of the cell).
    """
    rows, cols = grey.shape[0] // cell, grey.shape[1] // cell
    g = grey[: rows * cell, : cols * cell]
    return direction_focus_sums(lambda at: g[np.clip(at, 0, max(len(g) - 1, 0))], rows * cell, cell, step)


def focus_row_indices(height: int, step: int) -> NDArray[np.intp]:
    """The rows :func:`direction_focus_sums` reads of an image ``height`` rows tall, in the order
    :func:`focus_sums_of_rows` takes them: every ``step``-th row (each cell's rows step/2, 3 step/2, ...), then
    the rows 1, -4 and 5 away from each (clipped to the image)."""
    half = CRETE_WINDOW // 2
    at = np.arange(step // 2, height, step, dtype=np.intp)
    rows: NDArray[np.intp] = np.clip(np.concatenate([at + dy for dy in (0, 1, -half, half + 1)]), 0, max(height - 1, 0))
    return rows


def direction_focus_sums(
    rows_of: Callable[[NDArray[np.intp]], NDArray[Any]], height: int, cell: int, step: int
) -> NDArray[np.float32]:
    """:func:`focus_sums` of an image given by ``rows_of(indices)`` (its rows, indices clipped to the image),
    ``height`` rows tall, from every ``step``-th row (each cell's rows step/2, 3 step/2, ...).

    Along a line, the difference of neighbours in the box-blurred image is the difference of the two
    pixels 5 and 4 px away, over 9 (the rest of the windows cancel): so each direction needs only the
    rows 1, 4 and 5 away from a sampled row, not the blurred image. Rows may be int16 (sums of binned
    pixels: exact and twice as fast); V is summed as 9 V, which stays an integer, and divided at the end.
    Rows may carry leading axes (a stack of tiles: ``(..., rows, width)``); the sums then do too,
    ``(8, ..., rows, cols)``, each image's the same as alone.
    """
    return focus_sums_of_rows(rows_of(focus_row_indices(height, step)), height, cell, step)


def focus_sums_of_rows(lines: NDArray[Any], height: int, cell: int, step: int) -> NDArray[np.float32]:
    """:func:`direction_focus_sums` from the rows it reads (``(..., rows, width)``, the rows
    :func:`focus_row_indices` names, in its order): what the tile stream's readers take from a tile is
    measured later, many tiles at once."""
    half = CRETE_WINDOW // 2
    offsets = (0, 1, -half, half + 1)
    n_at = len(range(step // 2, height, step))
    lead = lines.shape[:-2]
    n_rows, n_cols = height // cell, lines.shape[-1] // cell
    out = np.zeros((2 * len(FOCUS_DIRECTIONS), *lead, n_rows, n_cols), np.float32)
    if n_rows == 0 or n_cols == 0:
        return out
    width = n_cols * cell
    reach = half + 1
    pad = [(0, 0)] * (lines.ndim - 1) + [(reach, reach)]
    padded = np.pad(lines[..., :width], pad, mode="edge").reshape(*lead, len(offsets), n_at, width + 2 * reach)
    row = {dy: padded[..., i, :, :] for i, dy in enumerate(offsets)}

    def shifted(dy: int, dx: int) -> NDArray[Any]:
        return row[dy][..., reach + dx: reach + dx + width]

    centre = shifted(0, 0)  # edge padding: a last column's (row's) missing neighbour differs by 0, as Crete skips it
    shape = (*lead, n_rows, cell // step, n_cols, cell)
    total = np.int32 if np.issubdtype(lines.dtype, np.integer) else np.float32  # integer rows: exact integer sums
    for k, (dy, dx) in enumerate(FOCUS_DIRECTIONS):
        d = np.abs(shifted(dy, dx) - centre)
        far = (half + 1) * dy if dy else 0
        near = -half * dy if dy else 0
        blurred = np.abs(shifted(far, (half + 1) * dx) - shifted(near, -half * dx))  # 9x the blurred difference
        lost = np.maximum(d * CRETE_WINDOW - blurred, 0)  # 9 V
        out[2 * k] = d.reshape(shape).sum(axis=-1, dtype=total).sum(axis=-2)
        out[2 * k + 1] = lost.reshape(shape).sum(axis=-1, dtype=total).sum(axis=-2)
    out[1::2] *= np.float32(1.0 / CRETE_WINDOW)
    return out


def crete_blur(sums: NDArray[np.float32]) -> NDArray[np.float32]:
    """Crete's blur from :func:`focus_sums` (summed over any cells first): (D - V) / D per direction, 0 sharp,
    1 flat, and the smallest of the four. Crete takes the larger of two; but defocus blurs every direction,
    while oriented texture (collagen fibres, muscle) is smooth along its fibres and would read as blurred.
    With the diagonals, fibres at any angle have a direction within 22.5° of crossing them (with rows and
    columns only, diagonal fibres read blurred in both: a clean slide's diagonal muscle was called out of focus).

    >>> rng = np.random.default_rng(0)
    >>> sharp = rng.uniform(0, 255, (64, 64)).astype(np.float32)
    >>> soft = ndimage.gaussian_filter(sharp, 3)
    >>> float(crete_blur(focus_sums(sharp, 64))[0, 0]) < float(crete_blur(focus_sums(soft, 64))[0, 0])
    True
    """
    d, v = sums[0::2], sums[1::2]
    return np.asarray((1.0 - v / np.maximum(d, 1e-6)).min(axis=0), np.float32)


@dataclass(frozen=True)
class StainVectors:
    """Unit optical-density vectors of haematoxylin and eosin (RGB order) and their 99th-percentile amounts."""

    hematoxylin: tuple[float, float, float]
    eosin: tuple[float, float, float]
    hematoxylin_max: float
    eosin_max: float
    pixels: int

    def matrix(self) -> NDArray[np.float64]:
        return np.array([self.hematoxylin, self.eosin], np.float64)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "hematoxylin": [round(v, 5) for v in self.hematoxylin],
            "eosin": [round(v, 5) for v in self.eosin],
            "hematoxylin_max": round(self.hematoxylin_max, 4),
            "eosin_max": round(self.eosin_max, 4),
            "pixels": self.pixels,
            "method": "macenko",
        }


def macenko(od: NDArray[Any], *, beta: float = MIN_STAIN_OD, alpha: float = MACENKO_PERCENTILE) -> StainVectors:
    """Macenko's stain vectors from optical-density pixels (N, 3).

    Pixels whose mean optical density is above ``beta`` are projected on the plane of the two largest
    eigenvectors of their covariance; the robust extremes (``alpha`` and 100 - ``alpha``
    percentiles) of their angle in that plane are the two stains. Haematoxylin is the one that
    absorbs more red. Amounts are least-squares concentrations, reported as 99th percentiles.
    Raises QcError with fewer than MIN_STAIN_PIXELS stained pixels.
    """
    od = np.asarray(od, np.float64).reshape(-1, 3)
    # The mean, not every channel (as some implementations read Macenko): eosin absorbs little red, so a
    # per-channel floor keeps only eosin mixed with haematoxylin and turns the eosin vector towards it (by
    # ~11° on a synthetic slide, whose pink muscle then fell outside the H-E cone and was called pen).
    od = od[od.mean(axis=1) > beta]
    if len(od) < MIN_STAIN_PIXELS:
        raise QcError(f"only {len(od)} stained pixels (at least {MIN_STAIN_PIXELS} needed) to estimate stain vectors")
    _, vectors = np.linalg.eigh(np.cov(od, rowvar=False))
    plane = vectors[:, 1:3]
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # point both into positive OD
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100.0 - alpha])
    v1 = plane @ np.array([math.cos(lo), math.sin(lo)])
    v2 = plane @ np.array([math.cos(hi), math.sin(hi)])
    h, e = (v1, v2) if v1[0] > v2[0] else (v2, v1)
    h, e = h / np.linalg.norm(h), e / np.linalg.norm(e)
    amounts = np.linalg.pinv(np.stack([h, e], axis=1)) @ od.T  # least squares; lstsq per pixel is 300x slower
    h_max, e_max = np.percentile(amounts, 99, axis=1)
    return StainVectors(
        tuple(float(v) for v in h), tuple(float(v) for v in e), float(h_max), float(e_max), len(od)  # type: ignore[arg-type]
    )


def angle_deg(a: Sequence[float] | NDArray[Any], b: Sequence[float] | NDArray[Any]) -> float:
    """Angle in degrees between two vectors.

    >>> angle_deg([1, 0, 0], [0, 1, 0])
    90.0
    """
    va, vb = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb) + 1e-12))
    return round(math.degrees(math.acos(max(-1.0, min(1.0, cos)))), 6)


def pen_mask(od: NDArray[np.float32], stains: NDArray[np.float64], config: QcConfig) -> NDArray[np.bool_]:
    """Dense pixels whose colour is no mix of the two stains: marker ink, dirt, dark debris.

    Each pixel's OD is compared with the plane and the cone the slide's two stain vectors span:
    more than ``pen_off_plane_deg`` off the plane (green ink, grey or black), more than
    ``pen_outside_cone_deg`` outside the cone within it (blue ink absorbs more red than
    haematoxylin), or dark in every channel (black ink, dirt).
    """
    h, e = (v / np.linalg.norm(v) for v in stains)
    normal = np.cross(h, e)
    normal /= np.linalg.norm(normal)
    u = e - (e @ h) * h  # in-plane axis orthogonal to H, towards E
    u /= np.linalg.norm(u)
    flat32 = od.reshape(-1, 3)
    # Only dense pixels can be pen: the rest (glass, most tissue) is dropped by a float32 sum a little below
    # the bar, and the angles are computed, in float64 as before, on the few left. Sums over the 3 channels
    # are written out: numpy's reductions over a last axis of 3 are several times slower (and add alike).
    candidates = np.flatnonzero((od[..., 0] + od[..., 1] + od[..., 2]).ravel() > config.pen_min_od - 1e-3)
    flat = flat32[candidates].astype(np.float64)
    x, y, z = flat[:, 0], flat[:, 1], flat[:, 2]
    length = np.sqrt(x * x + y * y + z * z) + 1e-9
    off_plane = np.degrees(np.arcsin(np.clip(np.abs(flat @ normal) / length, 0.0, 1.0)))
    phi = np.degrees(np.arctan2(flat @ u, flat @ h))  # 0 at H, angle(H, E) at E
    cone = math.degrees(math.acos(float(np.clip(h @ e, -1.0, 1.0))))
    margin = config.pen_outside_cone_deg
    outside = (phi < -margin) | (phi > cone + margin)
    dark = np.minimum(np.minimum(x, y), z) > config.dark_od
    dense = x + y + z > config.pen_min_od
    pen = np.zeros(len(flat32), bool)
    pen[candidates] = dense & ((off_plane > config.pen_off_plane_deg) | outside | dark)
    return pen.reshape(od.shape[:2])


def fold_mask(od: NDArray[np.float32], tissue: NDArray[np.bool_], stains: NDArray[np.float64], config: QcConfig,
              mpp: tuple[float, float]) -> NDArray[np.bool_]:
    """Tissue lying doubled: its optical density and its eosin at least ``fold_od_ratio`` times the tissue
    around it (``fold_window_um``), its density ``fold_od_ratio`` times the slide's median density and its
    eosin ``fold_eosin_ratio`` times the slide's median eosin.

    A fold doubles the section wherever it lies, so both stains double; a dense cellular area or an
    epidermis is dense in haematoxylin against its own surroundings, not in eosin, and a dense area is
    not dense against itself. The eosin bar against the slide is lower than the doubling bar: the slide's
    median eosin is set by its stroma, and a fold over cellular tissue with little eosin doubles to only
    ~1.4x that median. The surroundings are measured twice: the second time without the
    candidates of the first (and a 2 px rim), because a fold takes up much of its own window and,
    counted in it, raises the bar it is judged against (a 2x fold filling a third of it reads only ~1.4x).
    """
    if not tissue.any():
        return np.zeros(tissue.shape, bool)
    total = ndimage.gaussian_filter(od[..., 0] + od[..., 1] + od[..., 2], 1.0)
    unmix = np.linalg.pinv(stains.T)[1:]  # least-squares amounts: only eosin's row is needed
    eosin = ndimage.gaussian_filter((unmix @ od.reshape(-1, 3).T.astype(np.float64))[0].reshape(tissue.shape)
                                    .astype(np.float32), 1.0)
    size = max(3, round(config.fold_window_um / ((mpp[0] + mpp[1]) / 2)))
    medians = [float(np.median(measure[tissue])) for measure in (total, eosin)]
    surroundings = tissue
    folded = tissue
    for _ in range(2):
        weight = ndimage.uniform_filter(surroundings.astype(np.float32), size)
        folded = tissue.copy()
        bars = (config.fold_density_ratio, config.fold_eosin_ratio)  # times the slide's median density, eosin
        for measure, median, bar in zip((total, eosin), medians, bars, strict=True):
            local = ndimage.uniform_filter(np.where(surroundings, measure, 0.0).astype(np.float32), size)
            local = np.where(weight > 0.05, local / np.maximum(weight, 1e-6), median)  # no surroundings: the slide's
            folded &= (measure > config.fold_od_ratio * local) & (measure > bar * median)
        if not folded.any():
            break
        surroundings = tissue & ~ndimage.binary_dilation(folded, iterations=2)
    return folded


def _remove_small(mask: NDArray[np.bool_], min_pixels: float) -> NDArray[np.bool_]:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    keep = np.concatenate([[False], sizes >= min_pixels])
    return np.asarray(keep[labels], bool)


# --- per-slide maps and the verdict --------------------------------------------------------------


@dataclass
class QcMaps:
    """Where the faults are: out-of-focus cells (cell grid) and fold / pen pixels (thumbnail grid),
    each with its level-0 px per cell or pixel (x, y). For the overlay and the GeoJSON regions."""

    out_of_focus: NDArray[np.bool_]
    cell_px0: tuple[float, float]
    fold: NDArray[np.bool_]
    pen: NDArray[np.bool_]
    thumb_px0: tuple[float, float]
    tissue_cells: NDArray[np.bool_] | None = None  # the cells focus was judged on (same grid as out_of_focus)

    def regions(self) -> list[tuple[str, list[list[tuple[float, float]]]]]:
        """(class, outer rings in level-0 px) of each out-of-focus, fold and pen region."""
        out: list[tuple[str, list[list[tuple[float, float]]]]] = []
        for name, mask, scale in (
            ("out_of_focus", self.out_of_focus, self.cell_px0),
            ("fold", self.fold, self.thumb_px0),
            ("pen", self.pen, self.thumb_px0),
        ):
            for ring in _outlines(mask):
                out.append((name, [[(float(x * scale[0]), float(y * scale[1])) for x, y in ring]]))
        return out


@dataclass(frozen=True)
class SlideQc:
    """What :meth:`QcAccumulator.slide_maps` finds on the whole slide before any figure is known."""

    maps: QcMaps
    blur: NDArray[np.float32]  # pooled blur per cell
    stains: StainVectors | None
    mask: NDArray[np.bool_]  # the tissue mask (thumbnail grid) and its µm/px
    mask_mpp: tuple[float, float]
    mpp0: tuple[float, float]  # the slide's level-0 µm/px
    near_tissue: NDArray[np.bool_]  # the tissue mask and a 2-px rim (pen on it counts)
    seconds: float


def _outlines(mask: NDArray[np.bool_]) -> list[NDArray[np.float64]]:
    """Closed outlines (x, y in mask px, pixel edges) of each region, via contourpy (matplotlib's)."""
    if not mask.any():
        return []
    import contourpy

    padded = np.pad(mask.astype(np.float64), 1)
    # Upsample 2x with nearest so the 0.5 contour follows the pixel edges instead of cutting corners.
    z = np.repeat(np.repeat(padded, 2, axis=0), 2, axis=1)
    gen = contourpy.contour_generator(z=z, line_type=contourpy.LineType.Separate)
    rings = []
    for line in gen.lines(0.5):
        pts = (np.asarray(line, np.float64) + 0.5) / 2.0 - 1.0
        if len(pts) >= 4:
            rings.append(pts)
    return rings


def verdict_of(measures: Mapping[str, Any], config: QcConfig) -> tuple[Verdict, list[str]]:
    """pass | review | rescan and the reasons in words, from a qc section's measures.

    >>> from edge.config import QcConfig
    >>> verdict_of({"out_of_focus_fraction": 0.14, "hotspot": {"out_of_focus_fraction": 0.6}}, QcConfig())[0]
    'rescan'
    """
    rescan: list[str] = []
    review: list[str] = []
    oof = float(measures.get("out_of_focus_fraction") or 0.0)
    if oof >= config.rescan_out_of_focus_fraction:
        rescan.append(f"{oof:.1%} of the tissue is out of focus (rescan at {config.rescan_out_of_focus_fraction:.0%})")
    elif oof >= config.review_out_of_focus_fraction:
        review.append(f"{oof:.1%} of the tissue is out of focus")
    # A blurred next-best field may be the true hotspot with its figures hidden: worth a look. A fold
    # matters in the hotspot only (doubled tissue doubles its count).
    for i, spot in enumerate([measures.get("hotspot") or {}, *(measures.get("next_fields") or [])]):
        name = "the hotspot" if i == 0 else f"the next-best field {i}"
        spot_oof = float(spot.get("out_of_focus_fraction") or 0.0)
        if spot_oof >= config.hotspot_out_of_focus_fraction:
            (rescan if i == 0 else review).append(f"{name} is {spot_oof:.0%} out of focus")
    spot_fold = float((measures.get("hotspot") or {}).get("fold_fraction") or 0.0)
    if spot_fold >= config.hotspot_fold_fraction:
        review.append(f"the hotspot is {spot_fold:.0%} folded")
    fold = float(measures.get("fold_fraction") or 0.0)
    if fold >= config.review_fold_fraction:
        review.append(f"folds on {fold:.1%} of the tissue")
    pen = float(measures.get("pen_fraction") or 0.0)
    if pen >= config.review_pen_fraction:
        review.append(f"pen marks or dirt on {pen:.1%} of the tissue")
    saturated = float(measures.get("saturated_fraction") or 0.0)
    if saturated >= config.review_saturated_fraction:
        review.append(f"{saturated:.1%} of the tissue pixels are clipped (over-exposed)")
    if rescan:
        return "rescan", rescan + review
    return ("review", review) if review else ("pass", [])


# --- the accumulator fed by the pipeline ---------------------------------------------------------


@dataclass(frozen=True)
class TileQc:
    """What QC measured on one tile (``QcAccumulator.measure``): its cells' focus sums, tissue and clipped
    fractions, and its candidate stain pixels (optical densities), with the seconds it took."""

    x: int
    y: int
    n_rows: int
    n_cols: int
    sums: NDArray[np.float32]
    tissue: NDArray[Any]  # float32 at run time (a float32 array over an int)
    clipped: NDArray[Any]
    dense: NDArray[np.float32]
    seconds: float


@dataclass(frozen=True)
class TileSample:
    """What QC takes from one full-size tile in the tile stream's readers (``QcAccumulator.sample_batch``): the
    binned green rows its focus sums need and its sparse colour pixels, both copies; measured later, with
    other tiles, into a :class:`TileQc`."""

    x: int
    y: int
    n_rows: int
    n_cols: int
    rows: NDArray[np.int16]
    colour: NDArray[np.uint8]
    seconds: float


TileItem = TileSample | TileQc | None  # what QC's TileMeasure gives for each tile of the stream


@dataclass
class _Grid:
    sums: NDArray[np.float32]
    tissue: NDArray[np.float32]
    clipped: NDArray[np.float32]
    seen: NDArray[np.bool_]


@dataclass
class QcAccumulator:
    """Per-tile quality, gathered on a slide-wide grid of ``cell_um`` cells while the tiles stream by.

    ``width``/``height`` are the slide in tile px (at ``mpp``); ``glass`` the empty glass's RGB.
    ``measure`` may run in any thread (the tile stream's readers); ``add``, ``add_tile`` and ``finish`` only
    in the loop that consumes the tile stream.
    """

    width: int
    height: int
    mpp: float
    config: QcConfig
    glass: NDArray[np.float32]
    seconds: float = 0.0
    _samples: list[NDArray[np.float32]] = field(default_factory=list)
    _pending: list[TileItem] = field(default_factory=list)
    _sampled: int = 0

    def __post_init__(self) -> None:
        self.bin = max(1, round(self.config.focus_mpp / self.mpp))
        self.cell = max(self.bin, round(self.config.cell_um / self.mpp) // self.bin * self.bin)
        rows, cols = -(-self.height // self.cell), -(-self.width // self.cell)
        self.grid = _Grid(
            np.zeros((2 * len(FOCUS_DIRECTIONS), rows, cols), np.float32), np.zeros((rows, cols), np.float32),
            np.zeros((rows, cols), np.float32), np.zeros((rows, cols), bool),
        )
        self._rng = np.random.default_rng(0)

    def add_tile(self, x: int, y: int, pixels: NDArray[np.uint8]) -> None:
        """One tile's pixels (h, w, 3) whose top-left is (x, y) in tile px: ``add(measure(x, y, pixels))``."""
        self.add(self.measure(x, y, pixels))
        self.measure_pending()

    def measure(self, x: int, y: int, pixels: NDArray[np.uint8]) -> TileQc | None:
        """What QC takes from one tile (h, w, 3) at (x, y) in tile px; None for a tile smaller than a cell.

        Reads only the accumulator's settings, never its state, so it may run in any thread.
        """
        return self.measure_stack([x], [y], pixels[None])[0]

    def sample_batch(self, tiles: tuple[Tile, ...], pixels: NDArray[np.uint8]) -> tuple[TileItem, ...]:
        """What QC takes from one batch of the tile stream (a ``TileMeasure``, run in the stream's reader threads
        as each batch is decoded): the rows focus needs and the sparse colour pixels of each full-size tile (a
        :class:`TileSample`, measured later with other tiles by :meth:`measure_pending`), a smaller tile (at the
        slide's right or bottom edge) measured at once on its own pixels (not the white padding).

        Sampling is a few numpy calls a batch; measuring many tiles at once takes the interpreter lock a few
        times for all of them instead of a hundred times a batch, which the readers and the detector loop
        wait for (two threads measuring 4-tile batches ran at 0.42 of one thread's rate, 16-tile ones 0.75).
        """
        size = pixels.shape[1:3]
        full = [i for i, t in enumerate(tiles) if (t.height, t.width) == size]
        out: list[TileItem] = [None] * len(tiles)
        if full:
            samples = self._sample_tiles([tiles[i].x for i in full], [tiles[i].y for i in full],
                                         pixels if len(full) == len(tiles) else pixels[full])
            if samples is not None:
                for i, sample in zip(full, samples, strict=True):
                    out[i] = sample
        for i in sorted(set(range(len(tiles))) - set(full)):
            t = tiles[i]
            out[i] = self.measure(t.x, t.y, pixels[i, : t.height, : t.width])
        return tuple(out)

    def measure_batch(self, tiles: tuple[Tile, ...], pixels: NDArray[np.uint8]) -> tuple[TileQc | None, ...]:
        """``measure`` of each tile of one batch (sampled with :meth:`sample_batch`, measured at once)."""
        items = self.sample_batch(tiles, pixels)
        samples = [item for item in items if isinstance(item, TileSample)]
        measured = iter(self._measure_samples(samples))
        return tuple(next(measured) if isinstance(item, TileSample) else item for item in items)

    def measure_stack(
        self, xs: Sequence[int], ys: Sequence[int], stack: NDArray[np.uint8]
    ) -> list[TileQc | None]:
        """``measure`` of tiles of one size at once, ``stack`` (n, h, w, 3): the same figures as one by one."""
        samples = self._sample_tiles(xs, ys, stack)
        if samples is None:
            return [None] * len(stack)
        return list(self._measure_samples(samples))

    def _steps(self) -> tuple[int, int]:
        """(focus row step at focus_mpp, colour step at the tile's mpp) for this accumulator's cell."""
        c = self.cell // self.bin
        return (FOCUS_LINE_STEP if c % FOCUS_LINE_STEP == 0 else 1,
                COLOUR_STEP if self.cell % COLOUR_STEP == 0 else 1)

    def _sample_tiles(
        self, xs: Sequence[int], ys: Sequence[int], stack: NDArray[np.uint8]
    ) -> list[TileSample] | None:
        """A :class:`TileSample` of each tile of a stack of one size (its top-left at xs, ys); None when a tile is
        smaller than a cell. The binned focus rows and the colour pixels are copies: the tiles can go."""
        t0 = time.perf_counter()
        cell, b = self.cell, self.bin
        n_rows, n_cols = stack.shape[1] // cell, stack.shape[2] // cell
        if not (n_rows and n_cols):
            return None
        block = stack[:, : n_rows * cell, : n_cols * cell]
        step, k = self._steps()
        # Focus on the green channel binned to focus_mpp: green carries most of the contrast of both
        # stains. Only the binned rows each direction needs around every step-th one are binned.
        rows = _binned_rows(block, b, focus_row_indices(n_rows * (cell // b), step), 1)
        # Colour (tissue, clipping, stains) from a sparse grid of single pixels: enough per cell for a
        # fraction, and unmixed pixels are what Macenko wants.
        colour = np.ascontiguousarray(block[:, ::k, ::k])
        seconds = (time.perf_counter() - t0) / len(stack)
        return [TileSample(x, y, n_rows, n_cols, rows[i], colour[i], seconds)
                for i, (x, y) in enumerate(zip(xs, ys, strict=True))]

    def _measure_samples(self, samples: Sequence[TileSample]) -> list[TileQc]:
        """The measures of sampled tiles (all of one size), as one stack."""
        if not samples:
            return []
        t0 = time.perf_counter()
        first = samples[0]
        n_rows, n_cols = first.n_rows, first.n_cols
        c = self.cell // self.bin
        step, k = self._steps()
        lines = np.stack([s.rows for s in samples])
        colour = np.stack([s.colour for s in samples])
        sums = focus_sums_of_rows(lines, n_rows * c, c, step)
        ck = self.cell // k
        od = optical_density(colour, self.glass)
        red, green_od, blue = od[..., 0], od[..., 1], od[..., 2]  # per channel: numpy is slow over a last axis of 3
        stained = red + green_od + blue > self.config.tissue_od
        full = [colour[..., i] == 255 for i in range(3)]
        clipped = stained & ((full[0] & full[1]) | (full[0] & full[2]) | (full[1] & full[2])
                             | (np.minimum(np.minimum(colour[..., 0], colour[..., 1]), colour[..., 2]) == 0))
        tissue = _cell_sum(stained.astype(np.float32), ck) / (ck * ck)
        clip = _cell_sum(clipped.astype(np.float32), ck) / (ck * ck)
        # Stain samples: dense pixels (Macenko's beta on the mean OD) of colours a mix of H and E can make:
        # both absorb green most (or nearly); blue and green ink, black ink and dirt would otherwise become
        # the robust extremes Macenko takes as the stains. Both also absorb blue at least
        # stain_min_blue_per_red as much as red (haematoxylin 0.44-1.4, eosin >1; blue marker ink ~0.1): ink
        # laid over nuclei otherwise passes as haematoxylin and turns the H vector towards the ink, so that
        # the same ink over tissue then lies inside the H-E cone and is missed as pen.
        dense = ((red + green_od + blue > 3 * MIN_STAIN_OD) & (green_od >= 0.9 * red) & (green_od >= 0.9 * blue)
                 & (blue >= self.config.stain_min_blue_per_red * red)
                 & (np.minimum(np.minimum(red, green_od), blue) < self.config.dark_od))
        seconds = (time.perf_counter() - t0) / len(samples)
        return [TileQc(s.x, s.y, n_rows, n_cols, sums[:, i], tissue[i], clip[i], od[i][dense[i]], s.seconds + seconds)
                for i, s in enumerate(samples)]

    def add(self, item: TileItem) -> None:
        """One tile's item from the stream (``sample_batch``: a sample, a measure or None), in the stream's order;
        call from one thread. Samples wait for :meth:`measure_pending`; the grid takes every item in this order."""
        if self._pending or isinstance(item, TileSample):
            self._pending.append(item)
        else:
            self._place(item)

    def measure_pending(self, at_least: int = 0) -> None:
        """Measure the waiting samples as one stack (once there are ``at_least`` of them) and place every waiting
        item on the grid in the stream's order. The pipeline calls it while the detector runs a batch."""
        samples = [item for item in self._pending if isinstance(item, TileSample)]
        if not self._pending or len(samples) < at_least:
            return
        measured = iter(self._measure_samples(samples))
        pending, self._pending = self._pending, []
        for item in pending:
            self._place(next(measured) if isinstance(item, TileSample) else item)

    def _place(self, measured: TileQc | None) -> None:
        """A tile's measures onto the slide's grid."""
        if measured is None:
            return
        t0 = time.perf_counter()
        x, y, n_rows, n_cols = measured.x, measured.y, measured.n_rows, measured.n_cols
        # Each cell lands on the slide-wide cell its centre falls in (at most half a cell off).
        rows = np.clip((y + (np.arange(n_rows) + 0.5) * self.cell) // self.cell, 0, self.grid.tissue.shape[0] - 1)
        cols = np.clip((x + (np.arange(n_cols) + 0.5) * self.cell) // self.cell, 0, self.grid.tissue.shape[1] - 1)
        index = np.ix_(rows.astype(np.intp), cols.astype(np.intp))
        g = self.grid
        g.sums[(slice(None), *index)] = measured.sums
        g.tissue[index] = measured.tissue
        g.clipped[index] = measured.clipped
        g.seen[index] = True
        dense = measured.dense
        if len(dense):
            n = min(len(dense), self.config.stain_samples_per_tile)
            self._samples.append(dense[self._rng.integers(0, len(dense), n)])
            self._sampled += len(self._samples[-1])
            if self._sampled > 2 * self.config.stain_samples_max:
                pooled = np.concatenate(self._samples)
                pooled = pooled[self._rng.integers(0, len(pooled), self.config.stain_samples_max)]
                self._samples, self._sampled = [pooled], len(pooled)
        self.seconds += measured.seconds + time.perf_counter() - t0

    # --- the slide ------------------------------------------------------------------------------

    def out_of_focus_map(self) -> tuple[NDArray[np.bool_], NDArray[np.bool_], NDArray[np.float32]]:
        """(tissue cells, out-of-focus cells, pooled blur per cell)."""
        g = self.grid
        tissue = g.seen & (g.tissue >= self.config.min_cell_tissue)
        pooled = np.stack([ndimage.uniform_filter(s * tissue, POOL_CELLS, mode="constant") for s in g.sums])
        blur = crete_blur(pooled)
        # Hysteresis (as in Canny's edges): cells above focus_threshold seed a region that grows
        # through neighbours above focus_grow_threshold, so a region's rim, where pooling mixes sharp
        # and blurred cells, is kept without lowering the bar for isolated soft cells.
        seeds = tissue & (blur > self.config.focus_threshold)
        grow = tissue & (blur > self.config.focus_grow_threshold)
        labels, _ = ndimage.label(grow)
        kept = np.unique(labels[seeds])
        return tissue, np.isin(labels, kept[kept > 0]), blur

    def stains(self) -> StainVectors | None:
        if not self._samples:
            return None
        try:
            return macenko(np.concatenate(self._samples))
        except QcError:
            return None

    def slide_maps(
        self,
        *,
        thumbnail: NDArray[np.uint8] | None,
        mask: NDArray[np.bool_],
        mask_mpp: tuple[float, float],
        px0_per_tile_px: tuple[float, float],
        mpp0: tuple[float, float],
    ) -> SlideQc:
        """The slide-wide part of :meth:`finish`, which needs every tile but no figure: the out-of-focus map, the
        stain vectors, pen and folds on the thumbnail. The pipeline runs it in a thread as soon as the tile
        stream ends, while the last candidates are classified and the overview is read; nothing may be
        added to the accumulator after it starts."""
        self.measure_pending()
        t0 = time.perf_counter()
        cfg = self.config
        tissue, oof, blur = self.out_of_focus_map()
        stains = self.stains()
        stain_matrix = stains.matrix() if stains is not None else REFERENCE_STAINS
        thumb_scale = (mask_mpp[0] / mpp0[0], mask_mpp[1] / mpp0[1])
        fold = np.zeros(mask.shape, bool)
        pen = np.zeros(mask.shape, bool)
        if thumbnail is not None and mask.any():
            od = optical_density(thumbnail[:, :, :3], self.glass)
            min_px = cfg.min_region_mm2 * 1e6 / (mask_mpp[0] * mask_mpp[1])
            pen = _remove_small(pen_mask(od, stain_matrix, cfg), min_px)
            tissue_not_pen = mask & ~ndimage.binary_dilation(pen, iterations=2)
            fold = _remove_small(fold_mask(od, tissue_not_pen, stain_matrix, cfg, mask_mpp), min_px)
        cell_px0 = (self.cell * px0_per_tile_px[0], self.cell * px0_per_tile_px[1])
        maps = QcMaps(oof, cell_px0, fold, pen, thumb_scale, tissue)
        near_tissue = ndimage.binary_dilation(mask, iterations=2)
        return SlideQc(maps, blur, stains, mask, mask_mpp, mpp0, near_tissue, time.perf_counter() - t0)

    def finish(
        self,
        slide: SlideQc,
        *,
        figures: Sequence[Figure],
        hotspot_area_mm2: float,
        plain_hotspot: tuple[float, float] | None,
    ) -> tuple[dict[str, Any], QcMaps]:
        """The slide's qc section (docs/results.md) and its maps, from :meth:`slide_maps`' result and the figures."""
        t0 = time.perf_counter()
        cfg = self.config
        maps, blur, stains, near_tissue = slide.maps, slide.blur, slide.stains, slide.near_tissue
        mask, mask_mpp, mpp0 = slide.mask, slide.mask_mpp, slide.mpp0
        tissue, oof, fold, pen = maps.tissue_cells, maps.out_of_focus, maps.fold, maps.pen
        assert tissue is not None
        tissue_px = max(int(mask.sum()), 1)
        n_tissue = int(tissue.sum())
        radius_um = hotspot_radius_um(hotspot_area_mm2)
        cell_um = (maps.cell_px0[0] * mpp0[0], maps.cell_px0[1] * mpp0[1])
        thumb_um = mask_mpp

        def field_of(centre: tuple[float, float] | None, count: int | None = None) -> dict[str, Any]:
            if centre is None or not all(math.isfinite(c) for c in centre):
                return {"center_x_um": None, "center_y_um": None, "out_of_focus_fraction": None, "fold_fraction": None}
            in_cells = _circle(tissue.shape, cell_um, centre, radius_um) & tissue
            in_thumb = _circle(mask.shape, thumb_um, centre, radius_um) & mask
            spot: dict[str, Any] = {
                "center_x_um": round(centre[0], 2), "center_y_um": round(centre[1], 2),
                "out_of_focus_fraction": _ratio(int((in_cells & oof).sum()), int(in_cells.sum())),
                "fold_fraction": _ratio(int((in_thumb & fold).sum()), int(in_thumb.sum())),
            }
            if count is not None:
                spot["mitotic_count"] = count
            return spot

        mitotic = [f for f in figures if f.is_mitotic]
        points = np.array([(f.x_um, f.y_um) for f in mitotic], np.float64).reshape(-1, 2)
        next_fields = []
        rest = points
        if plain_hotspot is not None and len(rest):
            rest = rest[~points_in_hotspot(find_hotspot(np.array([plain_hotspot]), radius_um), rest)]
        for _ in range(cfg.next_fields):
            if not len(rest):
                break
            spot = find_hotspot(rest, radius_um)
            next_fields.append(field_of((spot.center_x_um, spot.center_y_um), spot.mitotic_count))
            rest = rest[~points_in_hotspot(spot, rest)]
        section: dict[str, Any] = {
            "schema": "mitosis-edge/qc/1",
            "tissue_cells": n_tissue,
            "cell_um": round(cell_um[0], 3),
            "focus_mpp": round(self.mpp * self.bin, 4),
            "focus_median": round(float(np.median(blur[tissue])), 4) if n_tissue else None,
            "focus_p90": round(float(np.percentile(blur[tissue], 90)), 4) if n_tissue else None,
            "out_of_focus_fraction": _ratio(int(oof.sum()), n_tissue),
            "fold_fraction": _ratio(int(fold.sum()), tissue_px),
            "pen_fraction": _ratio(int((pen & near_tissue).sum()), tissue_px),
            "pen_regions": int(ndimage.label(pen)[1]),
            "fold_regions": int(ndimage.label(fold)[1]),
            "saturated_fraction": round(float(self.grid.clipped[tissue].mean()), 5) if n_tissue else 0.0,
            "stains": stains.to_json_dict() if stains is not None else None,
            "hotspot": field_of(plain_hotspot),
            "next_fields": next_fields,
        }
        if cfg.hotspot_excludes_blur:
            rows = np.clip((points[:, 1] // cell_um[1]).astype(np.intp), 0, oof.shape[0] - 1)
            cols = np.clip((points[:, 0] // cell_um[0]).astype(np.intp), 0, oof.shape[1] - 1)
            spot = find_hotspot(points[~oof[rows, cols]], radius_um)
            section["sharp_hotspot"] = field_of((spot.center_x_um, spot.center_y_um), spot.mitotic_count)
        verdict, reasons = verdict_of(section, cfg)
        section["verdict"] = verdict
        section["reasons"] = reasons
        self.seconds += slide.seconds + time.perf_counter() - t0
        section["seconds"] = round(self.seconds, 4)
        return section, maps


def _binned_rows(image: NDArray[np.uint8], b: int, at: NDArray[np.intp], channel: int) -> NDArray[np.int16]:
    """Rows ``at`` (clipped) of one channel of the image (``(..., h, w, channels)``) binned b x b, as int16 sums
    (b <= 11; Crete's ratios ignore the scale). Whole pixel rows are copied first (contiguous: far faster than
    gathering one channel's strided bytes), then each of the b x b pixels of a bin added in place."""
    at = np.clip(at, 0, image.shape[-3] // b - 1) * b
    raw = (at[:, None] + np.arange(b)).ravel()
    width, channels = image.shape[-2] // b, image.shape[-1]
    rows = np.take(image[..., : width * b, :], raw, axis=-3)
    rows = rows.reshape(*rows.shape[:-3], len(at), b, width, b * channels)
    binned = rows[..., 0, :, channel].astype(np.int16)
    for i in range(b):
        for j in range(b):
            if i or j:
                binned += rows[..., i, :, j * channels + channel]
    return binned


def _cell_sum(a: NDArray[np.float32], cell: tuple[int, int] | int) -> NDArray[np.float32]:
    """Sums over cells (h, w) of an array ``(..., H, W)`` whose sides are multiples of them (last axis first)."""
    ch, cw = (cell, cell) if isinstance(cell, int) else cell
    rows, cols = a.shape[-2] // ch, a.shape[-1] // cw
    return np.asarray(a.reshape(*a.shape[:-2], rows, ch, cols, cw).sum(axis=-1).sum(axis=-2), np.float32)


def summary_lines(qc: Mapping[str, Any], scanner: str | None = None) -> list[str]:
    """The qc section for a person: verdict and reasons, the fractions, the sharp-tissue hotspot, drift.

    >>> summary_lines({"verdict": "pass", "reasons": [], "out_of_focus_fraction": 0.0, "focus_median": 0.3})[0]
    'scan QC    pass'
    """
    reasons = "; ".join(qc.get("reasons") or [])
    lines = [f"scan QC    {qc.get('verdict')}" + (f": {reasons}" if reasons else "")]
    focus = qc.get("focus_median")
    lines.append(
        f"           out of focus {float(qc.get('out_of_focus_fraction') or 0):.1%}, "
        f"folds {float(qc.get('fold_fraction') or 0):.1%}, pen/dirt {float(qc.get('pen_fraction') or 0):.1%}, "
        f"clipped {float(qc.get('saturated_fraction') or 0):.1%}; "
        f"focus {'n/a' if focus is None else f'{focus:.2f}'} (Crete blur, 0 sharp)"
        + (f"; scanner {scanner}" if scanner else "")
    )
    spot = qc.get("hotspot") or {}
    if spot.get("out_of_focus_fraction") is not None:
        lines.append(f"           hotspot {spot['out_of_focus_fraction']:.0%} out of focus, "
                     f"{float(spot.get('fold_fraction') or 0):.0%} folded")
    sharp = qc.get("sharp_hotspot")
    if sharp and sharp.get("mitotic_count") is not None:
        lines.append(f"           best field among sharp tissue: mitotic count {sharp['mitotic_count']}")
    baseline = qc.get("baseline") or {}
    if baseline.get("message"):
        lines.append(f"           {'drift' if baseline.get('drift') else 'outside baseline'}: {baseline['message']}")
    return lines


def _ratio(part: int, whole: int) -> float:
    return round(part / whole, 5) if whole else 0.0


def _circle(
    shape: tuple[int, ...], um_per_px: tuple[float, float], centre: tuple[float, float], radius: float
) -> NDArray[np.bool_]:
    # Only the circle's bounding box is measured (the same pixels as over the whole grid).
    y0 = max(0, math.floor((centre[1] - radius) / um_per_px[1]) - 1)
    y1 = min(shape[0], math.ceil((centre[1] + radius) / um_per_px[1]) + 1)
    x0 = max(0, math.floor((centre[0] - radius) / um_per_px[0]) - 1)
    x1 = min(shape[1], math.ceil((centre[0] + radius) / um_per_px[0]) + 1)
    out = np.zeros(shape[:2], bool)
    if y1 <= y0 or x1 <= x0:
        return out
    ys = (np.arange(y0, y1) + 0.5)[:, None] * um_per_px[1]
    xs = (np.arange(x0, x1) + 0.5)[None, :] * um_per_px[0]
    out[y0:y1, x0:x1] = np.hypot(xs - centre[0], ys - centre[1]) <= radius
    return out
