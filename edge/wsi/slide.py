"""Open a whole-slide image, report its metadata, and read regions at a target mpp.

TIFF-family slides (SVS, NDPI, SCN, BIF, Philips TIFF, OME-TIFF, generic pyramidal TIFF) open
with tiffslide; MRXS, VMS/VMU and DICOM WSI with OpenSlide. Pixels of tiled TIFF levels are
read by decoding the stored tiles directly (tifffile + imagecodecs, which release the GIL) with
a bounded cache of decoded tiles, because overlapping tile reads then decode each stored tile
once and reads scale across threads; other levels are read through the opening library.

No exception other than a :class:`edge.errors.SlideReadError` subclass leaves this module's
public functions and methods.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import math
import os
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from edge.config import SlideConfig
from edge.errors import (
    CorruptSlideError,
    ImplausibleSlideError,
    MissingMppError,
    NotASlideError,
    SlideNotFoundError,
    SlideReadError,
    TileDecodeError,
    UnsupportedFormatError,
)
from edge.fileio import special_file_kind
from edge.vocab import SLIDE_EXTENSIONS

log = logging.getLogger(__name__)

BACKGROUND = 255  # white glass: what is outside the scanned area
MIN_PLAUSIBLE_MPP = 0.01  # µm/px; below any optical scanner
MAX_PLAUSIBLE_MPP = 100.0  # µm/px; above this a "resolution" is a default DPI, not a pixel size
THUMBNAIL_CHUNK = 2048  # level px per side read at once when building a thumbnail
# A scan stores far more than this per megapixel of level 0 (JPEG of blank glass: ~20 KB); a file with
# less declares pixels it does not hold (a "bomb" that would plan tens of thousands of tiles).
MIN_BYTES_PER_MEGAPIXEL = 1000

TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Formats only OpenSlide reads: a file with one of these names goes to OpenSlide even when it starts like
# a TIFF (e.g. Sakura .svslide). vocab.SLIDE_EXTENSIONS lists every name the opener and the watcher know.
OPENSLIDE_ONLY_EXTENSIONS = frozenset({".mrxs", ".vms", ".vmu", ".dcm", ".svslide", ".czi"})
MPP_HINT = (
    "pass --mpp MICRONS_PER_PIXEL (for example --mpp 0.25) "
    "or set mpp_override in the [slide] section of the config file"
)


@dataclass(frozen=True)
class Level:
    """One pyramid level. ``downsample`` is level-0 px per level px."""

    index: int
    width: int
    height: int
    downsample: float
    tile_width: int | None = None
    tile_height: int | None = None


@dataclass(frozen=True)
class SlideInfo:
    """What `mitosis-edge info` reports. mpp is None when the slide records none and no override was given."""

    path: str
    format: str  # aperio, hamamatsu, leica, ventana, philips, ome, generic-tiff, mirax, dicom, ...
    reader: str  # tiffslide or openslide
    region_reader: str  # tiles (direct decode) or library
    vendor: str
    width: int
    height: int
    levels: tuple[Level, ...]
    mpp_x: float | None
    mpp_y: float | None
    mpp_source: str | None  # vendor, ome-xml, tiff-resolution, override
    objective_power: float | None
    associated_images: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())
    barcode: str | None = None  # the slide label's barcode as the scanner recorded it (see slide_barcode)
    scanner: dict[str, str] = field(default_factory=dict)  # vendor, model, serial, id ("unknown" when absent)

    @property
    def dimensions(self) -> tuple[int, int]:
        return (self.width, self.height)

    def level_mpp(self, level: int) -> tuple[float, float]:
        """(x, y) µm/px of a level; raises MissingMppError when the slide has no mpp."""
        if self.mpp_x is None or self.mpp_y is None:
            raise MissingMppError(self.path, f"the slide records no pixel size (mpp); {MPP_HINT}")
        lv = self.levels[level]
        return (self.mpp_x * self.width / lv.width, self.mpp_y * self.height / lv.height)

    def to_json_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["levels"] = [asdict(lv) for lv in self.levels]
        d["associated_images"] = list(self.associated_images)
        d["notes"] = list(self.notes)
        return d


# Where each vendor's metadata names the scanner's model and serial number (OpenSlide/tiffslide property names).
_SCANNER_MODEL_KEYS = ("aperio.ScannerType", "hamamatsu.Product", "leica.device-model",
                       "philips.DICOM_MANUFACTURERS_MODEL_NAME", "dicom.ManufacturerModelName", "ventana.ScannerModel",
                       "mirax.NONHIERLAYER_0_SECTION.SCANNER_HARDWARE_VERSION")
_SCANNER_SERIAL_KEYS = ("aperio.ScanScope ID", "hamamatsu.SerialNumber", "leica.device-version",
                        "philips.DICOM_DEVICE_SERIAL_NUMBER", "dicom.DeviceSerialNumber", "ventana.ScannerSerialNumber",
                        "mirax.NONHIERLAYER_0_SECTION.SCANNER_HARDWARE_ID")
UNKNOWN_SCANNER = "unknown"


def scanner_from_properties(props: Any, vendor: str) -> dict[str, str]:
    """The scanner that made a slide, from its metadata: vendor, model, serial and an id for grouping.

    The id is "vendor/model/serial" with the parts the metadata has; "unknown" when it names no model and
    no serial (a generic TIFF says nothing about its scanner).

    >>> scanner_from_properties({"aperio.ScanScope ID": "SS1234"}, "aperio")["id"]
    'aperio/-/SS1234'
    >>> scanner_from_properties({}, "generic-tiff")["id"]
    'unknown'
    """

    def first(keys: tuple[str, ...]) -> str:
        for key in keys:
            value = props.get(key)
            if value not in (None, ""):
                return " ".join(str(value).split())[:80]
        return ""

    model, serial = first(_SCANNER_MODEL_KEYS), first(_SCANNER_SERIAL_KEYS)
    known = bool(model or serial)
    return {
        "vendor": vendor or UNKNOWN_SCANNER,
        "model": model or UNKNOWN_SCANNER,
        "serial": serial or UNKNOWN_SCANNER,
        "id": f"{vendor}/{model or '-'}/{serial or '-'}" if known else UNKNOWN_SCANNER,
    }


@dataclass(frozen=True)
class ReadScale:
    """How output pixels at the target mpp map onto a pyramid level and level 0.

    Output pixel (u, v) covers level-0 pixels [u*px0_per_out_x, (u+1)*px0_per_out_x) and likewise in y.
    """

    level: int
    target_mpp: float
    mpp_x: float  # effective output µm/px (the target, or the level's own when within tolerance)
    mpp_y: float
    level_px_per_out_x: float  # 1.0 means the level is read as is
    level_px_per_out_y: float
    px0_per_out_x: float
    px0_per_out_y: float
    upsampled: bool  # the slide is coarser than the target: pixels were interpolated

    @property
    def resampled(self) -> bool:
        return self.level_px_per_out_x != 1.0 or self.level_px_per_out_y != 1.0


def choose_read_scale(
    level_mpps: list[tuple[float, float]], level0_mpp: tuple[float, float], target_mpp: float, tolerance: float
) -> ReadScale:
    """Pick the level to read for a target mpp: the coarsest level that is at least as fine as the
    target (within ``tolerance``); a level within tolerance of the target is read without resampling.
    A slide coarser than the target is read at level 0 and upsampled.
    """
    fine_enough = [i for i, (mx, my) in enumerate(level_mpps) if max(mx, my) <= target_mpp * (1 + tolerance)]
    level = max(fine_enough, key=lambda i: max(level_mpps[i])) if fine_enough else 0
    lmx, lmy = level_mpps[level]
    snap = abs(lmx / target_mpp - 1) <= tolerance and abs(lmy / target_mpp - 1) <= tolerance
    out_x, out_y = (lmx, lmy) if snap else (target_mpp, target_mpp)
    return ReadScale(
        level=level,
        target_mpp=target_mpp,
        mpp_x=out_x,
        mpp_y=out_y,
        level_px_per_out_x=1.0 if snap else target_mpp / lmx,
        level_px_per_out_y=1.0 if snap else target_mpp / lmy,
        px0_per_out_x=out_x / level0_mpp[0],
        px0_per_out_y=out_y / level0_mpp[1],
        upsampled=not snap and max(lmx, lmy) > target_mpp,
    )


def resolve_mpp(
    recorded: tuple[float, float] | None, source: str | None, override: float | None
) -> tuple[float | None, float | None, str | None, tuple[str, ...]]:
    """Decide the slide's mpp: an explicit override wins, then what the slide records (if plausible).

    Returns (mpp_x, mpp_y, source, notes). Never invents a value.
    """
    notes: list[str] = []
    if recorded is not None:
        mx, my = recorded
        if not all(MIN_PLAUSIBLE_MPP <= v <= MAX_PLAUSIBLE_MPP for v in (mx, my)):
            notes.append(
                f"ignored implausible recorded pixel size {mx:.4g} x {my:.4g} µm/px from {source} "
                "(likely a default DPI, not a scanner resolution)"
            )
            recorded = None
    if override is not None:
        if recorded is not None and abs(override / recorded[0] - 1) > 0.05:
            notes.append(f"mpp override {override} replaces the recorded {recorded[0]:.4g} µm/px")
        return (override, override, "override", tuple(notes))
    if recorded is None:
        return (None, None, None, tuple(notes))
    return (recorded[0], recorded[1], source, tuple(notes))


def detect_format(path: Path) -> tuple[str, Path]:
    """Return ('tiff'|'openslide', path to open). Raises SlideReadError subclasses for non-slides.

    Only regular files (and folders of them) are opened: a FIFO would block the reader forever.
    """
    if not path.exists():
        raise SlideNotFoundError(path, "no such file or folder; check the path")
    if path.is_dir():
        return ("openslide", _dicom_folder_target(path))
    head = _read_head(path, 132)
    if head[:4] in TIFF_MAGICS and path.suffix.lower() not in OPENSLIDE_ONLY_EXTENSIONS:
        return ("tiff", path)
    if head[128:132] == b"DICM":
        return ("openslide", path)
    vendor = _openslide_detect(path)
    if vendor is not None:
        return ("openslide", path)
    if path.suffix.lower() in SLIDE_EXTENSIONS:
        raise CorruptSlideError(
            path,
            f"has a {path.suffix} name but its content is no readable slide (not TIFF, DICOM or a format "
            "OpenSlide knows); the file is damaged or not a slide",
        )
    # The message never quotes the file's bytes: it travels to API clients in the job's error.
    raise NotASlideError(path, "is not a whole-slide image (not TIFF, DICOM or a format OpenSlide knows)")


def _read_head(path: Path, size: int) -> bytes:
    """The first bytes of a regular file. O_NONBLOCK: a FIFO put in its place is refused, never waited on."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        kind = special_file_kind(st.st_mode)
        if kind is not None:
            raise NotASlideError(path, f"is {kind}, not a regular file; only slide files and folders of them are read")
        if st.st_size == 0:
            raise CorruptSlideError(path, "the file is empty (0 bytes); it may still be being written")
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def _dicom_folder_target(folder: Path) -> Path:
    """The file to open for a DICOM WSI folder: its largest volume instance. The folder must hold one series."""
    from edge.wsi.dicom import series_in_folder

    groups = series_in_folder(folder)
    if not groups:
        what = "whose .dcm files are no readable DICOM" if any(folder.glob("*.dcm")) else "without .dcm files"
        raise NotASlideError(folder, f"is a folder {what}; pass a slide file or a DICOM WSI folder")
    if len(groups) > 1:
        raise NotASlideError(
            folder,
            f"mixes {len(groups)} DICOM series (SeriesInstanceUID {', '.join(sorted(groups))}): one folder must hold "
            "one slide's instances; pass one file of the series you mean, or give each slide its own folder",
        )
    (instances,) = groups.values()
    volumes = [i.path for i in instances if i.is_wsi_volume]
    if not volumes:
        flavors = sorted({i.image_flavor or "no ImageType" for i in instances})
        raise NotASlideError(
            folder, f"holds no whole-slide image, only DICOM {', '.join(flavors)} instance(s); a label or overview "
            "image alone cannot be analysed",
        )
    return max(volumes, key=lambda p: p.stat().st_size)


