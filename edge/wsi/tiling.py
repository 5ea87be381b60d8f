"""Tissue mask and tile grid: pure geometry on numpy arrays, no I/O.

Coordinates. A tile plan lives in *output pixels*: pixels at the target mpp (0.25 µm/px by
default), origin at the slide's top-left corner. Tile ``(x, y, width, height)`` is in output px;
``x0 = x * px0_per_out_x`` (and likewise y) is the same corner in *level-0 pixels* of the slide
file, which is what exports and viewers such as QuPath use. Microns are level-0 px times the
slide's level-0 mpp, or output px times the plan's mpp.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from edge.config import TilingConfig, TissueConfig

# --- tissue mask ---------------------------------------------------------------------------------

MASK_ROWS_PER_CHUNK = 128  # thumbnail rows converted to float at once
NEAR_BLACK = 25  # max(R, G, B) below this is scanner border or pen, not tissue
GLASS_MIN = 200.0  # the glass is never taken darker than this, even on a slide that is all tissue


def tissue_mask(thumbnail: np.ndarray, mpp: float, params: TissueConfig | None = None) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail taken at ``mpp`` µm/px.

    A pixel is stained when its HSV saturation passes the threshold, or when its summed optical
    density (against the glass's own colour, see :func:`glass_colour`) does and it is not grey.
    Closing bridges gaps, opening removes specks, holes are filled, and pieces smaller than the
    minimum area are dropped. Near-black pixels (scanner borders, pen) count as no tissue.
    """
    p = params or TissueConfig()
    glass = glass_colour(thumbnail)
    stained = np.zeros(thumbnail.shape[:2], dtype=bool)
    for r in range(0, thumbnail.shape[0], MASK_ROWS_PER_CHUNK):  # row chunks keep float temporaries small
        stained[r : r + MASK_ROWS_PER_CHUNK] = _stained(thumbnail[r : r + MASK_ROWS_PER_CHUNK], glass, p)
    mask = stained
    if p.closing_radius_um > 0:
        mask = ndimage.binary_closing(mask, structure=_disk(p.closing_radius_um / mpp), border_value=0)
        mask |= stained  # closing must not erode at the image border
    if p.opening_radius_um > 0:
        mask = ndimage.binary_opening(mask, structure=_disk(p.opening_radius_um / mpp))
    if p.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    if p.min_object_area_mm2 > 0 and mask.any():
        labels, _n = ndimage.label(mask)
        areas_mm2 = np.bincount(labels.ravel())[1:] * (mpp * mpp * 1e-6)
        keep = np.concatenate([[False], areas_mm2 >= p.min_object_area_mm2])
        mask = keep[labels]
    return np.asarray(mask, dtype=bool)


def glass_colour(thumbnail: np.ndarray) -> np.ndarray:
    """The empty glass's RGB: the 99th percentile per channel, clipped to [GLASS_MIN, 255].

    Scanners differ: one shows glass at 250, another at (226, 221, 228); optical density is measured
    against the glass, so a greyish background is not mistaken for faint tissue. An image of tissue
    only still has some bright lumen or fat, and the floor keeps a dense one from calling tissue glass.
    """
    sample = thumbnail[::2, ::2, :3].reshape(-1, 3)
    if sample.size == 0:
        return np.full(3, 255.0, np.float32)
    glass: np.ndarray = np.clip(np.percentile(sample, 99, axis=0), GLASS_MIN, 255.0).astype(np.float32)
    return glass


def _stained(rgb_u8: np.ndarray, glass: np.ndarray, p: TissueConfig) -> np.ndarray:
    """Pixels whose saturation or summed optical density says stain (and that are not near-black)."""
    rgb = rgb_u8[:, :, :3].astype(np.float32)
    mx = rgb.max(axis=2)
    mn = rgb.min(axis=2)
    saturation = (mx - mn) / np.maximum(mx, 1.0)
    optical_density = -np.log10(np.clip(rgb / glass, 1.0 / 255.0, 1.0)).sum(axis=2)
    dense_and_tinted = (optical_density > p.optical_density_threshold) & (saturation > p.grey_saturation)
    stained = (saturation > p.saturation_threshold) | dense_and_tinted
    return np.asarray(stained & (mx > NEAR_BLACK), dtype=bool)  # black borders and pen are dark but not tissue


