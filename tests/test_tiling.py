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

from edge.analysis.detect import TileOwnership
from edge.config import TilingConfig, TissueConfig
from edge.wsi.tiling import (
    TilePlan,
    dilated_mask,
    grid_starts,
    plan_efficiency,
    plan_tiles,
    tissue_area_mm2,
    tissue_mask,
)

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
    from edge.wsi.slide import open_slide

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


def _plan(  # type: ignore[no-untyped-def]
    width0: int, height0: int, mask: np.ndarray | None, px0: float = 1.0, tile: int = 1024, overlap: int = 64,
    layout: str = "grid",
):
    tiling = TilingConfig(tile_size=tile, overlap=overlap, layout=layout)  # type: ignore[arg-type]
    return plan_tiles(width0, height0, (px0, px0), (0.25, 0.25), mask, tiling)


def test_plan_without_mask_tiles_the_whole_slide() -> None:
    plan = _plan(5000, 3000, None)
    assert (plan.columns, plan.rows) == (6, 4)
    assert len(plan) == plan.grid_size == 24
    xs = sorted({t.x for t in plan.tiles})
    assert xs == [0, 960, 1920, 2880, 3840, 5000 - 1024]
    assert all(t.x + t.width <= plan.width and t.y + t.height <= plan.height for t in plan.tiles)
    assert [t.index for t in plan.tiles] == list(range(len(plan)))


def test_grid_plan_keeps_only_tiles_touching_tissue_and_covers_every_tissue_pixel() -> None:
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
    from edge.devtools.synth import default_truth_path, load_truth
    from edge.wsi.slide import open_slide
    from edge.wsi.stream import plan_slide

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


# --- fit layout: fewer tiles, every tissue pixel in an owned core ----------------------------------


def _needed_cells(plan: TilePlan, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Rows and columns of the mask cells the plan must cover (the mask dilated by the figure
    radius, half the overlap), and the output px per cell."""
    need = dilated_mask(mask, plan.width, plan.height, plan.overlap / 2)
    rows, cols = np.nonzero(need)
    return rows, cols, plan.width / mask.shape[1], plan.height / mask.shape[0]


def _pixels_outside_cores(plan: TilePlan, mask: np.ndarray, cores: np.ndarray) -> np.ndarray:
    """Output pixels that overlap a needed mask cell and lie in no tile's core."""
    need = dilated_mask(mask, plan.width, plan.height, plan.overlap / 2)
    fx, fy = plan.width / mask.shape[1], plan.height / mask.shape[0]
    x, y = np.arange(plan.width), np.arange(plan.height)
    c0, c1 = np.floor(x / fx).astype(int), np.minimum(np.floor((x + 1 - 1e-9) / fx).astype(int), mask.shape[1] - 1)
    r0, r1 = np.floor(y / fy).astype(int), np.minimum(np.floor((y + 1 - 1e-9) / fy).astype(int), mask.shape[0] - 1)
    needed = need[r0][:, c0] | need[r0][:, c1] | need[r1][:, c0] | need[r1][:, c1]
    in_core = np.zeros((plan.height, plan.width), bool)
    for xa, ya, xb, yb in cores:
        in_core[ya:yb, xa:xb] = True
    return needed & ~in_core


def _assert_covered_and_owned_once(plan: TilePlan, mask: np.ndarray, rng: np.random.Generator) -> None:
    # no tile leaves the slide, all tiles are the same size
    for t in plan.tiles:
        assert t.x >= 0 and t.x + t.width <= plan.width and t.y >= 0 and t.y + t.height <= plan.height
        assert (t.width, t.height) == (min(plan.tile_size, plan.width), min(plan.tile_size, plan.height))
    rows, cols, fx, fy = _needed_cells(plan, mask)
    if len(rows) == 0:
        assert len(plan) == 0
        return
    cores = np.array([plan.core(t) for t in plan.tiles])
    if plan.width * plan.height <= 4_000_000:  # every output pixel that touches a needed cell is in a core
        assert not _pixels_outside_cores(plan, mask, cores).any()
    else:  # a big slide: each needed cell lies whole in the core of some tile
        x0, x1, y0, y1 = cols * fx, (cols + 1) * fx, rows * fy, (rows + 1) * fy
        inside = (
            (cores[:, None, 0] <= x0 + 1e-6) & (x1 <= cores[:, None, 2] + 1e-6)
            & (cores[:, None, 1] <= y0 + 1e-6) & (y1 <= cores[:, None, 3] + 1e-6)
        )  # fmt: skip
        assert inside.any(axis=0).all(), f"{int((~inside.any(axis=0)).sum())} tissue cells in no tile's core"
    # points anywhere in those cells: exactly one tile owns each, and its core holds the point
    # (within half the overlap of the slide's edge, its tile holds it: nothing lies beyond the edge)
    pick = rng.integers(0, len(rows), 400)
    px = np.clip((cols[pick] + rng.random(400)) * fx, 0, plan.width - 1e-6)
    py = np.clip((rows[pick] + rng.random(400)) * fy, 0, plan.height - 1e-6)
    ownership = TileOwnership(plan)
    claims = np.sum([ownership.owned_by(i, px, py) for i in range(len(plan))], axis=0)
    assert (claims == 1).all()
    owner = ownership.owner(px, py)
    c = cores[owner]
    t = np.array([(tl.x, tl.y, tl.x + tl.width, tl.y + tl.height) for tl in plan.tiles])[owner]
    m = plan.margin
    interior = (px >= m) & (px < plan.width - m) & (py >= m) & (py < plan.height - m)
    in_core = (c[:, 0] <= px) & (px < c[:, 2]) & (c[:, 1] <= py) & (py < c[:, 3])
    in_tile = (t[:, 0] <= px) & (px < t[:, 2]) & (t[:, 1] <= py) & (py < t[:, 3])
    assert in_tile.all()
    assert in_core[interior].all()


@st.composite
def _slides_with_tissue(draw: st.DrawFn) -> tuple[int, int, np.ndarray, int, int]:
    tile, overlap = draw(st.sampled_from([(64, 8), (128, 16), (256, 32), (100, 10), (64, 0)]))
    width, height = draw(st.integers(20, 2000)), draw(st.integers(20, 2000))
    mh, mw = draw(st.integers(1, 60)), draw(st.integers(1, 60))
    mask = np.zeros((mh, mw), bool)
    for _ in range(draw(st.integers(0, 6))):
        r0, c0 = draw(st.integers(0, mh - 1)), draw(st.integers(0, mw - 1))
        mask[r0 : r0 + draw(st.integers(1, mh)), c0 : c0 + draw(st.integers(1, mw))] = True
    specks = draw(st.lists(st.tuples(st.integers(0, mh - 1), st.integers(0, mw - 1)), max_size=8))
    for r, c in specks:
        mask[r, c] = True
    return width, height, mask, tile, overlap


@given(_slides_with_tissue(), st.integers(0, 2**31))
@settings(max_examples=150, deadline=None)
def test_fit_plan_covers_every_tissue_pixel_once_and_stays_on_the_slide(
    case: tuple[int, int, np.ndarray, int, int], seed: int
) -> None:
    width, height, mask, tile, overlap = case
    plan = _plan(width, height, mask, tile=tile, overlap=overlap, layout="fit")
    _assert_covered_and_owned_once(plan, mask, np.random.default_rng(seed))
    assert [t.index for t in plan.tiles] == list(range(len(plan)))


def _biopsies(shape: tuple[int, int] = (400, 600), seed: int = 7) -> np.ndarray:
    """A fixed mask of needle biopsies and small fragments, the shape that wastes most of a grid."""
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, bool)
    for _ in range(5):  # slanted strips ~1.2 mm wide
        cy, cx, angle = rng.integers(60, shape[0] - 60), rng.integers(100, shape[1] - 100), rng.uniform(0, np.pi)
        along = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        across = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        mask |= (np.abs(along) < rng.integers(60, 180)) & (np.abs(across) < 18)
    for _ in range(25):  # fragments
        cy, cx, r = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(3, 20)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    return mask


