"""Scan faults planted in synthetic slides, with their truth: blurred regions, tissue folds, pen strokes, stain shift.

Pure geometry and pixel arithmetic on render blocks; the slide model (`edge.devtools.synth.model`) plans
them once per slide and calls these on each block it renders. Coordinates are level-0 px (pixel (i, j) covers
[i, i+1) x [j, j+1)); a block is given by its top-left corner (y, x).

- Blur: a disc in which haematoxylin and eosin amounts are Gaussian-blurred (sigma in px), as a
  scanner's focus plane missing the section there (1-2.5 µm, several depths of field).
- Fold: a band along a segment where the tissue lies doubled: stain amounts times ``factor`` (1.7-2.2).
- Pen: a polyline of marker ink over glass and tissue, multiplying the RGB by the ink's transmittance.
- Stain shift: the eosin optical-density vector turned out of the H-E plane by ``stain_shift_deg``,
  as after a change of eosin batch or stainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

Float32Array = NDArray[np.float32]

PEN_INKS: dict[str, tuple[float, float, float]] = {  # optical density per RGB channel of one marker line
    "green": (1.0, 0.25, 0.8),
    "blue": (1.1, 0.55, 0.1),
    "black": (1.6, 1.6, 1.6),
}
BLUR_SIGMA_UM = (1.0, 2.5)
BLUR_RADIUS_UM = (180.0, 400.0)
FOLD_LENGTH_UM = (300.0, 700.0)
FOLD_WIDTH_UM = (60.0, 140.0)
FOLD_FACTOR = (1.7, 2.2)
PEN_LENGTH_UM = (400.0, 900.0)
PEN_WIDTH_UM = (30.0, 60.0)


@dataclass(frozen=True)
class BlurRegion:
    id: int
    x_px: float
    y_px: float
    radius_px: float
    sigma_px: float
    over_hotspot: bool = False


@dataclass(frozen=True)
class Fold:
    id: int
    x0_px: float
    y0_px: float
    x1_px: float
    y1_px: float
    width_px: float
    factor: float


@dataclass(frozen=True)
class PenStroke:
    id: int
    colour: str
    points_px: tuple[tuple[float, float], ...]  # (x, y)
    width_px: float


@dataclass(frozen=True)
class PlantedFaults:
    """Every planted fault; empty by default (a clean slide)."""

    blur: tuple[BlurRegion, ...] = ()
    folds: tuple[Fold, ...] = ()
    pen: tuple[PenStroke, ...] = ()
    stain_shift_deg: float = 0.0
    hematoxylin_od: tuple[float, ...] = field(default=())  # the slide's stain vectors after any shift
    eosin_od: tuple[float, ...] = field(default=())

    @property
    def max_sigma_px(self) -> float:
        return max((b.sigma_px for b in self.blur), default=0.0)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "blur": [vars(b) for b in self.blur],
            "folds": [vars(f) for f in self.folds],
            "pen": [{"id": p.id, "colour": p.colour, "points_px": [list(q) for q in p.points_px],
                     "width_px": p.width_px} for p in self.pen],
            "stain_shift_deg": self.stain_shift_deg,
            "hematoxylin_od": list(self.hematoxylin_od),
            "eosin_od": list(self.eosin_od),
        }

    @classmethod
    def from_json_dict(cls, data: dict[str, Any] | None) -> PlantedFaults:
        if not data:
            return cls()
        return cls(
            blur=tuple(BlurRegion(**b) for b in data.get("blur", ())),
            folds=tuple(Fold(**f) for f in data.get("folds", ())),
            pen=tuple(
                PenStroke(int(p["id"]), str(p["colour"]), tuple((float(x), float(y)) for x, y in p["points_px"]),
                          float(p["width_px"]))
                for p in data.get("pen", ())
            ),
            stain_shift_deg=float(data.get("stain_shift_deg", 0.0)),
            hematoxylin_od=tuple(data.get("hematoxylin_od", ())),
            eosin_od=tuple(data.get("eosin_od", ())),
        )


def shift_eosin(
    hematoxylin_od: NDArray[np.float64], eosin_od: NDArray[np.float64], degrees: float
) -> NDArray[np.float64]:
    """The eosin OD vector turned by ``degrees`` towards the normal of the H-E plane, its length kept.

    >>> h, e = np.array([0.6, 0.8, 0.3]), np.array([0.1, 0.9, 0.4])
    >>> e2 = shift_eosin(h, e, 10.0)
    >>> round(math.degrees(math.acos(e @ e2 / np.linalg.norm(e) / np.linalg.norm(e2))), 6)
    10.0
    """
    if degrees == 0:
        return eosin_od
    length = float(np.linalg.norm(eosin_od))
    e = eosin_od / length
    normal = np.cross(hematoxylin_od, eosin_od)
    normal /= np.linalg.norm(normal)
    theta = math.radians(degrees)
    turned = math.cos(theta) * e + math.sin(theta) * normal
    return np.clip(turned, 0.01, None) * length / np.linalg.norm(np.clip(turned, 0.01, None))


def plan_faults(
    rng: np.random.Generator,
    *,
    width: int,
    height: int,
    mpp: float,
    blur_regions: int,
    folds: int,
    pen_strokes: int,
    tissue_point: Callable[[], tuple[float, float]],
    hotspot_px: tuple[float, float, float] | None = None,
    max_sigma_px: float = 16.0,
) -> PlantedFaults:
    """Draw the faults. ``tissue_point()`` returns a random (y, x) px in tissue; ``hotspot_px`` is
    (x, y, radius) of a field to blur on top of the ``blur_regions`` random ones."""
    side_um = min(width, height) * mpp
    blur: list[BlurRegion] = []
    if hotspot_px is not None:
        x, y, r = hotspot_px
        sigma = min(rng.uniform(*BLUR_SIGMA_UM) / mpp, max_sigma_px)
        blur.append(BlurRegion(0, float(x), float(y), float(r), float(sigma), over_hotspot=True))
    for _ in range(blur_regions):
        y, x = tissue_point()
        radius = min(rng.uniform(*BLUR_RADIUS_UM), 0.25 * side_um) / mpp
        sigma = min(rng.uniform(*BLUR_SIGMA_UM) / mpp, max_sigma_px)
        blur.append(BlurRegion(len(blur), float(x), float(y), float(radius), float(sigma)))
    planted_folds: list[Fold] = []
    for i in range(folds):
        y, x = tissue_point()
        half = min(rng.uniform(*FOLD_LENGTH_UM), 0.5 * side_um) / mpp / 2
        angle = rng.uniform(0, math.pi)
        dx, dy = half * math.cos(angle), half * math.sin(angle)
        planted_folds.append(
            Fold(i, float(x - dx), float(y - dy), float(x + dx), float(y + dy),
                 float(rng.uniform(*FOLD_WIDTH_UM) / mpp), float(rng.uniform(*FOLD_FACTOR)))
        )
    pen: list[PenStroke] = []
    colours = sorted(PEN_INKS)
    for i in range(pen_strokes):
        y, x = tissue_point()
        steps = 6
        step = min(rng.uniform(*PEN_LENGTH_UM), 0.6 * side_um) / mpp / steps
        heading = rng.uniform(0, 2 * math.pi)
        points = [(float(x), float(y))]
        for _ in range(steps):
            heading += rng.normal(0.0, 0.35)
            x = float(np.clip(x + step * math.cos(heading), 0, width - 1))
            y = float(np.clip(y + step * math.sin(heading), 0, height - 1))
            points.append((x, y))
        pen.append(PenStroke(i, colours[i % len(colours)], tuple(points), float(rng.uniform(*PEN_WIDTH_UM) / mpp)))
    return PlantedFaults(tuple(blur), tuple(planted_folds), tuple(pen))


def segment_distance(ys: NDArray[np.float32], xs: NDArray[np.float32], p0: tuple[float, float],
                     p1: tuple[float, float]) -> NDArray[np.float32]:
    """Distance of pixel centres (ys, xs broadcastable) to the segment p0-p1 given as (x, y).

    >>> float(segment_distance(np.float32([[0.5]]), np.float32([[5.5]]), (0.0, 3.5), (10.0, 3.5))[0, 0])
    3.0
    """
    ax, ay = p0
    dx, dy = p1[0] - ax, p1[1] - ay
    length2 = dx * dx + dy * dy
    px, py = xs - np.float32(ax), ys - np.float32(ay)
    t = np.clip((px * dx + py * dy) / length2, 0.0, 1.0) if length2 > 0 else np.zeros_like(px)
    return np.asarray(np.hypot(px - t * dx, py - t * dy), dtype=np.float32)


def _block_coords(y: int, x: int, h: int, w: int) -> tuple[Float32Array, Float32Array]:
    return (np.arange(y, y + h, dtype=np.float32)[:, None] + 0.5, np.arange(x, x + w, dtype=np.float32)[None, :] + 0.5)


def blur_block(hematoxylin: Float32Array, eosin: Float32Array, regions: tuple[BlurRegion, ...], y: int, x: int) -> None:
    """Blur the stain amounts inside each region that touches the block (in place). The block
    must extend 3 sigma past the pixels that will be kept."""
    h, w = hematoxylin.shape
    for region in regions:
        r = region.radius_px
        if region.y_px + r < y or region.y_px - r > y + h or region.x_px + r < x or region.x_px - r > x + w:
            continue
        ys, xs = _block_coords(y, x, h, w)
        inside = np.hypot(ys - np.float32(region.y_px), xs - np.float32(region.x_px)) <= r
        if not inside.any():
            continue
        for amount in (hematoxylin, eosin):
            blurred = ndimage.gaussian_filter(amount, region.sigma_px, mode="nearest")
            amount[inside] = blurred[inside]


def fold_block(hematoxylin: Float32Array, eosin: Float32Array, folds: tuple[Fold, ...], y: int, x: int) -> None:
    """Multiply the stain amounts inside each fold band by its factor (in place), with a 1 px soft edge."""
    h, w = hematoxylin.shape
    for fold in folds:
        reach = fold.width_px / 2 + 2
        if (max(fold.y0_px, fold.y1_px) + reach < y or min(fold.y0_px, fold.y1_px) - reach > y + h
                or max(fold.x0_px, fold.x1_px) + reach < x or min(fold.x0_px, fold.x1_px) - reach > x + w):
            continue
        ys, xs = _block_coords(y, x, h, w)
        distance = segment_distance(ys, xs, (fold.x0_px, fold.y0_px), (fold.x1_px, fold.y1_px))
        weight = np.clip(fold.width_px / 2 + 0.5 - distance, 0.0, 1.0)
        if not weight.any():
            continue
        gain = 1.0 + (fold.factor - 1.0) * weight
        hematoxylin *= gain
        eosin *= gain


def pen_block(rgb: NDArray[np.uint8], strokes: tuple[PenStroke, ...], y: int, x: int) -> NDArray[np.uint8]:
    """The block with marker ink drawn over it (a new array when any stroke touches it)."""
    h, w = rgb.shape[:2]
    coverage: Float32Array | None = None
    for stroke in strokes:
        pts = np.array(stroke.points_px, dtype=np.float64)
        reach = stroke.width_px / 2 + 2
        if (pts[:, 1].max() + reach < y or pts[:, 1].min() - reach > y + h
                or pts[:, 0].max() + reach < x or pts[:, 0].min() - reach > x + w):
            continue
        ys, xs = _block_coords(y, x, h, w)
        distance = np.full((h, w), np.inf, np.float32)
        for p0, p1 in zip(stroke.points_px[:-1], stroke.points_px[1:], strict=True):
            np.minimum(distance, segment_distance(ys, xs, p0, p1), out=distance)
        cover = np.clip(stroke.width_px / 2 + 0.5 - distance, 0.0, 1.0)
        if not cover.any():
            continue
        od = np.asarray(PEN_INKS[stroke.colour], np.float32)
        layer = np.exp(-cover[:, :, None] * od)
        coverage = layer if coverage is None else coverage * layer
    if coverage is None:
        return rgb
    inked: NDArray[np.uint8] = np.clip(np.rint(rgb * coverage), 0, 255).astype(np.uint8)
    return inked


def disc_mask(
    regions: tuple[BlurRegion, ...], shape: tuple[int, int], px_per_cell: tuple[float, float]
) -> NDArray[np.bool_]:
    """The union of blur discs on a grid of cells (row, col) each ``px_per_cell`` (x, y) level-0 px: a cell
    is inside when its centre is."""
    ys = (np.arange(shape[0]) + 0.5)[:, None] * px_per_cell[1]
    xs = (np.arange(shape[1]) + 0.5)[None, :] * px_per_cell[0]
    out = np.zeros(shape, bool)
    for r in regions:
        out |= np.hypot(ys - r.y_px, xs - r.x_px) <= r.radius_px
    return out