def tissue_area_mm2(mask: np.ndarray, mpp_x: float, mpp_y: float | None = None) -> float:
    """Area covered by a mask whose pixels are ``mpp_x`` x ``mpp_y`` µm."""
    return float(mask.sum()) * mpp_x * (mpp_y if mpp_y is not None else mpp_x) * 1e-6


def _disk(radius_px: float) -> np.ndarray:
    r = max(0, round(radius_px))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return np.asarray(xx * xx + yy * yy <= r * r + 0.5, dtype=bool)


# --- tile plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tile:
    """One tile. (x, y, width, height) in output px; (x0, y0, width0, height0) in level-0 px."""

    index: int
    col: int
    row: int
    x: int
    y: int
    width: int
    height: int
    x0: float
    y0: float
    width0: float
    height0: float


@dataclass(frozen=True)
class TilePlan:
    """The tiles of a slide that cover its tissue, in read order.

    All tiles have the same size (``tile_size``, or the slide's side where it is shorter). The
    *core* of a tile is the tile less ``overlap / 2`` px on every side that does not lie on the
    slide's edge; a figure whose centre is in a core is at least half the overlap from the tile's
    edge, so it is whole in that tile. :class:`edge.analysis.detect.TileOwnership` gives each point to the
    tile whose centre is nearest (L∞): that tile's core holds the point whenever any core does.

    Read order: vertical strips ``strip_columns`` grid columns wide, left to right; within a strip,
    top to bottom. The stored tiles a row shares with the next one are then still in the reader's
    decode cache when the next row needs them, however wide the slide: the cache needed depends on
    the strip's width, not the slide's. ``col`` and ``row`` of a tile are the grid cell its origin
    falls in (for a ``grid`` layout, its grid position); ``columns`` x ``rows`` is that grid's size
    and ``grid_tiles`` how many tiles the fixed grid keeps for the same mask (the baseline the
    ``fit`` layout is measured against)."""

    tiles: tuple[Tile, ...]
    tile_size: int
    overlap: int
    width: int  # slide size in output px
    height: int
    mpp_x: float  # output µm/px
    mpp_y: float
    px0_per_out_x: float
    px0_per_out_y: float
    columns: int
    rows: int
    layout: str = "grid"
    grid_tiles: int = 0

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def grid_size(self) -> int:
        """Tiles in the full grid, tissue or not."""
        return self.columns * self.rows

    @property
    def margin(self) -> int:
        """Px between a tile's edge and its core (half the overlap)."""
        return self.overlap // 2

    def core(self, tile: Tile) -> tuple[int, int, int, int]:
        """(x_start, y_start, x_end, y_end) of the tile's core in output px, ends exclusive."""
        m = self.margin
        return (
            tile.x + m if tile.x > 0 else 0,
            tile.y + m if tile.y > 0 else 0,
            tile.x + tile.width - m if tile.x + tile.width < self.width else self.width,
            tile.y + tile.height - m if tile.y + tile.height < self.height else self.height,
        )


