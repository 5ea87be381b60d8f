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
    model: Any, spec: ModelSpec, calibration: np.ndarray, folder: Path, target: Target = "onnxruntime"
) -> Any:
    """The QDQ INT8 version of one wrapped model (an ``onnx.ModelProto``), calibrated on ``calibration``.

    ``onnxruntime``: uint8 activations and the pixels straight into the first convolutions (fastest on
    a CPU). ``tensorrt``: symmetric int8 activations and weights (TensorRT's explicit quantization),
    the pixel preprocessing left in float.
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
    return uint8_input(quantized, spec) if folded is not None else dequantize_preprocessing(quantized, spec)


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
                quantized = quantize_model(
                    onnx.load(str(model.path)), model, calibration.inputs[model.name], Path(tmp), target
                )
                entry: dict[str, Any] = {
                    "source_file": model.path.name, "source_sha256": model.sha256,
                    "calibration_inputs": len(calibration.inputs[model.name]),
                    "qdq_nodes": sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in quantized.graph.node),
                }
                if target == "onnxruntime":  # on a CPU an INT8 graph can be slower (e.g. SiLU between every conv)
                    fp32_rate, int8_rate = int8_speed(model, quantized, calibration.inputs[model.name])
                    entry.update(fp32_items_per_s=round(fp32_rate, 1), int8_items_per_s=round(int8_rate, 1))
                    if int8_rate < fp32_rate:
                        log.warning("%s: INT8 %.1f/s is slower than FP32 %.1f/s here; kept FP32", model.name,
                                    int8_rate, fp32_rate)
                        report_models[model.name] = {**entry, "file": model.path.name, "kept_fp32": True}
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
                       "ops": list(COMPUTE_OPS + BETWEEN_OPS),
                       "tool": f"onnxruntime.quantization {onnxruntime.__version__}"},
            "calibration_slides": list(calibration.slides),
            "models": report_models,
            "not_quantized": sorted(unused),
        }
        (partial / REPORT_NAME).write_text(json.dumps(report, indent=1), encoding="utf-8")
    log.info("INT8 bundle %s %s written to %s", bundle.name, version, folder)
    return load_bundle(folder)


def int8_speed(model: ModelSpec, quantized: Any, inputs: np.ndarray, repeats: int = 3) -> tuple[float, float]:
    """(FP32, INT8) items/s of one model on a batch of its calibration inputs, interleaved, best of ``repeats``."""
    import onnxruntime as ort

    batch = inputs[: 4 if model.role == "detector" else 32]
    sessions = [ort.InferenceSession(source, providers=["CPUExecutionProvider"])
                for source in (str(model.path), quantized.SerializeToString())]
    best = [float("inf"), float("inf")]
    for session in sessions:
        session.run(None, {model.input_name: batch})  # warm-up
    for _ in range(repeats):
        for i, session in enumerate(sessions):
            t0 = time.perf_counter()
            session.run(None, {model.input_name: batch})
            best[i] = min(best[i], time.perf_counter() - t0)
    return len(batch) / best[0], len(batch) / best[1]


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
