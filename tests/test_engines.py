"""Engine bundles, the Engine protocol, ONNX Runtime backend, fake engine, wrap and verify."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from edge.config import EnginesConfig
from edge.devtools.verify import compare_outputs, detections_agree, verify_bundle, verify_engines
from edge.engines import Engine, EngineSet, FakeEngine, TensorSpec, find_bundle, load_bundle, open_engines
from edge.engines.manifest import BUNDLES_ENV, Normalisation, sha256_file
from edge.engines.onnxrt import OnnxRuntimeEngine
from edge.engines.wrap import wrap_file, wrap_model
from edge.errors import BackendUnavailableError, EngineError, EngineInputError, ManifestError
from tests.tiny_bundle import NORMALISATION, float_classifier, float_detector, make_tiny_bundle, reference_classifier


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return make_tiny_bundle(tmp_path / "tiny")


def _problems(folder: Path) -> list[str]:
    with pytest.raises(ManifestError) as info:
        load_bundle(folder)
    return info.value.problems


def _edit(folder: Path, old: str, new: str, count: int = 1) -> None:
    manifest = folder / "manifest.toml"
    text = manifest.read_text()
    assert old in text, old
    manifest.write_text(text.replace(old, new, count))


# --- the bundle format ----------------------------------------------------------------------------


def test_a_consistent_bundle_loads_with_its_models_and_decisions(tiny: Path) -> None:
    bundle = load_bundle(tiny)
    assert bundle.name == "tiny"
    assert [m.name for m in bundle.models] == ["detector", "a", "b"]
    assert bundle.detector.input_spec.describe() == "tiles: uint8[B,32,32,3]"
    assert bundle.detector.output_format == "yolo_raw"
    assert bundle.classifiers[0].mitotic.output == "mitotic"
    assert [c.name for c in bundle.atypical_classifiers] == ["a", "b"]
    assert bundle.decision.atypical_above == 0.9 and bundle.decision.normal_below == 0.1
    assert bundle.decision.hotspot_area_mm2 == 2.0
    assert len(bundle.manifest_sha256) == 64


def test_every_problem_is_reported_at_once_naming_file_tensor_expected_and_found(tiny: Path) -> None:
    _edit(tiny, 'input = "crops"', 'input = "crop"')
    _edit(tiny, 'output = "raw"', 'output = "boxes_out"')
    _edit(tiny, "size = 16", "size = 24")
    with (tiny / "clf_b.onnx").open("ab") as f:
        f.write(b"tampered")
    problems = _problems(tiny)
    text = "\n".join(problems)
    assert "detector.onnx (detector): output 'boxes_out' not in the graph; outputs are raw: float32[B,512,6]" in text
    assert "clf_a.onnx (a): input name expected 'crop', found 'crops'" in text
    assert "clf_a.onnx (a): input crops height (axis 1) expected 24, found 16" in text
    assert re.search(r"clf_b.onnx \(b\): sha256 differs from the manifest's [0-9a-f]{64} .*sha256sum clf_b.onnx", text)
    assert len(re.findall(r"[0-9a-f]{64}", text)) == 1  # the hash found is not echoed (issue 12)
    assert "clf_b.onnx (b): not a readable ONNX model" in text
    assert len(problems) >= 5


def test_a_float_input_model_is_refused_with_the_wrap_command(tmp_path: Path) -> None:
    folder = make_tiny_bundle(tmp_path / "raw", wrap=False)
    text = "\n".join(_problems(folder))
    assert "input image dtype expected uint8 (NHWC RGB), found float32" in text
    assert "mitosis-edge engines wrap detector.onnx" in text and "--model detector" in text


def test_a_fixed_batch_dimension_is_named(tmp_path: Path) -> None:
    folder = make_tiny_bundle(tmp_path / "fixed")
    fixed = wrap_model(
        float_detector(32, fixed_batch=True),
        input_name="tiles",
        size=32,
        layout="NCHW",
        channel_order="RGB",
        normalisation=NORMALISATION,
    )
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    fixed.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1  # wrap made it dynamic: undo that
    onnx.save(fixed, str(folder / "detector.onnx"))
    old = load_bundle(folder, check_graphs=False).detector.sha256
    _edit(folder, old, sha256_file(folder / "detector.onnx"))
    text = "\n".join(_problems(folder))
    assert "input tiles batch dimension expected dynamic, found fixed 1" in text
    assert "output raw batch dimension expected dynamic, found fixed 1" in text


def test_the_detector_class_count_must_match_its_output(tiny: Path) -> None:
    _edit(tiny, 'classes = ["mitotic_figure"]', 'classes = ["mitotic_figure", "imposter"]')
    text = "\n".join(_problems(tiny))
    assert "output raw axis 2 expected 7 ([B, N, 5+C] with C=2 classes ['mitotic_figure', 'imposter']), found 6" in text


def test_a_yolov8_output_is_checked_as_b_4_plus_c_n(tiny: Path) -> None:
    _edit(tiny, 'output_format = "yolo_raw"', 'output_format = "yolov8"')
    assert any("axis 1 expected 5 ([B, 4+C, N]" in p for p in _problems(tiny))


def test_missing_fields_unknown_fields_and_bad_values_are_all_named(tiny: Path) -> None:
    _edit(tiny, 'version = "0.0.1"\n', "")
    _edit(tiny, "score_threshold = 0.3", "score_threshold = 1.5\nscore_treshold = 0.3")
    _edit(tiny, 'scores = "logits"', 'scores = "odds"')
    _edit(tiny, 'atypical_heads = ["a", "b"]', 'atypical_heads = ["a", "c"]\nnormal_below = 0.95')
    text = "\n".join(_problems(tiny))
    assert "[bundle] version is missing" in text
    assert "[detector] score_threshold=1.5 must be in [0.0, 1.0]" in text
    assert "[detector] unknown field(s): score_treshold" in text
    assert "[classifier a] scores='odds' must be one of probabilities, logits" in text
    assert "[decision] atypical_heads names 'c'" in text
    assert "[decision] normal_below=0.95 must not exceed atypical_above=0.9" in text


def test_a_classifier_may_have_only_an_atypical_head_and_then_never_votes_on_mf(tiny: Path) -> None:
    _edit(tiny, 'weight = 0.5\nmitotic_output = "mitotic"\natypical_output', "atypical_output")
    bundle = load_bundle(tiny)
    a = bundle.model("a")
    assert a.mitotic is None and a.weight == 0 and a.output_names == ("atypical",)  # type: ignore[attr-defined]
    assert [c.name for c in bundle.mitotic_voters] == ["b"] and [c.name for c in bundle.subtype_only] == ["a"]
    assert bundle.ensemble_roles()["mitotic_voters"] == {"b": 0.5}


def test_an_atypical_only_member_with_mf_weight_or_a_member_without_heads_is_refused(tiny: Path) -> None:
    _edit(tiny, 'mitotic_output = "mitotic"\natypical_output', "atypical_output")
    assert any("weight=0.5 but it has no mitotic_output" in p for p in _problems(tiny))
    _edit(tiny, 'atypical_output = "atypical"\nscores', "scores")
    assert any("[classifier a] has no head: set mitotic_output" in p for p in _problems(tiny))


def test_a_member_with_mf_weight_0_and_no_atypical_head_in_use_is_not_run(tiny: Path) -> None:
    _edit(tiny, "weight = 0.5", "weight = 0")
    _edit(tiny, 'atypical_heads = ["a", "b"]', 'atypical_heads = ["b"]')
    bundle = load_bundle(tiny)
    assert [c.name for c in bundle.unused_classifiers] == ["a"]
    assert bundle.ensemble_roles() == {"mitotic_voters": {"b": 0.5}, "subtypers": ["b"], "subtype_only": [],
                                       "not_run": ["a"]}


def test_a_head_with_several_columns_needs_an_index(tiny: Path) -> None:
    _edit(tiny, 'mitotic_output = "mitotic"', 'mitotic_output = "mitotic"\nmitotic_index = 3')
    assert any("mitotic_index=3 is outside the 1 columns of mitotic" in p for p in _problems(tiny))


def test_a_missing_file_a_missing_manifest_and_broken_toml_are_clear(tiny: Path, tmp_path: Path) -> None:
    (tiny / "clf_a.onnx").unlink()
    assert any("clf_a.onnx (a): file" in p and "does not exist" in p for p in _problems(tiny))
    with pytest.raises(ManifestError, match=r"no manifest\.toml there"):
        load_bundle(tmp_path / "nowhere")
    (tiny / "manifest.toml").write_text("[bundle\nname=")
    with pytest.raises(ManifestError, match="not valid TOML"):
        load_bundle(tiny)


def test_bundles_are_found_by_name_on_the_search_path(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BUNDLES_ENV, str(tiny.parent))
    assert find_bundle("tiny") == tiny
    assert load_bundle("tiny").name == "tiny"
    with pytest.raises(ManifestError, match="give a bundle folder or the name of an installed bundle"):
        find_bundle("no-such-bundle")


# --- wrap -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_wrap_moves_cast_normalisation_channel_order_and_transpose_into_the_graph(layout: str, order: str) -> None:
    import onnxruntime as ort

    norm = Normalisation(scale=1 / 255, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    wrapped = wrap_model(
        float_classifier(16, layout),
        input_name="crops",
        size=16,
        layout=layout,  # type: ignore[arg-type]
        channel_order=order,
        normalisation=norm,
    )  # type: ignore[arg-type]
    session = ort.InferenceSession(wrapped.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    assert session.get_inputs()[0].shape[1:] == [16, 16, 3]
    crops = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    mitotic, atypical = session.run(["mitotic", "atypical"], {"crops": crops})
    x = crops.astype(np.float64)
    if order == "BGR":
        x = x[..., ::-1]
    means = ((x / 255 - np.array(norm.mean)) / np.array(norm.std)).mean(axis=(1, 2))
    np.testing.assert_allclose(mitotic[:, 0], means[:, 0] - means[:, 2], atol=1e-5)
    np.testing.assert_allclose(atypical[:, 0], means[:, 1], atol=1e-5)


def test_wrap_refuses_a_model_that_already_takes_uint8_or_has_the_wrong_size(tiny: Path) -> None:
    wrapped = onnx.load(str(tiny / "clf_a.onnx"))
    with pytest.raises(ManifestError, match="not float32 or float16: already wrapped"):
        wrap_model(
            wrapped, input_name="crops", size=16, layout="NCHW", channel_order="RGB", normalisation=NORMALISATION
        )
    with pytest.raises(ManifestError, match="axis 2 is 16 px, the manifest says size=32"):
        wrap_model(
            float_classifier(16),
            input_name="crops",
            size=32,
            layout="NCHW",
            channel_order="RGB",
            normalisation=NORMALISATION,
        )
    with pytest.raises(ManifestError, match="has 16 channels on axis 3 for layout NHWC"):
        wrap_model(
            float_classifier(16),
            input_name="crops",
            size=16,
            layout="NHWC",
            channel_order="RGB",
            normalisation=NORMALISATION,
        )


def test_wrap_file_writes_the_manifest_path_and_returns_its_sha256(tmp_path: Path) -> None:
    folder = make_tiny_bundle(tmp_path / "b", wrap=False)
    bundle = load_bundle(folder, check_graphs=False)
    for model in bundle.models:
        shutil.copy(model.path, tmp_path / f"{model.name}-float.onnx")
        path, sha = wrap_file(tmp_path / f"{model.name}-float.onnx", model)
        assert path == model.path
        _edit(folder, model.sha256, sha)
    assert load_bundle(folder).name == "tiny"


# --- engines ----------------------------------------------------------------------------------------


def test_onnxruntime_engine_runs_uint8_batches_sync_and_async(tiny: Path) -> None:
    bundle = load_bundle(tiny)
    crops = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    with OnnxRuntimeEngine(bundle.classifiers[0].path, name="a", max_batch=8, intra_op_threads=1) as engine:
        assert isinstance(engine, Engine)
        assert engine.input_spec == TensorSpec("crops", "uint8", (None, 16, 16, 3))
        assert [o.name for o in engine.output_spec] == ["mitotic", "atypical"]
        expected = reference_classifier(crops)
        out = engine.infer(crops)
        pending = [engine.submit(crops[:2]), engine.submit(crops[2:])]
        joined = {k: np.concatenate([p.result()[k] for p in pending]) for k in expected}
        for name, value in expected.items():
            np.testing.assert_allclose(out[name], value, atol=1e-5)
            np.testing.assert_allclose(joined[name], value, atol=1e-5)


def test_an_engine_names_a_wrong_batch_and_refuses_work_once_closed(tiny: Path) -> None:
    engine = OnnxRuntimeEngine(load_bundle(tiny).classifiers[0].path, name="a", max_batch=4)
    with pytest.raises(EngineInputError, match="must be uint8, got float32"):
        engine.infer(np.zeros((1, 16, 16, 3), np.float32))
    with pytest.raises(EngineInputError, match=r"must have shape crops: uint8\[B,16,16,3\], got \(1, 16, 8, 3\)"):
        engine.infer(np.zeros((1, 16, 8, 3), np.uint8))
    with pytest.raises(EngineInputError, match=r"batch of 5 is outside 1\.\.max_batch=4"):
        engine.submit(np.zeros((5, 16, 16, 3), np.uint8))
    engine.close()
    engine.close()
    with pytest.raises(EngineError, match="is closed"):
        engine.infer(np.zeros((1, 16, 16, 3), np.uint8))


def test_the_cuda_provider_is_refused_clearly_when_onnxruntime_gpu_is_missing(tiny: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(BackendUnavailableError, match="install onnxruntime-gpu"):
        OnnxRuntimeEngine(load_bundle(tiny).detector.path, device="cuda")


def test_a_damaged_model_file_is_an_engine_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(EngineError, match="ONNX Runtime cannot load"):
        OnnxRuntimeEngine(bad)


def test_open_engines_opens_the_detector_and_every_classifier(tiny: Path) -> None:
    bundle = load_bundle(tiny)
    with open_engines(bundle, EnginesConfig(intra_op_threads=1, classifier_batch=16), detector_batch=12) as engines:
        assert engines.backend == "onnxruntime"
        assert engines.detector.max_batch == 12
        assert sorted(engines.classifiers) == ["a", "b"]
        assert all(e.max_batch == 64 for e in engines.classifiers.values())
        out = engines.detector.infer(np.zeros((2, 32, 32, 3), np.uint8))
        assert out["raw"].shape == (2, 512, 6)


def test_the_fake_engine_checks_batches_counts_them_and_can_fail_on_request() -> None:
    spec = TensorSpec("tiles", "uint8", (None, 8, 8, 3))
    engine = FakeEngine(spec, (TensorSpec("raw", "float32", (None, 4, 6)),), max_batch=2, fail_after=2)
    assert isinstance(engine, Engine)
    assert engine.infer(np.zeros((2, 8, 8, 3), np.uint8))["raw"].shape == (2, 4, 6)
    assert engine.submit(np.zeros((1, 8, 8, 3), np.uint8)).result()["raw"].shape == (1, 4, 6)
    failing = engine.submit(np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(EngineError, match="simulated failure on batch 3"):
        failing.result()
    with pytest.raises(EngineInputError):
        engine.submit(np.zeros((3, 8, 8, 3), np.uint8))
    assert (engine.batches_seen, engine.items_seen) == (3, 4)


# --- verify -------------------------------------------------------------------------------------------


def test_compare_outputs_reports_max_errors_and_the_excess_over_tolerance() -> None:
    ref = np.array([[1.0, -2.0, 0.0]])
    assert compare_outputs(ref, ref, 1e-3, 1e-3)[:2] == (0.0, 0.0)
    abs_err, rel_err, excess = compare_outputs(ref, ref + np.array([[0.0, 0.1, 0.0]]), 1e-3, 1e-3)
    assert abs_err == pytest.approx(0.1) and rel_err == pytest.approx(0.05) and excess > 0
    assert compare_outputs(ref, ref[:, :2], 1, 1)[0] == float("inf")


def test_detection_agreement_counts_rows_above_the_threshold_in_both(tiny: Path) -> None:
    spec = load_bundle(tiny).detector
    ref = np.zeros((1, 3, 6), np.float32)
    ref[0, :, 4] = [0.9, 0.9, 0.1]
    ref[0, :, 5] = 1.0
    got = ref.copy()
    got[0, 1, 4] = 0.2
    report = detections_agree(ref, got, spec, "random")
    assert (report.reference, report.candidate, report.agreed) == (2, 1, 1)
    assert report.agreement == 0.5


def _noisy(engines: EngineSet, noise: float) -> EngineSet:
    def wrap(engine: Engine) -> Engine:
        def fn(batch: np.ndarray) -> dict[str, np.ndarray]:
            return {k: v + noise for k, v in engine.infer(batch).items()}

        return FakeEngine(engine.input_spec, engine.output_spec, fn, name=engine.name, max_batch=engine.max_batch)

    return EngineSet(
        engines.bundle, wrap(engines.detector), {k: wrap(v) for k, v in engines.classifiers.items()}, backend="noisy"
    )


def test_verify_passes_identical_backends_and_fails_above_tolerance(tiny: Path) -> None:
    bundle = load_bundle(tiny)
    with open_engines(bundle) as reference, open_engines(bundle) as candidate:
        same = verify_bundle(bundle, reference, candidate, slide_tiles=0)
        assert same.passed
        assert {(o.model, o.output) for o in same.outputs} >= {("detector", "raw"), ("a", "mitotic"), ("b", "atypical")}
        close = verify_engines(
            reference, _noisy(candidate, 1e-4), {"random": {"a": [np.full((2, 16, 16, 3), 7, np.uint8)]}}
        )
        assert close.passed
        far = verify_engines(
            reference, _noisy(candidate, 0.05), {"random": {"a": [np.full((2, 16, 16, 3), 7, np.uint8)]}}
        )
        assert not far.passed
        assert far.outputs[0].max_abs_error == pytest.approx(0.05, rel=1e-3)
        assert far.to_json_dict()["passed"] is False


def test_model_files_outside_the_bundle_folder_are_refused_without_being_read(tiny: Path, tmp_path: Path) -> None:
    secret = tmp_path / "tokens"
    secret.write_text("0123456789abcdef0123 admin root\n")
    _edit(tiny, 'file = "clf_a.onnx"', f'file = "{secret}"')
    _edit(tiny, 'file = "clf_b.onnx"', 'file = "../tokens"')
    text = "\n".join(_problems(tiny))
    assert "points outside the bundle folder" in text and text.count("points outside") == 2
    assert hashlib.sha256(secret.read_bytes()).hexdigest() not in text


def test_a_model_file_larger_than_onnx_allows_is_refused_before_it_is_read(tiny: Path) -> None:
    with (tiny / "clf_a.onnx").open("r+b") as fh:
        fh.truncate(3 << 30)  # sparse: 3 GiB on paper, nothing on disk
    text = "\n".join(_problems(tiny))
    assert "clf_a.onnx (a): 3.0 GiB, more than an ONNX file can hold (2 GiB); not read" in text


def test_engines_import_only_the_base_layer() -> None:
    """edge.engines sits beside edge.wsi over the base: config, errors, vocab, fileio (and the package version)."""
    import ast

    allowed = ("edge.engines", "edge.config", "edge.errors", "edge.vocab", "edge.fileio")
    folder = Path(__file__).resolve().parents[1] / "edge" / "engines"
    found = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "edge":
                names = [node.module] if node.module != "edge" else [f"edge.{a.name}" for a in node.names]
                found |= {(path.name, n) for n in names}
            elif isinstance(node, ast.Import):
                found |= {(path.name, a.name) for a in node.names if a.name.split(".")[0] == "edge"}
    above = sorted((f, n) for f, n in found if not n.startswith(allowed) and n != "edge.__version__")
    assert above == [], above
    assert not any(n.startswith("edge.engines.build") for f, n in found if f in ("__init__.py", "tensorrt.py"))