def _openslide_detect(path: Path) -> str | None:
    try:
        import openslide
    except ImportError:  # pragma: no cover - a declared dependency
        return None
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # noqa: BLE001 - any failure here just means "not an OpenSlide format"
        return None


class _LevelReader(Protocol):
    """Reads an in-bounds rectangle of one level as uint8 RGB into ``out`` (h, w, 3)."""

    name: str

    def read(self, level: int, x: int, y: int, w: int, h: int, out: np.ndarray) -> None: ...

    def close(self) -> None: ...


_T = TypeVar("_T")


class Slide:
    """An open slide. Use as a context manager; safe to read from several threads."""

    def __init__(self, info: SlideInfo, reader: _LevelReader, config: SlideConfig) -> None:
        self.info = info
        self.config = config
        self._reader = reader

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._reader.close()

    @property
    def path(self) -> str:
        return self.info.path

    def read_scale(self, target_mpp: float | None = None) -> ReadScale:
        """The level and scale used to read at ``target_mpp`` (default: the config's)."""
        target = self.config.target_mpp if target_mpp is None else target_mpp
        mpps = [self.info.level_mpp(i) for i in range(len(self.info.levels))]
        return choose_read_scale(mpps, mpps[0], target, self.config.mpp_tolerance)

    def read_level(self, level: int, x: int, y: int, w: int, h: int, out: np.ndarray | None = None) -> np.ndarray:
        """Read (h, w, 3) uint8 RGB at a level, in that level's px; outside the slide is white.

        ``out``, when given, is a (h, w, 3) uint8 array filled in place (saves a copy per tile)."""
        if not 0 <= level < len(self.info.levels):
            raise SlideReadError(self.path, f"level={level} out of range 0..{len(self.info.levels) - 1}")
        if w <= 0 or h <= 0:
            raise SlideReadError(self.path, f"region size {w}x{h} must be positive")
        lv = self.info.levels[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, lv.width), min(y + h, lv.height)
        if out is None:
            out = np.empty((h, w, 3), np.uint8)
        if x0 == x and y0 == y and x1 == x + w and y1 == y + h:
            self._guarded(functools.partial(self._reader.read, level, x, y, w, h, out), level, x, y)
            return out
        out[...] = BACKGROUND
        if x1 > x0 and y1 > y0:
            view = out[y0 - y : y1 - y, x0 - x : x1 - x]
            self._guarded(functools.partial(self._reader.read, level, x0, y0, x1 - x0, y1 - y0, view), level, x0, y0)
        return out

    def read_region(
        self, x0: float, y0: float, width: int, height: int, scale: ReadScale, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Read (height, width, 3) uint8 RGB at ``scale``'s output mpp; (x0, y0) is the top-left in level-0 px.

        ``out``, when given, is a (height, width, 3) uint8 array filled in place."""
        lv = self.info.levels[scale.level]
        ds_x, ds_y = self.info.width / lv.width, self.info.height / lv.height
        lx, ly = x0 / ds_x, y0 / ds_y
        if not scale.resampled:
            return self.read_level(scale.level, round(lx), round(ly), width, height, out)
        sx, sy = scale.level_px_per_out_x, scale.level_px_per_out_y
        pad = 3  # lanczos3 support, so border pixels see real neighbours
        ix, iy = math.floor(lx) - pad, math.floor(ly) - pad
        iw = math.ceil(lx + width * sx) + pad - ix
        ih = math.ceil(ly + height * sy) + pad - iy
        window = self.read_level(scale.level, ix, iy, iw, ih)
        result = self._guarded(
            functools.partial(resample, window, sx, sy, (lx - ix) / sx, (ly - iy) / sy, width, height),
            scale.level,
            ix,
            iy,
        )
        if out is not None:
            out[...] = result
            return out
        return result

    def thumbnail(self, mpp: float) -> tuple[np.ndarray, tuple[float, float]]:
        """The whole slide at about ``mpp`` µm/px, built in chunks so memory stays small.

        Returns the image and its exact (x, y) µm/px.
        """
        mpp0 = self.info.level_mpp(0)
        mpp = max(mpp, min(mpp0))  # never enlarge: a slide coarser than the thumbnail is its own thumbnail
        mpps = [self.info.level_mpp(i) for i in range(len(self.info.levels))]
        candidates = [i for i, m in enumerate(mpps) if max(m) <= mpp * (1 + 1e-9)]
        level = max(candidates, key=lambda i: max(mpps[i])) if candidates else 0
        lv = self.info.levels[level]
        out_w = max(1, round(self.info.width * mpp0[0] / mpp))
        out_h = max(1, round(self.info.height * mpp0[1] / mpp))
        fx, fy = lv.width / out_w, lv.height / out_h  # level px per thumbnail px
        thumb = np.full((out_h, out_w, 3), BACKGROUND, np.uint8)
        step_x = max(1, int(THUMBNAIL_CHUNK // fx)) if fx > 0 else out_w
        step_y = max(1, int(THUMBNAIL_CHUNK // fy)) if fy > 0 else out_h
        for ty in range(0, out_h, step_y):
            for tx in range(0, out_w, step_x):
                tw, th = min(step_x, out_w - tx), min(step_y, out_h - ty)
                lx, ly = tx * fx, ty * fy
                ix, iy = math.floor(lx), math.floor(ly)
                iw = max(1, math.ceil(lx + tw * fx) - ix)
                ih = max(1, math.ceil(ly + th * fy) - iy)
                window = self.read_level(level, ix, iy, iw, ih)
                thumb[ty : ty + th, tx : tx + tw] = self._guarded(
                    functools.partial(resample, window, fx, fy, (lx - ix) / fx, (ly - iy) / fy, tw, th), level, ix, iy
                )
        return thumb, (self.info.width * mpp0[0] / out_w, self.info.height * mpp0[1] / out_h)

    def _guarded(self, fn: Callable[[], _T], level: int, x: int, y: int) -> _T:
        try:
            return fn()
        except SlideReadError:
            raise
        except MemoryError:
            raise
        except Exception as exc:
            raise TileDecodeError(
                self.path, f"reading level {level} at ({x}, {y}) failed: {type(exc).__name__}: {exc}"
            ) from exc


def resample(
    window: np.ndarray, sx: float, sy: float, off_x: float, off_y: float, width: int, height: int
) -> np.ndarray:
    """Resample ``window`` by 1/sx, 1/sy (lanczos3 when shrinking, bicubic-class when enlarging) and
    cut (height, width) starting ``off_x``, ``off_y`` output px in. Edges are padded by replication."""
    pyvips = _pyvips()
    if sx == 1.0 and sy == 1.0 and off_x == int(off_x) and off_y == int(off_y):
        res = window
    else:
        src = np.ascontiguousarray(window[:, :, :3])
        img = pyvips.Image.new_from_memory(src.data, src.shape[1], src.shape[0], 3, "uchar")
        if sx >= 1.0 and sy >= 1.0:
            img = img.reduce(sx, sy, kernel="lanczos3")  # anti-aliased shrink
        else:
            img = img.resize(1.0 / sx, vscale=1.0 / sy, kernel="lanczos3")
        res = np.ndarray((img.height, img.width, 3), np.uint8, img.write_to_memory())
    ox, oy = round(off_x), round(off_y)
    cut = res[oy : oy + height, ox : ox + width]
    if cut.shape[0] != height or cut.shape[1] != width:
        cut = np.pad(
            cut,
            ((0, height - cut.shape[0]), (0, width - cut.shape[1]), (0, 0)),
            mode="edge" if cut.size else "constant",
        )
    return np.ascontiguousarray(cut[:, :, :3], dtype=np.uint8)


@functools.cache
def _pyvips() -> Any:
    """pyvips, with libvips' operation cache off: every resample is a new image, so cached results
    would only hold memory (up to 100 MB by default) and never be reused."""
    import pyvips

    pyvips.cache_set_max(0)
    return pyvips


# --- opening -------------------------------------------------------------------------------------


def open_slide(path: str | Path, config: SlideConfig | None = None) -> Slide:
    """Open a slide, choosing the library by format (or by ``config.reader``)."""
    cfg = config or SlideConfig()
    p = Path(path)
    with _translate_errors(p, "checking the file"):
        kind, target = detect_format(p)
    reader = cfg.reader
    if reader == "auto":
        reader = "tiffslide" if kind == "tiff" else "openslide"
    if reader == "tiffslide" and kind != "tiff":
        raise UnsupportedFormatError(
            p, 'tiffslide reads only TIFF-based slides; set [slide] reader = "openslide" or "auto"'
        )
    with _translate_errors(p, f"opening with {reader}"):
        if reader == "tiffslide":
            return _open_tiffslide(p, cfg)
        return _open_openslide(p, target, cfg)


@contextmanager
def _translate_errors(path: Path, what: str) -> Iterator[None]:
    try:
        yield
    except SlideReadError:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        raise _classify_open_error(path, what, exc) from exc


def _classify_open_error(path: Path, what: str, exc: Exception) -> SlideReadError:
    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    if isinstance(exc, PermissionError):
        return SlideReadError(path, f"permission denied ({exc.strerror}); let the service user read the file")
    if isinstance(exc, IsADirectoryError | NotADirectoryError):
        return NotASlideError(path, f"{what} failed: {text}")
    if "associated image" in low or "not a whole slide" in low or "no pyramid" in low:
        return NotASlideError(
            path, f"holds no whole-slide image ({text}); a label or overview image alone cannot be analysed"
        )
    if "unsupported" in low:
        return UnsupportedFormatError(path, f"{what} failed: {text}")
    return CorruptSlideError(path, f"{what} failed: {text}; the file is truncated or damaged (or still being written)")


def check_plausible(
    path: Path, width: int, height: int, file_bytes: int, stored_tile_bytes: int | None, cfg: SlideConfig
) -> None:
    """Refuse a slide whose declared level-0 size is beyond the limits or beyond what its bytes can hold,
    before any pixel is read. ``stored_tile_bytes``: level 0's tile byte counts summed (TIFF), else None.

    >>> check_plausible(Path("a.tiff"), 50_000, 40_000, 900 * 2**20, 880 * 2**20, SlideConfig())
    >>> check_plausible(Path("bomb.tiff"), 200_000, 200_000, 750_000, 9 * 10**9, SlideConfig())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    edge.errors.ImplausibleSlideError: bomb.tiff: declares 200000 x 200000 px (40000 megapixels), more ... scan is real
    """
    megapixels = width * height / 1e6
    if megapixels > cfg.max_level0_megapixels:
        raise ImplausibleSlideError(
            path,
            f"declares {width} x {height} px ({megapixels:.0f} megapixels), more than slide.max_level0_megapixels = "
            f"{cfg.max_level0_megapixels:g}; a crafted or damaged file, or a larger scan than expected: raise the "
            "limit only if the scan is real",
        )
    if stored_tile_bytes is not None and stored_tile_bytes > file_bytes:
        raise ImplausibleSlideError(
            path,
            f"its level-0 tiles add up to {stored_tile_bytes} bytes but the file has only {file_bytes}: tiles share "
            "bytes, so the declared image is not really stored (a crafted or damaged file); re-export the scan",
        )
    if file_bytes < megapixels * MIN_BYTES_PER_MEGAPIXEL:
        raise ImplausibleSlideError(
            path,
            f"declares {width} x {height} px ({megapixels:.0f} megapixels) in only {file_bytes} bytes, less than "
            f"{MIN_BYTES_PER_MEGAPIXEL} bytes per megapixel any scan stores: a crafted or damaged file; re-export the "
            "scan",
        )


def _slide_bytes(path: Path) -> int:
    """Bytes of every file of the slide (an MRXS companion folder and a DICOM folder included)."""
    from edge.wsi.fingerprint import slide_files

    return sum(file.stat().st_size for _name, file in slide_files(path))


def _open_tiffslide(path: Path, cfg: SlideConfig) -> Slide:
    import tiffslide

    ts = tiffslide.TiffSlide(str(path))
    try:
        return _build_tiffslide(path, ts, cfg)
    except BaseException:
        ts.close()
        raise


def _build_tiffslide(path: Path, ts: Any, cfg: SlideConfig) -> Slide:
    tf = ts.ts_tifffile
    props = ts.properties
    fmt = _tiff_format(tf)
    series = tf.series[props.get("tiffslide.series-index", 0)]
    level0 = series.levels[0].keyframe
    stored = int(np.asarray(level0.databytecounts, dtype=np.int64).sum()) if level0.is_tiled else None
    w0, h0 = ts.level_dimensions[0]
    check_plausible(path, int(w0), int(h0), _slide_bytes(path), stored, cfg)
    levels = tuple(
        Level(
            i,
            int(w),
            int(h),
            float(ds),
            props.get(f"tiffslide.level[{i}].tile-width"),
            props.get(f"tiffslide.level[{i}].tile-height"),
        )
        for i, ((w, h), ds) in enumerate(zip(ts.level_dimensions, ts.level_downsamples, strict=True))
    )
    recorded, source = None, None
    if fmt == "ome":
        recorded = _ome_mpp(tf.ome_metadata)
        source = "ome-xml" if recorded else None
    if recorded is None and props.get("tiffslide.mpp-x") and props.get("tiffslide.mpp-y"):
        recorded = (float(props["tiffslide.mpp-x"]), float(props["tiffslide.mpp-y"]))
        source = "tiff-resolution" if "tiff.XResolution" in props else "vendor"
    if recorded is None and fmt == "generic-tiff":
        recorded = _resolution_mpp(series.levels[0].keyframe)
        source = "tiff-resolution" if recorded else None
    mpp_x, mpp_y, mpp_source, notes = resolve_mpp(recorded, source, cfg.mpp_override)
    objective = props.get("tiffslide.objective-power")
    reader = _choose_tiff_reader(path, ts, series, levels, cfg)
    info = SlideInfo(
        path=str(path),
        format=fmt,
        reader="tiffslide",
        region_reader=reader.name,
        vendor=str(props.get("tiffslide.vendor") or fmt),
        width=levels[0].width,
        height=levels[0].height,
        levels=levels,
        mpp_x=mpp_x,
        mpp_y=mpp_y,
        mpp_source=mpp_source,
        objective_power=float(objective) if objective else None,
        associated_images=tuple(sorted(ts.associated_images.keys())),
        notes=notes,
        barcode=slide_barcode(props),
        scanner=scanner_from_properties(props, str(props.get("tiffslide.vendor") or fmt)),
    )
    return Slide(info, reader, cfg)


def _choose_tiff_reader(path: Path, ts: Any, series: Any, levels: tuple[Level, ...], cfg: SlideConfig) -> _LevelReader:
    """The pixel reader for a TIFF slide: by config, else direct tile decoding, else the library."""
    # the direct reader also checks that no level points past the end of the file (truncation)
    direct = _direct_tile_reader(path, series, levels, cfg) if cfg.region_reader != "library" else None
    if cfg.region_reader == "pyvips":
        vips = _vips_reader(path, series, ts.ts_tifffile, levels)
        if vips is None:
            raise UnsupportedFormatError(
                path, 'region_reader="pyvips" needs tiled levels libvips can decode: use "auto", "tiles" or "library"'
            )
        if direct is not None:
            direct.close()  # it had no owner yet: this closes only its file descriptor
        vips.owner = ts
        return vips
    if cfg.region_reader == "tiles" and direct is None:
        raise UnsupportedFormatError(
            path, 'region_reader="tiles" needs tiled TIFF levels; this slide has none: use "auto" or "library"'
        )
    if direct is not None:
        direct.owner = ts
        return direct
    return _TiffSlideReader(ts)


def _tiff_format(tf: Any) -> str:
    for flag, name in (
        ("is_svs", "aperio"),
        ("is_ndpi", "hamamatsu"),
        ("is_scn", "leica"),
        ("is_philips", "philips"),
        ("is_bif", "ventana"),
        ("is_ome", "ome"),
    ):
        if getattr(tf, flag, False):
            return name
    return "generic-tiff"


def _ome_mpp(xml: str | None) -> tuple[float, float] | None:
    """PhysicalSizeX/Y of the first OME image, converted to µm."""
    if not xml:
        return None
    to_um = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.endswith("Pixels") and "PhysicalSizeX" in el.attrib:
            x = float(el.attrib["PhysicalSizeX"]) * to_um.get(el.attrib.get("PhysicalSizeXUnit", "µm"), 1.0)
            y = float(el.attrib.get("PhysicalSizeY", el.attrib["PhysicalSizeX"])) * to_um.get(
                el.attrib.get("PhysicalSizeYUnit", "µm"), 1.0
            )
            return (x, y)
    return None


def _resolution_mpp(page: Any) -> tuple[float, float] | None:
    """mpp from XResolution/YResolution in pixels per inch, cm, mm or µm; None without a unit."""
    try:
        unit = int(page.tags["ResolutionUnit"].value)
        xn, xd = page.tags["XResolution"].value
        yn, yd = page.tags["YResolution"].value
    except (KeyError, TypeError, ValueError):
        return None
    per_unit_um = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}.get(unit)
    if per_unit_um is None or not xn or not yn:
        return None
    return (per_unit_um * xd / xn, per_unit_um * yd / yn)


def _open_openslide(path: Path, target: Path, cfg: SlideConfig) -> Slide:
    import openslide

    osr = openslide.OpenSlide(str(target))
    try:
        w0, h0 = osr.level_dimensions[0]
        check_plausible(path, int(w0), int(h0), _slide_bytes(path), None, cfg)
        props = dict(osr.properties)
        vendor = props.get(openslide.PROPERTY_NAME_VENDOR, "unknown")
        levels = tuple(
            Level(
                i,
                int(w),
                int(h),
                float(ds),
                _int_or_none(props.get(f"openslide.level[{i}].tile-width")),
                _int_or_none(props.get(f"openslide.level[{i}].tile-height")),
            )
            for i, ((w, h), ds) in enumerate(zip(osr.level_dimensions, osr.level_downsamples, strict=True))
        )
        recorded = None
        if props.get(openslide.PROPERTY_NAME_MPP_X) and props.get(openslide.PROPERTY_NAME_MPP_Y):
            recorded = (float(props[openslide.PROPERTY_NAME_MPP_X]), float(props[openslide.PROPERTY_NAME_MPP_Y]))
        source = ("tiff-resolution" if vendor == "generic-tiff" else "vendor") if recorded else None
        mpp_x, mpp_y, mpp_source, notes = resolve_mpp(recorded, source, cfg.mpp_override)
        objective = props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
        info = SlideInfo(
            path=str(path),
            format=vendor,
            reader="openslide",
            region_reader="library",
            vendor=vendor,
            width=levels[0].width,
            height=levels[0].height,
            levels=levels,
            mpp_x=mpp_x,
            mpp_y=mpp_y,
            mpp_source=mpp_source,
            objective_power=float(objective) if objective else None,
            associated_images=tuple(sorted(osr.associated_images.keys())),
            notes=notes,
            barcode=slide_barcode(props),
            scanner=scanner_from_properties(props, vendor),
        )
        return Slide(info, _OpenSlideReader(osr), cfg)
    except BaseException:
        osr.close()
        raise


# Where scanners record the label's barcode (OpenSlide / tiffslide property names), first match wins.
BARCODE_PROPERTIES = (
    "aperio.Barcode",  # Aperio ImageDescription "Barcode = ..."
    "hamamatsu.Reference",  # NDPI tag 65427
    "philips.PIM_DP_UFS_BARCODE",  # base64 in Philips TIFF
    "dicom.ContainerIdentifier",  # DICOM WSI: the slide's container (barcode) id
    "leica.barcode",
    "ventana.Barcode",
)
MAX_BARCODE_CHARS = 64


def slide_barcode(properties: Mapping[str, Any]) -> str | None:
    """The slide label's barcode from a reader's properties, or None when the format records none.

    >>> slide_barcode({"aperio.Barcode": " S24-0042 "}), slide_barcode({"philips.PIM_DP_UFS_BARCODE": "UzI0LTAwNDI="})
    ('S24-0042', 'S24-0042')
    >>> slide_barcode({"aperio.AppMag": 20}) is None
    True
    """
    for key in BARCODE_PROPERTIES:
        value = properties.get(key)
        if value is None:
            continue
        text = str(value).strip()
        if key.startswith("philips."):
            try:
                text = base64.b64decode(text, validate=True).decode("utf-8").strip()
            except (binascii.Error, UnicodeDecodeError):
                pass  # some Philips files store it as plain text
        if text and text.isprintable() and len(text) <= MAX_BARCODE_CHARS:
            return text
    return None


def _int_or_none(v: str | None) -> int | None:
    return int(v) if v else None


# --- level readers ---------------------------------------------------------------------------------


class _TiffSlideReader:
    name = "library"

    def __init__(self, ts: Any) -> None:
        self._ts = ts
        self._ds = ts.level_downsamples

    def read(self, level: int, x: int, y: int, w: int, h: int, out: np.ndarray) -> None:
        ds = self._ds[level]
        arr = self._ts.read_region((round(x * ds), round(y * ds)), level, (w, h), as_array=True)
        out[...] = _to_rgb(np.asarray(arr))

    def close(self) -> None:
        self._ts.close()


class _OpenSlideReader:
    name = "library"

    def __init__(self, osr: Any) -> None:
        self._osr = osr
        self._ds = osr.level_downsamples

    def read(self, level: int, x: int, y: int, w: int, h: int, out: np.ndarray) -> None:
        ds = self._ds[level]
        rgba = np.asarray(self._osr.read_region((round(x * ds), round(y * ds)), level, (w, h)))
        out[...] = _to_rgb(rgba)

    def close(self) -> None:
        self._osr.close()


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """uint8 RGB from grey, RGB or RGBA (transparent = white background)."""
    if arr.ndim == 2:
        arr = arr[:, :, None].repeat(3, axis=2)
    if arr.dtype != np.uint8:
        raise ValueError(f"pixel type {arr.dtype} is not 8-bit; only 8-bit RGB slides are supported")
    if arr.shape[2] == 4:
        alpha = arr[:, :, 3:4].astype(np.uint16)
        rgb = (arr[:, :, :3].astype(np.uint16) * alpha + BACKGROUND * (255 - alpha)) // 255
        return rgb.astype(np.uint8)
    return np.ascontiguousarray(arr[:, :, :3])


@dataclass
class _TiledPage:
    offsets: np.ndarray
    counts: np.ndarray
    decode: Callable[..., Any]
    jpegtables: bytes | None
    tile_w: int
    tile_h: int
    tiles_across: int


class _TiffTileReader:
    """Decodes stored TIFF tiles directly, keeping recently decoded tiles in a bounded LRU cache.

    Concurrent requests for one tile decode it once (the second waits for the first).
    """

    name = "tiles"

    def __init__(self, path: Path, pages: list[_TiledPage], cache_bytes: int) -> None:
        self.path = path
        self.owner: Any = None  # the library object that keeps the TIFF open; closed with us
        self._pages = pages
        self._fd = os.open(path, os.O_RDONLY)
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int], Future[np.ndarray | None]] = OrderedDict()
        tile_bytes = max(p.tile_w * p.tile_h * 3 for p in pages)
        self._max_tiles = max(16, cache_bytes // tile_bytes)

    def tile(self, level: int, index: int) -> np.ndarray | None:
        """Decoded tile (tile_h, tile_w, 3), or None for a tile the file does not store (background)."""
        key = (level, index)
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                owner = False
            else:
                fut = Future()
                self._cache[key] = fut
                owner = True
                while len(self._cache) > self._max_tiles:
                    self._cache.popitem(last=False)
        if owner:
            try:
                fut.set_result(self.decode_tile(level, index))
            except BaseException as exc:  # noqa: BLE001 - handed to every waiter of this tile
                with self._lock:
                    self._cache.pop(key, None)
                fut.set_exception(exc)
        return fut.result()

    def decode_tile(self, level: int, index: int) -> np.ndarray | None:
        """Read and decode one stored tile, without the cache."""
        page = self._pages[level]
        count = int(page.counts[index])
        if count == 0:
            return None
        offset = int(page.offsets[index])
        data = os.pread(self._fd, count, offset)
        if len(data) < count:
            raise TileDecodeError(
                self.path,
                f"level {level} tile {index} is truncated: {count} bytes expected at offset {offset}, "
                f"{len(data)} found; the file is incomplete (still being copied?) or was cut short",
            )
        try:
            seg = page.decode(data, index, jpegtables=page.jpegtables)[0]
        except Exception as exc:
            raise TileDecodeError(
                self.path,
                f"level {level} tile {index} failed to decode ({type(exc).__name__}: {exc}); the file is damaged",
            ) from exc
        if seg is None:
            return None
        return _to_rgb(seg.reshape(seg.shape[-3:]))

    def read(self, level: int, x: int, y: int, w: int, h: int, out: np.ndarray) -> None:
        page = self._pages[level]
        tw, th = page.tile_w, page.tile_h
        for ty in range(y // th, (y + h - 1) // th + 1):
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                tile = self.tile(level, ty * page.tiles_across + tx)
                ox, oy = tx * tw, ty * th
                sx, sy = max(x, ox), max(y, oy)
                ex, ey = min(x + w, ox + tw), min(y + h, oy + th)
                if tile is None:
                    out[sy - y : ey - y, sx - x : ex - x] = BACKGROUND
                else:
                    out[sy - y : ey - y, sx - x : ex - x] = tile[sy - oy : ey - oy, sx - ox : ex - ox]

    def stored_tiles(self, level: int, x: int, y: int, w: int, h: int) -> list[int]:
        """Indices of the stored tiles a level rectangle touches (for the decode floor benchmark)."""
        page = self._pages[level]
        tw, th = page.tile_w, page.tile_h
        return [
            ty * page.tiles_across + tx
            for ty in range(max(0, y) // th, (y + h - 1) // th + 1)
            for tx in range(max(0, x) // tw, (x + w - 1) // tw + 1)
        ]

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
        try:
            os.close(self._fd)
        except OSError:
            pass
        if self.owner is not None:
            self.owner.close()


class _VipsLevelReader:
    """Reads tiled TIFF levels through libvips regions (one region per thread and level)."""

    name = "pyvips"

    def __init__(self, images: list[Any]) -> None:
        self.owner: Any = None
        self._images = images
        self._local = threading.local()

    def read(self, level: int, x: int, y: int, w: int, h: int, out: np.ndarray) -> None:
        regions = getattr(self._local, "regions", None)
        if regions is None:
            regions = self._local.regions = {}
        region = regions.get(level)
        if region is None:
            region = regions[level] = _pyvips().Region.new(self._images[level])
        data = region.fetch(x, y, w, h)
        bands = self._images[level].bands
        out[...] = _to_rgb(np.frombuffer(data, np.uint8).reshape(h, w, bands))

    def close(self) -> None:
        self._images = []
        if self.owner is not None:
            self.owner.close()


VIPS_COMPRESSIONS = frozenset({1, 5, 7, 8, 32946})  # none, LZW, JPEG, deflate: what libvips' tiffload decodes


def _vips_reader(path: Path, series: Any, tf: Any, levels: tuple[Level, ...]) -> _VipsLevelReader | None:
    """A libvips reader when libvips can open every level as a tiled page of matching size; else None."""
    pyvips = _pyvips()
    top_level = {tf.pages[i].offset: i for i in range(len(tf.pages))}  # IFD offset -> page number
    images = []
    for lv, tlevel in zip(levels, series.levels, strict=False):
        page = tlevel.keyframe
        if len(tlevel.pages) != 1 or not page.is_tiled or int(page.compression) not in VIPS_COMPRESSIONS:
            return None
        # a level that is no top-level page is a SubIFD (OME-TIFF): the n-th reduced image of page 0
        args = {"page": top_level[page.offset]} if page.offset in top_level else {"page": 0, "subifd": lv.index - 1}
        try:
            image = pyvips.Image.tiffload(str(path), access="random", fail_on="warning", **args)
        except pyvips.Error:
            return None
        if (image.width, image.height) != (lv.width, lv.height) or image.format != "uchar":
            return None
        images.append(image)
    if len(images) != len(levels):
        return None
    return _VipsLevelReader(images)


def _direct_tile_reader(path: Path, series: Any, levels: tuple[Level, ...], cfg: SlideConfig) -> _TiffTileReader | None:
    """A direct tile reader when every level is one tiled, 8-bit, interleaved page; else None."""
    pages: list[_TiledPage] = []
    file_size = path.stat().st_size
    for lv, tlevel in zip(levels, series.levels, strict=False):
        if len(tlevel.pages) != 1:
            return None
        page = tlevel.keyframe
        if not page.is_tiled or page.dtype != np.uint8 or page.samplesperpixel not in (3, 4):
            return None
        if page.planarconfig != 1 or page.imagewidth != lv.width or page.imagelength != lv.height:
            return None
        if getattr(page, "imagedepth", 1) != 1:
            return None
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        if len(offsets) and int((offsets + counts).max()) > file_size:
            raise CorruptSlideError(
                path,
                f"truncated: level {lv.index} stores tiles up to byte {int((offsets + counts).max())} but the file "
                f"has only {file_size} bytes; it is incomplete (still being copied?) or was cut short",
            )
        pages.append(
            _TiledPage(
                offsets=offsets,
                counts=counts,
                decode=page.decode,
                jpegtables=page.jpegtables,
                tile_w=int(page.tilewidth),
                tile_h=int(page.tilelength),
                tiles_across=math.ceil(page.imagewidth / page.tilewidth),
            )
        )
    if len(pages) != len(levels):
        return None
    return _TiffTileReader(path, pages, cfg.tile_cache_mb * 1024 * 1024)


def direct_reader(slide: Slide) -> _TiffTileReader | None:
    """The slide's direct tile reader, when it has one (the benchmark's decode floor needs it)."""
    reader = slide._reader
    return reader if isinstance(reader, _TiffTileReader) else None
