"""Detector decoding, NMS, tile -> slide px, ownership of the overlap band and the merge across tiles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.analysis.detect import (
    Boxes,
    TileOwnership,
    decode,
    keep_owned,
    merge_across_tiles,
    nms,
    owner_tiles,
    to_slide,
)
from edge.config import TilingConfig
from edge.engines.manifest import DetectorSpec
from edge.errors import EngineError
from edge.wsi.tiling import Tile, TilePlan, plan_tiles


def detector(**overrides: Any) -> DetectorSpec:
    fields: dict[str, Any] = {
        "name": "detector",
        "role": "detector",
        "path": Path("detector.onnx"),
        "sha256": "0" * 64,
        "input_name": "images",
        "size": 64,
        "mpp": 0.25,
        "classes": ("mitotic_figure", "imposter"),
        "candidate_classes": ("mitotic_figure",),
    }
    return DetectorSpec(**(fields | overrides))


def boxes(*rows: tuple[float, ...]) -> Boxes:
    """Boxes from rows of (cx, cy, w, h, score[, label])."""
    a = np.array([r if len(r) == 6 else (*r, 0) for r in rows], dtype=np.float64).reshape(-1, 6)
    return Boxes(a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4], a[:, 5].astype(np.int64))


def logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def small_plan(width_out: int, height_out: int, mask: np.ndarray | None = None, scale: float = 1.0) -> TilePlan:
    """Tiles of 64 output px overlapping by 16 (stride 48)."""
    return plan_tiles(
        round(width_out * scale),
        round(height_out * scale),
        (scale, scale),
        (0.25 * scale, 0.25 * scale),
        mask,
        TilingConfig(tile_size=64, overlap=16),
    )


# --- Boxes ---------------------------------------------------------------------------------------


def test_boxes_take_concat_empty_and_length_check() -> None:
    b = boxes((1, 2, 3, 4, 0.5), (5, 6, 7, 8, 0.9, 1))
    assert len(b) == 2 and len(Boxes.empty()) == 0
    assert b.take(np.array([False, True])).label.tolist() == [1]
    joined = Boxes.concat([b, Boxes.empty(), b.take([0])])
    assert joined.cx.tolist() == [1, 5, 1] and joined.cx.dtype == np.float64
    assert len(Boxes.concat([])) == 0
    with pytest.raises(ValueError, match="score has 1"):
        Boxes(np.zeros(2), np.zeros(2), np.zeros(2), np.zeros(2), np.zeros(1), np.zeros(2, np.int64))


# --- decode --------------------------------------------------------------------------------------


def test_yolo_raw_score_is_objectness_times_the_candidate_class() -> None:
    out = np.array(
        [
            [10, 20, 8, 6, 0.9, 0.8, 0.1],  # kept: 0.72
            [30, 30, 8, 8, 0.9, 0.1, 0.95],  # the imposter class wins, but only candidates count: 0.09
            [40, 40, 8, 8, 0.2, 1.0, 0.0],  # objectness too low
            [50, 50, 4, 4, 0.5, 0.6, 0.0],  # 0.30, kept
        ],
        dtype=np.float32,
    )
    got = decode(out, detector())
    assert got.cx.tolist() == [10, 50] and got.cy.tolist() == [20, 50]
    assert got.w.tolist() == [8, 4] and got.h.tolist() == [6, 4]
    np.testing.assert_allclose(got.score, [0.72, 0.30], rtol=1e-6)
    assert got.label.tolist() == [0, 0]


def test_yolo_raw_label_is_the_best_candidate_class() -> None:
    spec = detector(
        classes=("mitotic_figure", "imposter", "atypical_mf"), candidate_classes=("mitotic_figure", "atypical_mf")
    )
    out = np.array([[10, 10, 5, 5, 1.0, 0.3, 0.99, 0.6]])
    got = decode(out, spec)
    assert got.label.tolist() == [2]
    np.testing.assert_allclose(got.score, [0.6])


def test_yolo_raw_logits_in_float16() -> None:
    out = np.array(
        [[10, 20, 8, 8, logit(0.9), logit(0.8), 0.0], [30, 30, 8, 8, logit(0.9), logit(0.2), 5.0]], dtype=np.float16
    )
    got = decode(out, detector(scores="logits"))
    assert len(got) == 1 and got.cx.tolist() == [10]
    np.testing.assert_allclose(got.score, [0.72], rtol=2e-3)
    assert got.score.dtype == np.float32


def test_yolov8_columns_without_objectness() -> None:
    out = np.array(
        [
            [10, 30, 50],  # cx
            [11, 31, 51],  # cy
            [4, 5, 6],  # w
            [7, 8, 9],  # h
            [0.9, 0.2, 0.4],  # mitotic_figure
            [0.0, 0.99, 0.1],  # imposter
        ]
    )
    got = decode(out, detector(output_format="yolov8"))
    assert got.cx.tolist() == [10, 50] and got.cy.tolist() == [11, 51]
    assert got.w.tolist() == [4, 6] and got.h.tolist() == [7, 9]
    np.testing.assert_allclose(got.score, [0.9, 0.4])


def test_a_two_class_detector_scores_the_candidate_class_or_by_request_its_argmax() -> None:
    out = np.array(
        [
            [10, 30, 50],  # cx
            [11, 31, 51],  # cy
            [4, 5, 6],  # w
            [7, 8, 9],  # h
            [0.9, 0.5, 0.4],  # mitotic_figure
            [0.0, 0.8, 0.1],  # imposter: outscores the MF class in the middle row
        ]
    )
    assert decode(out, detector(output_format="yolov8")).cx.tolist() == [10, 30, 50]  # candidate-class score
    argmax = decode(out, detector(output_format="yolov8", class_rule="argmax"))
    assert argmax.cx.tolist() == [10, 50]
    np.testing.assert_allclose(argmax.score, [0.9, 0.4])


def test_yolov8_logits() -> None:
    out = np.array([[10.0], [10.0], [4.0], [4.0], [logit(0.3)], [9.0]], dtype=np.float16)
    got = decode(out, detector(output_format="yolov8", scores="logits"))
    np.testing.assert_allclose(got.score, [0.3], rtol=2e-3)


def test_boxes_format_drops_padding_and_other_classes() -> None:
    out = np.array(
        [
            [0, 10, 20, 30, 0.9, 0],  # kept: centre (10, 20), size 20 x 20
            [5, 5, 15, 15, 0.8, 1],  # an imposter
            [5, 5, 15, 15, 0.1, 0],  # below the score threshold
            [0, 0, 0, 0, 0.0, 0],  # padding
            [0, 0, 0, 0, 0.0, 0],
        ],
        dtype=np.float32,
    )
    got = decode(out, detector(output_format="boxes"))
    assert (got.cx.tolist(), got.cy.tolist(), got.w.tolist(), got.h.tolist()) == ([10], [20], [20], [20])
    np.testing.assert_allclose(got.score, [0.9])
    assert got.label.tolist() == [0]
    # zero padding rows would pass a threshold of 0 and, as logits, sigmoid to 0.5: still dropped
    assert decode(out, detector(output_format="boxes", score_threshold=0.0)).score.tolist() == pytest.approx([0.9, 0.1])
    logits = out.copy()
    logits[:3, 4] = [logit(0.9), logit(0.8), logit(0.1)]
    assert len(decode(logits, detector(output_format="boxes", scores="logits"))) == 1


def test_decoded_boxes_do_not_alias_the_engine_buffer() -> None:
    out = np.array([[10, 20, 8, 6, 0.9, 0.8, 0.1]])
    got = decode(out, detector())
    out[:] = 0
    assert got.cx.tolist() == [10]


@pytest.mark.parametrize(
    ("fmt", "shape", "expected"),
    [
        ("yolo_raw", (1, 100, 7), "[N, 7]"),
        ("yolo_raw", (100, 6), "[N, 7]"),
        ("yolov8", (7, 100), "[6, N]"),
        ("boxes", (10, 7), "[K, 6]"),
    ],
)
def test_wrong_shape_names_expected_and_found(fmt: str, shape: tuple[int, ...], expected: str) -> None:
    with pytest.raises(EngineError, match=rf"{fmt}.*shape \{expected}.*found \[{', '.join(map(str, shape))}\]"):
        decode(np.zeros(shape, np.float32), detector(output_format=fmt))


# --- NMS -----------------------------------------------------------------------------------------


def test_nms_suppresses_overlaps_across_classes_and_keeps_disjoint_boxes() -> None:
    b = boxes((52, 50, 20, 20, 0.8, 1), (50, 50, 20, 20, 0.9, 0), (200, 200, 20, 20, 0.7, 0), (60, 50, 20, 20, 0.6))
    kept = nms(b, iou_threshold=0.45, max_detections=10)
    # IoU(50, 52) = 18/22 suppressed; IoU(50, 60) = 10/30 < 0.45 kept
    assert kept.cx.tolist() == [50, 200, 60]
    assert kept.score.tolist() == [0.9, 0.7, 0.6]


def test_nms_max_detections_and_stable_ties() -> None:
    b = boxes((0, 0, 4, 4, 0.5), (100, 0, 4, 4, 0.5), (200, 0, 4, 4, 0.9), (300, 0, 4, 4, 0.5))
    assert nms(b, 0.5, 10).cx.tolist() == [200, 0, 100, 300]
    assert nms(b, 0.5, 2).cx.tolist() == [200, 0]
    assert len(nms(b, 0.5, 0)) == 0


def test_nms_of_nothing_is_nothing() -> None:
    assert len(nms(Boxes.empty(), 0.45, 300)) == 0


def test_nms_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match=r"iou_threshold=1.5"):
        nms(Boxes.empty(), 1.5, 3)
    with pytest.raises(ValueError, match=r"max_detections=-1"):
        nms(Boxes.empty(), 0.5, -1)


# --- tile -> slide -------------------------------------------------------------------------------


def test_to_slide_scales_into_level0_px() -> None:
    plan = small_plan(112, 64, scale=2.0)  # level-0 224 x 128, read at half resolution
    right = plan.tiles[1]
    assert (right.x, right.x0) == (48, 96.0)
    got = to_slide(boxes((10, 5, 8, 6, 0.9)), right, (2.0, 2.0))
    assert (got.cx.tolist(), got.cy.tolist(), got.w.tolist(), got.h.tolist()) == ([116.0], [10.0], [16.0], [12.0])
    assert got.score.tolist() == [0.9]


def test_to_slide_drops_centres_in_the_padding_of_a_partial_tile() -> None:
    plan = small_plan(50, 40, scale=2.0)  # smaller than one tile: padded right and bottom
    (tile,) = plan.tiles
    assert (tile.width, tile.height) == (50, 40)
    b = boxes(
        (49.5, 10, 4, 4, 0.9), (50.0, 10, 4, 4, 0.9), (10, 39.9, 4, 4, 0.8), (10, 45, 4, 4, 0.8), (-1, 5, 4, 4, 0.7)
    )
    got = to_slide(b, tile, (2.0, 2.0))
    assert got.cx.tolist() == [99.0, 20.0] and got.cy.tolist() == [20.0, 79.8]


# --- ownership -----------------------------------------------------------------------------------


@pytest.mark.parametrize("x_out", [50.0, 56.0, 60.0, 63.5])
def test_a_figure_in_the_overlap_seen_by_both_tiles_counts_once(x_out: float) -> None:
    plan = small_plan(112, 64)  # tiles at x 0 and 48 share x in [48, 64)
    ownership = TileOwnership(plan)
    kept = []
    for tile in plan.tiles:
        seen = boxes((x_out - tile.x, 30, 10, 10, 0.9))
        kept.append(to_slide(seen.take(keep_owned(seen, tile, ownership)), tile, (1.0, 1.0)))
    merged = Boxes.concat(kept)
    assert len(merged) == 1 and merged.cx.tolist() == [x_out]
    # the midpoint 56 is as near to both centres (32 and 80): the lower index wins
    assert owner_tiles(np.array([56.0, 56.5]), np.array([30.0, 30.0]), plan).tolist() == [0, 1]


def test_overlap_band_is_owned_when_the_other_tile_has_no_tissue() -> None:
    mask = np.zeros((64, 160), bool)
    mask[:, :40] = mask[:, 120:] = True  # the middle column of tiles (x 48..112) sees only glass
    plan = small_plan(160, 64, mask)
    assert [t.x for t in plan.tiles] == [0, 96]
    # x = 60 is in tile 0's overlap with the absent tile; x = 100 in tile 1's
    assert owner_tiles(np.array([60.0, 100.0, 63.9]), np.array([10.0, 10.0, 63.0]), plan).tolist() == [0, 1, 0]
    tile = plan.tiles[0]
    assert keep_owned(boxes((60, 10, 8, 8, 0.9)), tile, plan).tolist() == [True]


def test_a_box_in_the_padding_of_a_tile_smaller_than_the_input_is_dropped() -> None:
    plan = small_plan(40, 30)  # a slide smaller than one 64 px tile: the batch pads it with white to 64 x 64
    (tile,) = plan.tiles
    assert (tile.width, tile.height) == (40, 30)
    seen = boxes((20, 10, 8, 8, 0.9), (50, 10, 8, 8, 0.9), (20, 40, 8, 8, 0.9), (39.5, 29.5, 8, 8, 0.9))
    # the tile is the nearest centre for all four; only the centres on the slide's pixels are kept
    assert owner_tiles(tile.x + seen.cx, tile.y + seen.cy, plan).tolist() == [0, 0, 0, 0]
    assert keep_owned(seen, tile, plan).tolist() == [True, False, False, True]


def test_ownership_of_an_empty_plan_and_bad_points() -> None:
    empty = small_plan(112, 64, np.zeros((64, 112), bool))
    assert len(empty) == 0
    assert owner_tiles(np.array([1.0]), np.array([1.0]), empty).tolist() == [-1]
    ownership = TileOwnership(small_plan(112, 64))
    with pytest.raises(ValueError, match="1 points have a nan"):
        ownership.owner(np.array([np.nan, 1.0]), np.array([1.0, 1.0]))
    with pytest.raises(IndexError, match="tile_index=5"):
        ownership.owned_by(5, np.array([1.0]), np.array([1.0]))


def test_ties_go_to_the_lowest_tile_index() -> None:
    # a shifted last row and column crowd the grid: four centres at (32 | 33, 32 | 33)
    plan = small_plan(65, 65)
    assert len(plan) == 4
    assert owner_tiles(np.array([32.5, 32.6]), np.array([32.5, 32.5]), plan).tolist() == [0, plan.tiles[1].index]


def test_more_ties_than_the_nearest_candidates_fetched_still_go_to_the_lowest_index() -> None:
    # Twelve centres on the L∞ circle of radius 20 around (100, 100), in shuffled order, plus a far one.
    ring = [(80, y) for y in range(80, 121, 10)] + [(120, y) for y in range(80, 121, 10)] + [(100, 80), (100, 120)]
    centres = [(1000, 1000), *[ring[i] for i in np.random.default_rng(3).permutation(len(ring))]]
    tiles = tuple(
        Tile(i, 0, 0, cx - 32, cy - 32, 64, 64, float(cx - 32), float(cy - 32), 64.0, 64.0)
        for i, (cx, cy) in enumerate(centres)
    )
    plan = TilePlan(tiles, 64, 16, 2000, 2000, 0.25, 0.25, 1.0, 1.0, 1, 1)
    assert owner_tiles(np.array([100.0, 80.0]), np.array([100.0, 80.5]), plan).tolist() == [1, centres.index((80, 80))]


@settings(max_examples=40, deadline=None)
@given(
    cols=st.integers(1, 6),
    rows=st.integers(1, 6),
    extra=st.tuples(st.integers(0, 47), st.integers(0, 47)),
    tissue=st.lists(st.booleans(), min_size=36, max_size=36),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_point_covered_by_tissue_tiles_has_exactly_one_owner_which_holds_it(
    cols: int, rows: int, extra: tuple[int, int], tissue: list[bool], seed: int
) -> None:
    width, height = 64 + 48 * (cols - 1) + extra[0], 64 + 48 * (rows - 1) + extra[1]
    coarse = np.array(tissue).reshape(6, 6)
    mask = np.kron(coarse, np.ones((8, 8), bool))  # any resolution: the plan maps it onto the slide
    plan = small_plan(width, height, mask)
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, width, 400)
    y = rng.uniform(0, height, 400)
    x[:50] = np.round(x[:50])  # whole pixels: tile edges and exact ties
    y[:50] = np.round(y[:50]) / 2
    if len(plan) == 0:
        return
    ownership = TileOwnership(plan)
    owners = ownership.owner(x, y)
    claims = np.sum([ownership.owned_by(t.index, x, y) for t in plan.tiles], axis=0)
    assert (claims == 1).all()
    tx = np.array([t.x for t in plan.tiles])
    ty = np.array([t.y for t in plan.tiles])
    tw = np.array([t.width for t in plan.tiles])
    th = np.array([t.height for t in plan.tiles])
    inside = (x[:, None] >= tx) & (x[:, None] < tx + tw) & (y[:, None] >= ty) & (y[:, None] < ty + th)
    covered = inside.any(axis=1)
    o = owners[covered]
    held = (tx[o] <= x[covered]) & (x[covered] <= tx[o] + tw[o]) & (ty[o] <= y[covered]) & (y[covered] <= ty[o] + th[o])
    assert held.all()


# --- merge across tiles --------------------------------------------------------------------------

MPP = 0.25  # µm per level-0 px


def test_two_figures_10um_apart_stay_two_with_a_5um_radius() -> None:
    apart = 10.0 / MPP
    b = boxes((1000, 1000, 40, 40, 0.9), (1000 + apart, 1000, 40, 40, 0.8))
    assert len(merge_across_tiles(b, 5.0 / MPP)) == 2


def test_one_figure_seen_twice_counts_once_with_the_higher_score() -> None:
    b = boxes((1000, 1000, 40, 40, 0.8), (1003, 998, 36, 40, 0.9), (5000, 5000, 40, 40, 0.5))
    got = merge_across_tiles(b, 5.0 / MPP)
    assert got.cx.tolist() == [1003, 5000] and got.score.tolist() == [0.9, 0.5]


def test_merge_is_greedy_and_does_not_chain() -> None:
    # b is within the radius of a and of c, but c is not within it of a: a wins over b, c stays
    b = boxes((0, 0, 4, 4, 0.9), (15, 0, 4, 4, 0.8), (30, 0, 4, 4, 0.7))
    assert merge_across_tiles(b, 20.0).cx.tolist() == [0, 30]
    assert len(merge_across_tiles(Boxes.empty(), 20.0)) == 0
    with pytest.raises(ValueError, match="radius_px=-1"):
        merge_across_tiles(b, -1.0)


def test_jittered_double_detection_at_an_ownership_border_is_merged() -> None:
    # The two tiles see the figure a fraction of a pixel apart, on either side of the border at x 56:
    # each keeps its own copy, and the merge makes it one.
    plan = small_plan(112, 64)
    ownership = TileOwnership(plan)
    seen = [(plan.tiles[0], 55.8), (plan.tiles[1], 56.3)]
    kept = []
    for tile, x in seen:
        b = boxes((x - tile.x, 30, 10, 10, 0.9 if tile.index else 0.85))
        kept.append(to_slide(b.take(keep_owned(b, tile, ownership)), tile, (1.0, 1.0)))
    both = Boxes.concat(kept)
    assert len(both) == 2
    assert merge_across_tiles(both, 5.0 / MPP).cx.tolist() == [56.3]
