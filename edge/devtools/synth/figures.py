"""Planted figures: which mitoses, atypical figures and imposters, where (clusters make a hotspot), their sprites."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from edge.analysis.scoring import hotspot_radius_um
from edge.devtools.synth.params import (
    ATYPICAL_SHAPES,
    IMPOSTER_SHAPES,
    NORMAL_SHAPE_WEIGHTS,
    NORMAL_SHAPES,
)
from edge.devtools.synth.section import Section
from edge.devtools.synth.sprites import draw_object
from edge.devtools.synth.truth import PlantedObject
from edge.errors import ConfigError

Float32Array = NDArray[np.float32]
Float64Array = NDArray[np.float64]
UInt8Array = NDArray[np.uint8]

OBJECT_MIN_SPACING_UM = 20.0
OBJECT_BORDER_UM = 30.0
STREAM_OBJECTS, STREAM_OBJECT_SPRITE = 5, 6  # random streams (see section.py for the others)


@dataclass
class PlantedSprite:
    """A planted object drawn once at plan time; composited as H = H (1 - clear) + h."""

    truth: PlantedObject
    top: int
    left: int
    hematoxylin: Float32Array
    eosin: Float32Array
    clear: Float32Array
    exclusion_um: float  # no ordinary nucleus centre closer than this

    @property
    def bottom(self) -> int:
        return self.top + int(self.hematoxylin.shape[0])

    @property
    def right(self) -> int:
        return self.left + int(self.hematoxylin.shape[1])


def plan_objects(section: Section) -> list[PlantedSprite]:
    """The planted figures and imposters: classes and shapes, places (clusters make the hotspot), sprites."""
    params = section.params
    rng = np.random.default_rng([params.seed, STREAM_OBJECTS])
    n_mitoses = params.mitosis_count
    n_atypical = round(n_mitoses * params.atypical_fraction)
    n_imposters = params.imposter_count
    classes: list[tuple[Literal["normal", "atypical", "imposter"], str]] = []
    for _ in range(n_mitoses - n_atypical):
        classes.append(("normal", str(rng.choice(NORMAL_SHAPES, p=NORMAL_SHAPE_WEIGHTS))))
    for _ in range(n_atypical):
        classes.append(("atypical", str(rng.choice(ATYPICAL_SHAPES))))
    for _ in range(n_imposters):
        classes.append(("imposter", str(rng.choice(IMPOSTER_SHAPES))))
    mitosis_order = rng.permutation(n_mitoses)  # which mitoses go into clusters
    classes[:n_mitoses] = [classes[i] for i in mitosis_order]

    placer = _Placer(section, rng)
    n_clustered = round(n_mitoses * params.cluster_fraction)
    positions: list[tuple[float, float]] = []
    if n_clustered:
        sizes = [n_clustered]
        if n_clustered >= 8 and rng.random() < 0.5:
            first = round(n_clustered * rng.uniform(0.55, 0.7))
            sizes = [first, n_clustered - first]
        hotspot_um = hotspot_radius_um(params.hotspot_area_mm2)
        spread_um = min(0.4 * hotspot_um, 0.2 * min(params.width, params.height) * section.mpp)
        for size in sizes:
            positions.extend(placer.cluster(size, spread_um))
    while len(positions) < n_mitoses:
        positions.append(placer.scattered("mitoses", weighted=True))
    for _ in range(n_imposters):
        positions.append(placer.scattered("imposters", weighted=False))

    order = sorted(range(len(positions)), key=lambda i: (positions[i][0], positions[i][1]))
    planted = []
    for new_id, index in enumerate(order):
        y_px, x_px = positions[index]
        object_class, shape = classes[index]
        sprite_rng = np.random.default_rng([params.seed, STREAM_OBJECT_SPRITE, new_id])
        drawing = draw_object(sprite_rng, shape, section.mpp)
        centre = drawing.hematoxylin.shape[0] // 2
        truth = PlantedObject(
            id=new_id,
            object_class=object_class,
            shape=shape,
            x_px=x_px,
            y_px=y_px,
            x_um=x_px * section.mpp,
            y_um=y_px * section.mpp,
            radius_um=round(drawing.radius_um, 2),
        )
        planted.append(
            PlantedSprite(
                truth=truth,
                top=math.floor(y_px) - centre,
                left=math.floor(x_px) - centre,
                hematoxylin=drawing.hematoxylin,
                eosin=drawing.eosin,
                clear=drawing.clear,
                exclusion_um=drawing.clear_radius_um + 3.0,
            )
        )
    return planted


def stamp_objects(
    planted: list[PlantedSprite],
    boxes: NDArray[np.int64],
    hematoxylin: Float32Array,
    eosin: Float32Array,
    y: int,
    x: int,
) -> None:
    """Composite the planted sprites that reach the block at (y, x): H = H (1 - clear) + h, E likewise."""
    h, w = hematoxylin.shape
    hits = np.flatnonzero((boxes[:, 0] < y + h) & (boxes[:, 2] > y) & (boxes[:, 1] < x + w) & (boxes[:, 3] > x))
    for index in hits.tolist():
        obj = planted[index]
        top, left = obj.top - y, obj.left - x
        sh, sw = obj.hematoxylin.shape
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + sh, h), min(left + sw, w)
        src = (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))
        keep = 1.0 - obj.clear[src]
        hematoxylin[y0:y1, x0:x1] *= keep
        hematoxylin[y0:y1, x0:x1] += obj.hematoxylin[src]
        eosin[y0:y1, x0:x1] *= keep
        eosin[y0:y1, x0:x1] += obj.eosin[src]


class _Placer:
    """Rejection sampling of object centres: inside tissue, apart, away from the border."""

    def __init__(self, section: Section, rng: np.random.Generator) -> None:
        self.section = section
        self.rng = rng
        params = section.params
        border = OBJECT_BORDER_UM / section.mpp
        self.y_range = (border, params.height - border)
        self.x_range = (border, params.width - border)
        if self.y_range[0] >= self.y_range[1] or self.x_range[0] >= self.x_range[1]:
            raise ConfigError(
                f"width={params.width!r}, height={params.height!r}: the slide is too small "
                f"to keep objects {OBJECT_BORDER_UM} µm from its border"
            )
        self.spacing = OBJECT_MIN_SPACING_UM / section.mpp
        self.placed = np.empty((0, 2))
        # Sample points on two rings around each candidate: the figure and its halo sit in
        # tissue. The samples include the border wiggle, so only the soft edge needs a margin.
        angles = np.linspace(0, 2 * math.pi, 16, endpoint=False)
        unit = np.stack([np.sin(angles), np.cos(angles)], axis=1)
        self.ring = np.concatenate([unit * 15.0, unit[::2] * 8.0]) / section.mpp
        self.inside_margin = section.tissue_softness

    def _ok(self, y: Float64Array, x: Float64Array) -> NDArray[np.bool_]:
        ok = (y >= self.y_range[0]) & (y < self.y_range[1]) & (x >= self.x_range[0]) & (x < self.x_range[1])
        points_y = np.concatenate([y[:, None], y[:, None] + self.ring[None, :, 0]], axis=1)
        points_x = np.concatenate([x[:, None], x[:, None] + self.ring[None, :, 1]], axis=1)
        value = self.section.tissue_value_at(points_y.ravel(), points_x.ravel()).reshape(points_y.shape)
        ok &= value.min(axis=1) > self.section.tissue_threshold + self.inside_margin
        return ok

    def _accept(self, y: float, x: float) -> bool:
        if len(self.placed):
            d = np.hypot(self.placed[:, 0] - y, self.placed[:, 1] - x)
            if d.min() < self.spacing:
                return False
        self.placed = np.vstack([self.placed, [[y, x]]])
        return True

    def _centre(self, y: float, x: float) -> tuple[float, float]:
        return math.floor(y) + 0.5, math.floor(x) + 0.5  # pixel centres: exact truth

    def scattered(self, what: str, *, weighted: bool) -> tuple[float, float]:
        """One centre anywhere in tissue; mitoses prefer cellular regions."""
        for _ in range(200):
            y = self.rng.uniform(*self.y_range, 64)
            x = self.rng.uniform(*self.x_range, 64)
            ok = self._ok(y, x)
            if weighted:
                cellularity = self.section.coarse_at(self.section.cellularity, y, x)
                ok &= self.rng.random(64) < 0.25 + 0.75 * cellularity
            for yy, xx in zip(y[ok].tolist(), x[ok].tolist(), strict=True):
                centre = self._centre(yy, xx)
                if self._accept(*centre):
                    return centre
        params = self.section.params
        raise ConfigError(
            f"{what}={getattr(params, what)!r}: could not place {len(self.placed) + 1} objects "
            f"{OBJECT_MIN_SPACING_UM} µm apart in the tissue of a {params.width}x{params.height} "
            "slide; lower the count or raise width, height or tissue_fraction"
        )

    def cluster(self, size: int, spread_um: float) -> list[tuple[float, float]]:
        """Up to `size` centres around one cellular tissue spot; fewer if space runs out."""
        section = self.section
        centre: tuple[float, float] | None = None
        for _ in range(200):
            y = self.rng.uniform(*self.y_range, 64)
            x = self.rng.uniform(*self.x_range, 64)
            ok = self._ok(y, x) & (self.rng.random(64) < section.coarse_at(section.cellularity, y, x) ** 2)
            if ok.any():
                first = int(np.flatnonzero(ok)[0])
                centre = (float(y[first]), float(x[first]))
                break
        if centre is None:
            return []
        spread = spread_um / section.mpp
        found: list[tuple[float, float]] = []
        for _ in range(100):
            if len(found) == size:
                break
            y = self.rng.normal(centre[0], spread, 64)
            x = self.rng.normal(centre[1], spread, 64)
            ok = self._ok(y, x)
            for yy, xx in zip(y[ok].tolist(), x[ok].tolist(), strict=True):
                point = self._centre(yy, xx)
                if self._accept(*point):
                    found.append(point)
                    if len(found) == size:
                        break
        return found
