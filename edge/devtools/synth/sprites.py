"""Sprites: ordinary nuclei and planted figures, drawn on small µm grids at the slide's mpp.

Each returns stain amounts (haematoxylin, eosin) on a square canvas centred on its middle pixel;
the tissue section stamps nuclei, the slide model composites figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

Float32Array = NDArray[np.float32]
Float64Array = NDArray[np.float64]
UInt8Array = NDArray[np.uint8]

_OBJECT_CANVAS_UM = 16.0  # half-size of a planted object's sprite


def local_grid(half_um: float, mpp: float) -> tuple[Float32Array, Float32Array]:
    """x, y offsets in µm of the pixel centres of a square sprite centred on its middle pixel."""
    half = math.ceil(half_um / mpp)
    offsets = (np.arange(-half, half + 1) * mpp).astype(np.float32)
    v, u = np.meshgrid(offsets, offsets, indexing="ij")
    return u, v


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_um: float, mpp: float) -> Float32Array:
    noise: Float64Array = ndimage.gaussian_filter(rng.standard_normal(shape), max(sigma_um / mpp, 0.5), mode="wrap")
    standard: Float32Array = ((noise - noise.mean()) / (noise.std() + 1e-12)).astype(np.float32)
    return standard


def nucleus_sprite(rng: np.random.Generator, mpp: float, kind: str, angle: float) -> tuple[Float32Array, Float32Array]:
    """One ordinary nucleus: (haematoxylin amount, eosin multiplier) arrays."""
    if kind == "lymphocyte":
        a = rng.uniform(2.6, 3.5)
        b = a * rng.uniform(0.88, 1.0)
        darkness = rng.uniform(1.35, 1.75)
        texture_um, texture_amount, rim, nucleoli = 0.6, 0.28, 0.1, 0
        wobble = 0.02
    elif kind == "fibroblast":
        a = rng.uniform(4.5, 8.0)
        b = rng.uniform(1.1, 1.9)
        darkness = rng.uniform(1.1, 1.5)
        texture_um, texture_amount, rim, nucleoli = 0.4, 0.18, 0.15, 0
        wobble = 0.03
    else:
        a = rng.uniform(3.4, 6.0)
        b = a * rng.uniform(0.62, 0.95)
        darkness = rng.uniform(0.95, 1.45)
        texture_um, texture_amount, rim, nucleoli = 0.45, 0.32, 0.35, int(rng.integers(0, 3))
        wobble = 0.045
    u, v = local_grid(a + 1.2, mpp)
    cos, sin = math.cos(angle), math.sin(angle)
    along = u * cos + v * sin
    across = -u * sin + v * cos
    theta = np.arctan2(across / b, along / a)
    outline = np.ones_like(theta)
    for k in range(2, 6):
        outline += rng.normal(0, wobble) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    rho = np.sqrt((along / a) ** 2 + (across / b) ** 2) / outline
    depth_um = (1.0 - rho) * b  # ≈ distance inside the border
    mask = np.clip(depth_um / 0.45 + 0.5, 0.0, 1.0)
    chromatin = 1.0 + texture_amount * _smooth_noise(rng, u.shape, texture_um, mpp)
    chromatin -= 0.18 * np.clip(depth_um / b, 0, 1) * (kind == "tumour")  # vesicular centre
    chromatin += rim * np.exp(-((depth_um / 0.45) ** 2))  # nuclear membrane
    for _ in range(nucleoli):
        r = rng.uniform(0, 0.5)
        t = rng.uniform(0, 2 * math.pi)
        cy, cx = r * a * math.sin(t), r * b * math.cos(t)
        size = rng.uniform(0.45, 0.8)
        chromatin += 0.8 * np.exp(-((u - cx) ** 2 + (v - cy) ** 2) / (2 * size**2))
    hematoxylin = (darkness * mask * np.clip(chromatin, 0.3, None)).astype(np.float32)
    keep = (1.0 - 0.78 * mask).astype(np.float32)
    return hematoxylin, keep


@dataclass
class Drawing:
    hematoxylin: Float32Array
    eosin: Float32Array
    clear: Float32Array
    radius_um: float
    clear_radius_um: float


class _Chromatin:
    """Condensed chromosomes as soft capsules (segments) and blobs on a µm grid."""

    def __init__(self, u: Float32Array, v: Float32Array, mpp: float) -> None:
        self.u, self.v, self.mpp = u, v, mpp
        self.density = np.zeros_like(u)
        self.half = u.shape[0] // 2

    def segment_around(
        self, centre: tuple[float, float], direction: float, half_length: float, width: float, weight: float
    ) -> None:
        """A segment centred on ``centre`` (µm), pointing along ``direction`` (radians)."""
        dx, dy = half_length * math.cos(direction), half_length * math.sin(direction)
        self.segment((centre[0] - dx, centre[1] - dy), (centre[0] + dx, centre[1] + dy), width, weight)

    def segment(self, p0: tuple[float, float], p1: tuple[float, float], width: float, weight: float) -> None:
        # Only the pixels near the segment: sprites are small but segments are many.
        reach = width * 3.0 + 0.5
        lo_x, hi_x = min(p0[0], p1[0]) - reach, max(p0[0], p1[0]) + reach
        lo_y, hi_y = min(p0[1], p1[1]) - reach, max(p0[1], p1[1]) + reach
        n = self.u.shape[0]
        c0 = max(0, math.floor(lo_x / self.mpp) + self.half)
        c1 = min(n, math.ceil(hi_x / self.mpp) + self.half + 1)
        r0 = max(0, math.floor(lo_y / self.mpp) + self.half)
        r1 = min(n, math.ceil(hi_y / self.mpp) + self.half + 1)
        if c0 >= c1 or r0 >= r1:
            return
        u = self.u[r0:r1, c0:c1]
        v = self.v[r0:r1, c0:c1]
        dx, dy = p1[0] - p0[0], p1[1] - p0[1]
        length2 = dx * dx + dy * dy
        t = np.clip(((u - p0[0]) * dx + (v - p0[1]) * dy) / max(length2, 1e-9), 0.0, 1.0)
        dist2 = (u - p0[0] - t * dx) ** 2 + (v - p0[1] - t * dy) ** 2
        sigma = max(width / 2.0, self.mpp * 0.6)
        self.density[r0:r1, c0:c1] += weight * np.exp(-dist2 / (2 * sigma * sigma))

    def blob(self, centre: tuple[float, float], radius: float, weight: float, edge: float = 0.25) -> None:
        dist = np.hypot(self.u - centre[0], self.v - centre[1])
        self.density += weight * np.clip((radius - dist) / edge + 0.5, 0.0, 1.0)

    def chromosomes(
        self,
        rng: np.random.Generator,
        count: int,
        centre: tuple[float, float],
        axis: float,
        length: float,
        thickness: float,
        arm_angle: float,
        arm_spread: float = 0.6,
        weight: float = 1.3,
    ) -> None:
        """`count` short rods spread along a plate of `length` x `thickness`; their arms point
        at `arm_angle` ± `arm_spread`, so the outline is hairy, not smooth."""
        ca, sa = math.cos(axis), math.sin(axis)
        for _ in range(count):
            s = rng.uniform(-length / 2, length / 2)
            n = rng.normal(0, thickness / 4)
            cx = centre[0] + s * ca - n * sa
            cy = centre[1] + s * sa + n * ca
            direction = arm_angle + rng.normal(0, arm_spread)
            half = rng.uniform(0.4, 1.1)
            dx, dy = half * math.cos(direction), half * math.sin(direction)
            self.segment((cx - dx, cy - dy), (cx + dx, cy + dy), rng.uniform(0.35, 0.6), weight)

    def hairs(
        self,
        rng: np.random.Generator,
        count: int,
        centre: tuple[float, float],
        axis: float,
        length: float,
        thickness: float,
    ) -> None:
        """Thin protruding chromosome arms on both faces of a plate."""
        ca, sa = math.cos(axis), math.sin(axis)
        for _ in range(count):
            s = rng.uniform(-length / 2, length / 2)
            side = rng.choice([-1.0, 1.0])
            base = thickness / 2 * 0.6
            cx = centre[0] + s * ca - side * base * sa
            cy = centre[1] + s * sa + side * base * ca
            direction = axis + side * math.pi / 2 + rng.normal(0, 0.45)
            reach = rng.uniform(0.8, 2.0)
            self.segment(
                (cx, cy),
                (cx + reach * math.cos(direction), cy + reach * math.sin(direction)),
                rng.uniform(0.3, 0.45),
                0.9,
            )

    def hematoxylin(self, rng: np.random.Generator, darkness: float) -> Float32Array:
        grain = 1.0 + 0.22 * _smooth_noise(rng, self.u.shape, 0.3, self.mpp)
        return (darkness * (1.0 - np.exp(-self.density * grain * 1.6))).astype(np.float32)

    def extent_um(self, threshold: float = 0.5) -> float:
        dark = self.density > threshold
        if not dark.any():
            return 1.0
        return float(np.hypot(self.u[dark], self.v[dark]).max())


def draw_object(rng: np.random.Generator, shape: str, mpp: float) -> Drawing:
    """Draw one planted figure of `shape` around the sprite's middle pixel."""
    u, v = local_grid(_OBJECT_CANVAS_UM, mpp)
    chrom = _Chromatin(u, v, mpp)
    axis = rng.uniform(0, math.pi)
    normal = axis + math.pi / 2
    darkness = rng.uniform(2.8, 3.3)
    eosin = np.zeros_like(u)
    if shape in ("apoptotic", "pyknotic"):
        return _draw_imposter(rng, shape, u, v, chrom)
    if shape == "metaphase":
        length, thickness = rng.uniform(8, 12), rng.uniform(2, 3)
        chrom.chromosomes(rng, int(length * 5.5), (0, 0), axis, length, thickness, normal)
        chrom.hairs(rng, int(rng.integers(16, 26)), (0, 0), axis, length, thickness)
    elif shape == "anaphase":
        gap = rng.uniform(4, 8)
        for side in (-1.0, 1.0):
            length = rng.uniform(6, 10)
            c = (side * gap / 2 * math.cos(normal), side * gap / 2 * math.sin(normal))
            bow = axis + side * rng.normal(0, 0.12)
            chrom.chromosomes(rng, int(length * 5), c, bow, length, rng.uniform(1.5, 2.5), normal, 0.45)
            chrom.hairs(rng, int(rng.integers(6, 12)), c, bow, length, 2.0)
    elif shape == "prophase":
        radius = rng.uniform(3.5, 4.6)
        chrom.blob((0, 0), radius, 0.35, edge=0.6)
        for _ in range(int(rng.integers(14, 22))):
            r = radius * math.sqrt(rng.uniform(0, 0.8))
            t = rng.uniform(0, 2 * math.pi)
            point = (r * math.cos(t), r * math.sin(t))
            heading = rng.uniform(0, 2 * math.pi)
            for _ in range(int(rng.integers(3, 7))):
                heading += rng.normal(0, 0.7)
                nxt = (point[0] + 0.8 * math.cos(heading), point[1] + 0.8 * math.sin(heading))
                if math.hypot(*nxt) > radius:
                    heading += math.pi
                    continue
                chrom.segment(point, nxt, rng.uniform(0.45, 0.65), 1.0)
                point = nxt
        darkness = rng.uniform(2.3, 2.8)
    elif shape == "tripolar":
        base = rng.uniform(0, 2 * math.pi)
        for k in range(3):
            arm = base + k * 2 * math.pi / 3 + rng.normal(0, 0.2)
            length = rng.uniform(4, 6)
            mid = (0.6 + length / 2) * math.cos(arm), (0.6 + length / 2) * math.sin(arm)
            chrom.chromosomes(rng, int(length * 4), mid, arm, length, 2.0, arm + math.pi / 2, 0.5)
            chrom.hairs(rng, int(rng.integers(3, 6)), mid, arm, length, 2.0)
    elif shape == "lagging":
        length, thickness = rng.uniform(7, 10), rng.uniform(2, 3)
        chrom.chromosomes(rng, int(length * 4.5), (0, 0), axis, length, thickness, normal)
        chrom.hairs(rng, int(rng.integers(6, 12)), (0, 0), axis, length, thickness)
        for _ in range(int(rng.integers(2, 5))):
            direction = normal + rng.choice([0.0, math.pi]) + rng.normal(0, 0.7)
            r = rng.uniform(3.5, 7.0)
            c = (r * math.cos(direction), r * math.sin(direction))
            turn = rng.uniform(0, math.pi)
            half = rng.uniform(0.4, 0.8)
            chrom.segment_around(c, turn, half, rng.uniform(0.55, 0.8), 2.0)
    elif shape == "ring":
        radius = rng.uniform(3.2, 4.8)
        for _ in range(int(radius * 9)):
            t = rng.uniform(0, 2 * math.pi)
            r = radius + rng.normal(0, 0.35)
            c = (r * math.cos(t), r * math.sin(t))
            direction = t + rng.normal(0, 0.5)
            half = rng.uniform(0.45, 1.1)
            chrom.segment_around(c, direction, half, rng.uniform(0.45, 0.7), 1.3)
    elif shape == "asymmetric":
        gap = rng.uniform(4, 7)
        long_bar = rng.uniform(8, 11)
        for side, length in ((-1.0, long_bar), (1.0, long_bar * rng.uniform(0.35, 0.6))):
            c = (side * gap / 2 * math.cos(normal), side * gap / 2 * math.sin(normal))
            tilt = axis + rng.normal(0, 0.3)
            chrom.chromosomes(rng, int(length * 4.5), c, tilt, length, 2.2, normal, 0.45)
            chrom.hairs(rng, int(rng.integers(3, 8)), c, tilt, length, 2.0)
    else:
        raise ValueError(f"unknown shape {shape!r}")

    hematoxylin = chrom.hematoxylin(rng, darkness)
    radius_um = chrom.extent_um()
    # A pale, partly cleared cell around the figure (the cell rounds up in mitosis); its
    # outline is as irregular as a real cell's, and often barely there.
    halo_um = radius_um + rng.uniform(1.0, 2.5)
    strength = rng.uniform(0.35, 0.75) if rng.random() < 0.7 else rng.uniform(0.1, 0.3)
    clear = (strength * _irregular_disc(rng, u, v, halo_um, 1.4, 0.08)).astype(np.float32)
    eosin = (clear * rng.uniform(0.15, 0.3)).astype(np.float32)
    hematoxylin = hematoxylin + clear * np.float32(0.06)
    return Drawing(hematoxylin, eosin, clear, radius_um, halo_um)


