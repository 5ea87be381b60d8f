"""Tiny engine bundles built in a test's tmp folder: real ONNX graphs, seconds to make, no training.

The detector maps a uint8 tile to a YOLO-style ``[B, N, 6]`` tensor, the classifiers map a crop to
two ``[B, 1]`` heads; the numbers are arithmetic on the pixels, so every backend must agree on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge.engines.manifest import Normalisation, sha256_file
from edge.engines.wrap import wrap_model

OPSET = 18


def float_detector(size: int = 32, layout: str = "NCHW", fixed_batch: bool = False) -> onnx.ModelProto:
    """Float input → ``[B, size*size*3/6, 6]``: the normalised pixels regrouped in rows of 6, sigmoid."""
    batch: Any = 1 if fixed_batch else "batch"
    shape = [batch, 3, size, size] if layout == "NCHW" else [batch, size, size, 3]
    rows = size * size * 3 // 6
    nodes = [
        helper.make_node("Reshape", ["image", "shape"], ["rows"]),
        helper.make_node("Sigmoid", ["rows"], ["raw"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_detector",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("raw", TensorProto.FLOAT, [batch, rows, 6])],
        [numpy_helper.from_array(np.array([-1, rows, 6], np.int64), "shape")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def float_classifier(size: int = 16, layout: str = "NCHW") -> onnx.ModelProto:
    """Float input → ``mitotic`` = mean of channel 0 − mean of channel 2, ``atypical`` = mean of channel 1."""
    axes = [2, 3] if layout == "NCHW" else [1, 2]
    shape = ["batch", 3, size, size] if layout == "NCHW" else ["batch", size, size, 3]
    nodes = [
        helper.make_node("ReduceMean", ["crop", "axes"], ["means"], keepdims=0),
        helper.make_node("Gather", ["means", "i0"], ["c0"], axis=1),
        helper.make_node("Gather", ["means", "i1"], ["atypical"], axis=1),
        helper.make_node("Gather", ["means", "i2"], ["c2"], axis=1),
        helper.make_node("Sub", ["c0", "c2"], ["mitotic"]),
    ]
    inits = [numpy_helper.from_array(np.array(axes, np.int64), "axes")] + [
        numpy_helper.from_array(np.array([i], np.int64), f"i{i}") for i in range(3)
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_classifier",
        [helper.make_tensor_value_info("crop", TensorProto.FLOAT, shape)],
        [
            helper.make_tensor_value_info("mitotic", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("atypical", TensorProto.FLOAT, ["batch", 1]),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


NORMALISATION = Normalisation(scale=1 / 255, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _norm_toml(n: Normalisation) -> str:
    return f"{{ scale = {n.scale!r}, mean = {list(n.mean)}, std = {list(n.std)} }}"


def make_tiny_bundle(
    folder: Path,
    *,
    detector_size: int = 32,
    crop_size: int = 16,
    wrap: bool = True,
    extra_detector: str = "",
    extra_classifier: str = "",
    extra_decision: str = "",
) -> Path:
    """Write a two-classifier bundle into ``folder`` and return the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    models = {
        "detector.onnx": (float_detector(detector_size), "tiles", detector_size),
        "clf_a.onnx": (float_classifier(crop_size), "crops", crop_size),
        "clf_b.onnx": (float_classifier(crop_size, layout="NHWC"), "crops", crop_size),
    }
    layouts = {"detector.onnx": "NCHW", "clf_a.onnx": "NCHW", "clf_b.onnx": "NHWC"}
    for file, (float_model, input_name, size) in models.items():
        model = float_model
        if wrap:
            model = wrap_model(
                float_model,
                input_name=input_name,
                size=size,
                layout=layouts[file],  # type: ignore[arg-type]
                channel_order="RGB",
                normalisation=NORMALISATION,
            )
        onnx.save(model, str(folder / file))
    sha = {f: sha256_file(folder / f) for f in models}
    norm = _norm_toml(NORMALISATION)
    (folder / "manifest.toml").write_text(
        f"""
[bundle]
name = "tiny"
version = "0.0.1"
intended_use = "tests only"

[detector]
file = "detector.onnx"
sha256 = "{sha["detector.onnx"]}"
input = "tiles"
size = {detector_size}
mpp = 0.25
layout = "NCHW"
normalisation = {norm}
output = "raw"
output_format = "yolo_raw"
classes = ["mitotic_figure"]
score_threshold = 0.3
{extra_detector}

[[classifier]]
name = "a"
file = "clf_a.onnx"
sha256 = "{sha["clf_a.onnx"]}"
input = "crops"
size = {crop_size}
mpp = 0.25
layout = "NCHW"
normalisation = {norm}
weight = 0.5
mitotic_output = "mitotic"
atypical_output = "atypical"
scores = "logits"
{extra_classifier}

[[classifier]]
name = "b"
file = "clf_b.onnx"
sha256 = "{sha["clf_b.onnx"]}"
input = "crops"
size = {crop_size}
mpp = 0.25
layout = "NHWC"
normalisation = {norm}
weight = 0.5
mitotic_output = "mitotic"
atypical_output = "atypical"
scores = "logits"

[decision]
mitotic_threshold = 0.5
atypical_heads = ["a", "b"]
{extra_decision}
""",
        encoding="utf-8",
    )
    return folder


def reference_classifier(crops: np.ndarray) -> dict[str, np.ndarray]:
    """What the tiny classifiers compute, in numpy, for checking backends."""
    x = (crops.astype(np.float64) * NORMALISATION.scale - 0.5) / 0.25
    means = x.mean(axis=(1, 2))
    return {"mitotic": (means[:, 0] - means[:, 2])[:, None], "atypical": means[:, 1:2]}
