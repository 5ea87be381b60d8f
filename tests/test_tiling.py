"""Tissue masks and tile plans: geometry that covers every tissue pixel, overlaps right and never
leaves the slide."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from edge.config import TilingConfig, TissueConfig
from edge.tiling import grid_starts, plan_tiles, tissue_area_mm2, tissue_mask

from .conftest import SynthFactory, data_file

# --- tissue mask ---------------------------------------------------------------------------------


def test_real_he_region_is_mostly_tissue() -> None:
    # the 1000 px field at ~0.5 µm/px, seen at 2 µm/px as a thumbnail would
    he = np.asarray(Image.open(data_file("he/tiatoolbox_target_image.png")).convert("RGB").resize((250, 250)))
    mask = tissue_mask(he, mpp=2.0)
    assert mask.shape == he.shape[:2]
    assert mask.mean() > 0.8


def test_real_he_on_white_glass_is_found_and_the_glass_is_not() -> None:
    he = np.asarray(Image.open(data_file("he/tiatoolbox_target_image.png")).convert("RGB").resize((250, 250)))
    canvas = np.full((600, 800, 3), 243, np.uint8)  # glass
    canvas += np.random.default_rng(0).integers(0, 4, canvas.shape, dtype=np.uint8)
    canvas[100:350, 200:450] = he
    mask = tissue_mask(canvas, mpp=8.0)
    inside = mask[100:350, 200:450].mean()
    outside = np.concatenate([mask[:90].ravel(), mask[360:].ravel()]).mean()
    assert inside > 0.9 and outside == 0.0


def test_real_dicom_slide_with_greyish_glass() -> None:
    from edge.slide import open_slide

    with open_slide(data_file("wsi/camelyon-multiframe.dcm")) as slide:  # glass at about (226, 221, 228)
        image = slide.read_level(0, 0, 0, *slide.info.dimensions)
    mask = tissue_mask(image, mpp=slide.info.mpp_x or 29.0)
    assert 0.15 < mask.mean() < 0.6  # two lymph-node sections side by side, with fat around them
    assert mask[:40, :].mean() < 0.01 and mask[:, :40].mean() < 0.01  # glass margins: a few specks of dirt at most
    assert mask[300, 150] and mask[300, 720]  # the dense purple node of each section


def test_specks_smaller_than_the_minimum_area_are_dropped() -> None:
    img = np.full((400, 400, 3), 245, np.uint8)
    img[100:300, 100:300] = (200, 120, 180)  # 200x200 px at 8 µm = 2.56 mm²
    img[20:23, 20:23] = (120, 40, 110)  # a 24 µm speck of dust
    mask = tissue_mask(img, mpp=8.0, params=TissueConfig(min_object_area_mm2=0.05))
    assert mask[200, 200] and not mask[21, 21]
    assert tissue_area_mm2(mask, 8.0) == pytest.approx(2.56, rel=0.05)


def test_black_scanner_border_is_not_tissue() -> None:
    img = np.full((200, 200, 3), 245, np.uint8)
    img[:, :15] = 0
    assert not tissue_mask(img, mpp=8.0)[:, :15].any()


def test_white_slide_has_no_tissue() -> None:
    mask = tissue_mask(np.full((100, 100, 3), 250, np.uint8), mpp=8.0)
    assert not mask.any() and tissue_area_mm2(mask, 8.0) == 0.0


# --- grid ----------------------------------------------------------------------------------------


@given(length=st.integers(1, 20000), tile=st.sampled_from([256, 512, 1024]), overlap=st.sampled_from([0, 32, 64]))
@settings(max_examples=200, deadline=None)
def test_grid_covers_the_axis_without_leaving_it(length: int, tile: int, overlap: int) -> None:
    starts = grid_starts(length, tile, tile - overlap)
    assert starts[0] == 0
    assert all(s >= 0 and (s + tile <= length or length < tile) for s in starts)
    ends = [s + min(tile, length) for s in starts]
    assert ends[-1] == length
    for a, b in itertools.pairwise(starts):
        assert tile - (b - a) >= overlap  # neighbours overlap by at least the configured amount
        assert b - a <= tile - overlap


def _plan(width0: int, height0: int, mask: np.ndarray | None, px0: float = 1.0, tile: int = 1024, overlap: int = 64):  # type: ignore[no-untyped-def]
    return plan_tiles(width0, height0, (px0, px0), (0.25, 0.25), mask, TilingConfig(tile_size=tile, overlap=overlap))


def test_plan_without_mask_tiles_the_whole_slide() -> None:
    plan = _plan(5000, 3000, None)
    assert (plan.columns, plan.rows) == (6, 4)
    assert len(plan) == plan.grid_size == 24
    xs = sorted({t.x for t in plan.tiles})
    assert xs == [0, 960, 1920, 2880, 3840, 5000 - 1024]
    assert all(t.x + t.width <= plan.width and t.y + t.height <= plan.height for t in plan.tiles)
    assert [t.index for t in plan.tiles] == list(range(len(plan)))


def test_plan_keeps_only_tiles_touching_tissue_and_covers_every_tissue_pixel() -> None:
    rng = np.random.default_rng(3)
    mask = np.zeros((300, 500), bool)  # one mask px = 20 level-0 px
    for _ in range(6):
        cy, cx, r = rng.integers(0, 300), rng.integers(0, 500), rng.integers(5, 40)
        yy, xx = np.ogrid[:300, :500]
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    plan = _plan(10000, 6000, mask)
    assert 0 < len(plan) < plan.grid_size
    covered = np.zeros_like(mask)
    for t in plan.tiles:
        covered[
            math.floor(t.y0 / 20) : math.ceil((t.y0 + t.height0) / 20),
            math.floor(t.x0 / 20) : math.ceil((t.x0 + t.width0) / 20),
        ] = True
    assert not (mask & ~covered).any()
    # and every kept tile really touches tissue
    for t in plan.tiles:
        window = mask[
            math.floor(t.y0 / 20) : math.ceil((t.y0 + t.height0) / 20),
            math.floor(t.x0 / 20) : math.ceil((t.x0 + t.width0) / 20),
        ]
        assert window.any()


def test_level0_coordinates_follow_the_scale() -> None:
    plan = _plan(8000, 8000, None, px0=0.25 / 0.12)  # a 0.12 µm/px scan read at 0.25
    t = plan.tiles[1]
    assert t.x == 960 and t.x0 == pytest.approx(960 * 0.25 / 0.12)
    assert t.width0 == pytest.approx(1024 * 0.25 / 0.12)
    assert plan.width == math.floor(8000 / (0.25 / 0.12))


def test_slide_smaller_than_a_tile_gives_one_partial_tile() -> None:
    plan = _plan(300, 200, None)
    assert len(plan) == 1
    t = plan.tiles[0]
    assert (t.x, t.y, t.width, t.height) == (0, 0, 300, 200)


def test_empty_mask_gives_no_tiles() -> None:
    assert len(_plan(5000, 5000, np.zeros((50, 50), bool))) == 0


def test_tissue_of_a_synthetic_slide_holds_every_planted_object(synth_slide: SynthFactory) -> None:
    from edge.config import Config
    from edge.slide import open_slide
    from edge.stream import plan_slide
    from edge.synth import default_truth_path, load_truth

    path = synth_slide(width=6144, height=4096, seed=4)
    truth = load_truth(default_truth_path(path))
    with open_slide(path) as slide:
        sp = plan_slide(slide, Config())
    mask, (mx, my) = sp.mask, sp.mask_mpp
    fraction = mask.mean()
    assert 0.3 < fraction < 0.85  # generated with tissue_fraction 0.55
    assert sp.tissue_area_mm2 == pytest.approx(fraction * 6144 * 4096 * 0.25**2 * 1e-6, rel=0.02)
    for obj in truth.objects:
        r, c = int(obj.y_um / my), int(obj.x_um / mx)
        assert mask[max(0, r - 1) : r + 2, max(0, c - 1) : c + 2].any(), f"object {obj.id} outside the tissue mask"
    # the plan covers every object with a tile
    for obj in truth.objects:
        assert any(t.x0 <= obj.x_px < t.x0 + t.width0 and t.y0 <= obj.y_px < t.y0 + t.height0 for t in sp.plan.tiles)
