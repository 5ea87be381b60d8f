"""Synthetic H&E-like whole-slide images with planted mitotic figures, and their truth.

`generate_slide` writes a JPEG-tiled pyramidal TIFF (or OME-TIFF) that tiffslide, OpenSlide
and tifffile read, strip by strip in bounded memory, plus a JSON truth file beside it:

.. code-block:: json

    {"schema": "mitosis-edge/synth-truth/1",
     "slide": "slide.tiff",            // file name of the slide, relative to the JSON
     "width": 40000, "height": 40000,  // level-0 pixels
     "mpp": 0.25, "seed": 0,
     "params": {...},                  // every SynthParams field
     "objects": [{"id": 0,
                  "class": "normal" | "atypical" | "imposter",
                  "shape": "metaphase" | "anaphase" | "prophase"            (normal)
                         | "tripolar" | "lagging" | "ring" | "asymmetric"  (atypical)
                         | "apoptotic" | "pyknotic",                       (imposter)
                  "x_px": 1234.5, "y_px": 987.5,   // level-0 pixels; pixel (i, j) covers
                  "x_um": 308.625, "y_um": 246.875, //   [i, i+1) x [j, j+1); µm = px * mpp
                  "radius_um": 6.1}],               // extent of the chromatin / body
     "hotspot": {"area_mm2": 2.0, "radius_um": 797.88,
                 "center_x_px": ..., "center_y_px": ..., "center_x_um": ..., "center_y_um": ...,
                 "mitotic_count": 17}}            // centre null when there are no mitoses

The hotspot is `edge.analysis.scoring.find_hotspot` over the normal and atypical figures (never the
imposters). Everything is drawn from numpy Generators seeded by `SynthParams.seed`, so the
same parameters give the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import imagecodecs
import numpy as np
import tifffile
from numpy.typing import NDArray
from scipy import ndimage
from scipy.spatial import cKDTree

from edge.analysis.scoring import BOUNDARY_TOLERANCE, Hotspot, find_hotspot, hotspot_radius_um
from edge.devtools import synth_faults
from edge.errors import ConfigError

__all__ = [
    "ATYPICAL_SHAPES",
    "IMPOSTER_SHAPES",
    "NORMAL_SHAPES",
    "TRUTH_SCHEMA",
    "PlantedObject",
    "SynthParams",
    "SynthTruth",
    "default_truth_path",
    "generate_slide",
    "load_truth",
    "pyramid_shapes",
]

logger = logging.getLogger(__name__)

TRUTH_SCHEMA = "mitosis-edge/synth-truth/1"
NORMAL_SHAPES = ("metaphase", "anaphase", "prophase")
ATYPICAL_SHAPES = ("tripolar", "lagging", "ring", "asymmetric")
IMPOSTER_SHAPES = ("apoptotic", "pyknotic")
_NORMAL_SHAPE_WEIGHTS = (0.5, 0.25, 0.25)  # metaphase plates dominate in real counts

PYRAMID_FACTOR = 4  # like Aperio
PYRAMID_MIN_SIDE = 2048  # px: stop once a level's longer side is below this
DEFAULT_MITOSES_PER_MM2 = 1.2  # of tissue
MIN_DEFAULT_MITOSES = 8
OBJECT_MIN_SPACING_UM = 20.0
OBJECT_BORDER_UM = 30.0
RENDER_THREADS = 2
MAX_FAULT_SIGMA_PX = 16.0  # a planted blur's sigma at most (the render margin is 3 sigma)

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
_OBJECT_CANVAS_UM = 16.0  # half-size of a planted object's sprite
_GRID_OVERHANG_PX = 2048 + 64  # largest tile plus the largest blur margin (3 x 16 px)
_TISSUE_EDGE_UM = 1.5  # width of the soft tissue/background transition
_TISSUE_EDGE_WIGGLE_UM = 10.0

# Independent random streams: adding draws to one never changes another.
_STREAM_STAINS, _STREAM_FIELDS, _STREAM_TEXTURES, _STREAM_SPRITES = 1, 2, 3, 4
_STREAM_OBJECTS, _STREAM_OBJECT_SPRITE, _STREAM_NUCLEI = 5, 6, 7
_STREAM_FAULTS = 8


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
    # Scan faults with truth (edge.devtools.synth_faults): blurred discs, one over the hotspot, folds, pen, stain shift.
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


@dataclass(frozen=True)
class PlantedObject:
    """One planted figure: a mitosis (normal or atypical) or an imposter that resembles one."""

    id: int
    object_class: Literal["normal", "atypical", "imposter"]
    shape: str
    x_px: float
    y_px: float
    x_um: float
    y_um: float
    radius_um: float

    @property
    def is_mitosis(self) -> bool:
        return self.object_class != "imposter"

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "class": self.object_class,
            "shape": self.shape,
            "x_px": self.x_px,
            "y_px": self.y_px,
            "x_um": self.x_um,
            "y_um": self.y_um,
            "radius_um": self.radius_um,
        }


@dataclass(frozen=True)
class SynthTruth:
    """What was planted in a synthetic slide, and its hotspot (µm, from `find_hotspot`)."""

    slide: str
    width: int
    height: int
    mpp: float
    seed: int
    params: SynthParams
    objects: tuple[PlantedObject, ...]
    hotspot: Hotspot
    faults: synth_faults.PlantedFaults = dataclasses.field(default_factory=synth_faults.PlantedFaults)

    def mitotic_points_um(self) -> Float64Array:
        """(N, 2) x, y in µm of the normal and atypical figures."""
        points = [(o.x_um, o.y_um) for o in self.objects if o.is_mitosis]
        return np.array(points, dtype=np.float64).reshape(-1, 2)

    def count(self, object_class: str) -> int:
        return sum(1 for o in self.objects if o.object_class == object_class)

    def counts(self) -> dict[str, int]:
        """Planted objects per class: {"normal": .., "atypical": .., "imposter": ..}."""
        return {name: self.count(name) for name in ("normal", "atypical", "imposter")}

    def to_json_dict(self) -> dict[str, Any]:
        hotspot = self.hotspot
        centred = math.isfinite(hotspot.center_x_um)
        return {
            "schema": TRUTH_SCHEMA,
            "slide": self.slide,
            "width": self.width,
            "height": self.height,
            "mpp": self.mpp,
            "seed": self.seed,
            "params": asdict(self.params),
            "objects": [o.to_json_dict() for o in self.objects],
            "hotspot": {
                "area_mm2": hotspot.area_mm2,
                "radius_um": hotspot.radius_um,
                "center_x_px": hotspot.center_x_um / self.mpp if centred else None,
                "center_y_px": hotspot.center_y_um / self.mpp if centred else None,
                "center_x_um": hotspot.center_x_um if centred else None,
                "center_y_um": hotspot.center_y_um if centred else None,
                "mitotic_count": hotspot.mitotic_count,
            },
            "faults": self.faults.to_json_dict(),
        }

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> SynthTruth:
        if data.get("schema") != TRUTH_SCHEMA:
            raise ValueError(f"schema={data.get('schema')!r}, expected {TRUTH_SCHEMA!r}")
        known = {f.name for f in fields(SynthParams)}
        params = SynthParams(**{k: v for k, v in data["params"].items() if k in known})
        objects = tuple(
            PlantedObject(
                id=int(o["id"]),
                object_class=o["class"],
                shape=str(o["shape"]),
                x_px=float(o["x_px"]),
                y_px=float(o["y_px"]),
                x_um=float(o["x_um"]),
                y_um=float(o["y_um"]),
                radius_um=float(o["radius_um"]),
            )
            for o in data["objects"]
        )
        spot = data["hotspot"]
        hotspot = Hotspot(
            center_x_um=math.nan if spot["center_x_um"] is None else float(spot["center_x_um"]),
            center_y_um=math.nan if spot["center_y_um"] is None else float(spot["center_y_um"]),
            radius_um=float(spot["radius_um"]),
            mitotic_count=int(spot["mitotic_count"]),
        )
        return cls(
            slide=str(data["slide"]),
            width=int(data["width"]),
            height=int(data["height"]),
            mpp=float(data["mpp"]),
            seed=int(data["seed"]),
            params=params,
            objects=objects,
            hotspot=hotspot,
            faults=synth_faults.PlantedFaults.from_json_dict(data.get("faults")),
        )


def default_truth_path(out_path: str | Path) -> Path:
    """Where the truth JSON goes: "x/slide.tiff" -> "x/slide.truth.json".

    Only the last suffix goes ("x/slide.ome.tiff" -> "x/slide.ome.truth.json"), so a TIFF
    and an OME-TIFF of the same name never share a truth file.
    """
    path = Path(out_path)
    return path.with_name(path.stem + ".truth.json")


def load_truth(path: str | Path) -> SynthTruth:
    """Read a truth JSON written by `generate_slide`."""
    with open(path, encoding="utf-8") as fh:
        return SynthTruth.from_json_dict(json.load(fh))


def generate_slide(
    out_path: str | Path,
    params: SynthParams,
    truth_path: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SynthTruth:
    """Write a synthetic slide to `out_path` and its truth JSON; return the truth.

    The slide appears under its name only when complete (written as "<name>.partial" and
    renamed), so a folder watcher never sees half a slide. `progress(done_rows, total_rows)`
    is called after each strip of level-0 tile rows.
    """
    params.validate()
    out = Path(out_path)
    truth_file = default_truth_path(out) if truth_path is None else Path(truth_path)
    started = time.perf_counter()
    model = _SlideModel(params)
    truth = SynthTruth(
        slide=out.name,
        width=params.width,
        height=params.height,
        mpp=params.mpp,
        seed=params.seed,
        params=params,
        objects=tuple(p.truth for p in model.planted),
        hotspot=_truth_hotspot(
            np.array(
                [(p.truth.x_um, p.truth.y_um) for p in model.planted if p.truth.is_mitosis],
                dtype=np.float64,
            ).reshape(-1, 2),
            hotspot_radius_um(params.hotspot_area_mm2),
        ),
        faults=model.faults,
    )
    logger.info(
        "synthesising %dx%d px at %.3f µm/px: %d mitoses, %d imposters (planned in %.1f s)",
        params.width,
        params.height,
        params.mpp,
        truth.count("normal") + truth.count("atypical"),
        truth.count("imposter"),
        time.perf_counter() - started,
    )
    partial = out.with_name(out.name + ".partial")
    try:
        _write_pyramid(partial, model, progress)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    _write_json_atomically(truth_file, truth.to_json_dict())
    logger.info("wrote %s in %.1f s", out, time.perf_counter() - started)
    return truth


def _truth_hotspot(points_um: Float64Array, radius_um: float) -> Hotspot:
    """`find_hotspot`, with ties going to the circle best centred on the figures it holds.

    Without it an equal-count circle may hang off the slide's edge (lowest y wins), which
    is a correct count but a poor field to show a pathologist.
    """
    if len(points_um) == 0:
        return find_hotspot(points_um, radius_um)
    tree = cKDTree(points_um)
    counting_radius = radius_um * (1.0 + BOUNDARY_TOLERANCE)

    def centred(centres: Float64Array) -> Float64Array:
        members = tree.query_ball_point(centres, counting_radius)
        means = np.array([points_um[m].mean(axis=0) for m in members])
        return np.asarray(-np.hypot(*(means - centres).T), dtype=np.float64)

    return find_hotspot(points_um, radius_um, tie_break=centred)


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
    os.replace(partial, path)


# --------------------------------------------------------------------------------------
# Writing: level 0 streamed strip by strip, the reduced levels kept at 1/4 size in memory.


def pyramid_shapes(height: int, width: int) -> list[tuple[int, int]]:
    """(height, width) of each level: /4 per level until the longer side is < 2048."""
    shapes = [(height, width)]
    while max(shapes[-1]) >= PYRAMID_MIN_SIDE:
        h, w = shapes[-1]
        shapes.append((-(-h // PYRAMID_FACTOR), -(-w // PYRAMID_FACTOR)))
    return shapes


def _write_pyramid(path: Path, model: _SlideModel, progress: Callable[[int, int], None] | None) -> None:
    params = model.params
    ts = params.tile_size
    shapes = pyramid_shapes(params.height, params.width)
    level1 = np.empty((*shapes[1], 3), np.uint8) if len(shapes) > 1 else None
    ome = params.fmt == "ome"
    name = path.name.removesuffix(".partial")
    # Classic TIFF offsets are 32-bit; JPEG keeps a slide far below its raw size, but a
    # raw size over 2 GiB is where a big slide could pass 4 GiB compressed in the worst case.
    bigtiff = params.width * params.height * 3 > (1 << 31)
    common: dict[str, Any] = {
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": params.jpeg_quality},
        "tile": (ts, ts),
        "resolutionunit": "CENTIMETER",
    }
    with tifffile.TiffWriter(path, bigtiff=bigtiff, ome=ome) as writer:
        if ome:
            metadata: dict[str, Any] | None = {
                "axes": "YXS",
                "Name": name,
                "PhysicalSizeX": params.mpp,
                "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": params.mpp,
                "PhysicalSizeYUnit": "µm",
                # tifffile would draw a time-based UUID; derive one so output is reproducible.
                "UUID": str(uuid.uuid5(uuid.NAMESPACE_URL, f"mitosis-edge-synth:{name}:{params!r}")),
            }
            description = None
        else:
            metadata = None
            description = f"mitosis-edge synthetic H&E slide; seed={params.seed}; mpp={params.mpp}"
        writer.write(
            _level0_jpeg_tiles(model, level1, progress),
            shape=(params.height, params.width, 3),
            dtype=np.uint8,
            resolution=(1e4 / params.mpp, 1e4 / params.mpp),
            subifds=len(shapes) - 1 if ome else None,
            metadata=metadata,
            description=description,
            **common,
        )
        level = level1
        for index in range(1, len(shapes)):
            assert level is not None
            level_mpp = params.mpp * (params.width / shapes[index][1])
            writer.write(
                level,
                resolution=(1e4 / level_mpp, 1e4 / level_mpp),
                subfiletype=1,
                metadata=None,
                maxworkers=RENDER_THREADS,
                **common,
            )
            if index + 1 < len(shapes):
                level = _downsample(level, shapes[index + 1])


def _level0_jpeg_tiles(
    model: _SlideModel,
    level1: UInt8Array | None,
    progress: Callable[[int, int], None] | None,
) -> Iterator[bytes]:
    """JPEG tiles of level 0 in TIFF order, rendered and encoded by a small thread pool.

    Encoding here, next to rendering, keeps both cores busy; the bytes are exactly what
    tifffile would produce for photometric="rgb", compression="jpeg" (YCbCr 4:2:0).
    """
    params = model.params
    ts = params.tile_size
    height, width = params.height, params.width
    n_strips = -(-height // ts)
    block_width = ts * max(1, 1024 // ts)
    block_starts = list(range(0, width, block_width))
    pending: deque[tuple[int, list[Future[tuple[list[bytes], UInt8Array]]]]] = deque()

    def encode_block(y0: int, x0: int, nuclei: _Nuclei) -> tuple[list[bytes], UInt8Array]:
        w = min(block_width, -(-(width - x0) // ts) * ts)
        rgb = model.render(y0, x0, ts, w, nuclei)
        tiles: list[bytes] = [
            imagecodecs.jpeg_encode(  # type: ignore[misc]  # stubs say bytes | bytearray; it is bytes
                np.ascontiguousarray(rgb[:, i : i + ts]),
                level=params.jpeg_quality,
                colorspace="RGB",
                outcolorspace="YCBCR",
                subsampling=(2, 2),
            )
            for i in range(0, w, ts)
        ]
        return tiles, _downsample_block(rgb)

    with ThreadPoolExecutor(RENDER_THREADS, thread_name_prefix="synth") as pool:

        def submit(strip: int) -> None:
            y0 = strip * ts
            nuclei = model.nuclei_for_rows(y0, y0 + ts)
            pending.append((strip, [pool.submit(encode_block, y0, x0, nuclei) for x0 in block_starts]))

        for strip in range(min(2, n_strips)):
            submit(strip)
        next_strip = len(pending)
        while pending:
            strip, futures = pending.popleft()
            y0 = strip * ts
            strip_tiles: list[bytes] = []
            for x0, future in zip(block_starts, futures, strict=True):
                tiles, small = future.result()
                if level1 is not None:
                    ys, xs = y0 // PYRAMID_FACTOR, x0 // PYRAMID_FACTOR
                    h = min(small.shape[0], level1.shape[0] - ys)
                    w = min(small.shape[1], level1.shape[1] - xs)
                    level1[ys : ys + h, xs : xs + w] = small[:h, :w]
                strip_tiles.extend(tiles)
            if next_strip < n_strips:
                submit(next_strip)
                next_strip += 1
            # Before yielding: tifffile stops pulling after the last tile, so code after
            # the final yield would never run.
            if progress is not None:
                progress(min(y0 + ts, height), height)
            yield from strip_tiles


def _downsample_block(rgb: UInt8Array) -> UInt8Array:
    """4x4 box mean of a block whose sides are multiples of 4 (cheap slicing sums)."""
    f = PYRAMID_FACTOR
    rows = rgb[0::f].astype(np.uint16)
    for k in range(1, f):
        rows += rgb[k::f]
    cols = rows.reshape(rows.shape[0], rows.shape[1] // f, f, 3)
    total = cols[:, :, 0].copy()
    for k in range(1, f):
        total += cols[:, :, k]
    total += (f * f) // 2
    total //= f * f
    return total.astype(np.uint8)


def _downsample(level: UInt8Array, shape: tuple[int, int]) -> UInt8Array:
    """The next pyramid level: 4x4 box mean, edges padded by replication, in row chunks."""
    f = PYRAMID_FACTOR
    out = np.empty((*shape, 3), np.uint8)
    chunk = 256 * f
    for y0 in range(0, level.shape[0], chunk):
        part = level[y0 : y0 + chunk]
        pad_h = -part.shape[0] % f
        pad_w = -part.shape[1] % f
        if pad_h or pad_w:
            part = np.pad(part, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        small = _downsample_block(part)
        out[y0 // f : y0 // f + small.shape[0]] = small[:, : shape[1]]
    return out


# --------------------------------------------------------------------------------------
# The slide model: smooth fields, textures, sprites and the plan of planted objects.


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
class _PlantedSprite:
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
        return self.top + self.hematoxylin.shape[0]

    @property
    def right(self) -> int:
        return self.left + self.hematoxylin.shape[1]


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


class _SlideModel:
    """Everything about one synthetic slide that is decided before rendering a pixel."""

    def __init__(self, params: SynthParams) -> None:
        self.params = params
        self.mpp = params.mpp
        ts = params.tile_size
        fault_sigma = MAX_FAULT_SIGMA_PX if params.blur_regions or params.blur_hotspot else 0.0
        widest = max(params.blur_sigma, fault_sigma)
        self.margin = math.ceil(3.0 * widest) if widest > 0 else 0
        self.max_block = (ts + 2 * self.margin, ts * max(1, 1024 // ts) + 2 * self.margin)
        self._build_stains()
        self._build_fields()
        self._build_textures()
        self._build_nucleus_sprites()
        self.planted = self._plan_objects()
        self._planted_boxes = np.array(
            [(p.top, p.left, p.bottom, p.right) for p in self.planted], dtype=np.int64
        ).reshape(-1, 4)
        self._planted_tree = (
            cKDTree(np.array([(p.truth.y_px, p.truth.x_px) for p in self.planted])) if self.planted else None
        )
        self._planted_exclusion_px = np.array([p.exclusion_um / self.mpp for p in self.planted], dtype=np.float64)
        self._band_px = _NUCLEUS_BAND_UM / self.mpp
        self._bands: dict[int, _Nuclei] = {}
        self.faults = self._plan_faults()

    # ---- stains --------------------------------------------------------------------

    def _build_stains(self) -> None:
        """A (256*256, 3) look-up table from quantised H and E amounts to RGB (Beer-Lambert)."""
        rng = np.random.default_rng([self.params.seed, _STREAM_STAINS])
        jitter = self.params.stain_jitter

        def jittered(vector: tuple[float, float, float]) -> Float64Array:
            v = np.array(vector) * (1.0 + rng.normal(0.0, jitter * 0.6, 3))
            return np.clip(v, 0.02, None)

        h_od = jittered(_HEMATOXYLIN_OD) * (1.0 + rng.normal(0.0, jitter))
        e_od = jittered(_EOSIN_OD) * (1.0 + rng.normal(0.0, jitter))
        e_od = synth_faults.shift_eosin(h_od, e_od, self.params.stain_shift)
        self.stain_od = (h_od, e_od)
        # Glass and light source: a little brighter or dimmer, barely tinted.
        brightness = rng.normal(0.0, 25.0 * jitter)
        background = np.clip(np.array(_BACKGROUND_RGB) + brightness + rng.normal(0.0, 0.8, 3), 232, 252)
        h = np.linspace(0.0, _H_MAX, 256)[:, None, None] * h_od
        e = np.linspace(0.0, _E_MAX, 256)[None, :, None] * e_od
        rgb = background * np.exp(-(h + e))
        self.lut = np.ascontiguousarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(-1, 3))
        self.background_rgb = self.lut[0].copy()

    # ---- smooth fields ---------------------------------------------------------------

    def _build_fields(self) -> None:
        params = self.params
        rng = np.random.default_rng([params.seed, _STREAM_FIELDS])
        self.cell_px = _COARSE_CELL_UM / self.mpp
        # The grid also covers the padding of the last tile row and column and the blur
        # margin, with a fixed overhang so that tile_size and blur_sigma never change content.
        ny = math.ceil((params.height + _GRID_OVERHANG_PX) / self.cell_px) + 3
        nx = math.ceil((params.width + _GRID_OVERHANG_PX) / self.cell_px) + 3
        extent_um = min(params.width, params.height) * self.mpp

        def smooth(sigma_um: float) -> Float64Array:
            sigma = max(sigma_um / _COARSE_CELL_UM, 0.8)
            f = ndimage.gaussian_filter(rng.standard_normal((ny, nx)), sigma, mode="reflect")
            return (f - f.mean()) / (f.std() + 1e-12)

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

    def _block_fields(self, y0: int, x0: int, h: int, w: int) -> _BlockFields:
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

    # ---- textures --------------------------------------------------------------------

    def _build_textures(self) -> None:
        rng = np.random.default_rng([self.params.seed, _STREAM_TEXTURES])
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

    # ---- ordinary nuclei -------------------------------------------------------------

    def _build_nucleus_sprites(self) -> None:
        """A bank of nucleus sprites (H amount, E multiplier); stamping reuses them."""
        rng = np.random.default_rng([self.params.seed, _STREAM_SPRITES])
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
        add("tumour", 48, lambda: _nucleus_sprite(rng, mpp, "tumour", rng.uniform(0, math.pi)))
        add("lymphocyte", 16, lambda: _nucleus_sprite(rng, mpp, "lymphocyte", 0.0))
        for name, angle in zip(("fibro_a", "fibro_b"), self.fibre_angles, strict=True):

            def fibroblast(angle: float = angle) -> tuple[Float32Array, Float32Array]:
                return _nucleus_sprite(rng, mpp, "fibroblast", angle + rng.normal(0, 0.15))

            add(name, 16, fibroblast)
        self.nucleus_bank = bank
        self.nucleus_ranges = ranges
        self.nucleus_half = np.array([h.shape[0] // 2 for h, _ in bank], dtype=np.int64)
        self.nucleus_reach = int(max(h.shape[0] for h, _ in bank))

    def _band_nuclei(self, band: int) -> _Nuclei:
        """Nuclei whose grid rows start in band `band`: a jittered grid thinned by density."""
        params = self.params
        rng = np.random.default_rng([params.seed, _STREAM_NUCLEI, band])
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
        if self._planted_tree is not None and keep.any():
            distance, nearest = self._planted_tree.query(np.stack([y, x], axis=1))
            keep &= distance > self._planted_exclusion_px[nearest]
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

    # ---- planted objects -------------------------------------------------------------

    def _plan_objects(self) -> list[_PlantedSprite]:
        params = self.params
        rng = np.random.default_rng([params.seed, _STREAM_OBJECTS])
        n_mitoses = params.mitosis_count
        n_atypical = round(n_mitoses * params.atypical_fraction)
        n_imposters = params.imposter_count
        classes: list[tuple[Literal["normal", "atypical", "imposter"], str]] = []
        for _ in range(n_mitoses - n_atypical):
            classes.append(("normal", str(rng.choice(NORMAL_SHAPES, p=_NORMAL_SHAPE_WEIGHTS))))
        for _ in range(n_atypical):
            classes.append(("atypical", str(rng.choice(ATYPICAL_SHAPES))))
        for _ in range(n_imposters):
            classes.append(("imposter", str(rng.choice(IMPOSTER_SHAPES))))
        mitosis_order = rng.permutation(n_mitoses)  # which mitoses go into clusters
        classes[:n_mitoses] = [classes[i] for i in mitosis_order]

        placer = _Placer(self, rng)
        n_clustered = round(n_mitoses * params.cluster_fraction)
        positions: list[tuple[float, float]] = []
        if n_clustered:
            sizes = [n_clustered]
            if n_clustered >= 8 and rng.random() < 0.5:
                first = round(n_clustered * rng.uniform(0.55, 0.7))
                sizes = [first, n_clustered - first]
            hotspot_um = hotspot_radius_um(params.hotspot_area_mm2)
            spread_um = min(0.4 * hotspot_um, 0.2 * min(params.width, params.height) * self.mpp)
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
            sprite_rng = np.random.default_rng([params.seed, _STREAM_OBJECT_SPRITE, new_id])
            drawing = _draw_object(sprite_rng, shape, self.mpp)
            centre = drawing.hematoxylin.shape[0] // 2
            truth = PlantedObject(
                id=new_id,
                object_class=object_class,
                shape=shape,
                x_px=x_px,
                y_px=y_px,
                x_um=x_px * self.mpp,
                y_um=y_px * self.mpp,
                radius_um=round(drawing.radius_um, 2),
            )
            planted.append(
                _PlantedSprite(
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

    # ---- scan faults -----------------------------------------------------------------

    def _plan_faults(self) -> synth_faults.PlantedFaults:
        params = self.params
        stains = {"stain_shift_deg": params.stain_shift, "hematoxylin_od": tuple(float(v) for v in self.stain_od[0]),
                  "eosin_od": tuple(float(v) for v in self.stain_od[1])}
        if not (params.blur_regions or params.blur_hotspot or params.folds or params.pen_strokes):
            return synth_faults.PlantedFaults(**stains)  # type: ignore[arg-type]
        rng = np.random.default_rng([params.seed, _STREAM_FAULTS])
        margin = 0.1 * min(params.width, params.height)

        def tissue_point() -> tuple[float, float]:
            ys = rng.uniform(margin, params.height - margin, 256)
            xs = rng.uniform(margin, params.width - margin, 256)
            inside = np.flatnonzero(self.tissue_value_at(ys, xs) > self.tissue_threshold + self.tissue_softness)
            i = int(inside[0]) if len(inside) else 0
            return float(ys[i]), float(xs[i])

        hotspot_px = None
        if params.blur_hotspot:
            points = np.array([(p.truth.x_um, p.truth.y_um) for p in self.planted if p.truth.is_mitosis]).reshape(-1, 2)
            spot = _truth_hotspot(points, hotspot_radius_um(params.hotspot_area_mm2))
            if math.isfinite(spot.center_x_um):
                radius_um = min(0.5 * spot.radius_um, 0.3 * min(params.width, params.height) * self.mpp)
                hotspot_px = (spot.center_x_um / self.mpp, spot.center_y_um / self.mpp, radius_um / self.mpp)
        planned = synth_faults.plan_faults(
            rng, width=params.width, height=params.height, mpp=self.mpp, blur_regions=params.blur_regions,
            folds=params.folds, pen_strokes=params.pen_strokes, tissue_point=tissue_point, hotspot_px=hotspot_px,
            max_sigma_px=MAX_FAULT_SIGMA_PX,
        )
        return dataclasses.replace(planned, **stains)  # type: ignore[arg-type]

    # ---- rendering -------------------------------------------------------------------

    def render(self, y0: int, x0: int, h: int, w: int, nuclei: _Nuclei) -> UInt8Array:
        """RGB pixels of level-0 rows [y0, y0+h) and columns [x0, x0+w). Thread-safe."""
        m = self.margin
        ry, rx, rh, rw = y0 - m, x0 - m, h + 2 * m, w + 2 * m
        if rh > self.max_block[0] or rw > self.max_block[1]:
            raise ValueError(f"block {h}x{w} larger than {self.max_block} less the blur margin")
        t = self.textures
        fields_ = self._block_fields(ry, rx, rh, rw)
        coarse_tissue = self.tissue[fields_.iy, fields_.ix]
        edge_reach = self.tissue_wiggle * self.tissue_edge_max + self.tissue_softness
        low, high = float(coarse_tissue.min()), float(coarse_tissue.max())
        if high + edge_reach < self.tissue_threshold and not self._objects_in(ry, rx, rh, rw):
            return self._finish(None, None, y0, x0, h, w)

        py, px = ry % t.period, rx % t.period
        if low - edge_reach > self.tissue_threshold:
            alpha: Float32Array | float = 1.0
        else:
            value = fields_.sample(self.tissue)
            value += self.tissue_wiggle * t.tissue_edge[py : py + rh, px : px + rw]
            value -= self.tissue_threshold
            value *= 1.0 / self.tissue_softness
            value += 0.5
            alpha = np.clip(value, 0.0, 1.0, out=value)

        # Eosin: fibrous stroma blended into granular cytoplasm where cells are dense.
        orientation = fields_.sample(self.orientation)
        cellularity = fields_.sample(self.cellularity)
        fibre_b = t.fibre_b[py : py + rh, px : px + rw]
        eosin = t.fibre_a[py : py + rh, px : px + rw] - fibre_b
        eosin *= orientation
        eosin += fibre_b
        cytoplasm = t.cytoplasm[py : py + rh, px : px + rw] - eosin
        cytoplasm *= cellularity
        eosin += cytoplasm
        # Haematoxylin background: faint in stroma, bluish cytoplasm in cellular sheets.
        hematoxylin = cellularity * np.float32(0.12)
        hematoxylin += np.float32(0.05)
        hematoxylin *= t.cytoplasm[py : py + rh, px : px + rw]
        if not isinstance(alpha, float):
            eosin *= alpha
            hematoxylin *= alpha

        self._stamp_nuclei(hematoxylin, eosin, ry, rx, nuclei)
        self._stamp_objects(hematoxylin, eosin, ry, rx)
        hematoxylin *= fields_.sample(self.hematoxylin_level)
        eosin *= fields_.sample(self.eosin_level)
        if self.faults.folds:
            synth_faults.fold_block(hematoxylin, eosin, self.faults.folds, ry, rx)
        if self.faults.blur:
            synth_faults.blur_block(hematoxylin, eosin, self.faults.blur, ry, rx)
        if self.params.blur_sigma > 0:
            sigma = self.params.blur_sigma
            hematoxylin = ndimage.gaussian_filter(hematoxylin, sigma, mode="nearest")
            eosin = ndimage.gaussian_filter(eosin, sigma, mode="nearest")
        if m:
            hematoxylin, eosin = hematoxylin[m:-m, m:-m], eosin[m:-m, m:-m]
        return self._finish(hematoxylin, eosin, y0, x0, h, w)

    def _objects_in(self, y: int, x: int, h: int, w: int) -> bool:
        boxes = self._planted_boxes
        return bool(np.any((boxes[:, 0] < y + h) & (boxes[:, 2] > y) & (boxes[:, 1] < x + w) & (boxes[:, 3] > x)))

    def _stamp_nuclei(self, hematoxylin: Float32Array, eosin: Float32Array, y: int, x: int, nuclei: _Nuclei) -> None:
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

    def _stamp_objects(self, hematoxylin: Float32Array, eosin: Float32Array, y: int, x: int) -> None:
        h, w = hematoxylin.shape
        boxes = self._planted_boxes
        hits = np.flatnonzero((boxes[:, 0] < y + h) & (boxes[:, 2] > y) & (boxes[:, 1] < x + w) & (boxes[:, 3] > x))
        for index in hits.tolist():
            obj = self.planted[index]
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

    def _finish(
        self,
        hematoxylin: Float32Array | None,
        eosin: Float32Array | None,
        y0: int,
        x0: int,
        h: int,
        w: int,
    ) -> UInt8Array:
        """Stain amounts -> RGB through the look-up table, then sensor noise."""
        if hematoxylin is None or eosin is None:
            rgb = np.empty((h, w, 3), np.uint8)
            rgb[:] = self.background_rgb
        else:
            hematoxylin *= np.float32(255.0 / _H_MAX)
            eosin *= np.float32(255.0 / _E_MAX)
            np.clip(hematoxylin, 0.0, 255.0, out=hematoxylin)
            np.clip(eosin, 0.0, 255.0, out=eosin)
            index = hematoxylin.astype(np.uint16)
            index <<= 8
            index |= eosin.astype(np.uint16)
            rgb = np.take(self.lut, index, axis=0)
        t = self.textures
        if t.noise is not None:
            ny, nx = y0 % t.noise_period, x0 % t.noise_period
            noisy = rgb.astype(np.int16)
            noisy += t.noise[ny : ny + h, nx : nx + w]
            np.clip(noisy, 0, 255, out=noisy)
            rgb = noisy.astype(np.uint8)
        if self.faults.pen:
            rgb = synth_faults.pen_block(rgb, self.faults.pen, y0, x0)
        return rgb


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


class _Placer:
    """Rejection sampling of object centres: inside tissue, apart, away from the border."""

    def __init__(self, model: _SlideModel, rng: np.random.Generator) -> None:
        self.model = model
        self.rng = rng
        params = model.params
        border = OBJECT_BORDER_UM / model.mpp
        self.y_range = (border, params.height - border)
        self.x_range = (border, params.width - border)
        if self.y_range[0] >= self.y_range[1] or self.x_range[0] >= self.x_range[1]:
            raise ConfigError(
                f"width={params.width!r}, height={params.height!r}: the slide is too small "
                f"to keep objects {OBJECT_BORDER_UM} µm from its border"
            )
        self.spacing = OBJECT_MIN_SPACING_UM / model.mpp
        self.placed = np.empty((0, 2))
        # Sample points on two rings around each candidate: the figure and its halo sit in
        # tissue. The samples include the border wiggle, so only the soft edge needs a margin.
        angles = np.linspace(0, 2 * math.pi, 16, endpoint=False)
        unit = np.stack([np.sin(angles), np.cos(angles)], axis=1)
        self.ring = np.concatenate([unit * 15.0, unit[::2] * 8.0]) / model.mpp
        self.inside_margin = model.tissue_softness

    def _ok(self, y: Float64Array, x: Float64Array) -> NDArray[np.bool_]:
        ok = (y >= self.y_range[0]) & (y < self.y_range[1]) & (x >= self.x_range[0]) & (x < self.x_range[1])
        points_y = np.concatenate([y[:, None], y[:, None] + self.ring[None, :, 0]], axis=1)
        points_x = np.concatenate([x[:, None], x[:, None] + self.ring[None, :, 1]], axis=1)
        value = self.model.tissue_value_at(points_y.ravel(), points_x.ravel()).reshape(points_y.shape)
        ok &= value.min(axis=1) > self.model.tissue_threshold + self.inside_margin
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
                cellularity = self.model.coarse_at(self.model.cellularity, y, x)
                ok &= self.rng.random(64) < 0.25 + 0.75 * cellularity
            for yy, xx in zip(y[ok].tolist(), x[ok].tolist(), strict=True):
                centre = self._centre(yy, xx)
                if self._accept(*centre):
                    return centre
        params = self.model.params
        raise ConfigError(
            f"{what}={getattr(params, what)!r}: could not place {len(self.placed) + 1} objects "
            f"{OBJECT_MIN_SPACING_UM} µm apart in the tissue of a {params.width}x{params.height} "
            "slide; lower the count or raise width, height or tissue_fraction"
        )

    def cluster(self, size: int, spread_um: float) -> list[tuple[float, float]]:
        """Up to `size` centres around one cellular tissue spot; fewer if space runs out."""
        model = self.model
        centre: tuple[float, float] | None = None
        for _ in range(200):
            y = self.rng.uniform(*self.y_range, 64)
            x = self.rng.uniform(*self.x_range, 64)
            ok = self._ok(y, x) & (self.rng.random(64) < model.coarse_at(model.cellularity, y, x) ** 2)
            if ok.any():
                first = int(np.flatnonzero(ok)[0])
                centre = (float(y[first]), float(x[first]))
                break
        if centre is None:
            return []
        spread = spread_um / model.mpp
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


# --------------------------------------------------------------------------------------
# Sprites: ordinary nuclei and planted figures, drawn on small µm grids at the slide's mpp.


def _local_grid(half_um: float, mpp: float) -> tuple[Float32Array, Float32Array]:
    """x, y offsets in µm of the pixel centres of a square sprite centred on its middle pixel."""
    half = math.ceil(half_um / mpp)
    offsets = (np.arange(-half, half + 1) * mpp).astype(np.float32)
    v, u = np.meshgrid(offsets, offsets, indexing="ij")
    return u, v


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_um: float, mpp: float) -> Float32Array:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), max(sigma_um / mpp, 0.5), mode="wrap")
    return ((noise - noise.mean()) / (noise.std() + 1e-12)).astype(np.float32)


def _nucleus_sprite(rng: np.random.Generator, mpp: float, kind: str, angle: float) -> tuple[Float32Array, Float32Array]:
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
    u, v = _local_grid(a + 1.2, mpp)
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
class _Drawing:
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


def _draw_object(rng: np.random.Generator, shape: str, mpp: float) -> _Drawing:
    """Draw one planted figure of `shape` around the sprite's middle pixel."""
    u, v = _local_grid(_OBJECT_CANVAS_UM, mpp)
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
    return _Drawing(hematoxylin, eosin, clear, radius_um, halo_um)


