"""What to synthesise: :class:`SynthParams`, checked field by field, and the figure shapes and densities."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from edge.errors import ConfigError

NORMAL_SHAPES = ("metaphase", "anaphase", "prophase")
ATYPICAL_SHAPES = ("tripolar", "lagging", "ring", "asymmetric")
IMPOSTER_SHAPES = ("apoptotic", "pyknotic")
NORMAL_SHAPE_WEIGHTS = (0.5, 0.25, 0.25)  # metaphase plates dominate in real counts

DEFAULT_MITOSES_PER_MM2 = 1.2  # of tissue
MIN_DEFAULT_MITOSES = 8


@dataclass(frozen=True)
class SynthParams:
    """What to synthesise. Sizes in level-0 pixels; `mpp` in µm per pixel.

    >>> SynthParams(width=2048, height=1536, mpp=0.25, mitoses=12).validate()
    """

    width: int
    height: int
    seed: int = 0
    mpp: float = 0.25
    mitoses: int | None = None  # normal + atypical; None: ~1.2 per mm² of tissue, min 8
    atypical_fraction: float = 0.3
    imposters: int | None = None  # apoptotic bodies + pyknotic nuclei; None: as mitoses
    cluster_fraction: float = 0.6  # of mitoses in 1-2 dense clusters (a clear hotspot)
    tissue_fraction: float = 0.55
    stain_jitter: float = 0.08
    blur_sigma: float = 0.0  # px
    noise_sigma: float = 3.0  # grey levels
    tile_size: int = 256
    jpeg_quality: int = 85
    fmt: Literal["tiff", "ome"] = "tiff"
    hotspot_area_mm2: float = 2.0
    # Scan faults with truth (edge.devtools.synth.faults): blurred discs, one over the hotspot, folds, pen, stain shift.
    blur_regions: int = 0
    blur_hotspot: bool = False
    folds: int = 0
    pen_strokes: int = 0
    stain_shift: float = 0.0  # degrees the eosin vector turns out of the H-E plane

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field and its value."""
        _check_int(self, "width", 256, 1 << 20)
        _check_int(self, "height", 256, 1 << 20)
        _check_int(self, "seed", 0, (1 << 63) - 1)
        _check_float(self, "mpp", 0.05, 2.0)
        if self.mitoses is not None:
            _check_int(self, "mitoses", 0, 1_000_000)
        _check_float(self, "atypical_fraction", 0.0, 1.0)
        if self.imposters is not None:
            _check_int(self, "imposters", 0, 1_000_000)
        _check_float(self, "cluster_fraction", 0.0, 1.0)
        _check_float(self, "tissue_fraction", 0.05, 0.95)
        _check_float(self, "stain_jitter", 0.0, 0.5)
        _check_float(self, "blur_sigma", 0.0, 16.0)
        _check_float(self, "noise_sigma", 0.0, 32.0)
        _check_int(self, "tile_size", 64, 2048)
        if self.tile_size % 16:
            raise ConfigError(
                f"tile_size={self.tile_size!r} must be a multiple of 16 (TIFF tiles and JPEG 4:2:0 blocks)"
            )
        _check_int(self, "jpeg_quality", 1, 100)
        if self.fmt not in ("tiff", "ome"):
            raise ConfigError(f"fmt={self.fmt!r} must be 'tiff' or 'ome'")
        _check_float(self, "hotspot_area_mm2", 1e-4, 1e4)
        for name in ("blur_regions", "folds", "pen_strokes"):
            _check_int(self, name, 0, 100)
        if not isinstance(self.blur_hotspot, bool):
            raise ConfigError(f"blur_hotspot={self.blur_hotspot!r} must be true or false")
        _check_float(self, "stain_shift", -45.0, 45.0)

    @property
    def tissue_area_mm2(self) -> float:
        return self.width * self.height * self.mpp**2 * 1e-6 * self.tissue_fraction

    @property
    def mitosis_count(self) -> int:
        """Planted mitotic figures, after the density-based default."""
        if self.mitoses is not None:
            return self.mitoses
        return max(MIN_DEFAULT_MITOSES, round(DEFAULT_MITOSES_PER_MM2 * self.tissue_area_mm2))

    @property
    def imposter_count(self) -> int:
        return self.mitosis_count if self.imposters is None else self.imposters


def _check_int(params: SynthParams, name: str, low: int, high: int) -> None:
    value = getattr(params, name)
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"{name}={value!r} must be an integer")
    if not low <= value <= high:
        raise ConfigError(f"{name}={value!r} must be between {low} and {high}")


def _check_float(params: SynthParams, name: str, low: float, high: float) -> None:
    value = getattr(params, name)
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise ConfigError(f"{name}={value!r} must be a number")
    if not (math.isfinite(value) and low <= value <= high):
        raise ConfigError(f"{name}={value!r} must be between {low} and {high}")
