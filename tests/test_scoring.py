"""Hotspot search: exact against a brute force, edge cases, tie-breaking."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.errors import ConfigError
from edge.scoring import BOUNDARY_TOLERANCE, Hotspot, find_hotspot, hotspot_radius_um

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
