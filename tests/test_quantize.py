"""`engines quantize` and `engines verify --reference`: an INT8 copy of a bundle that loads, runs int8 kernels
and finds the same figures as its FP32 source."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.devtools import quantize
from edge.devtools.quantize import (
    dequantize_preprocessing,
    fold_preprocessing,
    quantize_model,
    space_to_depth_convs,
    space_to_depth_first_conv,
)
from edge.engines import load_bundle
from edge.engines.manifest import Normalisation
from edge.engines.wrap import wrap_model
from edge.errors import ConfigError
from tests.conftest import SynthFactory
from tests.test_cli import run_cli
from tests.tiny_bundle import make_tiny_bundle

IMAGENET = Normalisation(scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def conv_model(size: int = 16, stride: int = 1, channels: int = 3) -> onnx.ModelProto:
    """Float NCHW [B,channels,size,size] -> a padded 3x3 conv (4 channels) -> ReLU -> global mean: ``[B, 4]``."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (4, channels, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.5, (4,)).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1], strides=[stride, stride], name="conv"),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["out"], name="flatten"),
    ]
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", channels, size, size])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray, output: str | None = None) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run([output] if output else None, {"crops": x})[0])


def spec_for(folder: Path, name: str = "a") -> object:
    return load_bundle(folder).model(name)


def wrapped_conv(tmp_path: Path, order: str = "RGB", stride: int = 1) -> tuple[Any, onnx.ModelProto]:
    """A classifier spec with ImageNet normalisation and ``conv_model`` wrapped to match it."""
    spec = dataclasses.replace(spec_for(make_tiny_bundle(tmp_path / "t", crop_size=16)),  # type: ignore[type-var]
                               normalisation=IMAGENET, channel_order=order)
    wrapped = wrap_model(conv_model(stride=stride), input_name="crops", size=16, layout="NCHW",  # type: ignore[arg-type]
                         channel_order=order, normalisation=IMAGENET)
    return spec, wrapped


@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_folding_the_normalisation_into_the_first_conv_keeps_its_interior_exact(order: str, tmp_path: Path) -> None:
    spec, wrapped = wrapped_conv(tmp_path, order)
    wrapped.graph.output.append(helper.make_tensor_value_info("conv", TensorProto.FLOAT, ["batch", 4, 16, 16]))
    folded = fold_preprocessing(wrapped, spec)  # type: ignore[arg-type]
    assert folded is not None
    assert not {n.name for n in folded.graph.node} & {"mitosis_edge_wrap_Mul", "mitosis_edge_wrap_Add"}
    x = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    exact, got = run(wrapped, x, "conv"), run(folded, x, "conv")
    np.testing.assert_allclose(got[:, :, 1:-1, 1:-1], exact[:, :, 1:-1, 1:-1], rtol=1e-4, atol=1e-4)


def test_a_model_whose_pixels_feed_no_conv_keeps_its_preprocessing_as_one_dequantize(tmp_path: Path) -> None:
    folder = make_tiny_bundle(tmp_path / "t")
    spec = spec_for(folder)
    wrapped = onnx.load(str(folder / "clf_a.onnx"))
    assert fold_preprocessing(wrapped, spec) is None  # type: ignore[arg-type]  # the pixels feed ReduceMean
    dq = dequantize_preprocessing(wrapped, spec)  # type: ignore[arg-type]
    assert [n.op_type for n in dq.graph.node][:2] == ["Transpose", "DequantizeLinear"]
    x = np.random.default_rng(2).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    # the mean becomes a whole grey level: at most half a level, 0.5 / 255 / 0.25 in normalised units
    np.testing.assert_allclose(run(dq, x, "atypical"), run(wrapped, x, "atypical"), atol=0.5 / 255 / 0.25 + 1e-6)