def _irregular_disc(
    rng: np.random.Generator, u: Float32Array, v: Float32Array, radius: float, edge: float, wobble: float
) -> Float32Array:
    """Soft mask (0..1) of a lobulated disc: a radius varying with low harmonics of the angle."""
    theta = np.arctan2(v, u)
    outline = np.full_like(u, radius)
    for k in range(2, 5):
        outline += radius * rng.normal(0, wobble) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    disc: Float32Array = np.clip((outline - np.hypot(u, v)) / edge + 0.5, 0.0, 1.0).astype(np.float32)
    return disc


def _draw_imposter(
    rng: np.random.Generator, shape: str, u: Float32Array, v: Float32Array, chrom: _Chromatin
) -> Drawing:
    """Apoptotic bodies and pyknotic nuclei: dark like mitoses, but round and smooth."""
    dist = np.hypot(u, v)
    if shape == "apoptotic":
        body = rng.uniform(4.0, 6.5)
        inside = _irregular_disc(rng, u, v, body, 0.5, 0.05)
        for _ in range(int(rng.integers(1, 5))):
            r = rng.uniform(0.8, 2.1)
            offset = rng.uniform(0, max(body * 0.65 - r, 0.1))
            angle = rng.uniform(0, 2 * math.pi)
            chrom.blob((offset * math.cos(angle), offset * math.sin(angle)), r, 3.0, edge=0.35)
        hematoxylin = (rng.uniform(2.6, 3.1) * (1.0 - np.exp(-chrom.density))).astype(np.float32)
        # Shrunken, hypereosinophilic cytoplasm, pulled away from its neighbours on one
        # side more than the other (a crescent of retraction space).
        retraction = body + rng.uniform(0.6, 2.0)
        gap = _irregular_disc(rng, u, v, retraction, 0.8, 0.1)
        side = np.cos((np.arctan2(v, u) - rng.uniform(0, 2 * math.pi)) / 2) ** 2
        clear = np.maximum(0.9 * inside, gap * (0.3 + 0.6 * side)).astype(np.float32)
        eosin = (rng.uniform(1.05, 1.4) * inside).astype(np.float32)
        return Drawing(hematoxylin, eosin, clear, body, retraction)
    radius = rng.uniform(2.0, 3.2)
    hematoxylin = (rng.uniform(2.8, 3.2) * np.clip((radius - dist) / 0.3 + 0.5, 0.0, 1.0)).astype(np.float32)
    rim = radius + rng.uniform(1.0, 2.5)
    clear = (0.85 * np.clip((rim - dist) / 0.6 + 0.5, 0.0, 1.0)).astype(np.float32)
    eosin = (clear * rng.uniform(0.6, 0.95)).astype(np.float32)
    return Drawing(hematoxylin, eosin, clear, radius, rim)
