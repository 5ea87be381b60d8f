"""Calibration: the grid search picks the weights and threshold with the best F1; a new bundle is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge.devtools.calibrate import CachedSlide, calibrated_manifest, grid_search, weight_grid, write_calibrated_bundle
from edge.engines import load_bundle
from edge.errors import ConfigError
from tests.tiny_bundle import make_tiny_bundle


def _slide(seed: int) -> CachedSlide:
    """40 true figures; 60 candidates: 40 on the figures, 20 look-alikes. Model a knows, model b guesses."""
    rng = np.random.default_rng(seed)
    truth = rng.uniform(0, 5000, (40, 2))
    lookalikes = rng.uniform(0, 5000, (20, 2))
    points = np.vstack([truth + rng.normal(0, 1.0, truth.shape), lookalikes])
    is_mf = np.r_[np.ones(40), np.zeros(20)]
    p_a = np.where(is_mf == 1, rng.uniform(0.55, 1.0, 60), rng.uniform(0.0, 0.45, 60))
    p_b = rng.uniform(0, 1, 60)
    return CachedSlide(f"slide{seed}", points, {"a": p_a, "b": p_b}, truth)


def test_the_weight_grid_covers_the_simplex() -> None:
    assert weight_grid(1, 0.1) == [(1.0,)]
    grid = weight_grid(2, 0.25)
    assert grid[0] == (0.0, 1.0) and grid[-1] == (1.0, 0.0) and len(grid) == 5
    assert all(sum(w) == pytest.approx(1.0) for w in weight_grid(3, 0.2))
    with pytest.raises(ConfigError):
        weight_grid(2, 0.0)


def test_grid_search_trusts_the_informative_model_and_finds_a_separating_threshold() -> None:
    calibration = grid_search([_slide(1), _slide(2)], ["a", "b"], weight_step=0.25)
    best = calibration.best
    assert best.weights == (1.0, 0.0)
    assert 0.45 <= best.threshold <= 0.55
    assert (best.tp, best.fp, best.fn) == (80, 0, 0) and best.f1 == 1.0
    assert len(calibration.grid) == 5 * 95
    report = calibration.to_json_dict()
    assert report["best"]["weights"] == {"a": 1.0, "b": 0.0} and report["slides"] == ["slide1", "slide2"]


def test_grid_search_needs_a_slide() -> None:
    with pytest.raises(ConfigError, match="at least one slide"):
        grid_search([], ["a"])


def test_the_manifest_edit_keeps_comments_and_order() -> None:
    text = '[bundle]\nname = "x"\nversion = "1.0"  # keep\n\n[[classifier]]\nname = "a"\nweight = 0.5\n\n' \
           '[[classifier]]\nweight = 0.5 # second\nname = "b"\n\n[decision]\nmitotic_threshold = 0.5\n'
    new = calibrated_manifest(text, {"a": 0.7, "b": 0.3}, 0.62, "1.0+cal")
    assert 'version = "1.0+cal"  # keep' in new
    assert 'name = "a"\nweight = 0.7' in new and "weight = 0.3 # second" in new
    assert "mitotic_threshold = 0.62" in new


def test_a_calibrated_bundle_is_a_new_folder_with_a_report(tmp_path: Path) -> None:
    bundle = load_bundle(make_tiny_bundle(tmp_path / "tiny"))
    calibration = grid_search([_slide(1)], ["a", "b"], weight_step=0.5)
    new = write_calibrated_bundle(bundle, calibration, tmp_path / "tiny-cal")
    assert new.path == (tmp_path / "tiny-cal").resolve()
    assert [c.weight for c in new.classifiers] == [1.0, 0.0]
    assert new.decision.mitotic_threshold == calibration.best.threshold
    assert new.version.startswith("0.0.1+cal.")
    report = json.loads((new.path / "calibration.json").read_text())
    assert report["source_bundle"]["name"] == "tiny" and report["best"]["f1"] == 1.0
    assert load_bundle(tmp_path / "tiny").classifiers[0].weight == 0.5  # the source is untouched
    with pytest.raises(ConfigError, match="not empty"):
        write_calibrated_bundle(bundle, calibration, tmp_path / "tiny-cal")
    with pytest.raises(ConfigError, match="never in place"):
        write_calibrated_bundle(bundle, calibration, tmp_path / "tiny")


def test_ties_go_to_the_middle_of_the_widest_best_plateau() -> None:
    from edge.devtools.calibrate import GridPoint, choose_best

    def point(w: float, t: float, tp: int) -> GridPoint:
        return GridPoint((w, 1 - w), t, tp, 10 - tp, 10 - tp)

    grid = [point(0.5, t / 10, 10 if 3 <= t <= 7 else 5) for t in range(1, 10)]
    grid += [point(1.0, t / 10, 10 if t == 9 else 5) for t in range(1, 10)]
    best = choose_best(grid)
    assert best.weights == (0.5, 0.5) and best.threshold == 0.5


def test_the_detector_threshold_rises_while_it_costs_no_f1(tmp_path: Path) -> None:
    """True figures score >= 0.6 at the detector, look-alikes spread over 0.1-0.9: every detector
    threshold up to 0.6 keeps the best F1 with fewer candidates, and the highest of them is chosen."""
    rng = np.random.default_rng(5)
    base = _slide(1)
    detector_score = np.r_[rng.uniform(0.6, 1.0, 40), rng.uniform(0.1, 0.9, 20)]
    slide = CachedSlide(base.name, base.points_um, base.p_mitotic, base.truth_um, detector_score)
    calibration = grid_search([slide], ["a", "b"], weight_step=0.5, detector_thresholds=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert calibration.best.score == 1.0
    assert calibration.best.detector_threshold == 0.6  # the least work at the best F1
    summary = {row["score_threshold"]: row for row in calibration.detector_summary()}
    assert summary[0.6]["candidates"] < summary[0.1]["candidates"] == 60
    bundle = load_bundle(make_tiny_bundle(tmp_path / "tiny"))
    new = write_calibrated_bundle(bundle, calibration, tmp_path / "tiny-cal")
    assert new.detector.score_threshold == 0.6


def test_a_detector_threshold_that_loses_figures_is_not_chosen() -> None:
    base = _slide(1)
    detector_score = np.r_[np.linspace(0.15, 0.9, 40), np.full(20, 0.12)]  # true figures from 0.15 up
    slide = CachedSlide(base.name, base.points_um, base.p_mitotic, base.truth_um, detector_score)
    calibration = grid_search([slide], ["a", "b"], weight_step=0.5, detector_thresholds=[0.1, 0.15, 0.3, 0.5])
    assert calibration.best.detector_threshold in (0.1, 0.15) and calibration.best.fn == 0


def test_validation_slides_without_any_true_figure_are_refused_with_what_to_add() -> None:
    empty = CachedSlide("empty.tiff", np.zeros((0, 2)), {"a": np.zeros(0)}, np.zeros((0, 2)))
    with pytest.raises(ConfigError, match=r"no true mitotic figure.*add slides with mitoses"):
        grid_search([empty], ["a"], weight_step=0.5)
