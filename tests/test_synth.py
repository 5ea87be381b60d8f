"""Synthetic slides: readable by every reader, reproducible, and true to their truth file."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import tiffslide

from edge.analysis.scoring import find_hotspot, hotspot_radius_um
from edge.devtools.synth import (
    ATYPICAL_SHAPES,
    IMPOSTER_SHAPES,
    NORMAL_SHAPES,
    TRUTH_SCHEMA,
    SynthParams,
    SynthTruth,
    default_truth_path,
    generate_slide,
    load_truth,
    pyramid_shapes,
)
from edge.devtools.synth.model import SlideModel
from edge.errors import ConfigError

SMALL = {"width": 2048, "height": 1536}


@dataclasses.dataclass
class Generated:
    path: Path
    truth: SynthTruth
    progress: list[tuple[int, int]]


def _generate(directory: Path, name: str, params: SynthParams) -> Generated:
    calls: list[tuple[int, int]] = []
    path = directory / name
    truth = generate_slide(path, params, progress=lambda done, total: calls.append((done, total)))
    return Generated(path, truth, calls)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Generated]:
    """One small slide per case, generated once for the whole module (~1 s each)."""
    root = tmp_path_factory.mktemp("synth")
    cases = {
        "planted": SynthParams(**SMALL, seed=11, mitoses=14, imposters=6, atypical_fraction=0.3),
        # 2048 px at 0.12 µm/px is only 246 µm wide: room for a few figures 20 µm apart.
        "mpp0.23": SynthParams(**SMALL, seed=1, mpp=0.23, mitoses=5, imposters=3),
        "mpp0.12": SynthParams(**SMALL, seed=1, mpp=0.12, mitoses=5, imposters=3),
        "mpp0.5": SynthParams(**SMALL, seed=1, mpp=0.5),
        "ome": SynthParams(**SMALL, seed=2, fmt="ome"),
    }
    names = {"ome": "ome.ome.tiff"}
    generated = {key: _generate(root, names.get(key, f"{key}.tiff"), p) for key, p in cases.items()}
    # tiffslide (zarr 3) starts a process-wide "zarr_io" thread on its first read; start it
    # here, before the per-test thread-leak guard takes its snapshot.
    _read_level0(generated["planted"].path, 0, 0, 16)
    return generated


def _grey(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(rgb[..., :3], dtype=np.float64).mean(axis=-1)


def _read_level0(path: Path, x: int, y: int, size: int) -> np.ndarray:
    with tiffslide.TiffSlide(path) as slide:
        return np.asarray(slide.read_region((x, y), 0, (size, size), as_array=True))


# ---- parameters -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("width", 100),
        ("height", 0),
        ("width", 2048.0),
        ("seed", -1),
        ("mpp", 0.0),
        ("mpp", math.nan),
        ("mitoses", -3),
        ("atypical_fraction", 1.5),
        ("imposters", 2.5),
        ("cluster_fraction", -0.1),
        ("tissue_fraction", 0.0),
        ("stain_jitter", 2.0),
        ("blur_sigma", -1.0),
        ("noise_sigma", math.inf),
        ("tile_size", 200),
        ("tile_size", 8),
        ("jpeg_quality", 0),
        ("jpeg_quality", True),
        ("fmt", "svs"),
        ("hotspot_area_mm2", 0.0),
    ],
)
def test_validate_names_the_bad_field(name: str, value: object) -> None:
    params = dataclasses.replace(SynthParams(**SMALL), **{name: value})
    with pytest.raises(ConfigError, match=rf"^{name}={value!r}"):
        params.validate()


def test_defaults_are_valid_and_density_based() -> None:
    SynthParams(**SMALL).validate()
    assert SynthParams(**SMALL).mitosis_count == 8  # tiny slides get the minimum
    big = SynthParams(width=40000, height=40000)  # 100 mm² x 0.55 tissue x 1.2 / mm²
    assert big.mitosis_count == 66
    assert big.imposter_count == 66
    assert SynthParams(width=40000, height=40000, imposters=3).imposter_count == 3


def test_too_many_objects_for_the_tissue_is_a_config_error(tmp_path: Path) -> None:
    params = SynthParams(width=512, height=512, mitoses=400)
    with pytest.raises(ConfigError, match="mitoses=400"):
        generate_slide(tmp_path / "crowded.tiff", params)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_pyramid_shapes() -> None:
    assert pyramid_shapes(40000, 40000) == [(40000, 40000), (10000, 10000), (2500, 2500), (625, 625)]
    assert pyramid_shapes(1536, 2048) == [(1536, 2048), (384, 512)]
    assert pyramid_shapes(1000, 2047) == [(1000, 2047)]
    assert pyramid_shapes(1001, 9001) == [(1001, 9001), (251, 2251), (63, 563)]


def test_default_truth_path() -> None:
    assert default_truth_path("x/slide.tiff") == Path("x/slide.truth.json")
    assert default_truth_path(Path("/d/a.b.tif")) == Path("/d/a.b.truth.json")
    assert default_truth_path("x/slide.ome.tiff") == Path("x/slide.ome.truth.json")


# ---- reproducibility ----------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_slide(tmp_path: Path) -> None:
    params = SynthParams(width=1024, height=768, seed=5, mitoses=4, imposters=2)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = generate_slide(tmp_path / "a" / "s.tiff", params)
    second = generate_slide(tmp_path / "b" / "s.tiff", params)
    assert (tmp_path / "a" / "s.tiff").read_bytes() == (tmp_path / "b" / "s.tiff").read_bytes()
    assert (tmp_path / "a" / "s.truth.json").read_bytes() == (tmp_path / "b" / "s.truth.json").read_bytes()
    assert first == second

    other = generate_slide(tmp_path / "c.tiff", dataclasses.replace(params, seed=6))
    assert (tmp_path / "c.tiff").read_bytes() != (tmp_path / "a" / "s.tiff").read_bytes()
    assert [(o.x_px, o.y_px) for o in other.objects] != [(o.x_px, o.y_px) for o in first.objects]


def test_strips_join_seamlessly() -> None:
    """Rendering in one block or in strips of any offset gives the same pixels."""
    model = SlideModel(SynthParams(width=1024, height=1024, seed=3, mitoses=3, imposters=2, blur_sigma=1.2))
    planted = model.planted[0].truth
    y0 = max(0, int(planted.y_px) - 100)
    x0 = max(0, int(planted.x_px) - 300)
    whole = model.render(y0, x0, 256, 512, model.nuclei_for_rows(y0, y0 + 256))
    top = model.render(y0, x0, 96, 512, model.nuclei_for_rows(y0, y0 + 96))
    bottom = model.render(y0 + 96, x0, 160, 512, model.nuclei_for_rows(y0 + 96, y0 + 256))
    left = model.render(y0, x0, 256, 208, model.nuclei_for_rows(y0, y0 + 256))
    assert np.array_equal(whole, np.concatenate([top, bottom]))
    assert np.array_equal(whole[:, :208], left)
    assert _grey(whole).min() < 100  # the planted figure is in there


# ---- readers ------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "mpp"), [("planted", 0.25), ("mpp0.23", 0.23), ("mpp0.12", 0.12), ("mpp0.5", 0.5)])
def test_tiffslide_and_openslide_read_dimensions_levels_and_mpp(
    slides: dict[str, Generated], key: str, mpp: float
) -> None:
    path = slides[key].path
    with tiffslide.TiffSlide(path) as slide:
        assert slide.dimensions == (2048, 1536)
        assert slide.level_dimensions == ((2048, 1536), (512, 384))
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(mpp, rel=1e-6)
        assert float(slide.properties["tiffslide.mpp-y"]) == pytest.approx(mpp, rel=1e-6)
    assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.level_count == 2
        assert slide.level_dimensions == ((2048, 1536), (512, 384))
        assert slide.level_downsamples == pytest.approx((1.0, 4.0))
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(mpp, rel=1e-6)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(mpp, rel=1e-6)
        region = np.asarray(slide.read_region((512, 512), 0, (256, 256)))
    assert np.array_equal(region[..., :3], _read_level0(path, 512, 512, 256)[..., :3])


def test_tiles_are_jpeg_and_decode_with_tifffile(slides: dict[str, Generated]) -> None:
    path = slides["planted"].path
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 2
        for page in tif.pages:
            assert isinstance(page, tifffile.TiffPage)
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            whole = page.asarray()
            fh = tif.filehandle
            for index in (0, len(page.dataoffsets) - 1):
                fh.seek(page.dataoffsets[index])
                raw = fh.read(page.databytecounts[index])
                tile, (_, _, ty, tx, _), _ = page.decode(raw, index, jpegtables=page.jpegtables)
                assert tile is not None
                y, x = ty * 256, tx * 256
                h, w = min(256, whole.shape[0] - y), min(256, whole.shape[1] - x)
                assert np.array_equal(tile[0, :h, :w], whole[y : y + h, x : x + w])
        assert tif.pages[1].subfiletype == tifffile.FILETYPE.REDUCEDIMAGE


def test_ome_variant(slides: dict[str, Generated]) -> None:
    path = slides["ome"].path
    assert path.name == "ome.ome.tiff"
    assert default_truth_path(path).exists()
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        assert len(tif.series[0].levels) == 2
        ome = tif.ome_metadata or ""
        assert 'PhysicalSizeX="0.25"' in ome and 'PhysicalSizeXUnit="µm"' in ome
    with tiffslide.TiffSlide(path) as slide:
        assert slide.level_dimensions == ((2048, 1536), (512, 384))
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.25)
        region = slide.read_region((0, 0), 1, (512, 384), as_array=True)
    assert region.shape == (384, 512, 3)


def test_progress_reports_each_strip(slides: dict[str, Generated]) -> None:
    calls = slides["planted"].progress
    assert calls == [(min(256 * (i + 1), 1536), 1536) for i in range(6)]


# ---- the truth ----------------------------------------------------------------------


def test_truth_json_round_trip_and_schema(slides: dict[str, Generated]) -> None:
    generated = slides["planted"]
    path = default_truth_path(generated.path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["schema"] == TRUTH_SCHEMA
    assert data["slide"] == generated.path.name
    assert (data["width"], data["height"], data["mpp"], data["seed"]) == (2048, 1536, 0.25, 11)
    assert data["params"] == dataclasses.asdict(generated.truth.params)
    assert set(data["objects"][0]) == {"id", "class", "shape", "x_px", "y_px", "x_um", "y_um", "radius_um"}
    assert set(data["hotspot"]) == {
        "area_mm2",
        "radius_um",
        "center_x_px",
        "center_y_px",
        "center_x_um",
        "center_y_um",
        "mitotic_count",
    }
    assert data["hotspot"]["radius_um"] == pytest.approx(797.88, abs=0.01)
    assert load_truth(path) == generated.truth


def test_classes_shapes_and_counts_as_requested(slides: dict[str, Generated]) -> None:
    truth = slides["planted"].truth
    assert truth.counts() == {"normal": 10, "atypical": 4, "imposter": 6}
    shapes = {"normal": NORMAL_SHAPES, "atypical": ATYPICAL_SHAPES, "imposter": IMPOSTER_SHAPES}
    for obj in truth.objects:
        assert obj.shape in shapes[obj.object_class]
        assert obj.x_um == pytest.approx(obj.x_px * 0.25) and obj.y_um == pytest.approx(obj.y_px * 0.25)
    assert [o.id for o in truth.objects] == list(range(20))


def test_objects_inside_slide_apart_and_in_tissue(slides: dict[str, Generated]) -> None:
    generated = slides["planted"]
    truth = generated.truth
    points = np.array([(o.x_um, o.y_um) for o in truth.objects])
    width_um, height_um = 2048 * 0.25, 1536 * 0.25
    assert np.all(points >= 30.0) and np.all(points[:, 0] <= width_um - 30) and np.all(points[:, 1] <= height_um - 30)
    distances = np.hypot(*(points[:, None, :] - points[None, :, :]).transpose(2, 0, 1))
    assert distances[~np.eye(len(points), dtype=bool)].min() >= 20.0
    # Around each figure, past its own pale halo or retraction space, is tissue.
    reach = 52  # 13 µm
    yy, xx = np.mgrid[-reach:reach, -reach:reach]
    distance_um = np.hypot(yy, xx) * 0.25
    for obj in truth.objects:
        surround = (distance_um >= obj.radius_um + 4.0) & (distance_um <= 13.0)
        patch = _read_level0(generated.path, int(obj.x_px) - reach, int(obj.y_px) - reach, 2 * reach)
        assert (_grey(patch)[surround] > 236).mean() < 0.01, f"object {obj.id} touches background"


@pytest.mark.parametrize("key", ["planted", "mpp0.5", "mpp0.12"])
def test_each_figure_is_much_darker_than_the_tissue(slides: dict[str, Generated], key: str) -> None:
    generated = slides[key]
    mpp = generated.truth.mpp
    with tiffslide.TiffSlide(generated.path) as slide:
        overview = _grey(slide.read_region((0, 0), 1, slide.level_dimensions[1], as_array=True))
    tissue_median = float(np.median(overview[overview < 225]))
    reach = math.ceil(6.0 / mpp)  # 6 µm around the centre
    for obj in generated.truth.objects:
        patch = _grey(_read_level0(generated.path, int(obj.x_px) - reach, int(obj.y_px) - reach, 2 * reach))
        darkest = float(np.percentile(patch, 3))
        assert darkest < 0.45 * tissue_median, f"{obj.shape} {obj.id}: {darkest:.0f} vs {tissue_median:.0f}"


def test_figures_have_the_same_physical_size_at_any_mpp(slides: dict[str, Generated]) -> None:
    for key in ("planted", "mpp0.5", "mpp0.12"):
        radii = [o.radius_um for o in slides[key].truth.objects if o.is_mitosis]
        assert min(radii) >= 2.5 and max(radii) <= 14.0, key


def test_hotspot_is_the_find_hotspot_of_the_mitoses(slides: dict[str, Generated]) -> None:
    truth = slides["planted"].truth
    points = truth.mitotic_points_um()
    assert len(points) == 14
    radius = hotspot_radius_um(2.0)
    expected = find_hotspot(points, radius)
    assert truth.hotspot.mitotic_count == expected.mitotic_count
    assert truth.hotspot.radius_um == pytest.approx(radius)
    for x, y in points:
        inside = np.hypot(points[:, 0] - x, points[:, 1] - y) <= radius
        assert truth.hotspot.mitotic_count >= inside.sum()
    centre = (truth.hotspot.center_x_um, truth.hotspot.center_y_um)
    held = np.hypot(points[:, 0] - centre[0], points[:, 1] - centre[1]) <= radius * (1 + 1e-6)
    assert held.sum() == truth.hotspot.mitotic_count


def test_no_mitoses_gives_an_empty_hotspot(tmp_path: Path) -> None:
    truth = generate_slide(tmp_path / "none.tiff", SynthParams(width=512, height=512, mitoses=0, imposters=1))
    assert truth.hotspot.mitotic_count == 0 and math.isnan(truth.hotspot.center_x_um)
    data = json.loads(default_truth_path(tmp_path / "none.tiff").read_text(encoding="utf-8"))
    assert data["hotspot"]["center_x_px"] is None
    assert load_truth(default_truth_path(tmp_path / "none.tiff")).hotspot.mitotic_count == 0


# ---- the look -----------------------------------------------------------------------


def test_background_is_white_and_tissue_is_pink_and_purple(slides: dict[str, Generated]) -> None:
    with tiffslide.TiffSlide(slides["planted"].path) as slide:
        rgb = slide.read_region((0, 0), 1, slide.level_dimensions[1], as_array=True).reshape(-1, 3).astype(float)
    grey = rgb.mean(axis=1)
    background = rgb[grey > 232]
    tissue = rgb[grey < 215]
    assert len(background) > 0.2 * len(rgb) and len(tissue) > 0.2 * len(rgb)
    assert np.all(np.abs(background.mean(axis=0) - 244) < 8)
    assert background.std(axis=0).max() < 6
    r, g, b = tissue.mean(axis=0)
    assert r > g + 25 and b > g + 15  # eosin pink and haematoxylin purple both lack green
    dark = rgb[grey < 140]
    assert len(dark) and dark[:, 2].mean() > dark[:, 0].mean()  # nuclei are blue-purple


def test_noise_and_blur_parameters_take_effect() -> None:
    def render(params: SynthParams) -> np.ndarray:
        model = SlideModel(params)
        return _grey(model.render(128, 0, 256, 1024, model.nuclei_for_rows(128, 384)))

    def edge_strength(grey: np.ndarray) -> float:
        return float(np.abs(np.diff(grey, axis=1)).mean())

    quiet = SynthParams(width=1024, height=512, seed=9, mitoses=1, imposters=0, noise_sigma=0.0)
    sharp = render(quiet)
    assert edge_strength(render(dataclasses.replace(quiet, blur_sigma=2.0))) < 0.7 * edge_strength(sharp)
    noisy = render(dataclasses.replace(quiet, noise_sigma=3.0))
    background = sharp > 238
    assert background.mean() > 0.05
    assert sharp[background].std() < 1.0
    # Independent noise per channel: the grey mean of three has σ / √3 ≈ 1.7 grey levels.
    assert 1.4 < (noisy - sharp)[background].std() < 2.1


# Recorded on main before synth became a package (edge/devtools/synth.py, one _SlideModel class):
# the split must not change one rendered pixel or one byte of the truth.
GOLDEN = SynthParams(
    width=2048, height=1536, seed=11, mitoses=9, imposters=4, blur_regions=1, blur_hotspot=True, folds=1,
    pen_strokes=1, stain_shift=8.0, blur_sigma=0.6,
)  # fmt: skip
GOLDEN_PIXELS_SHA256 = "9f9d241a163dd7daf77955eae5b923ea6552cf2f02f02c7aeae559e8f6baae82"
GOLDEN_TRUTH_SHA256 = "fea63d9f1a54f83297778c955582190ab2e35ccbe3b53db703712a35f9594cd7"


def test_the_same_seed_renders_the_same_pixels_and_truth_as_before_the_split(tmp_path: Path) -> None:
    model = SlideModel(GOLDEN)
    pixels = hashlib.sha256()
    for y0 in range(0, GOLDEN.height, 256):
        for x0 in range(0, GOLDEN.width, 1024):
            pixels.update(model.render(y0, x0, 256, 1024, model.nuclei_for_rows(y0, y0 + 256)).tobytes())
    assert pixels.hexdigest() == GOLDEN_PIXELS_SHA256
    out = tmp_path / "golden.tiff"
    generate_slide(out, GOLDEN)
    assert hashlib.sha256(default_truth_path(out).read_bytes()).hexdigest() == GOLDEN_TRUTH_SHA256


def test_a_crash_while_writing_leaves_no_half_slide_and_the_old_files_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "slide.tiff"
    params = SynthParams(**SMALL, seed=4)
    generate_slide(out, params)
    before = out.read_bytes(), default_truth_path(out).read_bytes()

    def half_then_disk_full(path: Path, *_rest: object) -> None:
        path.write_bytes(b"II*\0half a slide")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("edge.devtools.synth.write_pyramid", half_then_disk_full)
    with pytest.raises(OSError, match="No space left"):
        generate_slide(out, dataclasses.replace(params, seed=5))
    assert (out.read_bytes(), default_truth_path(out).read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide.tiff", "slide.truth.json"]  # no temporary left


def test_slide_and_truth_are_synced_before_they_appear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "slide.tiff"
    generate_slide(out, SynthParams(**SMALL, seed=6))
    assert [Path(p).name.split(".")[1:3] for p in synced] == [["slide", "tiff"], ["slide", "truth"]]
