"""Prepend pixel preprocessing to a float-input ONNX model so it takes uint8 NHWC RGB.

The cast, normalisation, channel reorder and transpose then run inside the engine (on the GPU with
TensorRT), so host code never converts pixels and a quarter of the bytes cross the bus.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge.engines.manifest import ChannelOrder, Layout, ModelSpec, Normalisation, import_onnx, sha256_file
from edge.errors import ManifestError

_PREFIX = "mitosis_edge_wrap_"


def wrap_model(
    model: Any,
    *,
    input_name: str,
    size: int,
    layout: Layout,
    channel_order: ChannelOrder,
    normalisation: Normalisation,
) -> Any:
    """A copy of ``model`` (an ``onnx.ModelProto`` with one float input) that takes uint8 NHWC RGB.

    The new input is ``input_name``: uint8 ``[batch, size, size, 3]``. Inside the graph it becomes
    ``(x * scale - mean) / std`` in the float model's dtype, channels reversed for a BGR model, and
    transposed to NCHW for an NCHW model (the transpose first, on uint8). Outputs are unchanged.
    """
    onnx = import_onnx()
    from onnx import TensorProto, helper, numpy_helper

    wrapped = onnx.ModelProto()
    wrapped.CopyFrom(model)
    graph = wrapped.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    where = f"wrap {input_name}"
    if len(inputs) != 1:
        raise ManifestError(where, [f"the model must have exactly one input, found {[v.name for v in inputs]}"])
    old = inputs[0]
    elem = old.type.tensor_type.elem_type
    if elem not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        raise ManifestError(
            where,
            [
                f"input {old.name} is {helper.tensor_dtype_to_np_dtype(elem).name}, not float32 or float16: "
                "already wrapped, or not a float model"
            ],
        )
    dims = old.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ManifestError(where, [f"input {old.name} must have rank 4 (NCHW or NHWC), found rank {len(dims)}"])
    channel_axis = 1 if layout == "NCHW" else 3
    spatial = (2, 3) if layout == "NCHW" else (1, 2)
    problems = []
    if dims[channel_axis].HasField("dim_value") and dims[channel_axis].dim_value != 3:
        problems.append(
            f"input {old.name} has {dims[channel_axis].dim_value} channels on axis {channel_axis}"
            f" for layout {layout}; expected 3 (is the layout right?)"
        )
    for axis in spatial:
        if dims[axis].HasField("dim_value") and dims[axis].dim_value not in (0, size):
            problems.append(f"input {old.name} axis {axis} is {dims[axis].dim_value} px, the manifest says size={size}")
    if problems:
        raise ManifestError(where, problems)
    if input_name != old.name and any(input_name in (n.name for n in g) for g in (graph.output, graph.value_info)):
        raise ManifestError(where, [f"the name {input_name!r} is already used by a tensor in the graph"])

    float_np = np.float16 if elem == TensorProto.FLOAT16 else np.float32
    mean = np.asarray(normalisation.mean, np.float64)
    std = np.asarray(normalisation.std, np.float64)
    # (x * scale - mean) / std == x * (scale / std) + (-mean / std): one Mul and one Add per pixel.
    # For an NCHW model the transpose runs first, on uint8 (a quarter of the bytes), and the per-channel
    # constants broadcast over whole planes: about 3x faster on a CPU than Mul/Add on a trailing axis of 3.
    channel_shape = (1, 3, 1, 1) if layout == "NCHW" else (1, 1, 1, 3)
    mul = (normalisation.scale / std).astype(float_np).reshape(channel_shape)
    add = (-mean / std).astype(float_np).reshape(channel_shape)
    graph_input = old.name if input_name == old.name else None
    internal = f"{_PREFIX}float_input" if graph_input else old.name
    nodes = []
    current = input_name
    if layout == "NCHW":
        nodes.append(helper.make_node("Transpose", [current], [f"{_PREFIX}nchw"], perm=[0, 3, 1, 2],
                                      name=f"{_PREFIX}Transpose"))
        current = f"{_PREFIX}nchw"
    nodes.append(helper.make_node("Cast", [current], [f"{_PREFIX}cast"], to=elem, name=f"{_PREFIX}Cast"))
    current = f"{_PREFIX}cast"
    if channel_order == "BGR":
        nodes.append(helper.make_node("Slice", [current, f"{_PREFIX}bgr_start", f"{_PREFIX}bgr_end",
                                                f"{_PREFIX}bgr_axes", f"{_PREFIX}bgr_steps"],
                                      [f"{_PREFIX}bgr"], name=f"{_PREFIX}ReverseChannels"))
        current = f"{_PREFIX}bgr"
    nodes.append(helper.make_node("Mul", [current, f"{_PREFIX}mul"], [f"{_PREFIX}scaled"], name=f"{_PREFIX}Mul"))
    nodes.append(helper.make_node("Add", [f"{_PREFIX}scaled", f"{_PREFIX}add"], [internal], name=f"{_PREFIX}Add"))
    constants = [numpy_helper.from_array(mul, f"{_PREFIX}mul"), numpy_helper.from_array(add, f"{_PREFIX}add")]
    if channel_order == "BGR":
        constants += [
            numpy_helper.from_array(np.array([-1], np.int64), f"{_PREFIX}bgr_start"),
            numpy_helper.from_array(np.array([np.iinfo(np.int64).min], np.int64), f"{_PREFIX}bgr_end"),
            numpy_helper.from_array(np.array([1 if layout == "NCHW" else 3], np.int64), f"{_PREFIX}bgr_axes"),
            numpy_helper.from_array(np.array([-1], np.int64), f"{_PREFIX}bgr_steps"),
        ]
    if graph_input:  # the new input keeps the old name: rename the old tensor's uses inside the graph
        for node in graph.node:
            node.input[:] = [internal if name == old.name else name for name in node.input]
        for out in graph.output:
            if out.name == old.name:
                raise ManifestError(where, [f"input {old.name} is also a graph output; cannot wrap it in place"])
    batch = dims[0].dim_param or "batch"
    if dims[0].HasField("dim_value"):  # a fixed batch: declare it dynamic; wrap_file then checks the graph agrees
        fixed = dims[0].dim_value
        for out in graph.output:
            out_dims = out.type.tensor_type.shape.dim
            if out_dims and out_dims[0].HasField("dim_value") and out_dims[0].dim_value == fixed:
                out_dims[0].dim_param = batch
        del graph.value_info[:]  # intermediate shapes recorded for the fixed batch would contradict it
    new_input = helper.make_tensor_value_info(input_name, TensorProto.UINT8, [batch, size, size, 3])
    graph.input.remove(old)
    graph.input.insert(0, new_input)
    old_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old_nodes)
    graph.initializer.extend(constants)
    onnx.checker.check_model(wrapped)
    return wrapped


def wrap_file(source: str | Path, model: ModelSpec, out: str | Path | None = None) -> tuple[Path, str]:
    """Wrap a float-input ONNX file for a bundle model; write it (default: the manifest's file path).

    Returns the written path and its sha256, which belongs in the manifest's ``sha256`` field.
    """
    onnx = import_onnx()
    source = Path(source)
    try:
        float_model = onnx.load(str(source))
    except FileNotFoundError:
        raise ManifestError(source, ["file does not exist"]) from None
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and others for a damaged file
        raise ManifestError(source, [f"not a readable ONNX model: {exc}"]) from None
    wrapped = wrap_model(
        float_model,
        input_name=model.input_name,
        size=model.size,
        layout=model.layout,
        channel_order=model.channel_order,
        normalisation=model.normalisation,
    )
    fixed = _fixed_batch(float_model)
    if fixed is not None:
        _check_dynamic_batch(wrapped, model, fixed)
    target = Path(out) if out is not None else model.path
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    onnx.save(wrapped, str(tmp))
    tmp.replace(target)
    return target, sha256_file(target)


DYNAMIC_BATCH_EXPORT = (
    "re-export with a dynamic batch axis: Ultralytics `yolo export ... dynamic=True`; "
    "torch.onnx.export(..., dynamic_axes={'<input>': {0: 'batch'}, '<output>': {0: 'batch'}}); "
    "tf2onnx --inputs <input>[-1,H,W,3] (or a TensorSpec with a None batch)"
)


def _fixed_batch(model: Any) -> int | None:
    """The fixed batch size of a model's (single float) input, None when it is dynamic."""
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name not in initializers:
            dims = value.type.tensor_type.shape.dim
            return dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
    return None


def _check_dynamic_batch(wrapped: Any, model: ModelSpec, fixed: int) -> None:
    """Run the wrapped graph on a batch other than ``fixed``; refuse when the graph keeps the fixed batch inside."""
    import onnxruntime as ort

    batch = 2 if fixed != 2 else 3
    where = f"wrap {model.name}"
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(wrapped.SerializeToString(), options, providers=["CPUExecutionProvider"])
        outputs = session.run(None, {model.input_name: np.zeros((batch, model.size, model.size, 3), np.uint8)})
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types for shape errors
        reason = str(exc).splitlines()[0][:300]
        raise ManifestError(
            where, [f"the model was exported with a fixed batch of {fixed} and fails on a batch of {batch} ({reason});"
                    f" {DYNAMIC_BATCH_EXPORT}"]
        ) from None
    wrong = [list(np.shape(o)) for o in outputs if np.ndim(o) == 0 or np.shape(o)[0] != batch]
    if wrong:
        raise ManifestError(
            where, [f"the model was exported with a fixed batch of {fixed}: a batch of {batch} gives outputs of shape"
                    f" {wrong}; {DYNAMIC_BATCH_EXPORT}"]
        )