def grid_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one axis: every ``stride`` px, the last one moved back so it ends at the
    edge (no tile leaves the slide). A side shorter than one tile gets one tile at 0."""
    if length <= tile:
        return [0]
    n = math.ceil((length - tile) / stride) + 1
    starts = [min(i * stride, length - tile) for i in range(n)]
    return sorted(set(starts))


def plan_tiles(
    width0: int,
    height0: int,
    px0_per_out: tuple[float, float],
    mpp: tuple[float, float],
    mask: np.ndarray | None,
    tiling: TilingConfig | None = None,
) -> TilePlan:
    """Tiles of ``tiling.tile_size`` output px that cover the tissue, in read order (see TilePlan).

    ``mask`` covers the whole slide at any resolution; None keeps every tile of the grid. Layout
    ``grid``: the fixed grid on a stride of ``tile_size - overlap``, keeping the tiles that touch
    tissue. Layout ``fit`` (see :func:`fit_tile_origins`): every mask pixel, dilated by half the
    overlap (the largest figure radius the overlap keeps whole), lies in the core of some tile, with
    tiles placed at the tissue's own edges instead of a global grid.
    """
    cfg = tiling or TilingConfig()
    fx, fy = px0_per_out
    out_w, out_h = max(1, math.floor(width0 / fx)), max(1, math.floor(height0 / fy))
    stride = cfg.tile_size - cfg.overlap
    xs = grid_starts(out_w, cfg.tile_size, stride)
    ys = grid_starts(out_h, cfg.tile_size, stride)
    touches = _touch_test(mask, out_w, out_h) if mask is not None else None
    grid: list[tuple[int, int]] = [
        (x, y)
        for y in ys
        for x in xs
        if touches is None or touches(x, y, min(cfg.tile_size, out_w - x), min(cfg.tile_size, out_h - y))
    ]
    if cfg.layout == "fit" and mask is not None:
        origins = fit_tile_origins(mask, out_w, out_h, cfg.tile_size, cfg.overlap)
    else:
        origins = grid
    strip_px = stride * cfg.strip_columns
    origins = sorted(set(origins), key=lambda o: (o[0] // strip_px, o[1], o[0]))
    tiles: list[Tile] = []
    for x, y in origins:
        w, h = min(cfg.tile_size, out_w - x), min(cfg.tile_size, out_h - y)
        col, row = _grid_cell(xs, x), _grid_cell(ys, y)
        tiles.append(Tile(len(tiles), col, row, x, y, w, h, x * fx, y * fy, w * fx, h * fy))
    return TilePlan(
        tiles=tuple(tiles),
        tile_size=cfg.tile_size,
        overlap=cfg.overlap,
        width=out_w,
        height=out_h,
        mpp_x=mpp[0],
        mpp_y=mpp[1],
        px0_per_out_x=fx,
        px0_per_out_y=fy,
        columns=len(xs),
        rows=len(ys),
        layout=cfg.layout if mask is not None else "grid",
        grid_tiles=len(grid),
    )


def _grid_cell(starts: list[int], origin: int) -> int:
    """Index of the last grid start at or before ``origin``."""
    return max(0, bisect.bisect_right(starts, origin) - 1)


def dilated_mask(mask: np.ndarray, out_w: int, out_h: int, radius_out: float) -> np.ndarray:
    """The mask grown by ``radius_out`` output px (a square, so at least the disk of that radius)."""
    mh, mw = mask.shape
    rx = math.ceil(radius_out * mw / out_w) if radius_out > 0 else 0
    ry = math.ceil(radius_out * mh / out_h) if radius_out > 0 else 0
    if rx == 0 and ry == 0:
        return np.asarray(mask, dtype=bool)
    return np.asarray(ndimage.binary_dilation(mask, structure=np.ones((2 * ry + 1, 2 * rx + 1), bool)), dtype=bool)


FIT_PHASES = 4  # band offsets tried per tissue piece (fractions of a core) in the fit layout


def fit_tile_origins(mask: np.ndarray, out_w: int, out_h: int, tile_size: int, overlap: int) -> list[tuple[int, int]]:
    """Origins (x, y) in output px of tiles whose cores cover every pixel of ``mask`` dilated by
    ``overlap / 2`` output px; a mask pixel counts as covered only when its whole footprint lies in a
    core. No tile leaves the slide.

    Each piece of tissue (a connected part of the dilated mask) is planned on its own, so tiles
    start at its own edges: bands one core high from the piece's top (or, column-wise, its left
    edge), and within a band tiles from the leftmost uncovered pixel on, each starting at the first
    pixel the previous one left out. The band start is tried at ``FIT_PHASES`` offsets and in both
    orientations; the piece keeps the plan with the fewest tiles. Tiles that pieces close together
    would share twice are then dropped when other tiles cover all their pixels.
    """
    mh, mw = mask.shape
    # mask cells must fit in a core comfortably: on a very coarse mask (or tiny tiles) split them
    core = tile_size - 2 * (overlap // 2)
    k = max(1, math.ceil(2 * max(out_w / mw, out_h / mh) / max(1, core)))
    need = dilated_mask(mask, out_w, out_h, overlap / 2)
    if k > 1:
        need = np.repeat(np.repeat(need, k, axis=0), k, axis=1)
    axes = _Axes(need.shape, out_w, out_h, tile_size, overlap)
    labels, _n = ndimage.label(need, structure=np.ones((3, 3), bool))
    origins: list[tuple[int, int]] = []
    for piece, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        cells = labels[box] == piece
        best: list[tuple[int, int]] | None = None
        for phase in range(FIT_PHASES):
            offset = phase * core // FIT_PHASES
            for plan in (
                _band_cover(cells, box[0].start, box[1].start, axes.rows, axes.cols, offset),
                [(x, y) for y, x in _band_cover(cells.T, box[1].start, box[0].start, axes.cols, axes.rows, offset)],
            ):
                if best is None or len(plan) < len(best):
                    best = plan
        origins += best or []
    return _drop_redundant(sorted(set(origins)), need, axes)


@dataclass(frozen=True)
class _Axis:
    """One axis of the cell array: cell edges in output px and the tile's size and core margin on it."""

    edges: np.ndarray  # output px of the cell edges, len = cells + 1
    length: int  # slide side in output px
    size: int  # tile side (the slide's side where shorter than a tile)
    margin: int

    def start_for(self, core_start: float) -> int:
        """The tile origin whose core starts at (or before) ``core_start``, kept inside the slide."""
        return min(max(0, math.floor(core_start) - self.margin), self.length - self.size)

    def core_cells(self, start: int) -> slice:
        """The cells whose whole footprint lies in the core of a tile at ``start``."""
        lo = start + self.margin if start > 0 else 0
        hi = start + self.size - self.margin if start + self.size < self.length else self.length
        first = int(np.searchsorted(self.edges, lo - 1e-9, side="left"))
        last = int(np.searchsorted(self.edges, hi + 1e-9, side="right")) - 1
        return slice(first, max(first, last))


