"""Evaluation by the MIDOG protocol: matching, F1 over images, subtyping, readers and the evaluate command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from edge.analysis.exports import write_exports
from edge.analysis.scoring import Figure, SlideResult, score_slide
from edge.cli import results as cli_results
from edge.devtools.evaluate import (
    PointSet,
    evaluate,
    match_points,
    predictions_from_json,
    read_predictions,
    read_truth,
)
from edge.errors import ConfigError
from tests.conftest import data_file


def points(*xy: tuple[float, float]) -> np.ndarray:
    return np.array(xy, dtype=np.float64).reshape(-1, 2)


# --- matching --------------------------------------------------------------------------------------


def test_prediction_at_7_4_um_is_a_true_positive() -> None:
    m = match_points(points((7.4, 0.0)), points((0.0, 0.0)))
    assert (m.tp, m.fp, m.fn) == (1, 0, 0)
    assert m.tp_pairs == [(0, 0)]


def test_prediction_at_7_6_um_is_a_false_positive_and_a_miss() -> None:
    m = match_points(points((0.0, 7.6)), points((0.0, 0.0)))
    assert (m.tp, m.fp, m.fn) == (0, 1, 1)
    assert m.fp_indices == [0] and m.fn_indices == [0]


def test_two_predictions_near_one_truth_give_one_match() -> None:
    m = match_points(points((3.0, 0.0), (1.0, 0.0)), points((0.0, 0.0)))
    assert (m.tp, m.fp, m.fn) == (1, 1, 0)
    assert m.tp_pairs == [(1, 0)]  # the nearer one


def test_one_prediction_between_two_truths_is_matched_once() -> None:
    m = match_points(points((5.0, 0.0)), points((0.0, 0.0), (10.0, 0.0)))
    assert (m.tp, m.fp, m.fn) == (1, 0, 1)


def test_assignment_maximises_matches_before_distance() -> None:
    # Greedy nearest-first would pair p0-t1 (1 µm) and leave t0 and p1 unmatched.
    pred = points((6.0, 0.0), (13.0, 0.0))
    truth = points((0.0, 0.0), (7.0, 0.0))
    m = match_points(pred, truth)
    assert m.tp_pairs == [(0, 0), (1, 1)]


def test_empty_inputs() -> None:
    assert match_points(np.empty((0, 2)), points((1.0, 1.0))).fn_indices == [0]
    assert match_points(points((1.0, 1.0)), np.empty((0, 2))).fp_indices == [0]
    with pytest.raises(ConfigError, match="radius_um"):
        match_points(points((1.0, 1.0)), points((1.0, 1.0)), radius_um=0.0)


def test_matching_on_many_points_equals_brute_force_counts() -> None:
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(5)
    truth = rng.uniform(0, 300, size=(80, 2))
    pred = np.concatenate([truth[:60] + rng.normal(0, 4, size=(60, 2)), rng.uniform(0, 300, size=(30, 2))])
    m = match_points(pred, truth)
    d = np.hypot(*(pred[:, None, :] - truth[None, :, :]).transpose(2, 0, 1))
    big = 1e6
    rows, cols = linear_sum_assignment(np.where(d <= 7.5, d, big))
    assert m.tp == int((d[rows, cols] <= 7.5).sum())
    assert m.tp + m.fp == len(pred) and m.tp + m.fn == len(truth)


# --- metrics ---------------------------------------------------------------------------------------


def test_f1_sums_counts_over_images() -> None:
    perfect = PointSet("a", points((0.0, 0.0)), (None,))
    # image b: 1 TP, 3 FP, 0 FN
    b_truth = PointSet("b", points((0.0, 0.0)), (None,))
    b_pred = PointSet("b", points((0.0, 0.0), (100.0, 0.0), (200.0, 0.0), (300.0, 0.0)), (None,) * 4)
    report = evaluate([(perfect, perfect), (b_pred, b_truth)])
    assert (report.tp, report.fp, report.fn) == (2, 3, 0)
    assert report.f1 == pytest.approx(4 / 7)  # not the mean of 1.0 and 0.4
    assert report.precision == pytest.approx(0.4) and report.recall == 1.0
    assert [i.f1 for i in report.images] == [1.0, pytest.approx(0.4)]
    data = report.to_json_dict()
    for key in ("f1", "precision", "recall", "tp", "fp", "fn", "hotspot_count_pred", "hotspot_count_true"):
        assert key in data
    assert len(data["images"]) == 2


def test_nothing_to_find_and_nothing_found_leaves_f1_undefined() -> None:
    empty = PointSet("a", np.empty((0, 2)), ())
    report = evaluate([(empty, empty)])
    assert report.f1 is None and report.precision is None and report.recall is None
    json.dumps(report.to_json_dict(), allow_nan=False)


def test_subtyping_metrics_on_matched_figures() -> None:
    truth_subtypes = ("atypical", "atypical", "atypical", "normal", "normal", "normal", None)
    pred_subtypes = ("atypical", "atypical", "normal", "normal", "atypical", "uncertain", "atypical")
    xy = points(*[(i * 100.0, 0.0) for i in range(7)])
    truth = PointSet("s", xy, truth_subtypes)
    pred = PointSet("s", xy + 1.0, pred_subtypes)
    sub = evaluate([(pred, truth)]).subtyping
    assert (sub.atypical_correct, sub.atypical_total) == (2, 3)
    assert (sub.normal_correct, sub.normal_total) == (1, 2)
    assert sub.uncertain == 1
    assert sub.sensitivity == pytest.approx(2 / 3)
    assert sub.specificity == pytest.approx(0.5)
    assert sub.balanced_accuracy == pytest.approx((2 / 3 + 0.5) / 2)
    assert sub.matched_with_subtype == 6


def test_hotspot_counts_recorded_or_recomputed() -> None:
    cluster = points(*[(float(i), 0.0) for i in range(5)], (5000.0, 0.0))
    truth = PointSet("h", cluster, (None,) * 6, hotspot_count=5, hotspot_area_mm2=2.0)
    pred = PointSet("h", cluster[:4], (None,) * 4)  # no recorded hotspot: recomputed
    image = evaluate([(pred, truth)]).images[0]
    assert (image.hotspot_count_pred, image.hotspot_count_true) == (4, 5)
    # A recorded count for another area is not trusted: recomputed at the evaluation's area.
    stale = PointSet("h", cluster, (None,) * 6, hotspot_count=99, hotspot_area_mm2=0.5)
    assert evaluate([(pred, stale)], hotspot_area_mm2=2.0).images[0].hotspot_count_true == 5


# --- readers ---------------------------------------------------------------------------------------


def make_result(figs: list[Figure], mpp: float = 0.25) -> SlideResult:
    slide = {"width": 8000, "height": 8000, "mpp_x": mpp, "mpp_y": mpp, "format": "tiff", "vendor": "synthetic"}
    return SlideResult("/x/slide.tiff", slide, score_slide(figs, tissue_area_mm2=4.0), tuple(figs), {})


def figure_at(x_um: float, y_um: float, subtype: str | None, mitotic: bool = True) -> Figure:
    return Figure(
        x_um / 0.25,
        y_um / 0.25,
        x_um,
        y_um,
        40,
        40,
        0.8,
        0.9 if mitotic else 0.1,
        0.5,
        mitotic,
        subtype if mitotic else None,  # type: ignore[arg-type]
    )


def test_midog_json_points_in_mm_are_read_as_um(tmp_path: Path) -> None:
    path = tmp_path / "midog.json"
    path.write_text(json.dumps({"type": "Multiple points", "points": [{"point": [1.0, 0.5, 0], "probability": 0.9}]}))
    pred = read_predictions(path)
    assert pred.points_um.tolist() == [[1000.0, 500.0]]
    assert pred.subtypes == (None,)


def test_result_json_and_its_midog_export_read_back(tmp_path: Path) -> None:
    figs = [figure_at(100.0, 200.0, "atypical"), figure_at(300.0, 200.0, "normal"), figure_at(9.0, 9.0, None, False)]
    paths = write_exports(make_result(figs), tmp_path)
    pred = read_predictions(paths["result"])
    assert pred.points_um.tolist() == [[100.0, 200.0], [300.0, 200.0]]
    assert pred.subtypes == ("atypical", "normal")
    assert (pred.hotspot_count, pred.hotspot_area_mm2) == (2, pytest.approx(2.0))
    assert pred.image == "slide.tiff"
    midog = read_predictions(paths["midog"])
    np.testing.assert_allclose(midog.points_um, pred.points_um)


def test_synth_truth_reader_and_a_perfect_prediction(synth_slide: object, tmp_path: Path) -> None:
    from edge.devtools.synth import default_truth_path, load_truth

    slide = synth_slide(width=2048, height=2048, mitoses=10, imposters=4, seed=11)  # type: ignore[operator]
    truth_path = default_truth_path(slide)
    synth = load_truth(truth_path)
    truth = read_truth(truth_path)
    mitoses = [o for o in synth.objects if o.is_mitosis]
    assert len(truth.points_um) == len(mitoses) == 10
    assert set(truth.subtypes) <= {"normal", "atypical"}
    assert truth.hotspot_count == synth.hotspot.mitotic_count

    figs = [figure_at(o.x_um, o.y_um, o.object_class) for o in mitoses]
    figs += [figure_at(o.x_um, o.y_um, None, False) for o in synth.objects if not o.is_mitosis]
    paths = write_exports(make_result(figs), tmp_path)
    report = evaluate([(read_predictions(paths["result"]), truth)])
    assert (report.f1, report.tp, report.fp, report.fn) == (1.0, 10, 0, 0)
    assert report.hotspot_count_pred == report.hotspot_count_true == synth.hotspot.mitotic_count
    assert report.subtyping.balanced_accuracy in (1.0, None)


def test_midogpp_coco_selects_one_image_by_id_or_file_name(tmp_path: Path) -> None:
    coco = data_file("annotations/MIDOGpp_MIDOG++.json")
    by_id = read_truth(coco, image="2")
    by_name = read_truth(coco, image="002.tiff")
    assert by_id.image == by_name.image == "002.tiff"
    np.testing.assert_array_equal(by_id.points_um, by_name.points_um)
    data = json.loads(coco.read_text())
    boxes = [a["bbox"] for a in data["annotations"] if a["image_id"] == 2 and a["category_id"] == 1]
    assert len(by_id.points_um) == len(boxes) > 0
    x1, y1, x2, y2 = boxes[0]
    assert by_id.points_um[0].tolist() == [(x1 + x2) / 2 * 0.25, (y1 + y2) / 2 * 0.25]
    assert read_truth(coco, image="2", truth_mpp=0.5).points_um[0, 0] == pytest.approx(2 * by_id.points_um[0, 0])

    # The truth's own points as a MIDOG prediction: F1 = 1.
    midog = {"type": "Multiple points", "points": [{"point": [x / 1000, y / 1000, 0]} for x, y in by_id.points_um]}
    pred = predictions_from_json(midog)
    assert evaluate([(pred, by_id)]).f1 == 1.0

    with pytest.raises(ConfigError, match=r"'nope' is not in truth.*e\.g\. 1 \(001\.tiff\)"):
        read_truth(coco, image="nope")
    with pytest.raises(ConfigError, match="choose one with --image"):
        read_truth(coco)


def test_coco_image_is_found_from_the_prediction_file_name() -> None:
    coco = {
        "images": [{"id": 1, "file_name": "a.tiff"}, {"id": 2, "file_name": "b.tiff"}],
        "categories": [{"id": 1, "name": "mitotic figure"}, {"id": 2, "name": "not mitotic figure"}],
        "annotations": [
            {"image_id": 2, "category_id": 1, "bbox": [0, 0, 50, 50]},
            {"image_id": 2, "category_id": 2, "bbox": [100, 0, 150, 50]},
            {"image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50]},
        ],
    }
    from edge.devtools.evaluate import truth_from_json

    truth = truth_from_json(coco, image_hint="b.tiff")
    assert truth.image == "b.tiff"
    assert truth.points_um.tolist() == [[6.25, 6.25]]  # look-alikes are not truth


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        ("{not json", "not valid JSON"),
        ('{"something": 1}', "unknown shape"),
        ("[1, 2]", "unknown shape"),
    ],
)
def test_bad_files_are_clear_config_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_predictions(path)
    with pytest.raises(ConfigError, match=message):
        read_truth(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_predictions(tmp_path / "missing.json")


# --- the evaluate command --------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli_results.register(parser.add_subparsers())
    return parser.parse_args(argv)


def write_truth(tmp_path: Path) -> Path:
    from edge.analysis.scoring import find_hotspot
    from edge.devtools.synth import PlantedObject, SynthParams, SynthTruth

    objects = (
        PlantedObject(0, "normal", "metaphase", 400.0, 400.0, 100.0, 100.0, 6.0),
        PlantedObject(1, "atypical", "tripolar", 800.0, 400.0, 200.0, 100.0, 6.0),
        PlantedObject(2, "imposter", "apoptotic", 1200.0, 400.0, 300.0, 100.0, 6.0),
    )
    hotspot = find_hotspot(np.array([[100.0, 100.0], [200.0, 100.0]]), 797.8845608028654)
    truth = SynthTruth("slide.tiff", 2048, 2048, 0.25, 0, SynthParams(width=2048, height=2048), objects, hotspot)
    path = tmp_path / "slide.truth.json"
    path.write_text(json.dumps(truth.to_json_dict()))
    return path


def test_evaluate_command_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    truth = write_truth(tmp_path)
    figs = [
        figure_at(101.0, 100.0, "normal"),
        figure_at(200.0, 100.0, "uncertain"),
        figure_at(300.0, 100.0, None, False),
    ]
    figs.append(figure_at(600.0, 600.0, "atypical"))
    paths = write_exports(make_result(figs), tmp_path / "out")

    args = parse(["evaluate", "--pred", str(paths["result"]), "--truth", str(truth), "--json"])
    assert args.handler(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["tp"], data["fp"], data["fn"]) == (2, 1, 0)
    assert data["f1"] == pytest.approx(0.8)
    assert data["hotspot_count_true"] == 2 and data["hotspot_count_pred"] == 3
    assert data["subtyping"]["uncertain"] == 1 and data["subtyping"]["specificity"] == 1.0

    args = parse(["evaluate", "--pred", str(paths["midog"]), "--truth", str(truth)])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "F1               0.800" in out and "TP / FP / FN     2 / 1 / 0" in out


def test_evaluate_command_bad_arguments_raise_config_errors(tmp_path: Path) -> None:
    truth = write_truth(tmp_path)
    args = parse(["evaluate", "--pred", str(tmp_path / "none.json"), "--truth", str(truth)])
    with pytest.raises(ConfigError, match="does not exist"):
        args.handler(args)
    args = parse(["evaluate", "--pred", str(truth), "--truth", str(truth), "--hotspot-area", "-1"])
    with pytest.raises(ConfigError, match="hotspot-area"):
        args.handler(args)