def test_fit_plan_on_a_fixed_mask_needs_far_fewer_tiles_than_the_grid() -> None:
    mask = _biopsies()  # one mask px = 32 output px (8 µm at 0.25 µm/px): a 48 x 32 mm slide area
    fit = _plan(600 * 32, 400 * 32, mask, layout="fit")
    grid = _plan(600 * 32, 400 * 32, mask, layout="grid")
    assert fit.grid_tiles == len(grid)
    assert len(fit) <= 0.85 * len(grid), (len(fit), len(grid))
    _assert_covered_and_owned_once(fit, mask, np.random.default_rng(0))
    fit_e, grid_e = plan_efficiency(fit, mask, (8.0, 8.0)), plan_efficiency(grid, mask, (8.0, 8.0))
    assert fit_e.tissue_mm2 == grid_e.tissue_mm2 == pytest.approx(tissue_area_mm2(mask, 8.0))
    assert fit_e.tiles_vs_grid == pytest.approx(len(fit) / len(grid))
    assert fit_e.read_mm2 == pytest.approx(len(fit) * (1024 * 0.25 / 1000) ** 2)
    assert fit_e.tissue_fraction > grid_e.tissue_fraction
    assert fit_e.tissue_mm2 < fit_e.covered_mm2 < fit_e.read_mm2  # overlaps are read twice


def test_fit_plan_of_one_small_piece_is_one_tile_where_the_grid_needs_four() -> None:
    mask = np.zeros((100, 100), bool)
    mask[28:34, 28:34] = True  # a 6-cell piece across the corner of four grid tiles (cells of 32 px)
    assert len(_plan(3200, 3200, mask, layout="grid")) == 4
    assert len(_plan(3200, 3200, mask, layout="fit")) == 1


def test_without_mask_the_fit_layout_is_the_grid() -> None:
    plan = _plan(5000, 3000, None, layout="fit")
    assert plan.layout == "grid" and len(plan) == plan.grid_size == 24


def test_fit_plan_on_a_synthetic_slide_owns_every_planted_figure_in_a_core(synth_slide: SynthFactory) -> None:
    from edge.config import Config
    from edge.devtools.synth import default_truth_path, load_truth
    from edge.wsi.slide import open_slide
    from edge.wsi.stream import plan_slide

    path = synth_slide(width=6144, height=4096, seed=4)
    truth = load_truth(default_truth_path(path))
    with open_slide(path) as slide:
        sp = plan_slide(slide, Config())
    assert sp.plan.layout == "fit" and len(sp.plan) <= sp.plan.grid_tiles
    px = np.array([o.x_px / sp.plan.px0_per_out_x for o in truth.objects])
    py = np.array([o.y_px / sp.plan.px0_per_out_y for o in truth.objects])
    owner = TileOwnership(sp.plan).owner(px, py)
    for i, obj in enumerate(truth.objects):
        x0, y0, x1, y1 = sp.plan.core(sp.plan.tiles[owner[i]])
        assert x0 <= px[i] < x1 and y0 <= py[i] < y1, f"object {obj.id} outside its owner's core"
