"""`mitosis-edge analyze`, `evaluate`, `bench analyze` and `calibrate` with the demo bundle, as a user runs them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import SynthFactory, data_file
from tests.test_cli import run_cli

UNSEEN_SEED = 4242  # not used in training or in choosing the demo bundle's thresholds


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory: pytest.TempPathFactory, synth_slide: SynthFactory) -> tuple[Path, Path]:
    slide = synth_slide(width=8192, height=8192, seed=UNSEEN_SEED, mitoses=30, imposters=30)
    out = tmp_path_factory.mktemp("analyze") / "out"
    result = run_cli("analyze", str(slide), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "mitotic count" in result.stdout and "atypical ratio" in result.stdout
    return slide, out


def test_analyze_finds_the_planted_mitoses_on_an_unseen_slide(analyzed: tuple[Path, Path]) -> None:
    slide, out = analyzed
    truth = slide.with_name(slide.stem + ".truth.json")
    result = run_cli("evaluate", "--pred", str(out / "result.json"), "--truth", str(truth), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["f1"] >= 0.9, report
    assert abs(report["hotspot_count_pred"] - report["hotspot_count_true"]) <= 1, report


def test_analyze_writes_every_export(analyzed: tuple[Path, Path]) -> None:
    _, out = analyzed
    result = json.loads((out / "result.json").read_text())
    assert result["schema"].startswith("mitosis-edge/result/")
    assert result["provenance"]["bundle"]["name"] == "demo"
    assert result["provenance"]["backend"] == "onnxruntime"
    assert set(result["provenance"]["timings_s"]) >= {"read", "detect", "classify", "total"}
    geojson = json.loads((out / "detections.geojson").read_text())
    assert geojson["type"] == "FeatureCollection"
    names = {f["properties"]["classification"]["name"] for f in geojson["features"]}
    assert names & {"Mitotic figure (normal)", "Mitotic figure (atypical)", "Mitotic figure (uncertain subtype)"}
    midog = json.loads((out / "midog.json").read_text())
    assert midog["type"] == "Multiple points" and midog["points"]
    assert (out / "detections.csv").read_text().startswith("x_px,")
    assert (out / "overlay.png").stat().st_size > 0


def test_analyze_json_prints_the_result(synth_slide: SynthFactory, tmp_path: Path) -> None:
    slide = synth_slide(width=4096, height=4096, seed=UNSEEN_SEED + 1)
    result = run_cli("analyze", str(slide), "--out", str(tmp_path / "o"), "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert {"scores", "figures", "provenance", "slide"} <= set(printed)


def test_analyze_a_real_svs_scanned_at_half_the_resolution(tmp_path: Path) -> None:
    result = run_cli("analyze", str(data_file("wsi/CMU-1-Small-Region.svs")), "--out", str(tmp_path / "svs"))
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "svs" / "result.json").read_text())
    assert data["slide"]["mpp_x"] == pytest.approx(0.499) and data["slide"]["resampled"] is True


def test_analyze_a_slide_without_mpp_says_how_to_fix_it(tmp_path: Path) -> None:
    path = str(data_file("wsi/tcga-cr-7395-01a-01-ts1.svs"))
    result = run_cli("analyze", path, "--out", str(tmp_path / "x"))
    assert result.returncode == 1
    assert path in result.stderr and "--mpp" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x" / "result.json").exists()


@pytest.mark.parametrize("name", ["broken.svs", "camelyon-multiframe.dcm"])
def test_analyze_refuses_unreadable_or_too_coarse_slides_clearly(name: str, tmp_path: Path) -> None:
    result = run_cli("analyze", str(data_file(f"wsi/{name}")), "--out", str(tmp_path / "x"))
    assert result.returncode == 1, result.stdout
    assert name in result.stderr and "Traceback" not in result.stderr


def test_bench_analyze_reports_the_ratio_to_the_slower_stage(synth_slide: SynthFactory) -> None:
    slide = synth_slide(width=4096, height=4096, seed=UNSEEN_SEED + 1)
    result = run_cli("bench", "analyze", str(slide), "--detector-batches", "2",
                     "--detector-seconds", "0.2", "--json")
    assert result.returncode == 0, result.stderr
    bench = json.loads(result.stdout)
    for key in ("end_to_end_tiles_per_s", "read_tiles_per_s", "detector_tiles_per_s", "ratio", "peak_rss_mb"):
        assert bench[key] > 0, key


ATYPICAL_ONLY_MEMBER = """
[[classifier]]
name = "atypical_net"
file = "classifier_efficientnet_tiny.onnx"
sha256 = "{sha}"
input = "image"
size = 96
mpp = 0.25
channel_order = "BGR"
normalisation = {{ scale = 0.00784313725490196, mean = [1.0, 1.0, 1.0], std = [1.0, 1.0, 1.0] }}
atypical_output = "atypical"
scores = "logits"
"""


def test_calibrate_writes_a_new_bundle_version_and_never_weighs_an_atypical_only_member(
    synth_slide: SynthFactory, tmp_path: Path
) -> None:
    from edge.engines import find_bundle, load_bundle

    source = tmp_path / "demo-amf"
    shutil.copytree(find_bundle("demo"), source)
    manifest = source / "manifest.toml"
    member = ATYPICAL_ONLY_MEMBER.format(sha=load_bundle("demo").model("efficientnet_tiny").sha256)
    text = manifest.read_text().replace('atypical_heads = ["densenet_tiny", "efficientnet_tiny"]',
                                        'atypical_heads = ["atypical_net"]')  # the paper: a separate subtyper
    manifest.write_text(text.replace("[decision]", member + "\n[decision]"))
    slide = synth_slide(width=4096, height=4096, seed=UNSEEN_SEED + 2, mitoses=12, imposters=12)
    truth = slide.with_name(slide.stem + ".truth.json")
    out = tmp_path / "demo-cal"
    result = run_cli("calibrate", "--bundle", str(source), "--slide", str(slide), "--truth", str(truth),
                     "--out", str(out), "--weight-step", "0.25")
    assert result.returncode == 0, result.stderr
    assert "mitotic_threshold" in result.stdout and "atypical_net" not in result.stdout
    check = run_cli("engines", "check", "--bundle", str(out))
    assert check.returncode == 0, check.stderr
    report = json.loads((out / "calibration.json").read_text())
    assert report["source_bundle"]["name"] == "demo" and "atypical_net" not in report["best"]["weights"]
    calibrated = load_bundle(out)
    assert calibrated.version != load_bundle(source).version
    assert calibrated.model("atypical_net").weight == 0  # type: ignore[attr-defined]
    assert [c.name for c in calibrated.subtype_only] == ["atypical_net"]


# --- slides without mitoses or tissue are valid results (issue 11, bug 1) --------------------------


def blank_tiff(path: Path, side: int = 2048) -> Path:
    """A tiled TIFF of plain glass: a slide with no tissue at all."""
    import numpy as np
    import tifffile

    tifffile.imwrite(path, np.full((side, side, 3), 242, np.uint8), tile=(256, 256), photometric="rgb",
                     resolution=(40000, 40000), resolutionunit="CENTIMETER")  # 0.25 µm/px
    return path


def _empty_slide(kind: str, synth_slide: SynthFactory, tmp_path: Path) -> tuple[Path, str]:
    if kind == "no mitoses":
        return synth_slide(width=2048, height=2048, seed=5, mitoses=0, imposters=0), "no mitotic figure found"
    if kind == "blank":
        return blank_tiff(tmp_path / "blank.tiff"), "no tissue found"
    return data_file("wsi/highdicom-sm-50px.dcm"), "no tissue found"


@pytest.mark.parametrize("kind", ["no mitoses", "blank", "tiny dicom"])
def test_a_slide_without_mitoses_or_tissue_is_a_result_with_a_null_hotspot_and_every_export(
    kind: str, synth_slide: SynthFactory, tmp_path: Path
) -> None:
    slide, reason = _empty_slide(kind, synth_slide, tmp_path)
    out = tmp_path / "out"
    result = run_cli("analyze", str(slide), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert reason in result.stdout
    scores = json.loads((out / "result.json").read_text())["scores"]
    assert scores["hotspot"]["mitotic"] == 0 and scores["totals"]["mitotic"] == 0
    assert scores["hotspot"]["center_x_um"] is None and reason in scores["hotspot"]["null_reason"]
    assert scores["hotspot"]["atypical_ratio"] is None and scores["totals"]["atypical_ratio"] is None
    assert json.loads((out / "detections.geojson").read_text())["features"] == []
    assert json.loads((out / "midog.json").read_text())["points"] == []
    assert (out / "detections.csv").read_text().strip().count("\n") == 0  # the header only
    assert (out / "overlay.png").stat().st_size > 0


def test_calibrate_takes_a_mitosis_free_slide_among_its_validation_slides(
    synth_slide: SynthFactory, tmp_path: Path
) -> None:
    empty = synth_slide(width=2048, height=2048, seed=5, mitoses=0, imposters=0)
    busy = synth_slide(width=2048, height=2048, seed=UNSEEN_SEED + 3, mitoses=8, imposters=4)
    args = []
    for slide in (empty, busy):
        args += ["--slide", str(slide), "--truth", str(slide.with_name(slide.stem + ".truth.json"))]
    result = run_cli("calibrate", *args, "--out", str(tmp_path / "cal"), "--weight-step", "0.5")
    assert result.returncode == 0, result.stderr
    assert "on 2 slide(s)" in result.stdout


# --- plausibility before reading (issue 11, bug 5) --------------------------------------------------


@pytest.mark.parametrize(("side", "reason"), [
    (200_000, "40000 megapixels), more than slide.max_level0_megapixels = 30000"),
    (8192, "tiles share bytes"),  # small enough for the area limit, but its tiles are not really stored
])
def test_a_bomb_tiff_is_refused_before_a_pixel_is_read(side: int, reason: str, tmp_path: Path) -> None:
    from tests.tiff_bomb import write_bomb

    bomb = write_bomb(tmp_path / "bomb.tiff", side, side)
    result = run_cli("analyze", str(bomb), "--out", str(tmp_path / "x"))
    assert result.returncode == 1, result.stdout
    assert "bomb.tiff" in result.stderr and reason in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x" / "result.json").exists()


def test_limits_on_level_0_area_and_tile_count_are_settings(synth_slide: SynthFactory, tmp_path: Path) -> None:
    slide = synth_slide(width=2048, height=2048, seed=5, mitoses=0, imposters=0)
    for setting, reason in (("max_level0_megapixels = 1.0", "more than slide.max_level0_megapixels = 1"),
                            ("max_tiles = 1", "more than slide.max_tiles = 1")):
        config = tmp_path / "edge.toml"
        config.write_text(f"[slide]\n{setting}\n")
        result = run_cli("--config", str(config), "analyze", str(slide), "--out", str(tmp_path / "x"))
        assert result.returncode == 1 and reason in result.stderr, result.stderr


def test_the_same_slide_gives_byte_identical_exports_in_any_process(synth_slide: SynthFactory, tmp_path: Path) -> None:
    # Python salts str hashes per process: scores once followed a set's order, so two runs wrote the
    # classifiers' atypical scores in different orders. Hash seeds 0 and 6 order the demo's two names apart.
    slide = synth_slide(width=2048, height=2048, seed=UNSEEN_SEED + 1, mitoses=6, imposters=4)
    outs = []
    for hash_seed in ("0", "6"):
        out = tmp_path / f"out-{hash_seed}"
        result = run_cli("analyze", str(slide), "--out", str(out), env={"PYTHONHASHSEED": hash_seed})
        assert result.returncode == 0, result.stderr
        outs.append(out)
    figures = json.loads((outs[0] / "result.json").read_text())["figures"]
    assert figures, "the slide should have candidates"
    assert list(figures[0]["scores"]) == [
        "mitotic:densenet_tiny", "mitotic:efficientnet_tiny", "atypical:densenet_tiny", "atypical:efficientnet_tiny"
    ]  # the bundle's order
    for name in ("detections.geojson", "detections.csv", "midog.json", "overlay.png"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