def _irregular_disc(
    rng: np.random.Generator, u: Float32Array, v: Float32Array, radius: float, edge: float, wobble: float
) -> Float32Array:
    """Soft mask (0..1) of a lobulated disc: a radius varying with low harmonics of the angle."""
    theta = np.arctan2(v, u)
    outline = np.full_like(u, radius)
    for k in range(2, 5):
        outline += radius * rng.normal(0, wobble) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    return np.clip((outline - np.hypot(u, v)) / edge + 0.5, 0.0, 1.0).astype(np.float32)


def _draw_imposter(
    rng: np.random.Generator, shape: str, u: Float32Array, v: Float32Array, chrom: _Chromatin
) -> _Drawing:
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
        return _Drawing(hematoxylin, eosin, clear, body, retraction)
    radius = rng.uniform(2.0, 3.2)
    hematoxylin = (rng.uniform(2.8, 3.2) * np.clip((radius - dist) / 0.3 + 0.5, 0.0, 1.0)).astype(np.float32)
    rim = radius + rng.uniform(1.0, 2.5)
    clear = (0.85 * np.clip((rim - dist) / 0.6 + 0.5, 0.0, 1.0)).astype(np.float32)
    eosin = (clear * rng.uniform(0.6, 0.95)).astype(np.float32)
    return _Drawing(hematoxylin, eosin, clear, radius, rim)