def test_a_quantized_conv_reads_uint8_pixels_and_stays_close(tmp_path: Path) -> None:
    spec, wrapped = wrapped_conv(tmp_path)
    x = np.random.default_rng(3).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    quantized = quantize_model(wrapped, spec, x, tmp_path)  # type: ignore[arg-type]
    ops = [n.op_type for n in quantized.graph.node]
    assert "Cast" not in ops and ops.count("QuantizeLinear") >= 1
    dequantized = {n.input[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    assert "mitosis_edge_wrap_nchw" in dequantized  # the convolution's input is the uint8 pixels themselves
    folded = fold_preprocessing(wrapped, spec)  # type: ignore[arg-type]  # the same padding as the INT8 model
    assert folded is not None
    exact, got = run(folded, x), run(quantized, x)
    assert np.abs(got - exact).max() < 0.03 * np.abs(exact).max()


def run_x(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["conv"], {"x": x})[0])


def with_conv_output(model: onnx.ModelProto, shape: list[Any]) -> onnx.ModelProto:
    model.graph.output.append(helper.make_tensor_value_info("conv", TensorProto.FLOAT, shape))
    return model


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_a_stride2_first_conv_becomes_space_to_depth_and_a_2x2_conv_with_the_same_output(channels: int) -> None:
    model = with_conv_output(conv_model(stride=2, channels=channels), ["batch", 4, 8, 8])
    rewritten, names = space_to_depth_first_conv(model, 16)
    assert names == ["conv"] and space_to_depth_convs(rewritten) == ["conv"]
    conv = next(n for n in rewritten.graph.node if n.op_type == "Conv")
    attrs = {a.name: list(helper.get_attribute_value(a)) for a in conv.attribute if a.name != "group"}
    assert attrs == {"kernel_shape": [2, 2], "strides": [1, 1], "pads": [1, 1, 0, 0]}
    weight = next(t for t in rewritten.graph.initializer if t.name == conv.input[1])
    assert list(weight.dims) == [4, 4 * channels, 2, 2]
    x = np.random.default_rng(6).normal(0, 1, (2, channels, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(run_x(rewritten, x), run_x(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("why", "model", "size"), [
    ("stride 1", conv_model(stride=1), 16),
    ("odd size", conv_model(size=15, stride=2), 15),
    ("8 channels", conv_model(stride=2, channels=8), 16),
])
def test_a_conv_that_does_not_qualify_is_left_as_it_is(why: str, model: onnx.ModelProto, size: int) -> None:
    rewritten, names = space_to_depth_first_conv(model, size)
    assert names == [] and rewritten is model, why


@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_the_int8_first_conv_rewrite_keeps_the_int8_sums_exactly(
    order: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, wrapped = wrapped_conv(tmp_path, order, stride=2)
    x = np.random.default_rng(7).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    rewritten = quantize_model(wrapped, spec, x, tmp_path)  # type: ignore[arg-type]
    assert space_to_depth_convs(rewritten) == ["conv"]
    nodes = {n.output[0]: n for n in rewritten.graph.node}
    s2d = next(n for n in rewritten.graph.node if n.name.endswith("SpaceToDepth"))
    source = nodes[s2d.input[0]]
    if order == "RGB":
        # the uint8 NHWC pixels are rearranged before the layout transpose (one copy; ONNX Runtime runs the
        # int8 conv in NHWC and drops the layout transpose), and the image's own layout transpose is gone
        assert (s2d.op_type, source.op_type, source.input[0]) == ("Transpose", "Reshape", spec.input_name)
        assert not [n for n in rewritten.graph.node if n.op_type == "Transpose" and spec.input_name in n.input]
    else:  # the channel reverse sits between: SpaceToDepth on the reversed uint8 NCHW pixels
        assert (s2d.op_type, source.op_type) == ("SpaceToDepth", "Slice")
    monkeypatch.setattr(quantize, "space_to_depth_first_conv", lambda model, size: (model, []))
    plain = quantize_model(wrapped, spec, x, tmp_path)  # type: ignore[arg-type]
    assert space_to_depth_convs(plain) == []
    np.testing.assert_array_equal(run(rewritten, x), run(plain, x))


def test_a_rewrite_that_would_change_the_outputs_is_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    spec, wrapped = wrapped_conv(tmp_path, stride=2)
    x = np.random.default_rng(9).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    wrong = lambda w: np.zeros((w.shape[0], 4 * w.shape[1], 2, 2), w.dtype)  # noqa: E731 - a broken remap
    monkeypatch.setattr(quantize, "space_to_depth_kernel", wrong)
    quantized = quantize_model(wrapped, spec, x, tmp_path)  # type: ignore[arg-type]
    assert space_to_depth_convs(quantized) == []
    assert "first conv left as the quantizer wrote it (space-to-depth rewrite: output out changed" in caplog.text


@pytest.mark.parametrize("rewrite_faster", [True, False])
def test_quantize_keeps_the_first_conv_rewrite_only_where_it_measures_faster(
    rewrite_faster: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    demo = load_bundle(Path(__file__).resolve().parents[1] / "engines" / "demo")
    rng = np.random.default_rng(10)
    inputs = {m.name: rng.integers(0, 256, (2 if m.role == "detector" else 8, m.size, m.size, 3), dtype=np.uint8)
              for m in demo.models}

    def timed(model: Any, candidates: list[Any], batch: np.ndarray) -> list[float]:
        assert len(candidates) == 2 and space_to_depth_convs(candidates[1])  # without, then with the rewrite
        return [1.0, *([2.0, 3.0] if rewrite_faster else [3.0, 2.0])]

    monkeypatch.setattr(quantize, "int8_speed", timed)
    out = quantize.quantize_bundle(demo, quantize.CalibrationSet(inputs, ("random",)), tmp_path / "q")
    report = json.loads((tmp_path / "q" / "quantization.json").read_text())
    for m in out.models:
        assert bool(space_to_depth_convs(onnx.load(str(m.path)))) == rewrite_faster, m.name
        entry = report["models"][m.name]
        assert bool(entry["space_to_depth_convs"]) == rewrite_faster and entry["int8_items_per_s"] == 3.0
        assert (entry["space_to_depth_items_per_s"], entry["without_space_to_depth_items_per_s"]) == (
            (3.0, 2.0) if rewrite_faster else (2.0, 3.0))


def test_the_tensorrt_target_keeps_the_first_conv_as_the_quantizer_wrote_it(tmp_path: Path) -> None:
    spec, wrapped = wrapped_conv(tmp_path, stride=2)
    x = np.random.default_rng(8).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    quantized = quantize_model(wrapped, spec, x, tmp_path, "tensorrt")  # type: ignore[arg-type]
    assert space_to_depth_convs(quantized) == []


def test_quantize_refuses_without_calibration_inputs(tmp_path: Path) -> None:
    folder = make_tiny_bundle(tmp_path / "t")
    spec = spec_for(folder)
    with pytest.raises(ConfigError, match="no calibration inputs"):
        quantize_model(onnx.load(str(folder / "clf_a.onnx")), spec, np.empty((0, 16, 16, 3), np.uint8), tmp_path)  # type: ignore[arg-type]


def test_quantize_the_demo_bundle_then_verify_it_against_fp32(synth_slide: SynthFactory, tmp_path: Path) -> None:
    calibration = synth_slide(width=4096, height=4096, seed=5101, mitoses=12, imposters=12)
    unseen = synth_slide(width=4096, height=4096, seed=5102, mitoses=12, imposters=12)
    out = tmp_path / "demo-int8"
    result = run_cli("engines", "quantize", "--bundle", "demo", "--calibration-slide", str(calibration),
                     "--out", str(out), "--tiles", "8", "--crops", "64")
    assert result.returncode == 0, result.stderr
    assert "INT8 QDQ" in result.stdout
    assert "  detector: INT8" in result.stdout and "/s here)" in result.stdout  # each model's outcome and speed
    bundle = load_bundle(out)
    assert "+int8." in bundle.version and bundle.name == "demo"
    report = json.loads((out / "quantization.json").read_text())
    assert bundle.detector.path.name == "detector.int8.onnx"  # the demo detector is faster in INT8
    for m in bundle.models:  # a model INT8 would slow down here stays FP32, and the report says so
        assert m.path.name.endswith(".int8.onnx") != report["models"][m.name]["kept_fp32"]
    ops = {n.op_type for n in onnx.load(str(bundle.detector.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert report["source_bundle"]["name"] == "demo" and report["calibration_slides"] == [str(calibration)]
    assert report["models"]["detector"]["calibration_inputs"] == 8
    assert report["method"]["space_to_depth_first_conv"]  # the demo detector's 3x3 stride-2 first conv
    detector = report["models"]["detector"]  # both timed; the faster kept, and the file is what the report says
    faster = detector["space_to_depth_items_per_s"] > detector["without_space_to_depth_items_per_s"]
    assert detector["int8_items_per_s"] == max(detector["space_to_depth_items_per_s"],
                                               detector["without_space_to_depth_items_per_s"])
    assert detector["space_to_depth_convs"] == (["/body/body.0/body.0.0/Conv"] if faster else [])
    assert bool(space_to_depth_convs(onnx.load(str(bundle.detector.path)))) == faster
    assert run_cli("engines", "check", "--bundle", str(out)).returncode == 0
    verify = run_cli("engines", "verify", "--bundle", str(out), "--reference", "demo", "--slide", str(unseen),
                     "--tiles", "2", "--random", "1", "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    found = json.loads(verify.stdout)
    assert found["passed"] and not found["outputs_judged"]
    assert found["f1"]["f1_change"] >= -0.01 and found["f1"]["reference_f1"] >= 0.9  # a loss fails, a gain not
    assert all(d["agreement"] >= 0.9 for d in found["detections"])
    again = run_cli("engines", "quantize", "--bundle", "demo", "--calibration-slide", str(calibration),
                    "--out", str(out))
    assert again.returncode != 0 and "not empty" in again.stderr


def test_the_tensorrt_target_quantizes_symmetric_int8_and_keeps_float_preprocessing(tmp_path: Path) -> None:
    spec, wrapped = wrapped_conv(tmp_path)
    x = np.random.default_rng(4).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    quantized = quantize_model(wrapped, spec, x, tmp_path, "tensorrt")  # type: ignore[arg-type]
    inits = {t.name: t for t in quantized.graph.initializer}
    zero_points = [inits[n.input[2]] for n in quantized.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.data_type == TensorProto.INT8 and not numpy_helper.to_array(z).any()
                               for z in zero_points)
    assert {"Cast", "Mul", "Add"} <= {n.op_type for n in quantized.graph.node}
    assert np.abs(run(quantized, x) - run(wrapped, x)).max() < 0.05 * np.abs(run(wrapped, x)).max()


def test_quantize_times_int8_against_fp32_with_the_engines_own_session_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ONNX Runtime's default sessions keep their threads spinning after a run, which slowed whichever session
    # was timed next (FP32 read 49 tiles/s instead of 100 on an idle machine) and chose the wrong first conv
    from edge.engines import onnxrt

    made: list[object] = []
    real = onnxrt.new_session

    def recording(path: object, **kwargs: object) -> object:
        made.append(path)
        return real(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(onnxrt, "new_session", recording)
    demo = load_bundle(Path(__file__).resolve().parents[1] / "engines" / "demo")
    spec = demo.classifiers[0]
    x = np.random.default_rng(11).integers(0, 256, (4, spec.size, spec.size, 3), dtype=np.uint8)
    speeds = quantize.int8_speed(spec, [onnx.load(str(spec.path))], x, repeats=1)
    assert len(speeds) == 2 and all(s > 0 for s in speeds)
    assert made[0] == spec.path and isinstance(made[1], bytes)
