"""`evaluate --report`: F1 over the threshold and PR curves per group, agreement plots, the report files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge.cli import main
from edge.devtools.evaluate import PointSet
from edge.devtools.evaluate_report import ReportImage, collect_images, pr_auc, read_groups, threshold_curve
from edge.errors import ConfigError
from tests.conftest import SynthFactory, data_file

pytest.importorskip("matplotlib", reason='matplotlib is not installed: pip install "mitosis-edge[cohort]"')


def _image(name: str) -> ReportImage:
    truth = PointSet(name, np.array([[0.0, 0.0], [100.0, 0.0], [200.0, 0.0]]), ("normal", "atypical", "normal"))
    # two true figures found with high p, one with low p; a look-alike in between
    points = np.array([[1.0, 0.0], [101.0, 0.0], [201.0, 0.0], [500.0, 500.0]])
    return ReportImage(name, points, np.array([0.9, 0.8, 0.3, 0.6]), np.array([0.05, 0.95, 0.5, 0.5]), truth,
                       tissue_mm2=1.0, threshold=0.5)


def test_f1_precision_and_recall_follow_the_threshold() -> None:
    curve = threshold_curve([_image("a"), _image("b")], np.array([0.2, 0.5, 0.7, 0.95]))
    assert curve["tp"] == [6, 4, 4, 0] and curve["fp"] == [2, 2, 0, 0] and curve["fn"] == [0, 2, 2, 6]
    assert curve["f1"][2] == pytest.approx(2 * 4 / (2 * 4 + 2))
    assert curve["precision"][3] is None  # nothing kept: precision undefined, not zero
    assert pr_auc(curve) == pytest.approx(2 / 3 * 1.0 + 1 / 3 * 0.75)


def test_groups_come_from_the_midogpp_table_as_it_is() -> None:
    images = [_image("001.tiff"), _image("201.tiff"), _image("not-there.tiff")]
    dims = read_groups(data_file("annotations/MIDOGpp_datasets_xvalidation.csv"), images)
    assert dims == ["Tumor", "Scanner"]
    assert images[0].groups == {"Tumor": "human breast cancer", "Scanner": "Hamammatsu XR"}
    assert images[1].groups["Tumor"] != "human breast cancer"
    assert images[2].groups["Tumor"] == "(not in groups table)"


def test_the_report_needs_result_json_with_probabilities(tmp_path: Path) -> None:
    (tmp_path / "midog.json").write_text(json.dumps({"type": "Multiple points", "points": []}))
    (tmp_path / "t.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ConfigError, match="needs every candidate's probabilities"):
        collect_images([str(tmp_path / "midog.json")], [str(tmp_path / "t.json")])


@pytest.mark.slow
def test_evaluate_report_on_synthetic_slides_with_groups(synth_slide: SynthFactory, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "results"
    truths = []
    names = []
    for seed in (21, 22, 23):
        slide = synth_slide(width=2048, height=2048, seed=seed, atypical_fraction=0.4)
        assert main(["analyze", str(slide), "--out", str(results / slide.name)]) == 0
        truths.append(str(slide.with_suffix(".truth.json")))
        names.append(slide.name)
    groups = tmp_path / "groups.csv"
    groups.write_text("image,scanner\n" + "".join(f"{n},{'A' if i else 'B'}\n" for i, n in enumerate(names)))
    (results / "orphan").mkdir()
    orphan = json.loads((results / names[0] / "result.json").read_text())
    orphan["slide_path"] = "/elsewhere/unknown.tiff"
    (results / "orphan" / "result.json").write_text(json.dumps(orphan))
    capsys.readouterr()
    out = tmp_path / "report"
    args = ["evaluate", "--pred", str(results), *(a for t in truths for a in ("--truth", t)),
            "--groups", str(groups), "--report", str(out)]
    assert main(args) == 0
    assert "scanner: A" in capsys.readouterr().out
    data = json.loads((out / "report.json").read_text())
    assert data["images"] == 3 and data["group_columns"] == ["scanner"]
    assert sorted(data["groups"]["scanner"]) == ["A", "B"] and data["groups"]["scanner"]["A"]["images"] == 2
    assert len(data["unmatched"]) == 1 and "unknown.tiff" in data["unmatched"][0]
    assert len(data["scatter_thresholds"]) == 3 and data["scatter_thresholds"][1] == data["calibrated_threshold"]
    # at the calibrated threshold the report's F1 is the one `evaluate` gives for the same images
    single = []
    for name, truth in zip(names, truths, strict=True):
        assert main(["evaluate", "--pred", str(results / name / "result.json"), "--truth", truth, "--json"]) == 0
        single.append(json.loads(capsys.readouterr().out))
    tp, fp, fn = (sum(s[k] for s in single) for k in ("tp", "fp", "fn"))
    assert data["groups"]["all"]["all images"]["f1_at_chosen"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert data["agreement"][1]["density"]["true"]  # per-image points at each threshold
    for name in ("f1_pr_all.png", "f1_pr_scanner.png", "scatter.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG" and (out / name).stat().st_size > 10_000, name
    assert "f1_pr_scanner.png" in (out / "report.html").read_text()
    assert "| scanner: A | 2 |" in (out / "report.md").read_text()


@pytest.mark.realdata
def test_evaluate_report_on_midogpp_truth_groups_by_tumour_and_scanner(tmp_path: Path) -> None:
    coco = data_file("annotations/MIDOGpp_MIDOG++.json")
    table = data_file("annotations/MIDOGpp_datasets_xvalidation.csv")
    doc = json.loads(coco.read_text())
    results = []
    for image_id in (2, 201):
        image = next(i for i in doc["images"] if i["id"] == image_id)
        boxes = [a["bbox"] for a in doc["annotations"] if a["image_id"] == image_id and a["category_id"] == 1]
        # found: every true figure with p 0.9 but the last, which has p 0.3; one look-alike with p 0.7
        figures = [{"x_um": (b[0] + b[2]) / 8, "y_um": (b[1] + b[3]) / 8, "p_mitotic": 0.9, "p_atypical": None}
                   for b in boxes]
        figures[-1]["p_mitotic"] = 0.3
        figures.append({"x_um": -500.0, "y_um": -500.0, "p_mitotic": 0.7, "p_atypical": None})
        result = {"schema": "mitosis-edge/result/1", "slide_path": f"/midog/{image['file_name']}",
                  "scores": {"tissue_area_mm2": image["width"] * image["height"] * 0.0625 / 1e6}, "figures": figures,
                  "provenance": {}}
        path = tmp_path / f"{image_id}" / "result.json"
        path.parent.mkdir()
        path.write_text(json.dumps(result))
        results.append(len(boxes))
    out = tmp_path / "report"
    assert main(["evaluate", "--pred", str(tmp_path), "--truth", str(coco), "--groups", str(table),
                 "--threshold", "0.5", "--report", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["group_columns"] == ["Tumor", "Scanner"] and "human breast cancer" in data["groups"]["Tumor"]
    tp = sum(results) - 2
    assert data["groups"]["all"]["all images"]["f1_at_chosen"] == pytest.approx(2 * tp / (2 * tp + 2 + 2))
    assert data["groups"]["all"]["all images"]["best_threshold"] == 0.3  # the best F1 nearest the calibrated one