class _Axes:
    def __init__(self, shape: tuple[int, ...], out_w: int, out_h: int, tile_size: int, overlap: int) -> None:
        mh, mw = shape
        m = overlap // 2
        self.rows = _Axis(np.arange(mh + 1) * (out_h / mh), out_h, min(tile_size, out_h), m)
        self.cols = _Axis(np.arange(mw + 1) * (out_w / mw), out_w, min(tile_size, out_w), m)


def _band_cover(
    cells: np.ndarray, row0: int, col0: int, rows: _Axis, cols: _Axis, offset: int
) -> list[tuple[int, int]]:
    """Row bands over a piece (``cells``, whose top-left cell is (row0, col0) of the whole array):
    the first band's core starts ``offset`` px above the piece. Returns tile origins (x, y)."""
    open_rows = np.flatnonzero(cells.any(axis=1))
    origins: list[tuple[int, int]] = []
    y = rows.start_for(rows.edges[row0 + open_rows[0]] - offset)
    while True:
        band = rows.core_cells(y)
        lo, hi = max(0, band.start - row0), max(0, band.stop - row0)
        occupied = np.flatnonzero(cells[lo:hi].any(axis=0))
        i = 0
        while i < len(occupied):
            x = cols.start_for(cols.edges[col0 + occupied[i]])
            origins.append((x, y))
            stop = cols.core_cells(x).stop - col0
            i += max(1, int(np.searchsorted(occupied[i:], stop, side="left")))
        below = open_rows[open_rows >= hi]
        if len(below) == 0:
            return origins
        nxt = rows.start_for(rows.edges[row0 + below[0]])
        if nxt <= y:  # the slide's bottom edge: the last band already reaches it
            raise RuntimeError(f"tile plan made no progress at row {row0 + below[0]}")
        y = nxt


