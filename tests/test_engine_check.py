"""`engines check` with a probe run, `engines wrap` on a real Ultralytics export, and finding bundles:
mistakes that used to show only when a slide ran are caught with the fix in the message."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edge.engines import load_bundle
from edge.engines.manifest import BUNDLES_ENV, find_bundle, sha256_file
from edge.engines.onnxrt import OnnxRuntimeEngine
from edge.errors import ManifestError
from tests.conftest import data_file
from tests.test_cli import run_cli
from tests.tiny_bundle import float_detector, make_tiny_bundle

ULTRALYTICS = "models/ultralytics-yolov8n-nc2-random.onnx"
SIZE = 256  # the export is dynamic in height and width: 1344 anchors at 256 px (21504 at 1024) keep tests quick
ANCHORS = (SIZE // 8) ** 2 + (SIZE // 16) ** 2 + (SIZE // 32) ** 2

ULTRALYTICS_DETECTOR = f"""[detector]
file = "detector.onnx"
sha256 = ""
input = "tiles"
size = {SIZE}
mpp = 0.25
layout = "NCHW"
normalisation = {{ scale = 0.00392156862745098, mean = [0.0, 0.0, 0.0], std = [1.0, 1.0, 1.0] }}
output = "output0"
output_format = "yolov8"
classes = ["mitotic_figure", "imposter"]
candidate_classes = ["mitotic_figure"]
scores = "probabilities"
score_threshold = 0.25

"""


def _with_detector(folder: Path, table: str) -> None:
    manifest = folder / "manifest.toml"
    text = manifest.read_text()
    start, end = text.index("[detector]"), text.index("[[classifier]]")
    manifest.write_text(text[:start] + table + text[end:])


def _edit(folder: Path, old: str, new: str) -> None:
    manifest = folder / "manifest.toml"
    assert old in manifest.read_text(), old
    manifest.write_text(manifest.read_text().replace(old, new, 1))


@pytest.fixture(scope="module")
def wrapped_ultralytics(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle with the Ultralytics export as its detector, wrapped by `engines wrap` as a user does."""
    folder = make_tiny_bundle(tmp_path_factory.mktemp("u") / "yolo")
    (folder / "detector.onnx").unlink()
    _with_detector(folder, ULTRALYTICS_DETECTOR)
    result = run_cli("engines", "wrap", str(data_file(ULTRALYTICS)), "--bundle", str(folder), "--model", "detector")
    assert result.returncode == 0, result.stderr
    assert f'sha256 = "{sha256_file(folder / "detector.onnx")}"   # written to [detector]' in result.stdout
    return folder


@pytest.fixture
def yolo(wrapped_ultralytics: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(wrapped_ultralytics, tmp_path / "yolo"))


