"""Hotspot search (exact against a brute force, edge cases, tie-breaking) and slide scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.analysis.scoring import (
    BOUNDARY_TOLERANCE,
    NOTTINGHAM_FIELD_AREA_MM2,
    SCORE_HINT_NOTE,
    Figure,
    Hotspot,
    SlideResult,
    SlideScores,
    SubtypeCounts,
    find_hotspot,
    hotspot_radius_um,
    mitotic_score_hint,
    score_slide,
    tissue_fraction_in_circles,
)
from edge.errors import ConfigError

Points = np.ndarray


def brute_force_candidates(points: Points, radius: float) -> tuple[Points, np.ndarray]:
    """Every point and both centres of each radius-r circle through two points, with counts.

    Plain numpy distance matrices, O(n³): the definition, not the algorithm under test.
    """
    counting_radius = radius * (1 + BOUNDARY_TOLERANCE)
    centres = [points]
    n = len(points)
    for i in range(n):
        for j in range(i + 1, n):
            delta = points[j] - points[i]
            d = float(np.hypot(*delta))
            if d == 0 or d > 2 * counting_radius:
                continue
            unit = delta / d
            normal = np.array([unit[1], -unit[0]])
            h = math.sqrt(max(radius**2 - (d / 2) ** 2, 0.0))
            mid = points[i] + min(d / 2, radius) * unit
            centres.append(np.stack([mid + h * normal, mid - h * normal]))
    all_centres = np.concatenate(centres)
    distances = np.hypot(*(all_centres[:, None, :] - points[None, :, :]).transpose(2, 0, 1))
    return all_centres, (distances <= counting_radius).sum(axis=1)


def count_at(points: Points, centre: tuple[float, float], radius: float) -> int:
    d = np.hypot(points[:, 0] - centre[0], points[:, 1] - centre[1])
    return int((d <= radius * (1 + BOUNDARY_TOLERANCE)).sum())


def grid_best(points: Points, radius: float, steps: int = 24) -> int:
    lo = points.min(axis=0) - radius
    hi = points.max(axis=0) + radius
    xs = np.linspace(lo[0], hi[0], steps)
    ys = np.linspace(lo[1], hi[1], steps)
    grid = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
    d = np.hypot(*(grid[:, None, :] - points[None, :, :]).transpose(2, 0, 1))
    return int((d <= radius * (1 + BOUNDARY_TOLERANCE)).sum(axis=1).max())


coordinates_on_grid = st.integers(min_value=0, max_value=12).map(float)
coordinates_free = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)
point_sets = st.one_of(
    # Small integer grids: duplicates, collinear runs and exact 2r distances are common.
    st.lists(st.tuples(coordinates_on_grid, coordinates_on_grid), min_size=1, max_size=40),
    st.lists(st.tuples(coordinates_free, coordinates_free), min_size=1, max_size=40),
)
radii = st.sampled_from([0.5, 1.0, 2.5, 3.0, 5.0, 12.5, 40.0])


@settings(max_examples=150, deadline=None, derandomize=True)
@given(point_sets, radii)
def test_count_matches_brute_force(raw: list[tuple[float, float]], radius: float) -> None:
    points = np.array(raw, dtype=np.float64)
    hotspot = find_hotspot(points, radius)
    _, counts = brute_force_candidates(points, radius)
    assert hotspot.mitotic_count == counts.max()
    # The reported centre really holds the reported count.
    assert count_at(points, (hotspot.center_x_um, hotspot.center_y_um), radius) == (hotspot.mitotic_count)
    assert grid_best(points, radius) <= hotspot.mitotic_count


@settings(max_examples=60, deadline=None, derandomize=True)
@given(point_sets, radii)
def test_ties_go_to_lowest_y_then_x(raw: list[tuple[float, float]], radius: float) -> None:
    points = np.array(raw, dtype=np.float64)
    hotspot = find_hotspot(points, radius)
    centres, counts = brute_force_candidates(points, radius)
    maximal = centres[counts == counts.max()]
    lowest = maximal[np.lexsort((maximal[:, 0], maximal[:, 1]))[0]]
    assert hotspot.center_y_um == pytest.approx(lowest[1], abs=1e-6 * max(radius, 1.0))
    if hotspot.center_y_um == pytest.approx(lowest[1], abs=1e-9):
        assert hotspot.center_x_um == pytest.approx(lowest[0], abs=1e-6 * max(radius, 1.0))


def test_hotspot_radius_of_two_square_millimetres() -> None:
    assert hotspot_radius_um(2.0) == pytest.approx(797.8845608, rel=1e-9)
    hotspot = Hotspot(0.0, 0.0, hotspot_radius_um(2.0), 0)
    assert hotspot.area_mm2 == pytest.approx(2.0)


@pytest.mark.parametrize("area", [0.0, -1.0, math.nan, math.inf])
def test_hotspot_radius_rejects_bad_area(area: float) -> None:
    with pytest.raises(ConfigError, match="area_mm2"):
        hotspot_radius_um(area)


def test_no_points_gives_zero_count_and_nan_centre() -> None:
    hotspot = find_hotspot(np.empty((0, 2)), 100.0)
    assert hotspot.mitotic_count == 0
    assert math.isnan(hotspot.center_x_um) and math.isnan(hotspot.center_y_um)
    assert hotspot.radius_um == 100.0


def test_one_point_is_the_centre() -> None:
    hotspot = find_hotspot(np.array([[10.0, 20.0]]), 5.0)
    assert (hotspot.center_x_um, hotspot.center_y_um, hotspot.mitotic_count) == (10.0, 20.0, 1)


def test_two_points_exactly_two_radii_apart_share_a_circle() -> None:
    hotspot = find_hotspot(np.array([[0.0, 0.0], [10.0, 0.0]]), 5.0)
    assert hotspot.mitotic_count == 2
    assert hotspot.center_x_um == pytest.approx(5.0)
    assert hotspot.center_y_um == pytest.approx(0.0, abs=1e-9)


def test_two_points_just_beyond_two_radii_do_not() -> None:
    hotspot = find_hotspot(np.array([[0.0, 0.0], [10.001, 0.0]]), 5.0)
    assert hotspot.mitotic_count == 1


def test_collinear_points() -> None:
    points = np.array([[float(x), 3.0] for x in range(0, 21)])
    hotspot = find_hotspot(points, 4.0)
    assert hotspot.mitotic_count == 9  # a diameter of 8 holds 9 unit-spaced points


def test_duplicates_are_counted_each() -> None:
    points = np.array([[1.0, 1.0]] * 5 + [[50.0, 50.0]] * 3)
    hotspot = find_hotspot(points, 2.0)
    assert hotspot.mitotic_count == 5
    assert (hotspot.center_x_um, hotspot.center_y_um) == (1.0, 1.0)


def test_tie_break_picks_highest_score() -> None:
    left = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    right = left + np.array([100.0, 0.0])
    points = np.concatenate([left, right])

    default = find_hotspot(points, 2.0)
    assert default.mitotic_count == 3
    assert default.center_x_um < 50  # same lowest y on both sides: lowest x wins

    calls: list[int] = []

    def prefer_right(centres: np.ndarray) -> np.ndarray:
        calls.append(len(centres))
        return centres[:, 0]

    chosen = find_hotspot(points, 2.0, tie_break=prefer_right)
    assert calls and calls[0] > 1
    assert chosen.mitotic_count == 3
    assert chosen.center_x_um > 50


def test_tie_break_with_wrong_shape_is_an_error() -> None:
    points = np.array([[0.0, 0.0], [100.0, 0.0]])
    with pytest.raises(ValueError, match="tie_break"):
        find_hotspot(points, 1.0, tie_break=lambda c: np.zeros(len(c) + 1))


@pytest.mark.parametrize("radius", [0.0, -3.0, math.nan])
def test_bad_radius_is_a_config_error(radius: float) -> None:
    with pytest.raises(ConfigError, match="radius_um"):
        find_hotspot(np.zeros((3, 2)), radius)


def test_bad_point_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        find_hotspot(np.zeros((3, 3)), 1.0)


def test_clustered_slide_scale_finds_the_cluster_exactly() -> None:
    rng = np.random.default_rng(7)
    radius = hotspot_radius_um(2.0)
    cluster = rng.normal([5000.0, 4000.0], 250.0, size=(600, 2))
    background = rng.uniform(0, 20000, size=(1400, 2))
    points = np.concatenate([cluster, background])
    hotspot = find_hotspot(points, radius)
    assert hotspot.mitotic_count >= count_at(points, (5000.0, 4000.0), radius)
    assert hotspot.mitotic_count == count_at(points, (hotspot.center_x_um, hotspot.center_y_um), radius)
    assert math.hypot(hotspot.center_x_um - 5000.0, hotspot.center_y_um - 4000.0) < radius


# --- slide scores ----------------------------------------------------------------------------------


def figure(
    x_um: float,
    y_um: float,
    subtype: str | None = "normal",
    *,
    mitotic: bool = True,
    mpp: float = 0.25,
) -> Figure:
    return Figure(
        x_px=x_um / mpp,
        y_px=y_um / mpp,
        x_um=x_um,
        y_um=y_um,
        width_px=48.0,
        height_px=48.0,
        detector_score=0.8,
        p_mitotic=0.9 if mitotic else 0.2,
        p_atypical={"atypical": 0.95, "normal": 0.05, "uncertain": 0.5}.get(subtype or ""),
        is_mitotic=mitotic,
        subtype=subtype if mitotic else None,  # type: ignore[arg-type]
        scores={"mitotic:a": 0.9},
    )


subtypes = st.sampled_from(["normal", "atypical", "uncertain"])


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    st.lists(st.tuples(coordinates_free, coordinates_free, subtypes, st.booleans()), min_size=0, max_size=30),
    st.sampled_from([1e-4, 5e-4, 2e-3]),
)
def test_score_slide_hotspot_count_matches_brute_force(
    raw: list[tuple[float, float, str, bool]], area_mm2: float
) -> None:
    figures = [figure(x, y, s, mitotic=m) for x, y, s, m in raw]
    scores = score_slide(figures, tissue_area_mm2=1.0, hotspot_area_mm2=area_mm2)
    mitotic = np.array([(f.x_um, f.y_um) for f in figures if f.is_mitotic]).reshape(-1, 2)
    radius = hotspot_radius_um(area_mm2)
    expected = 0 if len(mitotic) == 0 else int(brute_force_candidates(mitotic, radius)[1].max())
    counts = scores.hotspot.counts
    assert scores.hotspot.hotspot.mitotic_count == counts.mitotic == expected
    assert counts.atypical + counts.normal + counts.uncertain == counts.mitotic
    assert scores.totals.mitotic == len(mitotic)
    assert scores.candidates == len(figures)


def test_ratio_is_none_without_normal_figures() -> None:
    scores = score_slide([figure(0, 0, "atypical"), figure(5, 5, "atypical")], tissue_area_mm2=1.0)
    assert scores.hotspot.counts.atypical == 2
    assert scores.hotspot.counts.atypical_ratio is None
    assert scores.totals.atypical_ratio is None


def test_ratio_is_zero_without_atypical_figures() -> None:
    scores = score_slide([figure(0, 0, "normal"), figure(5, 5, "normal")], tissue_area_mm2=1.0)
    assert scores.hotspot.counts.atypical_ratio == 0.0


def test_no_figures_gives_zero_count_and_no_ratio() -> None:
    scores = score_slide([], tissue_area_mm2=1.0)
    assert scores.hotspot.counts == SubtypeCounts(0, 0, 0, 0)
    assert scores.hotspot.counts.atypical_ratio is None
    assert math.isnan(scores.hotspot.hotspot.center_x_um)
    assert scores.mitotic_density_per_mm2 == 0.0
    assert scores.mitotic_score_hint.score == 1
    # Non-mitotic candidates alone are not counted.
    scores = score_slide([figure(0, 0, mitotic=False)], tissue_area_mm2=1.0)
    assert scores.hotspot.counts.mitotic == 0 and scores.candidates == 1


def test_uncertain_figures_are_counted_but_left_out_of_the_ratio() -> None:
    figs = [figure(0, 0, "atypical"), figure(1, 0, "normal"), figure(2, 0, "normal")]
    figs += [figure(3, 0, "uncertain"), figure(4, 0, None)]
    scores = score_slide(figs, tissue_area_mm2=1.0)
    assert scores.hotspot.counts == SubtypeCounts(mitotic=5, atypical=1, normal=2, uncertain=2)
    assert scores.hotspot.counts.atypical_ratio == 0.5


def test_tie_broken_by_tissue_fraction() -> None:
    area = 0.01  # radius ≈ 56 µm
    left = [figure(100, 100), figure(110, 100)]
    right = [figure(1000, 100), figure(1010, 100)]
    mask = np.zeros((40, 120), dtype=bool)  # 10 µm/px: 1200 x 400 µm
    mask[:, 60:] = True  # tissue only on the right
    radius = hotspot_radius_um(area)

    def fraction(centres: np.ndarray) -> np.ndarray:
        return tissue_fraction_in_circles(mask, (10.0, 10.0), centres, radius)

    plain = score_slide(left + right, tissue_area_mm2=0.24, hotspot_area_mm2=area)
    assert plain.hotspot.hotspot.center_x_um < 500  # without the tie-break: lowest (y, x)
    assert plain.hotspot.tissue_fraction is None
    chosen = score_slide(left + right, tissue_area_mm2=0.24, hotspot_area_mm2=area, tissue_fraction=fraction)
    assert chosen.hotspot.hotspot.center_x_um > 500
    assert chosen.hotspot.counts.mitotic == 2
    assert chosen.hotspot.tissue_fraction == pytest.approx(1.0)


def test_density_per_square_millimetre_of_tissue() -> None:
    figs = [figure(i * 100.0, 0) for i in range(6)] + [figure(0, 50, mitotic=False)]
    assert score_slide(figs, tissue_area_mm2=3.0).mitotic_density_per_mm2 == pytest.approx(2.0)
    no_tissue = score_slide(figs, tissue_area_mm2=0.0)
    assert no_tissue.mitotic_density_per_mm2 is None
    assert no_tissue.mitotic_score_hint.score is None


@pytest.mark.parametrize("area", [-1.0, math.nan, math.inf])
def test_bad_tissue_area_is_a_config_error(area: float) -> None:
    with pytest.raises(ConfigError, match="tissue_area_mm2"):
        score_slide([], tissue_area_mm2=area)


@pytest.mark.parametrize(("count", "score"), [(0, 1), (8, 1), (9, 2), (17, 2), (18, 3), (40, 3)])
def test_score_hint_cutoffs_at_ten_hpf_of_055_mm(count: int, score: int) -> None:
    hint = mitotic_score_hint(count, NOTTINGHAM_FIELD_AREA_MM2)
    assert hint.score == score
    assert hint.cutoffs == pytest.approx((8.5, 17.5))
    assert hint.note == SCORE_HINT_NOTE and "not a diagnosis" in hint.note


@pytest.mark.parametrize(("count", "score"), [(7, 1), (8, 2), (14, 2), (15, 3)])
def test_score_hint_cutoffs_rescaled_to_two_square_millimetres(count: int, score: int) -> None:
    hint = mitotic_score_hint(count, 2.0)
    assert hint.cutoffs == pytest.approx((8.5 * 2 / 2.376, 17.5 * 2 / 2.376))
    assert hint.score == score


def test_score_slide_hint_uses_the_hotspot_count_and_area() -> None:
    figs = [figure(float(i), 0.0) for i in range(15)]
    hint = score_slide(figs, tissue_area_mm2=5.0).mitotic_score_hint
    assert (hint.count, hint.score) == (15, 3)
    assert hint.field_area_mm2 == pytest.approx(2.0)


# --- tissue fraction -------------------------------------------------------------------------------


def brute_tissue_fraction(mask: np.ndarray, mpp: tuple[float, float], centre: tuple[float, float], r: float) -> float:
    h, w = mask.shape
    pad = int((r + 40.0) / min(mpp)) + 3  # centres lie at most 40 µm beyond the mask
    rows = np.arange(-pad, h + pad)
    cols = np.arange(-pad, w + pad)
    yy, xx = np.meshgrid((rows + 0.5) * mpp[1], (cols + 0.5) * mpp[0], indexing="ij")
    inside = np.hypot(xx - centre[0], yy - centre[1]) <= r
    padded = np.zeros((len(rows), len(cols)), dtype=bool)
    padded[pad : pad + h, pad : pad + w] = mask
    return float((inside & padded).sum() / inside.sum())


def test_tissue_fraction_matches_brute_force_including_borders() -> None:
    rng = np.random.default_rng(3)
    mask = rng.random((37, 53)) < 0.6
    mpp = (2.0, 3.0)
    centres = np.concatenate([rng.uniform(-20, 130, size=(40, 2)), [[0.0, 0.0], [106.0, 111.0]]])
    for radius in (4.0, 17.5, 60.0):
        got = tissue_fraction_in_circles(mask, mpp, centres, radius)
        expected = [brute_tissue_fraction(mask, mpp, (cx, cy), radius) for cx, cy in centres]
        np.testing.assert_allclose(got, expected, atol=1e-12)


def test_tissue_fraction_outside_the_slide_is_non_tissue() -> None:
    mask = np.ones((100, 100), dtype=bool)
    fractions = tissue_fraction_in_circles(mask, (1.0, 1.0), np.array([[50.0, 50.0], [0.0, 50.0], [-500.0, 0]]), 20.0)
    assert fractions[0] == 1.0
    assert fractions[1] == pytest.approx(0.5, abs=0.03)
    assert fractions[2] == 0.0


def test_tissue_fraction_bad_arguments() -> None:
    mask = np.ones((4, 4), dtype=bool)
    with pytest.raises(ConfigError, match="mask_mpp"):
        tissue_fraction_in_circles(mask, (0.0, 1.0), np.zeros((1, 2)), 1.0)
    with pytest.raises(ValueError, match="centres_um"):
        tissue_fraction_in_circles(mask, (1.0, 1.0), np.zeros((1, 3)), 1.0)
    with pytest.raises(ValueError, match="2-D"):
        tissue_fraction_in_circles(np.ones(4, dtype=bool), (1.0, 1.0), np.zeros((1, 2)), 1.0)
    assert tissue_fraction_in_circles(mask, (1.0, 1.0), np.empty((0, 2)), 1.0).shape == (0,)


# --- JSON round trips ------------------------------------------------------------------------------


def test_slide_scores_and_result_round_trip_through_json() -> None:
    import json

    figs = [figure(0, 0, "atypical"), figure(3, 0, "normal"), figure(9, 9, mitotic=False)]
    scores = score_slide(figs, tissue_area_mm2=2.5)
    text = json.dumps(scores.to_json_dict(), allow_nan=False)
    assert SlideScores.from_json_dict(json.loads(text)) == scores
    result = SlideResult("a.svs", {"width": 100, "mpp_x": 0.25}, scores, tuple(figs), {"created_at": "now"})
    back = SlideResult.from_json_dict(json.loads(json.dumps(result.to_json_dict(), allow_nan=False)))
    assert back == result
    empty = score_slide([], tissue_area_mm2=0.0)
    back_empty = SlideScores.from_json_dict(json.loads(json.dumps(empty.to_json_dict(), allow_nan=False)))
    assert math.isnan(back_empty.hotspot.hotspot.center_x_um)
    assert back_empty.to_json_dict() == empty.to_json_dict()