def _drop_redundant(origins: list[tuple[int, int]], need: np.ndarray, axes: _Axes) -> list[tuple[int, int]]:
    """The origins less those whose needed cells other tiles' cores cover too (later ones first)."""
    cores = [(axes.rows.core_cells(y), axes.cols.core_cells(x)) for x, y in origins]
    count = np.zeros(need.shape, np.int32)
    for rows, cols in cores:
        count[rows, cols] += 1
    kept: list[tuple[int, int]] = []
    for origin, (rows, cols) in zip(reversed(origins), reversed(cores), strict=True):
        if (need[rows, cols] & (count[rows, cols] == 1)).any():
            kept.append(origin)
        else:
            count[rows, cols] -= 1
    return kept


@dataclass(frozen=True)
class PlanEfficiency:
    """How much of what a plan reads is tissue. Areas in mm².

    ``read_mm2`` counts every tile's pixels (overlaps twice: the detector sees them twice);
    ``covered_mm2`` is the union of the tiles (the area the plan owns), on the mask's raster."""

    tiles: int
    grid_tiles: int  # tiles the fixed grid keeps for the same mask
    tissue_mm2: float
    covered_mm2: float
    read_mm2: float

    @property
    def tissue_fraction(self) -> float:
        """Tissue area over the area read (0 for an empty plan)."""
        return self.tissue_mm2 / self.read_mm2 if self.read_mm2 > 0 else 0.0

    @property
    def tiles_vs_grid(self) -> float:
        return self.tiles / self.grid_tiles if self.grid_tiles else 1.0

    def to_json_dict(self) -> dict[str, float | int]:
        return {
            "tiles": self.tiles,
            "grid_tiles": self.grid_tiles,
            "tiles_vs_grid": round(self.tiles_vs_grid, 4),
            "tissue_mm2": round(self.tissue_mm2, 4),
            "covered_mm2": round(self.covered_mm2, 4),
            "read_mm2": round(self.read_mm2, 4),
            "tissue_fraction_of_read": round(self.tissue_fraction, 4),
        }


def plan_efficiency(plan: TilePlan, mask: np.ndarray, mask_mpp: tuple[float, float]) -> PlanEfficiency:
    """The efficiency of ``plan`` for the tissue ``mask`` (pixels of ``mask_mpp`` µm)."""
    mh, mw = mask.shape
    fx, fy = plan.width / mw, plan.height / mh  # output px per mask px
    union = np.zeros(mask.shape, bool)
    for t in plan.tiles:  # mask cells whose centre lies in the tile
        c0, c1 = math.ceil(t.x / fx - 0.5), math.ceil((t.x + t.width) / fx - 0.5)
        r0, r1 = math.ceil(t.y / fy - 0.5), math.ceil((t.y + t.height) / fy - 0.5)
        union[max(0, r0) : r1, max(0, c0) : c1] = True
    out_px_mm2 = plan.mpp_x * plan.mpp_y * 1e-6
    return PlanEfficiency(
        tiles=len(plan),
        grid_tiles=plan.grid_tiles,
        tissue_mm2=tissue_area_mm2(mask, *mask_mpp),
        covered_mm2=tissue_area_mm2(union, *mask_mpp),
        read_mm2=sum(t.width * t.height for t in plan.tiles) * out_px_mm2,
    )


def _touch_test(mask: np.ndarray, out_w: int, out_h: int) -> Callable[[int, int, int, int], bool]:
    """A function (x, y, w, h) -> bool: does the output-px rectangle touch any mask pixel?

    The rectangle is mapped onto the mask conservatively (outward), and a summed-area table makes
    each test O(1)."""
    mh, mw = mask.shape
    sat = np.zeros((mh + 1, mw + 1), np.int64)
    sat[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    sx, sy = mw / out_w, mh / out_h

    def touches(x: int, y: int, w: int, h: int) -> bool:
        c0 = max(0, math.floor(x * sx))
        r0 = max(0, math.floor(y * sy))
        c1 = min(mw, max(c0 + 1, math.ceil((x + w) * sx)))
        r1 = min(mh, max(r0 + 1, math.ceil((y + h) * sy)))
        return bool(sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0] > 0)

    return touches
