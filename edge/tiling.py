"""Tissue mask and tile grid: pure geometry on numpy arrays, no I/O.

Coordinates. A tile plan lives in *output pixels*: pixels at the target mpp (0.25 µm/px by
default), origin at the slide's top-left corner. Tile ``(x, y, width, height)`` is in output px;
``x0 = x * px0_per_out_x`` (and likewise y) is the same corner in *level-0 pixels* of the slide
file, which is what exports and viewers such as QuPath use. Microns are level-0 px times the
slide's level-0 mpp, or output px times the plan's mpp.
"""

from __future__ import annotations

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
    return np.clip(np.percentile(sample, 99, axis=0), GLASS_MIN, 255.0).astype(np.float32)


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
    """The tiles of a slide that touch tissue, in read order.

    Read order: vertical strips of ``strip_columns`` tile columns, left to right; within a strip,
    row by row. The stored tiles a row shares with the next one are then still in the reader's
    decode cache when the next row needs them, however wide the slide: the cache needed depends on
    the strip's width, not the slide's."""

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

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def grid_size(self) -> int:
        """Tiles in the full grid, tissue or not."""
        return self.columns * self.rows


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
    """Tiles of ``tiling.tile_size`` output px with ``tiling.overlap``, keeping those that touch
    tissue, in read order (see TilePlan). ``mask`` covers the whole slide at any resolution (None
    keeps every tile)."""
    cfg = tiling or TilingConfig()
    fx, fy = px0_per_out
    out_w, out_h = max(1, math.floor(width0 / fx)), max(1, math.floor(height0 / fy))
    stride = cfg.tile_size - cfg.overlap
    xs = grid_starts(out_w, cfg.tile_size, stride)
    ys = grid_starts(out_h, cfg.tile_size, stride)
    touches = _touch_test(mask, out_w, out_h) if mask is not None else None
    tiles: list[Tile] = []
    for strip in range(0, len(xs), cfg.strip_columns):
        for row, y in enumerate(ys):
            h = min(cfg.tile_size, out_h - y)
            for col in range(strip, min(strip + cfg.strip_columns, len(xs))):
                x = xs[col]
                w = min(cfg.tile_size, out_w - x)
                if touches is not None and not touches(x, y, w, h):
                    continue
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
