"""Opening slides of every format we have or can make, their metadata, region reads at a target mpp,
and the errors a user gets for missing, broken, truncated or mpp-less files."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from edge.config import SlideConfig
from edge.errors import (
    CorruptSlideError,
    EdgeError,
    MissingMppError,
    NotASlideError,
    SlideNotFoundError,
    SlideReadError,
    TileDecodeError,
    UnsupportedFormatError,
)
from edge.vocab import SLIDE_EXTENSIONS
from edge.wsi.slide import OPENSLIDE_ONLY_EXTENSIONS, _resolution_mpp, choose_read_scale, open_slide, resolve_mpp

from .conftest import SynthFactory, data_file

# --- real files ----------------------------------------------------------------------------------


def test_aperio_svs_metadata() -> None:
    with open_slide(data_file("wsi/CMU-1-Small-Region.svs")) as slide:
        info = slide.info
    assert info.format == "aperio" and info.vendor == "aperio" and info.reader == "tiffslide"
    assert info.dimensions == (2220, 2967)
    assert len(info.levels) == 1 and info.levels[0].downsample == 1.0
    assert (info.mpp_x, info.mpp_y, info.mpp_source) == (0.499, 0.499, "vendor")
    assert info.objective_power == 20
    assert set(info.associated_images) == {"label", "macro", "thumbnail"}


def test_aperio_region_equals_the_stored_pixels() -> None:
    path = data_file("wsi/CMU-1-Small-Region.svs")
    reference = tifffile.imread(path, level=0)
    with open_slide(path) as slide:
        region = slide.read_level(0, 301, 777, 640, 480)
    np.testing.assert_array_equal(region, reference[777 : 777 + 480, 301 : 301 + 640])


def test_coarse_slide_is_upsampled_and_flagged() -> None:
    with open_slide(data_file("wsi/CMU-1-Small-Region.svs")) as slide:
        scale = slide.read_scale(0.25)
        assert scale.upsampled and scale.resampled
        assert scale.px0_per_out_x == pytest.approx(0.25 / 0.499)
        region = slide.read_region(1000, 1000, 512, 512, scale)
        native = slide.read_level(0, 1000, 1000, 256, 256)
    assert region.shape == (512, 512, 3) and region.dtype == np.uint8
    # the upsampled region shows the same picture as the native one, twice as large
    back = np.asarray(Image.fromarray(region).resize((256, 256), Image.Resampling.BOX), dtype=float)
    assert np.abs(back - native).mean() < 6


def test_jpeg2000_svs_without_mpp_needs_an_override() -> None:
    path = data_file("wsi/tcga-cr-7395-01a-01-ts1.svs")
    with open_slide(path) as slide:
        assert slide.info.mpp_x is None and slide.info.mpp_source is None
        assert len(slide.info.levels) == 2
        with pytest.raises(MissingMppError) as err:
            slide.read_scale()
    message = str(err.value)
    assert str(path) in message and "--mpp" in message and "mpp_override" in message


def test_jpeg2000_tiles_decode_with_an_override() -> None:
    path = data_file("wsi/tcga-cr-7395-01a-01-ts1.svs")
    with open_slide(path, SlideConfig(mpp_override=0.5)) as slide:
        assert (slide.info.mpp_x, slide.info.mpp_source) == (0.5, "override")
        for level in (0, 1):
            reference = tifffile.imread(path, level=level)
            region = slide.read_level(level, 37, 53, 700, 600)
            np.testing.assert_array_equal(region, reference[53:653, 37:737])


def test_dicom_wsi_opens_with_openslide() -> None:
    with open_slide(data_file("wsi/camelyon-multiframe.dcm")) as slide:
        info = slide.info
        region = slide.read_level(0, 0, 0, 256, 256)
    assert (info.reader, info.format) == ("openslide", "dicom")
    assert info.dimensions == (1152, 700)
    assert info.mpp_x == pytest.approx(28.969, rel=1e-3)
    assert region.shape == (256, 256, 3) and region.std() > 5


def test_small_synthetic_dicom() -> None:
    with open_slide(data_file("wsi/highdicom-sm-50px.dcm")) as slide:
        assert slide.info.dimensions == (50, 50)
        assert slide.info.mpp_x == pytest.approx(0.499)


def test_dicom_label_is_refused_clearly() -> None:
    path = data_file("wsi/dicom-label-not-wsi.dcm")
    with pytest.raises(NotASlideError) as err:
        open_slide(path)
    assert str(path) in str(err.value) and "label" in str(err.value)


def test_broken_svs_is_named() -> None:
    path = data_file("wsi/broken.svs")
    with pytest.raises(CorruptSlideError) as err:
        open_slide(path)
    assert str(path) in str(err.value) and ".svs" in str(err.value)


def test_truncated_slide_fails_with_a_read_error(tmp_path: Path) -> None:
    source = data_file("wsi/CMU-1-Small-Region.svs")
    cut = tmp_path / "cut.svs"
    data = source.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptSlideError) as err, open_slide(cut) as slide:
        slide.read_level(0, 0, 0, slide.info.width, slide.info.height)
    assert str(cut) in str(err.value)
    assert "truncated" in str(err.value) or "damaged" in str(err.value)


# --- errors for things that are not slides -------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(SlideNotFoundError) as err:
        open_slide(tmp_path / "nowhere.svs")
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, EdgeError)
    assert "nowhere.svs" in str(err.value)


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.svs").write_bytes(b"")
    with pytest.raises(CorruptSlideError, match="empty"):
        open_slide(tmp_path / "empty.svs")


def test_text_file_is_not_a_slide(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(NotASlideError, match="not a whole-slide image"):
        open_slide(tmp_path / "notes.txt")


def test_folder_without_dicom(tmp_path: Path) -> None:
    with pytest.raises(NotASlideError, match=r"folder without \.dcm"):
        open_slide(tmp_path)


def test_a_fifo_named_like_a_slide_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "x.svs"
    os.mkfifo(fifo)
    errors: list[BaseException] = []

    def try_open() -> None:
        try:
            open_slide(fifo)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            errors.append(exc)

    thread = threading.Thread(target=try_open, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # unblock the reader so the test can end, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("opening a FIFO blocked")
    [error] = errors
    assert isinstance(error, NotASlideError) and "named pipe (FIFO)" in str(error)


def test_a_folder_mixing_dicom_series_is_refused_with_the_series(tmp_path: Path) -> None:
    shutil.copy(data_file("wsi/highdicom-sm-50px.dcm"), tmp_path / "a.dcm")
    shutil.copy(data_file("wsi/camelyon-multiframe.dcm"), tmp_path / "b.dcm")
    with pytest.raises(NotASlideError, match="mixes 2 DICOM series"):
        open_slide(tmp_path)


def test_a_folder_holding_only_a_dicom_label_is_refused_clearly(tmp_path: Path) -> None:
    shutil.copy(data_file("wsi/dicom-label-not-wsi.dcm"), tmp_path / "label.dcm")
    with pytest.raises(NotASlideError, match="no whole-slide image, only DICOM LABEL"):
        open_slide(tmp_path)


def test_plain_png_is_refused(tmp_path: Path) -> None:
    Image.new("RGB", (64, 64), "white").save(tmp_path / "photo.png")
    with pytest.raises(SlideReadError):
        open_slide(tmp_path / "photo.png")


# --- mpp rules -----------------------------------------------------------------------------------


def test_mpp_override_wins_and_is_noted() -> None:
    assert resolve_mpp((0.25, 0.25), "vendor", None)[:3] == (0.25, 0.25, "vendor")
    mx, my, source, notes = resolve_mpp((0.25, 0.25), "vendor", 0.5)
    assert (mx, my, source) == (0.5, 0.5, "override") and "replaces" in notes[0]


def test_missing_mpp_is_never_invented() -> None:
    assert resolve_mpp(None, None, None)[:3] == (None, None, None)


def test_implausible_resolution_is_ignored() -> None:
    mx, _, source, notes = resolve_mpp((352.8, 352.8), "tiff-resolution", None)
    assert mx is None and source is None and "implausible" in notes[0]


class _Tag:
    def __init__(self, value: object) -> None:
        self.value = value


class _Page:
    def __init__(self, unit: int, xres: tuple[int, int], yres: tuple[int, int]) -> None:
        self.tags = {"ResolutionUnit": _Tag(unit), "XResolution": _Tag(xres), "YResolution": _Tag(yres)}


@pytest.mark.parametrize(
    ("unit", "res", "mpp"),
    [(3, (40000, 1), 0.25), (2, (101600, 1), 0.25), (4, (4000, 1), 0.25), (5, (4, 1), 0.25), (3, (400000, 10), 0.25)],
)
def test_tiff_resolution_units(unit: int, res: tuple[int, int], mpp: float) -> None:
    got = _resolution_mpp(_Page(unit, res, res))
    assert got is not None and got[0] == pytest.approx(mpp)


def test_tiff_resolution_without_unit_is_no_mpp() -> None:
    assert _resolution_mpp(_Page(1, (40000, 1), (40000, 1))) is None


# --- choosing the level --------------------------------------------------------------------------


def test_level_choice_reads_the_coarsest_level_fine_enough() -> None:
    mpps = [(0.12, 0.12), (0.48, 0.48), (1.92, 1.92)]
    scale = choose_read_scale(mpps, mpps[0], 0.25, 0.03)
    assert scale.level == 0 and scale.level_px_per_out_x == pytest.approx(0.25 / 0.12)
    assert not scale.upsampled
    scale = choose_read_scale(mpps, mpps[0], 0.49, 0.03)
    assert scale.level == 1 and not scale.resampled and scale.mpp_x == 0.48


def test_level_within_tolerance_is_read_as_stored() -> None:
    scale = choose_read_scale([(0.2527, 0.2527)], (0.2527, 0.2527), 0.25, 0.03)
    assert not scale.resampled and scale.mpp_x == 0.2527 and scale.px0_per_out_x == 1.0
    scale = choose_read_scale([(0.23, 0.23)], (0.23, 0.23), 0.25, 0.03)
    assert scale.resampled and not scale.upsampled and scale.px0_per_out_x == pytest.approx(0.25 / 0.23)


# --- synthetic slides at every scanner resolution -----------------------------------------------


@pytest.mark.parametrize(
    ("mpp", "upsampled", "resampled"),
    [(0.25, False, False), (0.23, False, True), (0.12, False, True), (0.5, True, True)],
)
def test_synthetic_slides_read_at_target_mpp(
    synth_slide: SynthFactory, mpp: float, upsampled: bool, resampled: bool
) -> None:
    size = round(2560 * 0.25 / mpp)
    path = synth_slide(width=size, height=size, mpp=mpp)
    with open_slide(path) as slide:
        assert slide.info.mpp_x == pytest.approx(mpp, rel=1e-4)
        assert slide.info.mpp_source == "tiff-resolution"
        assert slide.info.region_reader == "tiles"
        scale = slide.read_scale(0.25)
        assert (scale.upsampled, scale.resampled) == (upsampled, resampled)
        x0, y0 = size * 0.3, size * 0.35
        region = slide.read_region(x0, y0, 400, 300, scale)
        level0 = tifffile.imread(path, level=0)
    # reference: the same physical window cut from level 0 and resized with PIL's Lanczos
    w0, h0 = 400 * scale.px0_per_out_x, 300 * scale.px0_per_out_y
    window = Image.fromarray(level0).resize((400, 300), Image.Resampling.LANCZOS, box=(x0, y0, x0 + w0, y0 + h0))
    reference = np.asarray(window, dtype=float)
    diff = np.abs(region.astype(float) - reference)
    assert diff.mean() < (2.0 if not resampled else 8.0)
    assert np.corrcoef(region.ravel(), reference.ravel())[0, 1] > 0.9


@pytest.mark.parametrize("mpp", [0.25, 0.23, 0.12, 0.5])
def test_ome_tiff_reads_mpp_from_ome_xml(synth_slide: SynthFactory, mpp: float) -> None:
    size = round(2400 * 0.25 / mpp)
    path = synth_slide(width=size, height=size * 2 // 3, mpp=mpp, fmt="ome")
    with open_slide(path) as slide:
        assert slide.info.format == "ome"
        assert (slide.info.mpp_x, slide.info.mpp_source) == (pytest.approx(mpp), "ome-xml")
        assert slide.info.region_reader == "tiles"
        region = slide.read_level(0, 100, 100, 300, 200)
        scale = slide.read_scale(0.25)
        assert scale.upsampled == (mpp > 0.25)
        assert slide.read_region(0, 0, 256, 256, scale).shape == (256, 256, 3)
    reference = tifffile.imread(path, level=0)
    np.testing.assert_array_equal(region, reference[100:300, 100:400])


def test_unreadable_file_is_a_slide_read_error(tmp_path: Path) -> None:
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads any file; permission errors cannot be provoked")
    path = tmp_path / "locked.svs"
    path.write_bytes(b"II*\x00" + b"\x00" * 100)
    path.chmod(0)
    with pytest.raises(SlideReadError, match="permission denied"):
        open_slide(path)


def test_openslide_reader_override_reads_the_same_pixels(synth_slide: SynthFactory) -> None:
    path = synth_slide()
    with open_slide(path, SlideConfig(reader="openslide")) as a, open_slide(path) as b:
        assert a.info.reader == "openslide" and a.info.mpp_x == pytest.approx(0.25)
        np.testing.assert_array_equal(a.read_level(0, 500, 400, 600, 500), b.read_level(0, 500, 400, 600, 500))


def test_library_region_reader_matches_direct_tiles(synth_slide: SynthFactory) -> None:
    path = synth_slide()
    with open_slide(path, SlideConfig(region_reader="library")) as a, open_slide(path) as b:
        assert (a.info.region_reader, b.info.region_reader) == ("library", "tiles")
        np.testing.assert_array_equal(a.read_level(0, 123, 45, 700, 333), b.read_level(0, 123, 45, 700, 333))


def test_reads_outside_the_slide_are_white(synth_slide: SynthFactory) -> None:
    path = synth_slide()
    with open_slide(path) as slide:
        w, h = slide.info.dimensions
        region = slide.read_level(0, w - 100, h - 50, 300, 200)
    assert region.shape == (200, 300, 3)
    assert (region[50:, :] == 255).all() and (region[:, 100:] == 255).all()


def test_tile_failing_mid_read_raises_tile_decode_error(synth_slide: SynthFactory, tmp_path: Path) -> None:
    path = tmp_path / "damaged.tiff"
    shutil.copy(synth_slide(), path)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        assert not isinstance(page, tifffile.TiffFrame)
        offsets, counts = page.dataoffsets, page.databytecounts
    victim = len(offsets) // 2
    with path.open("r+b") as fh:  # overwrite one stored tile with garbage
        fh.seek(offsets[victim])
        fh.write(b"\x00\x13" * (counts[victim] // 2))
    with open_slide(path) as slide:
        slide.read_level(0, 0, 0, 256, 256)  # other tiles are fine
        with pytest.raises(TileDecodeError) as err:
            slide.read_level(0, 0, 0, slide.info.width, slide.info.height)
    assert str(path) in str(err.value) and f"tile {victim}" in str(err.value)


def test_thumbnail_has_the_requested_mpp(synth_slide: SynthFactory) -> None:
    with open_slide(synth_slide()) as slide:
        thumb, (mx, my) = slide.thumbnail(8.0)
        w, h = slide.info.dimensions
    assert thumb.shape[:2] == (round(h * 0.25 / 8), round(w * 0.25 / 8))
    assert mx == pytest.approx(8.0, rel=0.02) and my == pytest.approx(8.0, rel=0.02)


def test_stripped_tiff_falls_back_to_the_library_reader(tmp_path: Path) -> None:
    # like NDPI: levels stored in strips, not tiles; pixels then come through tiffslide
    path = tmp_path / "strips.tif"
    image = np.random.default_rng(0).integers(0, 255, (600, 800, 3), dtype=np.uint8)
    tifffile.imwrite(path, image, photometric="rgb", resolution=(40000, 40000), resolutionunit="CENTIMETER")
    with open_slide(path) as slide:
        assert slide.info.region_reader == "library"
        assert slide.info.mpp_x == pytest.approx(0.25)
        np.testing.assert_array_equal(slide.read_level(0, 10, 20, 300, 200), image[20:220, 10:310])


def test_dicom_folder_opens(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    folder.mkdir()
    shutil.copy(data_file("wsi/highdicom-sm-50px.dcm"), folder / "level0.dcm")
    with open_slide(folder) as slide:
        assert (slide.info.format, slide.info.dimensions) == ("dicom", (50, 50))
        assert slide.info.path == str(folder)


@pytest.mark.parametrize("fmt", ["tiff", "ome"])
def test_pyvips_region_reader_reads_the_same_pixels(synth_slide: SynthFactory, fmt: str) -> None:
    path = synth_slide(width=3000, height=2000, fmt=fmt)
    with open_slide(path, SlideConfig(region_reader="pyvips")) as a, open_slide(path) as b:
        assert (a.info.region_reader, b.info.region_reader) == ("pyvips", "tiles")
        for level in range(len(a.info.levels)):
            lv = a.info.levels[level]
            np.testing.assert_array_equal(
                a.read_level(level, 7, 9, lv.width - 20, lv.height - 30),
                b.read_level(level, 7, 9, lv.width - 20, lv.height - 30),
            )


def test_pyvips_region_reader_is_refused_for_jpeg2000() -> None:
    path = data_file("wsi/tcga-cr-7395-01a-01-ts1.svs")
    with pytest.raises(UnsupportedFormatError, match="pyvips"):
        open_slide(path, SlideConfig(region_reader="pyvips"))


def test_thumbnail_of_a_coarse_slide_is_never_enlarged() -> None:
    with open_slide(data_file("wsi/camelyon-multiframe.dcm")) as slide:  # 29 µm/px, coarser than 8
        thumb, (mx, _my) = slide.thumbnail(8.0)
    assert thumb.shape[:2] == (700, 1152) and mx == pytest.approx(28.969, rel=1e-3)


# --- every slide extension the watcher queues is one the opener reads -------------------------------

# Read by tifffile; a plain pyramidal TIFF is a valid file under each name but .ndpi (tifffile reads NDPI's
# own 64-bit offsets by its name; the damaged-file test below covers it, real NDPI files are not redistributable)
TIFF_EXTENSIONS = sorted(set(SLIDE_EXTENSIONS) - OPENSLIDE_ONLY_EXTENSIONS - {".ndpi"})


def test_the_opener_and_the_watcher_know_one_list_of_extensions() -> None:
    from edge.config import WatchConfig

    assert WatchConfig().extensions == SLIDE_EXTENSIONS
    assert set(SLIDE_EXTENSIONS) >= OPENSLIDE_ONLY_EXTENSIONS
    assert {".qptiff", ".czi"} <= set(SLIDE_EXTENSIONS)  # the two lists disagreed on these


@pytest.mark.parametrize("ext", TIFF_EXTENSIONS)
def test_a_tiff_slide_under_each_tiff_extension_opens_and_reads(
    synth_slide: SynthFactory, tmp_path: Path, ext: str
) -> None:
    path = tmp_path / f"slide{ext}"
    shutil.copy(synth_slide(width=2048, height=1536), path)
    with open_slide(path) as slide:
        assert (slide.info.width, slide.info.height) == (2048, 1536)
        assert slide.read_level(0, 0, 0, 64, 64).shape == (64, 64, 3)


def test_a_dicom_file_opens_under_its_extension(tmp_path: Path) -> None:
    path = tmp_path / "slide.dcm"
    shutil.copy(data_file("wsi/camelyon-multiframe.dcm"), path)
    with open_slide(path) as slide:
        assert slide.info.width == 1152


@pytest.mark.parametrize("ext", SLIDE_EXTENSIONS)
def test_a_damaged_file_under_each_slide_extension_is_called_damaged_not_foreign(tmp_path: Path, ext: str) -> None:
    path = tmp_path / f"slide{ext}"
    path.write_bytes(b"not the header of any slide format" * 8)
    with pytest.raises(CorruptSlideError, match=f"has a \\{ext} name"):
        open_slide(path)


def test_openslide_reads_the_formats_listed_for_it() -> None:
    import openslide_bin  # the OpenSlide build the package installs (openslide-bin)

    library = (Path(openslide_bin.__file__).parent / "libopenslide.so.1").read_bytes()
    # one vendor driver per OpenSlide-only format: Zeiss CZI came with OpenSlide 4
    for vendor in (b"zeiss", b"mirax", b"hamamatsu", b"sakura", b"dicom"):
        assert vendor in library
