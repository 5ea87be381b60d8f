"""Static INT8 quantization of a bundle in QDQ form, calibrated on tiles and crops of the lab's own slides.

ONNX Runtime's quantization tools (``onnxruntime.quantization.quantize_static``) insert
QuantizeLinear/DequantizeLinear pairs around each Conv/MatMul/Gemm, with activation ranges measured
on calibration inputs: tiles read by the pipeline's own reader (tile plan, tissue mask, scale) and
crops centred on the FP32 detector's candidates. ONNX Runtime runs such a graph with int8 kernels
on the CPU; TensorRT (10 with ``--precision int8``, 11 as a strongly typed network) compiles the same
QDQ file. The result is a new bundle folder, a new version; the source bundle is never changed.

The wrap's pixel preprocessing (``Cast``, ``Mul``, ``Add`` on full-size float images: as slow as the
int8 convolutions themselves) becomes one per-channel ``DequantizeLinear`` on the uint8 pixels; its
zero point is the channel mean in grey levels, rounded to a whole level (at most half a grey level).

For ONNX Runtime a 3x3 stride-2 first convolution on the pixels can be rewritten as ``SpaceToDepth`` and a
2x2 stride-1 convolution with the same int8 weights moved (``space_to_depth_first_conv``); ``quantize_bundle``
times both graphs and keeps the faster.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.engines.manifest import (
    MANIFEST_NAME,
    Bundle,
    ModelSpec,
    import_onnx,
    load_bundle,
    manifest_tables,
    new_bundle_folder,
    set_toml_key,
    sha256_file,
    source_bundle_json,
    writing_bundle_version,
)
from edge.errors import ConfigError, ManifestError
from edge.vocab import QuantizeTarget as Target

log = logging.getLogger(__name__)

REPORT_NAME = "quantization.json"
COMPUTE_OPS = ("Conv", "MatMul", "Gemm")
# quantized too where their output reaches a convolution (SiLU, residual adds, concatenations: the graph stays
# int8 between layers); where it does not (a detector's box decoding, a classifier's last softmax) they stay float
BETWEEN_OPS = ("Relu", "Clip", "MaxPool", "Sigmoid", "Mul", "Add", "Concat", "Split", "Resize", "GlobalAveragePool")
DEFAULT_TILES = 32  # calibration tiles over all slides
DEFAULT_CROPS = 256  # calibration crops per classifier crop size
_WRAP = "mitosis_edge_wrap_"


@dataclass(frozen=True)
class CalibrationSet:
    """uint8 NHWC inputs per model name, as the pipeline feeds them."""

    inputs: dict[str, np.ndarray]
    slides: tuple[str, ...]

    def counts(self) -> dict[str, int]:
        return {name: len(batch) for name, batch in self.inputs.items()}


def dequantize_preprocessing(model: Any, spec: ModelSpec) -> Any:
    """A copy of a wrapped model whose Cast/Mul/Add preprocessing is one per-channel DequantizeLinear.

    ``(x * scale - mean) / std`` per channel equals ``(x - mean / scale) * (scale / std)``: a
    DequantizeLinear with zero point ``round(mean / scale)`` (a grey level) and scale ``scale / std``.
    A model that was not wrapped by mitosis-edge, or whose means are not grey levels in [0, 255],
    is returned unchanged.
    """
    onnx = import_onnx()
    from onnx import helper, numpy_helper

    nodes = list(model.graph.node)
    add = next((n for n in nodes if n.name == f"{_WRAP}Add"), None)
    n = spec.normalisation
    zero = np.round(np.asarray(n.mean) / n.scale)
    if add is None or n.scale <= 0 or np.any(zero < 0) or np.any(zero > 255) or min(n.std) <= 0:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    wrap_nodes = {f"{_WRAP}{op}" for op in ("Transpose", "Cast", "ReverseChannels", "Mul", "Add")}
    kept = [node for node in graph.node if node.name not in wrap_nodes]
    wrap_constants = {f"{_WRAP}mul", f"{_WRAP}add"}
    kept_inits = [t for t in graph.initializer if t.name not in wrap_constants and not t.name.startswith(f"{_WRAP}bgr")]
    channel_axis = 1 if spec.layout == "NCHW" else 3
    new_nodes = []
    current = spec.input_name
    if spec.layout == "NCHW":
        new_nodes.append(helper.make_node("Transpose", [current], [f"{_WRAP}nchw"], perm=[0, 3, 1, 2],
                                          name=f"{_WRAP}Transpose"))
        current = f"{_WRAP}nchw"
    constants = [
        numpy_helper.from_array((n.scale / np.asarray(n.std)).astype(np.float32), f"{_WRAP}dq_scale"),
        numpy_helper.from_array(zero.astype(np.uint8), f"{_WRAP}dq_zero"),
    ]
    if spec.channel_order == "BGR":
        new_nodes.append(helper.make_node("Slice", [current, f"{_WRAP}bgr_start", f"{_WRAP}bgr_end",
                                                    f"{_WRAP}bgr_axes", f"{_WRAP}bgr_steps"],
                                          [f"{_WRAP}bgr"], name=f"{_WRAP}ReverseChannels"))
        current = f"{_WRAP}bgr"
        constants += [
            numpy_helper.from_array(np.array([-1], np.int64), f"{_WRAP}bgr_start"),
            numpy_helper.from_array(np.array([np.iinfo(np.int64).min], np.int64), f"{_WRAP}bgr_end"),
            numpy_helper.from_array(np.array([channel_axis], np.int64), f"{_WRAP}bgr_axes"),
            numpy_helper.from_array(np.array([-1], np.int64), f"{_WRAP}bgr_steps"),
        ]
    new_nodes.append(helper.make_node("DequantizeLinear", [current, f"{_WRAP}dq_scale", f"{_WRAP}dq_zero"],
                                      [add.output[0]], axis=channel_axis, name=f"{_WRAP}Dequantize"))
    del graph.node[:]
    graph.node.extend(new_nodes + kept)
    del graph.initializer[:]
    graph.initializer.extend(kept_inits + constants)
    onnx.checker.check_model(out)
    return out


def fold_preprocessing(model: Any, spec: ModelSpec) -> Any | None:
    """A copy of a wrapped float model whose normalisation is folded into the first convolutions' weights.

    ``conv(W, x * a + b) = conv(W * a, x) + sum(W) . b`` per input channel, so the convolutions read the
    pixels themselves (cast to float), which ``uint8_input`` then hands them as uint8 after quantization.
    Exact except in the first convolution's zero padding (the outermost pixel ring of a tile: padding
    is then black, not the mean grey). None when the pixels feed anything but plain Conv nodes.
    """
    onnx = import_onnx()
    from onnx import numpy_helper

    graph = model.graph
    by_name = {n.name: n for n in graph.node}
    add, cast = by_name.get(f"{_WRAP}Add"), by_name.get(f"{_WRAP}Cast")
    if add is None or cast is None:
        return None
    pixels = add.output[0]
    consumers = [n for n in graph.node if pixels in n.input]
    inits = {t.name: t for t in graph.initializer}
    shared = [name for n in graph.node if n not in consumers for name in n.input]
    for conv in consumers:
        group = next((a.i for a in conv.attribute if a.name == "group"), 1)
        if conv.op_type != "Conv" or group != 1 or conv.input[1] not in inits or conv.input[1] in shared:
            return None
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    n = spec.normalisation
    a = n.scale / np.asarray(n.std, np.float64)
    b = -np.asarray(n.mean, np.float64) / np.asarray(n.std, np.float64)
    inits = {t.name: t for t in graph.initializer}
    for conv in [c for c in graph.node if pixels in c.input]:
        weight = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        bias = (numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 and conv.input[2]
                else np.zeros(weight.shape[0]))
        folded_bias = bias + weight.sum(axis=(2, 3)) @ b
        names = (f"{conv.input[1]}_{_WRAP}folded", f"{conv.name or conv.output[0]}_{_WRAP}folded_bias")
        graph.initializer.extend([
            numpy_helper.from_array((weight * a[None, :, None, None]).astype(np.float32), names[0]),
            numpy_helper.from_array(folded_bias.astype(np.float32), names[1]),
        ])
        conv.input[:] = [conv.input[0], *names]
    # the pixels, cast to float, go straight to the convolutions: Mul and Add go
    reverse = next((x for x in graph.node if x.name == f"{_WRAP}ReverseChannels"), None)
    last = reverse or next(x for x in graph.node if x.name == f"{_WRAP}Cast")
    last.output[0] = pixels
    return _with_nodes(out, [x for x in graph.node if x.name not in (f"{_WRAP}Mul", f"{_WRAP}Add")])


def uint8_input(model: Any, spec: ModelSpec) -> Any:
    """After quantizing a folded model: the first convolutions read the uint8 pixels (scale 1, zero point 0).

    The quantizer put QuantizeLinear on the float pixels with a calibrated scale; pixels are already
    exact integers, so that Cast and QuantizeLinear go and the DequantizeLinear reads the uint8 tensor,
    which ONNX Runtime fuses into the convolution (no full-size float image at all).
    """
    onnx = import_onnx()
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    cast = next((x for x in graph.node if x.name == f"{_WRAP}Cast"), None)
    reverse = next((x for x in graph.node if x.name == f"{_WRAP}ReverseChannels"), None)
    if cast is None:
        return model
    pixels = (reverse or cast).output[0]
    quantize = [x for x in graph.node if x.op_type == "QuantizeLinear" and x.input[0] == pixels]
    if len(quantize) != 1 or any(x.input[0] == pixels for x in graph.node if x not in quantize and x is not reverse):
        return model
    q = quantize[0]
    uint8_pixels = f"{_WRAP}uint8_pixels"
    if reverse is not None:  # the channel reversal runs on uint8 after the transpose
        reverse.input[0] = cast.input[0]
        reverse.output[0] = uint8_pixels
    graph.initializer.extend([numpy_helper.from_array(np.array(1.0, np.float32), f"{_WRAP}pixel_scale"),
                              numpy_helper.from_array(np.array(0, np.uint8), f"{_WRAP}pixel_zero")])
    for dq in [x for x in graph.node if x.op_type == "DequantizeLinear" and x.input[0] == q.output[0]]:
        dq.input[:] = [uint8_pixels if reverse is not None else cast.input[0], f"{_WRAP}pixel_scale",
                       f"{_WRAP}pixel_zero"]
    return _with_nodes(out, [x for x in graph.node if x is not q and x is not cast])


def _with_nodes(model: Any, nodes: list[Any]) -> Any:
    """``model`` (changed in place) with only ``nodes``, in that order, and the initializers they use; checked."""
    graph = model.graph
    kept = list(nodes)
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for x in graph.node for name in x.input}
    kept_inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    import_onnx().checker.check_model(model)
    return model


# nodes that carry the pixels to the first convolution without changing the image's height and width
PIXEL_OPS = ("Transpose", "Cast", "Slice", "Mul", "Add", "DequantizeLinear", "QuantizeLinear")
SPACE_TO_DEPTH_MAX_CHANNELS = 4  # a first conv on more input channels already fills the int8 kernels
# 3x3 tap -> (tap of the 2x2 kernel, row within the 2x2 block): with pad 1, stride 2, output row y reads input rows
# 2y-1 (block y-1, row 1), 2y (block y, row 0) and 2y+1 (block y, row 1)
_S2D_TAPS = {0: (0, 1), 1: (1, 0), 2: (1, 1)}


def space_to_depth_kernel(weight: np.ndarray) -> np.ndarray:
    """The ``[O, 4C, 2, 2]`` kernel of a stride-1 conv (pads top/left 1, bottom/right 0) on ``SpaceToDepth(2)``
    of an image that equals a 3x3, stride-2, pad-1 conv with ``weight`` ``[O, C, 3, 3]`` on the image itself.

    SpaceToDepth puts block row ``sy``, column ``sx``, channel ``c`` in channel ``(2 sy + sx) C + c``; the taps
    that read no pixel of the 3x3 window (row 0 of the block above, column 0 of the block to the left) are zero.
    Works on float and on int8 weights alike (a per-output-channel scale is unchanged).
    """
    out_channels, channels = weight.shape[:2]
    out = np.zeros((out_channels, 4 * channels, 2, 2), weight.dtype)
    for ky, (by, sy) in _S2D_TAPS.items():
        for kx, (bx, sx) in _S2D_TAPS.items():
            first = (2 * sy + sx) * channels
            out[:, first : first + channels, by, bx] = weight[:, :, ky, kx]
    return out


def space_to_depth_first_conv(model: Any, size: int) -> tuple[Any, list[str]]:
    """A copy of ``model`` whose first convolutions (3x3, stride 2, pad 1, on at most
    ``SPACE_TO_DEPTH_MAX_CHANNELS`` channels of the ``size`` x ``size`` image) read ``SpaceToDepth(2)`` of their
    input through a 2x2 stride-1 conv on four times the channels (``space_to_depth_kernel``), and their names.

    The same products, summed: exact for float weights up to summation order, and for a QDQ graph (int8
    weights behind a ``DequantizeLinear``, the input behind one too) the rearrangement runs on the quantized
    input and on the int8 weights, so the int8 arithmetic is unchanged. ONNX Runtime's int8 convolution with
    stride 2 on 3 input channels is slow (twice the FP32 kernel in the demo detector); a stride-1 conv on 12
    channels is the kernels' usual case, at the price of copying the uint8 image once more. Where the conv reads
    the uint8 NHWC image through the wrap's layout transpose, the copy is made in NHWC (``_nhwc_space_to_depth``);
    else (e.g. a channel reverse in between) by ``SpaceToDepth`` on the NCHW pixels.
    A model without such a conv, or with an odd ``size``, is returned unchanged.
    """
    onnx = import_onnx()
    from onnx import helper, numpy_helper

    if size % 2:
        return model, []
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {name: node for node in graph.node for name in node.output}
    inputs = {v.name for v in graph.input if v.name not in inits}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1

    def from_pixels(name: str) -> bool:  # reaches a graph input through size-keeping pixel nodes only
        node = producer.get(name)
        if node is None:
            return name in inputs
        return node.op_type in PIXEL_OPS and from_pixels(node.input[0])

    def attr(node: Any, key: str, default: Any) -> Any:
        found = next((a for a in node.attribute if a.name == key), None)
        return default if found is None else helper.get_attribute_value(found)

    rewritten: list[str] = []
    added: list[tuple[Any, Any]] = []  # (node to insert before, new node)
    removed: set[int] = set()  # ids of nodes the rewrite replaces
    for conv in [n for n in graph.node if n.op_type == "Conv"]:
        weight_dq = producer.get(conv.input[1])
        weight_name = (weight_dq.input[0] if weight_dq is not None and weight_dq.op_type == "DequantizeLinear"
                       else conv.input[1])
        weight = inits.get(weight_name)
        weight_scale = inits.get(weight_dq.input[1]) if weight_dq is not None and len(weight_dq.input) > 1 else None
        # int8 weights scaled per output channel (or per tensor) keep their scales when rearranged
        per_tensor_or_axis0 = weight_dq is None or (weight_scale is not None and (
            attr(weight_dq, "axis", 1) == 0 or list(weight_scale.dims) in ([], [1])))
        if (weight is None or not per_tensor_or_axis0 or list(weight.dims[2:]) != [3, 3]
                or weight.dims[1] > SPACE_TO_DEPTH_MAX_CHANNELS or consumers.get(weight_name, 0) != 1
                or attr(conv, "group", 1) != 1 or list(attr(conv, "strides", [1, 1])) != [2, 2]
                or list(attr(conv, "pads", [0] * 4)) != [1] * 4 or list(attr(conv, "dilations", [1, 1])) != [1, 1]
                or attr(conv, "auto_pad", b"NOTSET") != b"NOTSET" or not from_pixels(conv.input[0])):
            continue
        tag = conv.name or conv.output[0]
        x_dq = producer.get(conv.input[0])
        if (x_dq is not None and x_dq.op_type == "DequantizeLinear" and consumers.get(conv.input[0]) == 1
                and all(name in inits for name in x_dq.input[1:])):
            # rearrange the quantized pixels, then dequantize them (a per-channel scale repeats for each block)
            params = []
            for name in x_dq.input[1:]:
                param = numpy_helper.to_array(inits[name])
                params.append(f"{name}_{_WRAP}s2d")
                param = np.tile(param, 4) if param.ndim else param
                graph.initializer.append(numpy_helper.from_array(param, params[-1]))
            layout = producer.get(x_dq.input[0])
            if (layout is not None and layout.op_type == "Transpose" and list(attr(layout, "perm", [])) == [0, 3, 1, 2]
                    and layout.input[0] in inputs and consumers.get(x_dq.input[0]) == 1):
                # uint8 NHWC pixels: rearrange them before the layout transpose. ONNX Runtime runs int8 convs
                # in NHWC and cancels that transpose against its own, so the space-to-depth is one copy of the
                # image (SpaceToDepth on NCHW cost two more layout copies: slower than the plain conv on idle cores)
                s2d_nodes = _nhwc_space_to_depth(layout.input[0], f"{tag}_{_WRAP}", size, int(weight.dims[1]), graph)
                removed.add(id(layout))
            else:
                s2d_nodes = [helper.make_node("SpaceToDepth", [x_dq.input[0]], [f"{tag}_{_WRAP}s2d_q"], blocksize=2,
                                              name=f"{tag}_{_WRAP}SpaceToDepth")]
            x_dq.input[:] = [s2d_nodes[-1].output[0], *params]
            added.extend((x_dq, node) for node in s2d_nodes)
        else:
            s2d = helper.make_node("SpaceToDepth", [conv.input[0]], [f"{tag}_{_WRAP}s2d"], blocksize=2,
                                   name=f"{tag}_{_WRAP}SpaceToDepth")
            conv.input[0] = s2d.output[0]
            added.append((conv, s2d))
        remapped = space_to_depth_kernel(numpy_helper.to_array(weight))
        weight.CopyFrom(numpy_helper.from_array(remapped, weight.name))
        for key, value in (("kernel_shape", [2, 2]), ("strides", [1, 1]), ("pads", [1, 1, 0, 0])):
            for a in conv.attribute:
                if a.name == key:
                    a.CopyFrom(helper.make_attribute(key, value))
        if not any(a.name == "kernel_shape" for a in conv.attribute):
            conv.attribute.append(helper.make_attribute("kernel_shape", [2, 2]))
        rewritten.append(tag)
    if not rewritten:
        return model, []
    nodes: list[Any] = []
    for node in graph.node:
        nodes.extend(new for before, new in added if before is node)
        if id(node) not in removed:
            nodes.append(node)
    return _with_nodes(out, nodes), rewritten


def _nhwc_space_to_depth(image: str, prefix: str, size: int, channels: int, graph: Any) -> list[Any]:
    """Nodes from the ``[N, size, size, C]`` image to ``SpaceToDepth(2)`` of its NCHW form, ``[N, 4C, size/2, size/2]``:
    a reshape to 2x2 blocks, one transpose that brings each block's two rows together (channel order
    ``(sy, sx, c)``, as SpaceToDepth's), a reshape and the layout transpose. The last node's output is
    ``{prefix}s2d_q``; the transpose that moves the pixels is named ``{prefix}SpaceToDepth``."""
    from onnx import helper, numpy_helper

    half = size // 2
    shapes = {"blocks": [-1, half, 2, half, 2, channels], "nhwc": [-1, half, half, 4 * channels]}
    for key, shape in shapes.items():
        graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), f"{prefix}s2d_{key}_shape"))
    return [
        helper.make_node("Reshape", [image, f"{prefix}s2d_blocks_shape"], [f"{prefix}s2d_blocks"],
                         name=f"{prefix}s2d_blocks"),
        helper.make_node("Transpose", [f"{prefix}s2d_blocks"], [f"{prefix}s2d_rows"], perm=[0, 1, 3, 2, 4, 5],
                         name=f"{prefix}SpaceToDepth"),
        helper.make_node("Reshape", [f"{prefix}s2d_rows", f"{prefix}s2d_nhwc_shape"], [f"{prefix}s2d_nhwc"],
                         name=f"{prefix}s2d_nhwc"),
        helper.make_node("Transpose", [f"{prefix}s2d_nhwc"], [f"{prefix}s2d_q"], perm=[0, 3, 1, 2],
                         name=f"{prefix}s2d_nchw"),
    ]


def nodes_to_quantize(graph: Any) -> list[str]:
    """Names of the compute nodes, and of the ``BETWEEN_OPS`` nodes whose output reaches a compute node.

    The pixel preprocessing (``mitosis_edge_wrap_*``) is never chosen: the first convolutions read
    the pixels themselves (``uint8_input``).
    """
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    feeds: dict[int, bool] = {}  # id(node) -> some path from its outputs reaches a compute node
    for node in reversed(graph.node):  # ONNX nodes are topologically sorted: consumers come later
        feeds[id(node)] = any(
            c.op_type in COMPUTE_OPS or feeds.get(id(c), False) for out in node.output for c in consumers.get(out, [])
        )
    return [
        n.name for n in graph.node
        if not n.name.startswith(_WRAP) and (n.op_type in COMPUTE_OPS or (n.op_type in BETWEEN_OPS and feeds[id(n)]))
    ]


def quantize_model(
    model: Any, spec: ModelSpec, calibration: np.ndarray, folder: Path, target: Target = "onnxruntime",
    *, space_to_depth: bool = True,
) -> Any:
    """The QDQ INT8 version of one wrapped model (an ``onnx.ModelProto``), calibrated on ``calibration``.

    ``onnxruntime``: uint8 activations and the pixels straight into the first convolutions (fastest on
    a CPU), a 3x3 stride-2 first convolution on the pixels rewritten by ``with_space_to_depth`` unless
    ``space_to_depth`` is False.
    ``tensorrt``: symmetric int8 activations and weights (TensorRT's explicit quantization), the pixel
    preprocessing left in float and the graph as the quantizer wrote it.
    """
    onnx = import_onnx()
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    float_types = {t.type.tensor_type.elem_type for t in model.graph.output}
    if onnx.TensorProto.FLOAT16 in float_types:
        raise ManifestError(spec.path, ["a float16 model cannot be quantized; quantize the float32 export"])
    if len(calibration) == 0:
        raise ConfigError(f"no calibration inputs for {spec.name}: give slides with tissue (and candidates)")
    source, prepared, result = folder / f"{spec.name}.src.onnx", folder / f"{spec.name}.pre.onnx", folder / "q.onnx"
    folded = fold_preprocessing(model, spec) if target == "onnxruntime" else None
    onnx.save(folded if folded is not None else model, str(source))
    try:  # shape inference and graph optimisation help the quantizer; a graph they choke on is quantized as is
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    except Exception as exc:  # noqa: BLE001 - the pre-processing raises many types; it is an optional step
        log.warning("quantization pre-processing of %s skipped: %s", spec.name, exc)
        shutil.copyfile(source, prepared)
    prepared_model = onnx.load(str(prepared))
    for i, node in enumerate(prepared_model.graph.node):  # the quantizer selects nodes by name
        node.name = node.name or f"{_WRAP}node{i}"
    onnx.save(prepared_model, str(prepared))
    chosen = nodes_to_quantize(prepared_model.graph)

    class Reader(CalibrationDataReader):  # type: ignore[misc, unused-ignore]  # no stubs
        def __init__(self) -> None:
            self.items: Iterator[np.ndarray] = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            item = next(self.items, None)
            return None if item is None else {spec.input_name: item[None]}

    tensorrt = target == "tensorrt"
    quantize_static(
        str(prepared), str(result), Reader(), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(COMPUTE_OPS + BETWEEN_OPS), nodes_to_quantize=chosen,
        per_channel=True, activation_type=QuantType.QInt8 if tensorrt else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True} if tensorrt else None,
    )
    quantized = onnx.load(str(result))
    if tensorrt:
        return quantized
    # after quantizing: given to the quantizer, the DequantizeLinear's per-channel scale would be taken as the
    # first convolution's input scale
    quantized = uint8_input(quantized, spec) if folded is not None else dequantize_preprocessing(quantized, spec)
    return with_space_to_depth(quantized, spec, calibration) if space_to_depth else quantized


def with_space_to_depth(quantized: Any, spec: ModelSpec, calibration: np.ndarray) -> Any:
    """``quantized`` with its first convs rewritten by ``space_to_depth_first_conv``, when ONNX Runtime runs the
    result with the same outputs on two calibration inputs; else ``quantized`` itself."""
    rewritten, convs = space_to_depth_first_conv(quantized, spec.size)
    if not convs:
        return quantized
    problem = _differs(quantized, rewritten, spec.input_name, calibration[:2])
    if problem:  # e.g. an ONNX Runtime without a uint8 SpaceToDepth kernel
        log.warning("%s: first conv left as the quantizer wrote it (space-to-depth rewrite: %s)", spec.name, problem)
        return quantized
    return rewritten


def _differs(model: Any, rewritten: Any, input_name: str, inputs: np.ndarray) -> str | None:
    """Why ``rewritten`` cannot replace ``model`` on this ONNX Runtime (fails, or other outputs), or None."""
    import onnxruntime as ort

    try:
        outputs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                   .run(None, {input_name: inputs}) for m in (model, rewritten)]
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types (NOT_IMPLEMENTED, INVALID_GRAPH, ...)
        return f"{type(exc).__name__}: {exc}"
    for name, a, b in zip([o.name for o in model.graph.output], *outputs, strict=True):
        if not np.allclose(a, b, rtol=1e-4, atol=1e-4):
            return f"output {name} changed by up to {float(np.max(np.abs(a - b))):g}"
    return None


def space_to_depth_convs(model: Any) -> list[str]:
    """Names of the convolutions ``space_to_depth_first_conv`` rewrote in ``model``."""
    suffix = f"_{_WRAP}SpaceToDepth"
    return [n.name.removesuffix(suffix) for n in model.graph.node if n.name.endswith(suffix)]


def calibration_set(
    bundle: Bundle, slides: Sequence[str | Path], config: Any, *, tiles: int = DEFAULT_TILES, crops: int = DEFAULT_CROPS
) -> CalibrationSet:
    """Tiles spread over each slide's tissue, read by the pipeline's reader, and crops at the FP32 detector's
    candidates on those tiles (topped up with points in tissue when it finds few)."""
    from edge.analysis.classify import crop_origins
    from edge.analysis.detect import decode, nms, to_slide
    from edge.engines import open_engines
    from edge.wsi.slide import open_slide
    from edge.wsi.stream import open_stream, plan_slide

    if not slides:
        raise ConfigError("give at least one --calibration-slide: quantization needs tiles of your own slides")
    per_slide = max(1, -(-tiles // len(slides)))
    wanted = max(1, -(-crops // len(slides)))
    spec = bundle.detector
    tile_list: list[np.ndarray] = []
    crop_lists: dict[str, list[np.ndarray]] = {c.name: [] for c in bundle.classifiers}
    with open_engines(bundle, config.engines, detector_batch=config.stream.batch_size) as engines:
        for path in slides:
            with open_slide(path, config.slide) as slide:
                sp = plan_slide(slide, config)
                stride, seen = max(1, len(sp.plan) // per_slide), 0
                sampled: list[tuple[Any, np.ndarray]] = []
                with open_stream(slide, sp, config) as stream:
                    for batch in stream:
                        for tile, pixels in zip(batch.tiles, batch.pixels, strict=False):
                            if seen % stride == 0:
                                sampled.append((tile, pixels.copy()))
                            seen += 1
                tile_list.extend(pixels for _, pixels in sampled)
                points: list[tuple[float, float]] = []
                px0_per_out = (sp.plan.px0_per_out_x, sp.plan.px0_per_out_y)
                for i in range(0, len(sampled), engines.detector.max_batch):
                    chunk = sampled[i : i + engines.detector.max_batch]
                    raw = engines.detector.infer(np.stack([pixels for _, pixels in chunk]))[spec.output]
                    for (tile, _), out in zip(chunk, raw, strict=True):
                        found = to_slide(nms(decode(out, spec), spec.nms_iou, spec.max_detections), tile, px0_per_out)
                        points.extend(zip(found.cx.tolist(), found.cy.tolist(), strict=True))
                rng = np.random.default_rng(len(tile_list))
                points = [points[j] for j in rng.permutation(len(points))[:wanted]]
                while len(points) < wanted and sampled:  # a detector that finds little: crops in tissue too
                    tile = sampled[int(rng.integers(len(sampled)))][0]
                    points.append((tile.x0 + rng.uniform(0.1, 0.9) * tile.width0,
                                   tile.y0 + rng.uniform(0.1, 0.9) * tile.height0))
                for clf in bundle.classifiers:
                    scale = slide.read_scale(clf.mpp)
                    x0, y0 = crop_origins(np.array([p[0] for p in points]), np.array([p[1] for p in points]),
                                          clf.size, (scale.px0_per_out_x, scale.px0_per_out_y))
                    for x, y in zip(x0, y0, strict=True):
                        crop_lists[clf.name].append(slide.read_region(float(x), float(y), clf.size, clf.size, scale))
    inputs = {spec.name: np.stack(tile_list[:tiles]) if tile_list else np.empty((0,), np.uint8)}
    for name, items in crop_lists.items():
        inputs[name] = np.stack(items) if items else np.empty((0,), np.uint8)
    return CalibrationSet(inputs, tuple(str(s) for s in slides))


def quantize_bundle(
    bundle: Bundle, calibration: CalibrationSet, out: str | Path, *, version: str | None = None,
    target: Target = "onnxruntime",
) -> Bundle:
    """Write ``out``: a copy of the bundle whose models are QDQ INT8, a new version, and a report."""
    onnx = import_onnx()
    import onnxruntime

    folder = new_bundle_folder(bundle, out, "quantize")
    stamp = _dt.datetime.now(_dt.UTC)
    suffix = "int8" if target == "onnxruntime" else "int8-tensorrt"
    version = version or f"{bundle.version}+{suffix}.{stamp:%Y%m%d.%H%M%S}"
    with writing_bundle_version(bundle, folder, REPORT_NAME) as partial:
        unused = {c.name for c in bundle.unused_classifiers}
        files: dict[str, tuple[str, str]] = {}
        report_models: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="mitosis-edge-quantize-") as tmp:
            for model in bundle.models:
                if model.name in unused:
                    continue
                log.info("quantizing %s on %d calibration inputs", model.name, len(calibration.inputs[model.name]))
                inputs = calibration.inputs[model.name]
                quantized = quantize_model(onnx.load(str(model.path)), model, inputs, Path(tmp), target,
                                           space_to_depth=False)
                entry: dict[str, Any] = {
                    "source_file": model.path.name, "source_sha256": model.sha256,
                    "calibration_inputs": len(inputs),
                    "qdq_nodes": sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in quantized.graph.node),
                    "space_to_depth_convs": [],
                }
                if target == "onnxruntime":  # on a CPU an INT8 graph can be slower (e.g. SiLU between every conv)
                    rewritten = with_space_to_depth(quantized, model, inputs)
                    candidates = [quantized] if rewritten is quantized else [quantized, rewritten]
                    fp32_rate, *rates = int8_speed(model, candidates, inputs)
                    if len(rates) == 2:  # the rewrite moves int8 conv work to uint8 copies: kept where it is faster
                        entry.update(space_to_depth_items_per_s=round(rates[1], 1),
                                     without_space_to_depth_items_per_s=round(rates[0], 1))
                        if rates[1] > rates[0]:
                            quantized = rewritten
                            entry["space_to_depth_convs"] = space_to_depth_convs(rewritten)
                    int8_rate = max(rates)
                    entry.update(fp32_items_per_s=round(fp32_rate, 1), int8_items_per_s=round(int8_rate, 1))
                    if int8_rate < fp32_rate:
                        log.warning("%s: INT8 %.1f/s is slower than FP32 %.1f/s here; kept FP32", model.name,
                                    int8_rate, fp32_rate)
                        report_models[model.name] = {**entry, "file": model.path.name, "kept_fp32": True,
                                                     "space_to_depth_convs": []}
                        continue
                name = f"{model.path.stem}.int8.onnx"
                onnx.save(quantized, str(partial / name))
                (partial / model.path.name).unlink(missing_ok=True)
                files[model.name] = (name, sha256_file(partial / name))
                report_models[model.name] = {**entry, "file": name, "kept_fp32": False}
        manifest = partial / MANIFEST_NAME
        manifest.write_text(_quantized_manifest(manifest.read_text(encoding="utf-8"), files, version), encoding="utf-8")
        report = {
            "source_bundle": source_bundle_json(bundle),
            "version": version,
            "created_at": stamp.isoformat(timespec="seconds"),
            "method": {"format": "QDQ", "target": target,
                       "activations": f"{'int8 symmetric' if target == 'tensorrt' else 'uint8'}, per tensor (MinMax)",
                       "weights": "int8, per channel",
                       # 3x3 stride-2 first convs on few channels: SpaceToDepth(2) and a 2x2 conv (same int8 sums),
                       # per model where it measured faster than without
                       "space_to_depth_first_conv": target == "onnxruntime",
                       "ops": list(COMPUTE_OPS + BETWEEN_OPS),
                       "tool": f"onnxruntime.quantization {onnxruntime.__version__}"},
            "calibration_slides": list(calibration.slides),
            "models": report_models,
            "not_quantized": sorted(unused),
        }
        (partial / REPORT_NAME).write_text(json.dumps(report, indent=1), encoding="utf-8")
    log.info("INT8 bundle %s %s written to %s", bundle.name, version, folder)
    return load_bundle(folder)


def int8_speed(model: ModelSpec, quantized: Sequence[Any], inputs: np.ndarray, repeats: int = 5) -> list[float]:
    """Items/s of one model in FP32 and of each INT8 version, on a batch of its calibration inputs, the sessions
    interleaved (so all see the same load), best of ``repeats``: ``[fp32, *int8]``.

    The sessions have the engines' own settings (``new_session``: idle pool threads sleep). With ONNX Runtime's
    defaults each session's threads spin after a run and slow down the next session timed.
    """
    from edge.engines.onnxrt import new_session

    batch = inputs[: 4 if model.role == "detector" else 32]
    sessions = [new_session(source) for source in (model.path, *(q.SerializeToString() for q in quantized))]
    best = [float("inf")] * len(sessions)
    for session in sessions:
        session.run(None, {model.input_name: batch})  # warm-up
    for _ in range(repeats):
        for i, session in enumerate(sessions):
            t0 = time.perf_counter()
            session.run(None, {model.input_name: batch})
            best[i] = min(best[i], time.perf_counter() - t0)
    return [len(batch) / t for t in best]


def _quantized_manifest(text: str, files: dict[str, tuple[str, str]], version: str) -> str:
    out = []
    for header, name, block in manifest_tables(text):
        key = "detector" if header == "[detector]" else name if header == "[[classifier]]" else None
        if header == "[bundle]":
            out.append(set_toml_key(block, "version", json.dumps(version)))
        elif key is not None and key in files:
            file, sha = files[key]
            out.append(set_toml_key(set_toml_key(block, "file", json.dumps(file)), "sha256", json.dumps(sha)))
        else:
            out.append(block)
    return "".join(out)
