"""The tissue section of a synthetic slide: stains, smooth fields, periodic textures and ordinary nuclei.

Decided once per slide from the seed (each part from its own random stream), then sampled block by
block: the tissue field says where tissue is, cellularity and orientation where stroma or tumour
sheets are, and nuclei are drawn band by band as rendering moves down the slide.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from scipy.spatial import cKDTree

from edge.devtools.synth.faults import shift_eosin
from edge.devtools.synth.params import SynthParams
from edge.devtools.synth.sprites import nucleus_sprite

Float32Array = NDArray[np.float32]
Float64Array = NDArray[np.float64]
UInt8Array = NDArray[np.uint8]

# Optical densities (per unit stain) of haematoxylin and eosin in R, G, B. Nuclei absorb
# more green than red (purple), eosin mostly green with some blue (pink, not magenta).
_HEMATOXYLIN_OD = (0.62, 0.80, 0.30)
_EOSIN_OD = (0.09, 0.90, 0.42)
_BACKGROUND_RGB = (244.0, 243.0, 246.0)
_H_MAX = 3.4  # stain amounts covered by the colour look-up table
_E_MAX = 2.0
# Physical scales, in µm, so that a 0.5 µm/px slide shows the same tissue as a 0.25 one.
_COARSE_CELL_UM = 16.0  # grid of the smooth fields (tissue, cellularity, stain strength)
_TEXTURE_PERIOD_UM = 320.0
_NUCLEUS_BAND_UM = 64.0  # nuclei are generated per horizontal band of this height
_NUCLEUS_SPACING_UM = 11.0  # jittered grid: at most ~8000 nuclei per mm²
_NUCLEI_PER_MM2_STROMA = 1300.0
_NUCLEI_PER_MM2_TUMOUR = 7200.0
_LYMPHOCYTE_FRACTION = 0.08
_GRID_OVERHANG_PX = 2048 + 64  # largest tile plus the largest blur margin (3 x 16 px)
_TISSUE_EDGE_UM = 1.5  # width of the soft tissue/background transition
_TISSUE_EDGE_WIGGLE_UM = 10.0

# Independent random streams: adding draws to one never changes another (synth.figures and
# synth.model hold the others: objects 5, object sprites 6, faults 8).
STREAM_STAINS, STREAM_FIELDS, STREAM_TEXTURES, STREAM_SPRITES = 1, 2, 3, 4
STREAM_NUCLEI = 7


@dataclass
class _Nuclei:
    """Ordinary nuclei to stamp: top-left corners (px) and sprite ids, sorted by left."""

    top: NDArray[np.int64]
    left: NDArray[np.int64]
    sprite: NDArray[np.int64]

    @classmethod
    def empty(cls) -> _Nuclei:
        none = np.empty(0, dtype=np.int64)
        return cls(none, none.copy(), none.copy())


@dataclass
class _BlockFields:
    """Bilinear weights of the coarse grid for one block: field = Wy @ F[iy, ix] @ Wx.T."""

    wy: Float32Array
    wx: Float32Array
    iy: slice
    ix: slice

    def sample(self, coarse: Float32Array) -> Float32Array:
        return (self.wy @ coarse[self.iy, self.ix] @ self.wx.T).astype(np.float32, copy=False)


@dataclass
class _Textures:
    """Periodic textures, padded by wrapping so any block is one contiguous slice."""

    period: int
    fibre_a: Float32Array  # eosin multiplier, fibres along angle a
    fibre_b: Float32Array
    cytoplasm: Float32Array
    tissue_edge: Float32Array  # zero mean, unit std: wiggles the tissue border
    noise: NDArray[np.int16] | None = None
    noise_period: int = 1


class Section:
    """The tissue of one slide, everything decided before rendering a pixel but the planted figures."""

    def __init__(self, params: SynthParams, margin: int, max_block: tuple[int, int]) -> None:
        self.params = params
        self.mpp = params.mpp
        self.margin = margin  # px rendered around a block for blurs
        self.max_block = max_block  # the largest block rendered, margins included (textures are padded to it)
        self._build_stains()
        self._build_fields()
        self._build_textures()
        self._build_nucleus_sprites()
        self._band_px = _NUCLEUS_BAND_UM / self.mpp
        self._bands: dict[int, _Nuclei] = {}
        self._exclusion_tree: cKDTree | None = None
        self._exclusion_px = np.empty(0, dtype=np.float64)

    def keep_nuclei_away(self, centres_yx_px: Float64Array, radius_px: Float64Array) -> None:
        """No ordinary nucleus centred within ``radius_px[i]`` of ``centres_yx_px[i]`` (a planted figure's halo)."""
        self._exclusion_tree = cKDTree(centres_yx_px) if len(centres_yx_px) else None
        self._exclusion_px = radius_px
        self._bands.clear()

    def _build_stains(self) -> None:
        """A (256*256, 3) look-up table from quantised H and E amounts to RGB (Beer-Lambert)."""
        rng = np.random.default_rng([self.params.seed, STREAM_STAINS])
        jitter = self.params.stain_jitter

        def jittered(vector: tuple[float, float, float]) -> Float64Array:
            v = np.array(vector) * (1.0 + rng.normal(0.0, jitter * 0.6, 3))
            return np.clip(v, 0.02, None)

        h_od = jittered(_HEMATOXYLIN_OD) * (1.0 + rng.normal(0.0, jitter))
        e_od = jittered(_EOSIN_OD) * (1.0 + rng.normal(0.0, jitter))
        e_od = shift_eosin(h_od, e_od, self.params.stain_shift)
        self.stain_od = (h_od, e_od)
        # Glass and light source: a little brighter or dimmer, barely tinted.
        brightness = rng.normal(0.0, 25.0 * jitter)
        background = np.clip(np.array(_BACKGROUND_RGB) + brightness + rng.normal(0.0, 0.8, 3), 232, 252)
        h = np.linspace(0.0, _H_MAX, 256)[:, None, None] * h_od
        e = np.linspace(0.0, _E_MAX, 256)[None, :, None] * e_od
        rgb = background * np.exp(-(h + e))
        self.lut = np.ascontiguousarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(-1, 3))
        self.background_rgb = self.lut[0].copy()

    def _build_fields(self) -> None:
        params = self.params
        rng = np.random.default_rng([params.seed, STREAM_FIELDS])
        self.cell_px = _COARSE_CELL_UM / self.mpp
        # The grid also covers the padding of the last tile row and column and the blur
        # margin, with a fixed overhang so that tile_size and blur_sigma never change content.
        ny = math.ceil((params.height + _GRID_OVERHANG_PX) / self.cell_px) + 3
        nx = math.ceil((params.width + _GRID_OVERHANG_PX) / self.cell_px) + 3
        extent_um = min(params.width, params.height) * self.mpp

        def smooth(sigma_um: float) -> Float64Array:
            sigma = max(sigma_um / _COARSE_CELL_UM, 0.8)
            f: Float64Array = ndimage.gaussian_filter(rng.standard_normal((ny, nx)), sigma, mode="reflect")
            standard: Float64Array = (f - f.mean()) / (f.std() + 1e-12)
            return standard

        # Tissue: blobs of about a millimetre with irregular, lobulated borders.
        blob_um = min(700.0, extent_um / 5.0)
        tissue = smooth(blob_um) + 0.45 * smooth(blob_um / 3.0) + 0.15 * smooth(blob_um / 9.0)
        # Keep most tissue off the slide border, as on a real glass slide.
        gy = (np.arange(ny) - 1.0) * self.cell_px
        gx = (np.arange(nx) - 1.0) * self.cell_px
        border = np.minimum.outer(np.minimum(gy, params.height - gy), np.minimum(gx, params.width - gx)) * self.mpp
        tissue -= 1.5 * np.clip(1.0 - border / (0.08 * extent_um), 0.0, 1.0) ** 2
        inside = border > 0
        self.tissue_threshold = float(np.quantile(tissue[inside], 1.0 - params.tissue_fraction))
        gradient = np.hypot(*np.gradient(tissue)) / _COARSE_CELL_UM  # per µm
        near = np.abs(tissue - self.tissue_threshold) < 0.1 * tissue.std()
        slope = float(np.median(gradient[near])) if near.any() else float(np.median(gradient))
        slope = max(slope, 1e-6)
        self.tissue_softness = slope * _TISSUE_EDGE_UM
        self.tissue_wiggle = slope * _TISSUE_EDGE_WIGGLE_UM
        self.tissue = tissue.astype(np.float32)

        # Cellularity 0 (fibrous stroma) .. 1 (sheets of tumour cells), sharpened into regions.
        cellular = smooth(min(250.0, extent_um / 4.0)) + 0.3 * smooth(60.0)
        self.cellularity = (1.0 / (1.0 + np.exp(-3.0 * (cellular - 0.1)))).astype(np.float32)
        # Which of the two fibre directions dominates where.
        orient = smooth(min(180.0, extent_um / 4.0))
        self.orientation = np.clip(orient * 2.0 + 0.5, 0.0, 1.0).astype(np.float32)
        # Regional staining strength: uneven section thickness and staining.
        jitter = params.stain_jitter
        e_mean = 0.48 * (1.0 + rng.normal(0.0, jitter))
        h_mean = 1.0 * (1.0 + rng.normal(0.0, jitter))
        self.eosin_level = np.clip(e_mean * (1.0 + 1.6 * jitter * smooth(300.0)), 0.15, None).astype(np.float32)
        self.hematoxylin_level = np.clip(h_mean * (1.0 + 1.2 * jitter * smooth(300.0)), 0.3, None).astype(np.float32)

    def block_fields(self, y0: int, x0: int, h: int, w: int) -> _BlockFields:
        wy, iy = _bilinear_weights(y0, h, self.cell_px)
        wx, ix = _bilinear_weights(x0, w, self.cell_px)
        return _BlockFields(wy, wx, iy, ix)

    def tissue_value_at(self, y_px: Float64Array, x_px: Float64Array) -> Float64Array:
        """The tissue field (above `tissue_threshold` is tissue) at pixel centres."""
        coarse = ndimage.map_coordinates(
            self.tissue,
            [(y_px + 0.5) / self.cell_px + 1.0, (x_px + 0.5) / self.cell_px + 1.0],
            order=1,
            mode="nearest",
        )
        t = self.textures
        edge = t.tissue_edge[np.floor(y_px).astype(np.int64) % t.period, np.floor(x_px).astype(np.int64) % t.period]
        return np.asarray(coarse + self.tissue_wiggle * edge, dtype=np.float64)

    def coarse_at(self, coarse: Float32Array, y_px: Float64Array, x_px: Float64Array) -> Float64Array:
        return np.asarray(
            ndimage.map_coordinates(
                coarse,
                [(y_px + 0.5) / self.cell_px + 1.0, (x_px + 0.5) / self.cell_px + 1.0],
                order=1,
                mode="nearest",
            ),
            dtype=np.float64,
        )

    def _build_textures(self) -> None:
        rng = np.random.default_rng([self.params.seed, STREAM_TEXTURES])
        mpp = self.mpp
        period = int(np.clip(round(_TEXTURE_PERIOD_UM / mpp / 16) * 16, 512, 2048))
        pad = self.max_block
        angle_a = rng.uniform(0, math.pi)
        angle_b = angle_a + rng.choice([-1.0, 1.0]) * rng.uniform(0.9, 1.4)
        self.fibre_angles = (angle_a, angle_b)

        def fibres(angle: float) -> Float32Array:
            fine = _periodic_texture(rng, period, mpp, 9.0, 0.7, angle)
            wavy = _periodic_texture(rng, period, mpp, 14.0, 1.2, angle + rng.normal(0, 0.2))
            bundles = _periodic_texture(rng, period, mpp, 35.0, 4.0, angle)
            tex = 1.0 + 0.26 * fine + 0.14 * wavy + 0.12 * bundles
            # Clefts between collagen bundles: the white streaks of loose stroma.
            cleft = np.clip((bundles + 1.55) / 0.6, 0.0, 1.0)
            tex *= 0.12 + 0.88 * cleft**2
            return _wrap_pad(np.clip(tex, 0.04, 2.0).astype(np.float32), pad)

        fine_iso = _periodic_texture(rng, period, mpp, 1.0, 1.0, 0.0)
        coarse_iso = _periodic_texture(rng, period, mpp, 4.0, 4.0, 0.0)
        cytoplasm = np.clip(0.78 + 0.14 * fine_iso + 0.12 * coarse_iso, 0.3, 1.4)
        edge = _periodic_texture(rng, period, mpp, 5.0, 5.0, 0.0)
        self.textures = _Textures(
            period=period,
            fibre_a=fibres(angle_a),
            fibre_b=fibres(angle_b),
            cytoplasm=_wrap_pad(cytoplasm.astype(np.float32), pad),
            tissue_edge=_wrap_pad(edge.astype(np.float32), pad),
        )
        self.tissue_edge_max = float(np.abs(edge).max())
        if self.params.noise_sigma > 0:
            noise_period = 1000  # not a multiple of the tile size: no visible tile pattern
            noise = rng.normal(0.0, self.params.noise_sigma, (noise_period, noise_period, 3))
            self.textures.noise = _wrap_pad(np.rint(noise).astype(np.int16), pad)
            self.textures.noise_period = noise_period

    def _build_nucleus_sprites(self) -> None:
        """A bank of nucleus sprites (H amount, E multiplier); stamping reuses them."""
        rng = np.random.default_rng([self.params.seed, STREAM_SPRITES])
        bank: list[tuple[Float32Array, Float32Array]] = []
        ranges: dict[str, tuple[int, int]] = {}

        def add(kind: str, count: int, make: Callable[[], tuple[Float32Array, Float32Array]]) -> None:
            start = len(bank)
            for _ in range(count):
                h, keep = make()
                bank.append((h, keep))
                bank.append((h[::-1, ::-1], keep[::-1, ::-1]))  # 180°: same orientation
            ranges[kind] = (start, len(bank))

        mpp = self.mpp
        add("tumour", 48, lambda: nucleus_sprite(rng, mpp, "tumour", rng.uniform(0, math.pi)))
        add("lymphocyte", 16, lambda: nucleus_sprite(rng, mpp, "lymphocyte", 0.0))
        for name, angle in zip(("fibro_a", "fibro_b"), self.fibre_angles, strict=True):

            def fibroblast(angle: float = angle) -> tuple[Float32Array, Float32Array]:
                return nucleus_sprite(rng, mpp, "fibroblast", angle + rng.normal(0, 0.15))

            add(name, 16, fibroblast)
        self.nucleus_bank = bank
        self.nucleus_ranges = ranges
        self.nucleus_half = np.array([h.shape[0] // 2 for h, _ in bank], dtype=np.int64)
        self.nucleus_reach = int(max(h.shape[0] for h, _ in bank))

    def _band_nuclei(self, band: int) -> _Nuclei:
        """Nuclei whose grid rows start in band `band`: a jittered grid thinned by density."""
        params = self.params
        rng = np.random.default_rng([params.seed, STREAM_NUCLEI, band])
        spacing = _NUCLEUS_SPACING_UM / self.mpp
        y_lo, y_hi = band * self._band_px, (band + 1) * self._band_px
        rows = np.arange(math.ceil(y_lo / spacing - 0.5), math.ceil(y_hi / spacing - 0.5))
        cols = np.arange(0, math.ceil(params.width / spacing))
        if len(rows) == 0 or len(cols) == 0:
            return _Nuclei.empty()
        gy, gx = np.meshgrid(rows, cols, indexing="ij")
        y = (gy.ravel() + 0.5 + rng.uniform(-0.45, 0.45, gy.size)) * spacing
        x = (gx.ravel() + 0.5 + rng.uniform(-0.45, 0.45, gx.size)) * spacing
        keep_draw = rng.random(y.size)
        kind_draw = rng.random(y.size)
        sprite_draw = rng.random(y.size)
        inside = (y >= 0) & (y < params.height) & (x >= 0) & (x < params.width)
        y, x = y[inside], x[inside]
        keep_draw, kind_draw, sprite_draw = keep_draw[inside], kind_draw[inside], sprite_draw[inside]
        cellularity = self.coarse_at(self.cellularity, y, x)
        density = _NUCLEI_PER_MM2_STROMA + cellularity * (_NUCLEI_PER_MM2_TUMOUR - _NUCLEI_PER_MM2_STROMA)
        grid_density = 1e6 / _NUCLEUS_SPACING_UM**2
        keep = (keep_draw < density / grid_density) & (self.tissue_value_at(y, x) > self.tissue_threshold)
        if self._exclusion_tree is not None and keep.any():
            distance, nearest = self._exclusion_tree.query(np.stack([y, x], axis=1))
            keep &= distance > self._exclusion_px[nearest]
        y, x = y[keep], x[keep]
        kind_draw, sprite_draw, cellularity = kind_draw[keep], sprite_draw[keep], cellularity[keep]
        orientation = self.coarse_at(self.orientation, y, x)
        lymph = kind_draw < _LYMPHOCYTE_FRACTION
        tumour = ~lymph & (kind_draw < _LYMPHOCYTE_FRACTION + (1 - _LYMPHOCYTE_FRACTION) * cellularity)
        fibre_a = ~lymph & ~tumour & (orientation >= 0.5)
        start = np.empty(y.size, dtype=np.int64)
        stop = np.empty(y.size, dtype=np.int64)
        for mask, kind in (
            (lymph, "lymphocyte"),
            (tumour, "tumour"),
            (fibre_a, "fibro_a"),
            (~lymph & ~tumour & ~fibre_a, "fibro_b"),
        ):
            start[mask], stop[mask] = self.nucleus_ranges[kind]
        sprite = start + np.minimum((sprite_draw * (stop - start)).astype(np.int64), stop - start - 1)
        half = self.nucleus_half[sprite]
        top = np.floor(y).astype(np.int64) - half
        left = np.floor(x).astype(np.int64) - half
        order = np.argsort(left, kind="stable")
        return _Nuclei(top[order], left[order], sprite[order])

    def nuclei_for_rows(self, y0: int, y1: int) -> _Nuclei:
        """All nuclei whose sprites may touch rows [y0, y1) (plus the blur margin).

        Called from one thread only; bands are cached while strips move down the slide.
        """
        reach = self.nucleus_reach + self.margin + _NUCLEUS_SPACING_UM / self.mpp
        first = max(0, math.floor((y0 - reach) / self._band_px))
        last = math.floor((y1 + reach) / self._band_px)
        for band in [b for b in self._bands if b < first]:
            del self._bands[band]
        parts = []
        for band in range(first, last + 1):
            if band not in self._bands:
                self._bands[band] = self._band_nuclei(band)
            parts.append(self._bands[band])
        top = np.concatenate([p.top for p in parts])
        left = np.concatenate([p.left for p in parts])
        sprite = np.concatenate([p.sprite for p in parts])
        order = np.argsort(left, kind="stable")
        return _Nuclei(top[order], left[order], sprite[order])

    def stamp_nuclei(self, hematoxylin: Float32Array, eosin: Float32Array, y: int, x: int, nuclei: _Nuclei) -> None:
        h, w = hematoxylin.shape
        reach = self.nucleus_reach
        first = int(np.searchsorted(nuclei.left, x - reach, side="left"))
        last = int(np.searchsorted(nuclei.left, x + w, side="left"))
        tops = nuclei.top[first:last] - y
        lefts = nuclei.left[first:last] - x
        sprites = nuclei.sprite[first:last]
        rows = (tops < h) & (tops > -reach)
        bank = self.nucleus_bank
        for top, left, index in zip(tops[rows].tolist(), lefts[rows].tolist(), sprites[rows].tolist(), strict=True):
            sprite_h, keep = bank[index]
            sh, sw = sprite_h.shape
            y0, x0 = max(top, 0), max(left, 0)
            y1, x1 = min(top + sh, h), min(left + sw, w)
            if y0 >= y1 or x0 >= x1:
                continue
            region = hematoxylin[y0:y1, x0:x1]
            np.maximum(region, sprite_h[y0 - top : y1 - top, x0 - left : x1 - left], out=region)
            eosin[y0:y1, x0:x1] *= keep[y0 - top : y1 - top, x0 - left : x1 - left]


def _bilinear_weights(start: int, size: int, cell_px: float) -> tuple[Float32Array, slice]:
    """Weights (size, k) mapping coarse nodes iy.start..iy.stop-1 onto pixels start.."""
    c = (np.arange(start, start + size) + 0.5) / cell_px + 1.0
    i0 = np.floor(c).astype(np.int64)
    frac = (c - i0).astype(np.float32)
    lo = int(i0.min())
    k = int(i0.max()) - lo + 2
    weights = np.zeros((size, k), np.float32)
    rows = np.arange(size)
    weights[rows, i0 - lo] = 1.0 - frac
    weights[rows, i0 - lo + 1] = frac
    return weights, slice(lo, lo + k)


def _periodic_texture(
    rng: np.random.Generator,
    size: int,
    mpp: float,
    sigma_along_um: float,
    sigma_across_um: float,
    angle: float,
) -> Float64Array:
    """Seamlessly tiling Gaussian noise, correlated over sigma_along along `angle`.

    Filtering in the Fourier domain keeps it periodic at any orientation. Zero mean, unit std.
    """
    spectrum = np.fft.rfft2(rng.standard_normal((size, size)))
    fy = np.fft.fftfreq(size)[:, None] / mpp
    fx = np.fft.rfftfreq(size)[None, :] / mpp
    along = fx * math.cos(angle) + fy * math.sin(angle)
    across = -fx * math.sin(angle) + fy * math.cos(angle)
    spectrum *= np.exp(-2.0 * math.pi**2 * ((sigma_along_um * along) ** 2 + (sigma_across_um * across) ** 2))
    texture = np.fft.irfft2(spectrum, s=(size, size))
    return np.asarray((texture - texture.mean()) / (texture.std() + 1e-12), dtype=np.float64)


def _wrap_pad(texture: NDArray[Any], pad: tuple[int, int]) -> NDArray[Any]:
    widths = [(0, pad[0]), (0, pad[1])] + [(0, 0)] * (texture.ndim - 2)
    return np.ascontiguousarray(np.pad(texture, widths, mode="wrap"))