def test_the_ultralytics_export_wraps_checks_and_decodes(yolo: Path) -> None:
    result = run_cli("engines", "check", "--bundle", str(yolo), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["probe"]["shapes"]["detector"] == {"output0": [2, 6, ANCHORS]}
    assert report["probe"]["problems"] == [] and report["probe"]["warnings"] == []
    bundle = load_bundle(yolo)  # wrap wrote the sha256 itself
    from edge.analysis.detect import decode
    from edge.engines.check import synthetic_image

    with OnnxRuntimeEngine(bundle.detector.path, max_batch=2) as engine:
        out = engine.infer(np.stack([synthetic_image(SIZE)] * 2))["output0"]
    spec = dataclasses.replace(bundle.detector, score_threshold=0.0)  # random weights: every score is below 0.01
    boxes = decode(out[0], spec)
    assert len(boxes) == ANCHORS  # one candidate per anchor, centred on the stride-8 grid first
    assert np.allclose(boxes.cx[:3], [4, 12, 20], atol=1e-3) and np.allclose(boxes.cy[:3], 4, atol=1e-3)
    assert np.all((boxes.score >= 0) & (boxes.score <= 1)) and np.all(boxes.label == 0)
    assert np.all((boxes.cx >= 0) & (boxes.cx <= SIZE) & (boxes.cy >= 0) & (boxes.cy <= SIZE))


def test_the_probe_names_the_right_output_format(yolo: Path) -> None:
    _edit(yolo, 'output_format = "yolov8"', 'output_format = "yolo_raw"')
    result = run_cli("engines", "check", "--bundle", str(yolo))
    assert result.returncode == 1
    assert f"output output0 is [2, 6, {ANCHORS}] for a probe batch of 2" in result.stderr
    assert f'this output looks like yolov8 ({ANCHORS} anchors): set output_format = "yolov8"' in result.stderr


def test_the_probe_warns_when_logits_are_already_probabilities(yolo: Path) -> None:
    _edit(yolo, 'scores = "probabilities"\nscore_threshold', 'scores = "logits"\nscore_threshold')
    result = run_cli("engines", "check", "--bundle", str(yolo))
    assert result.returncode == 0, result.stderr
    assert 'warning: detector.onnx (detector) output output0: scores = "logits" but every probe score lies in [0, 1]'\
        in result.stdout
    assert 'needs scores = "probabilities"' in result.stdout


def test_the_probe_refuses_probabilities_that_are_logits(tmp_path: Path) -> None:
    folder = make_tiny_bundle(tmp_path / "tiny")
    _edit(folder, 'scores = "logits"', 'scores = "probabilities"')  # classifier a's heads give values below 0
    result = run_cli("engines", "check", "--bundle", str(folder))
    assert result.returncode == 1
    assert 'clf_a.onnx (a) atypical head atypical: scores = "probabilities" but probe scores lie outside [0, 1]'\
        in result.stderr
    assert 'set scores = "logits"' in result.stderr


def test_check_says_which_members_vote_subtype_or_are_not_run(tmp_path: Path) -> None:
    folder = make_tiny_bundle(tmp_path / "tiny")
    _edit(folder, "weight = 0.5", "weight = 0")
    _edit(folder, 'atypical_heads = ["a", "b"]', 'atypical_heads = ["b"]')
    result = run_cli("engines", "check", "--bundle", str(folder))
    assert result.returncode == 0, result.stderr
    assert "note: classifier a is not run: its MF weight is 0 and it has no atypical head in use" in result.stdout
    assert "MF voter (weight 0.5), subtyper" in result.stdout


def test_wrap_makes_a_fixed_batch_dynamic(tmp_path: Path) -> None:
    folder = make_tiny_bundle(tmp_path / "yolo")
    _with_detector(folder, ULTRALYTICS_DETECTOR)
    fixed = onnx.load(str(data_file(ULTRALYTICS)))
    for value in (fixed.graph.input[0], fixed.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 1  # as exported without dynamic=True
    source = tmp_path / "fixed.onnx"
    onnx.save(fixed, str(source))
    result = run_cli("engines", "wrap", str(source), "--bundle", str(folder), "--model", "detector")
    assert result.returncode == 0, result.stderr
    check = run_cli("engines", "check", "--bundle", str(folder), "--json")
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["probe"]["shapes"]["detector"] == {"output0": [2, 6, ANCHORS]}


def test_wrap_refuses_a_batch_fixed_inside_the_graph_with_the_export_flag(tmp_path: Path) -> None:
    folder = make_tiny_bundle(tmp_path / "tiny")
    model = float_detector(32, fixed_batch=True)
    shape = next(t for t in model.graph.initializer if t.name == "shape")
    shape.CopyFrom(numpy_helper.from_array(np.array([1, 32 * 32 * 3 // 6, 6], np.int64), "shape"))
    source = tmp_path / "fixed.onnx"
    onnx.save(model, str(source))
    before = (folder / "manifest.toml").read_text()
    result = run_cli("engines", "wrap", str(source), "--bundle", str(folder), "--model", "detector")
    assert result.returncode == 1
    assert "exported with a fixed batch of 1" in result.stderr
    assert "dynamic=True" in result.stderr and "dynamic_axes" in result.stderr
    assert (folder / "manifest.toml").read_text() == before


def test_an_empty_sha256_says_how_to_compute_it(tmp_path: Path) -> None:
    folder = make_tiny_bundle(tmp_path / "tiny")
    sha = sha256_file(folder / "clf_a.onnx")
    _edit(folder, f'sha256 = "{sha}"', 'sha256 = ""')
    with pytest.raises(ManifestError) as info:
        load_bundle(folder)
    text = "\n".join(info.value.problems)
    assert f"sha256 is empty; run sha256sum {folder.resolve() / 'clf_a.onnx'}" in text
    assert "expected ," not in text
    assert sha not in text  # never a hash of a file the reader of the message may not be able to read (issue 12)


def test_bundle_not_found_names_the_variable_and_the_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BUNDLES_ENV, str(tmp_path))
    with pytest.raises(ManifestError) as info:
        find_bundle("mine")
    text = str(info.value)
    assert "bundle not found" in text and f"${BUNDLES_ENV} is '{tmp_path}'" in text and str(tmp_path) in text


def test_two_different_bundles_with_one_name_and_version_are_an_error_in_list(tmp_path: Path) -> None:
    one = make_tiny_bundle(tmp_path / "bundles" / "tiny")
    two = Path(shutil.copytree(one, tmp_path / "bundles" / "tiny-copy"))
    _edit(two, "weight = 0.5", "weight = 0.7")
    result = run_cli("engines", "list", env={BUNDLES_ENV: str(tmp_path / "bundles")})
    assert result.returncode == 1
    assert f"bundle tiny 0.0.1 is defined twice, differently: {one.resolve()}, {two.resolve()}" in result.stdout
