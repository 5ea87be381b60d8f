"""A fake ``tensorrt`` module mirroring the TensorRT 10 and 11 Python APIs that mitosis-edge uses.

``make_fake_trt(10)`` and ``make_fake_trt(11)`` differ where the real ones do: TensorRT 11 has no
weak-typing builder flags (``BuilderFlag.FP16``/``INT8``/... raise AttributeError), no calibrators,
no ``platform_has_fast_fp16``, and ``NetworkDefinitionCreationFlag`` has no ``EXPLICIT_BATCH``
(``STRONGLY_TYPED`` is 0 there, 1 in 10).

The parser reads the ONNX file with the ``onnx`` package so the network has the model's real input
and output names, dtypes and shapes. A "plan" is a header plus the ONNX bytes; executing it runs the
ONNX through ONNX Runtime on the bytes found at the bound device addresses, queued on the stream of a
``FakeCudart`` when one is given. So outputs are the real model's, and parity can be tested.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import json
import math
import struct
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PLAN_MAGIC = b"FAKETRT-PLAN\x00"
CACHE_MAGIC = b"FAKETRT-TIMING\x00"

_ONNX_TO_TRT = {1: "FLOAT", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "HALF", 16: "BF16"}
_TRT_TO_NP = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
    "UINT8": np.uint8,
}
_PRECISION_FLAGS = (
    "FP16",
    "BF16",
    "INT8",
    "FP8",
    "INT4",
    "FP4",
    "OBEY_PRECISION_CONSTRAINTS",
    "PREFER_PRECISION_CONSTRAINTS",
    "DIRECT_IO",
)
_COMMON_FLAGS = (
    "DEBUG",
    "GPU_FALLBACK",
    "REFIT",
    "DISABLE_TIMING_CACHE",
    "TF32",
    "SPARSE_WEIGHTS",
    "SAFETY_SCOPE",
    "VERSION_COMPATIBLE",
    "EXCLUDE_LEAN_RUNTIME",
    "REJECT_EMPTY_ALGORITHMS",
    "STRIP_PLAN",
    "REFIT_IDENTICAL",
    "WEIGHT_STREAMING",
    "MONITOR_MEMORY",
    "REFIT_INDIVIDUAL",
    "STRICT_NANS",
    "EDITABLE_TIMING_CACHE",
    "DISTRIBUTIVE_INDEPENDENCE",
)


def make_fake_trt(major: int = 10, *, version: str | None = None, cudart: Any = None, lean: bool = False) -> Any:
    """A fresh fake module. ``cudart`` (a FakeCudart) makes execution run on its streams; ``lean`` drops the builder."""
    mod = types.ModuleType("tensorrt_lean" if lean else "tensorrt")
    mod.__version__ = version or {10: "10.13.3.9", 11: "11.1.0.12"}.get(major, f"{major}.0.0.1")
    mod._cudart = cudart  # type: ignore[attr-defined]
    mod.stats = {"builds": 0, "timing_cache_hits": 0, "timing_cache_misses": 0, "executions": 0}  # type: ignore[attr-defined]
    mod.fail_build = None  # type: ignore[attr-defined]  # a message makes the next builds fail with it
    mod.build_log = []  # type: ignore[attr-defined]  # every message the fake emitted, for assertions

    # -- enums ---------------------------------------------------------------------------------
    dtype_names = ["FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "FP8", "BF16", "INT64", "INT4"]
    if major >= 11 or (major == 10 and int(mod.__version__.split(".")[1]) >= 8):
        dtype_names.append("FP4")
    DataType = enum.Enum("DataType", dtype_names)
    mod.DataType = DataType
    for alias, name in (
        ("float32", "FLOAT"),
        ("float16", "HALF"),
        ("int8", "INT8"),
        ("int32", "INT32"),
        ("int64", "INT64"),
        ("bool", "BOOL"),
        ("uint8", "UINT8"),
        ("bfloat16", "BF16"),
    ):
        setattr(mod, alias, DataType[name])
    mod.TensorIOMode = enum.Enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"], start=0)
    if major >= 11:
        mod.NetworkDefinitionCreationFlag = enum.Enum("NetworkDefinitionCreationFlag", ["STRONGLY_TYPED"], start=0)
    else:
        mod.NetworkDefinitionCreationFlag = enum.Enum(
            "NetworkDefinitionCreationFlag",
            ["EXPLICIT_BATCH", "STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS", "PREFER_JIT_PYTHON_PLUGINS"],
            start=0,
        )
    flags = (_PRECISION_FLAGS if major < 11 else ()) + _COMMON_FLAGS
    mod.BuilderFlag = enum.Enum("BuilderFlag", list(flags), start=0)
    mod.MemoryPoolType = enum.Enum(
        "MemoryPoolType",
        ["WORKSPACE", "DLA_MANAGED_SRAM", "DLA_LOCAL_DRAM", "DLA_GLOBAL_DRAM", "TACTIC_DRAM", "TACTIC_SHARED_MEMORY"],
        start=0,
    )
    mod.HardwareCompatibilityLevel = enum.Enum(
        "HardwareCompatibilityLevel", ["NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY"], start=0
    )
    mod.LayerType = enum.Enum("LayerType", ["CONVOLUTION", "CAST", "REDUCE", "QUANTIZE", "DEQUANTIZE", "PLUGIN"])

    def nptype(dtype: Any) -> type:
        return _TRT_TO_NP[dtype.name]

    mod.nptype = nptype
    mod.volume = math.prod

    # -- logging -------------------------------------------------------------------------------
    Severity = enum.Enum("Severity", ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"], start=0)

    class ILogger:
        def __init__(self) -> None:
            pass

        def log(self, severity: Any, msg: str) -> None:
            raise NotImplementedError

    ILogger.Severity = Severity  # type: ignore[attr-defined]

    class Logger(ILogger):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = (Severity[n] for n in Severity.__members__)

        def __init__(self, min_severity: Any = None) -> None:
            super().__init__()
            self.min_severity = min_severity or Severity.WARNING
            self.messages: list[tuple[Any, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            self.messages.append((severity, msg))

    mod.ILogger = ILogger
    mod.Logger = Logger

    def emit(logger: Any, severity: str, msg: str) -> None:
        mod.build_log.append(f"{severity}: {msg}")
        if logger is not None:
            logger.log(Severity[severity], msg)

    # -- memory ---------------------------------------------------------------------------------
    class IHostMemory(bytes):
        @property
        def nbytes(self) -> int:
            return len(self)

        @property
        def dtype(self) -> Any:
            return DataType.UINT8

    mod.IHostMemory = IHostMemory

    # -- network and parser ---------------------------------------------------------------------
    class ITensor:
        def __init__(self, name: str, dtype: Any, shape: tuple[int, ...]) -> None:
            self.name, self.dtype, self.shape = name, dtype, shape
            self.is_network_input = False

    class INetworkDefinition:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.inputs: list[ITensor] = []
            self.outputs: list[ITensor] = []
            self.onnx: bytes = b""
            self.op_types: list[str] = []
            self.name = "network"

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        @property
        def num_outputs(self) -> int:
            return len(self.outputs)

        def get_input(self, i: int) -> ITensor:
            return self.inputs[i]

        def get_output(self, i: int) -> ITensor:
            return self.outputs[i]

        @property
        def num_layers(self) -> int:
            return len(self.op_types)

        def get_layer(self, i: int) -> Any:
            op = self.op_types[i]
            kind = {
                "QuantizeLinear": "QUANTIZE",
                "DequantizeLinear": "DEQUANTIZE",
                "Cast": "CAST",
                "Conv": "CONVOLUTION",
            }.get(op, "REDUCE")
            return types.SimpleNamespace(name=f"{op}_{i}", type=mod.LayerType[kind])

        @property
        def strongly_typed(self) -> bool:
            return bool(self.flags & (1 << mod.NetworkDefinitionCreationFlag.STRONGLY_TYPED.value))

    class ParserError:
        def __init__(self, desc: str, node: int = -1, node_name: str = "", op: str = "") -> None:
            self._desc, self._node, self._node_name, self._op = desc, node, node_name, op

        def desc(self) -> str:
            return self._desc

        def code(self) -> int:
            return 8  # ErrorCode.UNSUPPORTED_NODE, say

        def node(self) -> int:
            return self._node

        def node_name(self) -> str:
            return self._node_name

        def node_operator(self) -> str:
            return self._op

        def __str__(self) -> str:
            where = f"In node {self._node} with name: {self._node_name} and operator: {self._op} " if self._op else ""
            return f"{where}(parse): {self._desc}"

    class OnnxParser:
        def __init__(self, network: INetworkDefinition, logger: Any) -> None:
            self.network, self.logger = network, logger
            self.errors: list[ParserError] = []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, index: int) -> ParserError:
            return self.errors[index]

        def clear_errors(self) -> None:
            self.errors.clear()

        def parse_from_file(self, path: str) -> bool:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                self.errors.append(ParserError(f"Failed to open file {path}: {exc}"))
                return False
            return self.parse(data, path)

        def parse(self, model: bytes, path: str | None = None) -> bool:
            import onnx

            try:
                proto = onnx.load_from_string(bytes(model))
            except Exception as exc:  # noqa: BLE001 - the real parser reports any protobuf failure this way
                self.errors.append(ParserError(f"Failed to parse ONNX model: {exc}"))
                return False
            if not proto.graph.node:
                self.errors.append(ParserError("Failed to parse ONNX model: the graph has no nodes"))
                return False
            for i, node in enumerate(proto.graph.node):
                if node.domain not in ("", "ai.onnx"):
                    self.errors.append(
                        ParserError(f"No importer registered for op: {node.op_type}", i, node.name, node.op_type)
                    )
            if self.errors:
                return False
            init = {t.name for t in proto.graph.initializer}

            def tensor(value: Any) -> ITensor:
                tt = value.type.tensor_type
                name = _ONNX_TO_TRT.get(tt.elem_type)
                if name is None:
                    raise _ParseFailure(f"{value.name}: unsupported data type {tt.elem_type}")
                dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tt.shape.dim)
                return ITensor(value.name, DataType[name], dims)

            try:
                self.network.inputs = [tensor(v) for v in proto.graph.input if v.name not in init]
                self.network.outputs = [tensor(v) for v in proto.graph.output]
            except _ParseFailure as exc:
                self.errors.append(ParserError(str(exc)))
                return False
            for t in self.network.inputs:
                t.is_network_input = True
            self.network.onnx = bytes(model)
            self.network.op_types = [n.op_type for n in proto.graph.node]
            return True

    mod.OnnxParser = OnnxParser

    # -- builder --------------------------------------------------------------------------------
    class IOptimizationProfile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}

        def set_shape(self, input: str, min: Sequence[int], opt: Sequence[int], max: Sequence[int]) -> None:
            lo, mid, hi = tuple(min), tuple(opt), tuple(max)
            same_rank = len(lo) == len(mid) == len(hi)
            if not same_rank or any(not a <= b <= c for a, b, c in zip(lo, mid, hi, strict=True)):
                raise ValueError(f"invalid profile for {input}: min {lo} opt {mid} max {hi}")
            self.shapes[input] = (lo, mid, hi)

        def get_shape(self, input: str) -> list[tuple[int, ...]]:
            return list(self.shapes[input])

        def __bool__(self) -> bool:
            return True

    class ITimingCache:
        def __init__(self, entries: dict[str, str]) -> None:
            self.entries = entries

        def serialize(self) -> IHostMemory:
            return IHostMemory(CACHE_MAGIC + json.dumps(self.entries, sort_keys=True).encode())

        def combine(self, other: ITimingCache, ignore_mismatch: bool) -> bool:
            self.entries.update(other.entries)
            return True

        def reset(self) -> bool:
            self.entries.clear()
            return True

    class IBuilderConfig:
        def __init__(self) -> None:
            self.flag_set: set[Any] = set()
            if "TF32" in mod.BuilderFlag.__members__:
                self.flag_set.add(mod.BuilderFlag.TF32)  # on by default, as in TensorRT
            self.pools: dict[Any, int] = {}
            self.profiles: list[IOptimizationProfile] = []
            self.timing_cache: ITimingCache | None = None
            self.hardware_compatibility_level = mod.HardwareCompatibilityLevel.NONE
            self.builder_optimization_level = 3
            if major < 11:
                self.int8_calibrator = None

        def set_flag(self, flag: Any) -> None:
            self.flag_set.add(flag)

        def clear_flag(self, flag: Any) -> None:
            self.flag_set.discard(flag)

        def get_flag(self, flag: Any) -> bool:
            return flag in self.flag_set

        def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
            if pool_size < 0:
                raise ValueError("pool size must be >= 0")
            self.pools[pool] = int(pool_size)

        def get_memory_pool_limit(self, pool: Any) -> int:
            return self.pools.get(pool, 1 << 40)

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        @property
        def num_optimization_profiles(self) -> int:
            return len(self.profiles)

        def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache:
            data = bytes(serialized_timing_cache)
            if not data:
                return ITimingCache({})
            if not data.startswith(CACHE_MAGIC):
                raise RuntimeError("Failed to deserialize the timing cache: invalid magic tag")
            return ITimingCache(json.loads(data[len(CACHE_MAGIC) :]))

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            self.timing_cache = cache
            return True

        def get_timing_cache(self) -> ITimingCache | None:
            return self.timing_cache

    class Builder:
        def __init__(self, logger: Any) -> None:
            self.logger = logger
            self.max_threads = 1
            if major < 11:
                self.platform_has_fast_fp16 = True
                self.platform_has_fast_int8 = True
            self.platform_has_tf32 = True

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            if major < 11 and flags & (1 << mod.NetworkDefinitionCreationFlag.EXPLICIT_BATCH.value):
                emit(self.logger, "WARNING", "EXPLICIT_BATCH is deprecated and has no effect")
            return INetworkDefinition(flags)

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
            mod.stats["builds"] += 1

            def fail(msg: str) -> None:
                emit(self.logger, "ERROR", msg)

            emit(self.logger, "INFO", f"building {len(network.op_types)} layers")
            if mod.fail_build:
                fail(mod.fail_build)
                return None
            if not network.inputs or not network.outputs:
                fail("Network must have at least one input and one output")
                return None
            weak = {f.name for f in config.flag_set} & set(_PRECISION_FLAGS)
            if network.strongly_typed and weak:
                fail(
                    f"Error Code 4: API Usage Error (precision flags {sorted(weak)} are not allowed "
                    "on a strongly typed network)"
                )
                return None
            qdq = {"QuantizeLinear", "DequantizeLinear"} & set(network.op_types)
            if qdq and not network.strongly_typed and "INT8" not in weak:
                fail("Error Code 4: the network has Q/DQ layers but INT8 is not enabled")
                return None
            io = []
            for t in network.inputs:
                if -1 in t.shape:
                    profile = next((p for p in config.profiles if t.name in p.shapes), None)
                    if profile is None:
                        fail("Network has dynamic or shape inputs, but no optimization profile has been defined.")
                        return None
                    lo, mid, hi = profile.shapes[t.name]
                    if len(hi) != len(t.shape) or any(d != -1 and d != m for d, m in zip(t.shape, hi, strict=True)):
                        fail(f"Error Code 4: profile for {t.name} {hi} does not match the input's shape {t.shape}")
                        return None
                    prof = [list(lo), list(mid), list(hi)]
                else:
                    prof = [list(t.shape)] * 3
                io.append(
                    {"name": t.name, "mode": "INPUT", "dtype": t.dtype.name, "shape": list(t.shape), "profile": prof}
                )
            for t in network.outputs:
                io.append({"name": t.name, "mode": "OUTPUT", "dtype": t.dtype.name, "shape": list(t.shape)})
            cache_entry = hashlib.sha256(network.onnx + repr(sorted(f.name for f in config.flag_set)).encode())
            if config.timing_cache is not None:
                if cache_entry.hexdigest() in config.timing_cache.entries:
                    mod.stats["timing_cache_hits"] += 1
                else:
                    mod.stats["timing_cache_misses"] += 1
                    config.timing_cache.entries[cache_entry.hexdigest()] = "tactic-0"
            header = {
                "trt_version": mod.__version__,
                "io": io,
                "strongly_typed": network.strongly_typed,
                "flags": sorted(f.name for f in config.flag_set),
                "hardware_compat": config.hardware_compatibility_level.name,
                "workspace": config.get_memory_pool_limit(mod.MemoryPoolType.WORKSPACE),
                "version_compatible": mod.BuilderFlag.VERSION_COMPATIBLE in config.flag_set,
            }
            blob = json.dumps(header).encode()
            emit(self.logger, "INFO", "engine built")
            return IHostMemory(PLAN_MAGIC + struct.pack("<I", len(blob)) + blob + network.onnx)

    if not lean:
        mod.Builder = Builder
    else:
        del mod.OnnxParser

    # -- runtime --------------------------------------------------------------------------------
    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.logger = logger
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, serialized_engine: Any) -> ICudaEngine | None:
            data = bytes(serialized_engine)
            if not data.startswith(PLAN_MAGIC):
                emit(
                    self.logger,
                    "ERROR",
                    "IRuntime::deserializeCudaEngine: Error Code 1: Serialization "
                    "(Serialization assertion magicTagRead == kMAGIC_TAG failed.Magic tag does not match)",
                )
                return None
            (n,) = struct.unpack_from("<I", data, len(PLAN_MAGIC))
            start = len(PLAN_MAGIC) + 4
            header = json.loads(data[start : start + n])
            built = header["trt_version"]
            if built != mod.__version__ and not (header["version_compatible"] and self.engine_host_code_allowed):
                emit(
                    self.logger,
                    "ERROR",
                    f"Error Code 6: The engine plan file is not compatible with this version "
                    f"of TensorRT, expecting library version {mod.__version__} got {built}, please rebuild.",
                )
                return None
            return ICudaEngine(header, data[start + n :])

    class ICudaEngine:
        def __init__(self, header: dict[str, Any], onnx_bytes: bytes) -> None:
            self.header = header
            self.onnx = onnx_bytes
            self.io = {t["name"]: t for t in header["io"]}
            self.names = [t["name"] for t in header["io"]]
            self._session: Any = None
            self.contexts: list[IExecutionContext] = []
            self.name = "fake-engine"

        @property
        def num_io_tensors(self) -> int:
            return len(self.names)

        @property
        def num_optimization_profiles(self) -> int:
            return 1

        def get_tensor_name(self, index: int) -> str:
            return self.names[index]

        def get_tensor_mode(self, name: str) -> Any:
            t = self.io.get(name)
            return mod.TensorIOMode[t["mode"]] if t else mod.TensorIOMode.NONE

        def get_tensor_dtype(self, name: str) -> Any:
            return DataType[self.io[name]["dtype"]]

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return tuple(self.io[name]["shape"])

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
            t = self.io[name]
            if t["mode"] != "INPUT" or profile_index != 0:
                raise RuntimeError(f"{name} has no profile {profile_index}")
            return [tuple(s) for s in t["profile"]]

        def create_execution_context(self) -> IExecutionContext:
            ctx = IExecutionContext(self)
            self.contexts.append(ctx)
            return ctx

        def session(self) -> Any:
            if self._session is None:
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.intra_op_num_threads = 1
                opts.inter_op_num_threads = 1
                opts.log_severity_level = 3
                self._session = ort.InferenceSession(self.onnx, opts, providers=["CPUExecutionProvider"])
            return self._session

        def output_shapes(self, inputs: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
            feeds = {n: np.zeros(s, _TRT_TO_NP[self.io[n]["dtype"]]) for n, s in inputs.items()}
            outs = self.session().run(None, feeds)
            return {o.name: tuple(v.shape) for o, v in zip(self.session().get_outputs(), outs, strict=True)}

    class IExecutionContext:
        def __init__(self, engine: ICudaEngine) -> None:
            self.engine = engine
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}
            self._out_cache: dict[tuple[Any, ...], dict[str, tuple[int, ...]]] = {}
            self.executions = 0

        def set_input_shape(self, name: str, shape: Sequence[int]) -> bool:
            t = self.engine.io.get(name)
            shape = tuple(int(d) for d in shape)
            if t is None or t["mode"] != "INPUT":
                return False
            lo, _, hi = t["profile"]
            if len(shape) != len(hi) or any(not a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True)):
                emit(None, "ERROR", f"setInputShape: {name} {shape} is outside the profile [{lo}, {hi}]")
                return False
            self.shapes[name] = shape
            return True

        def _inputs(self) -> list[str]:
            return [n for n in self.engine.names if self.engine.io[n]["mode"] == "INPUT"]

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            t = self.engine.io[name]
            if t["mode"] == "INPUT":
                return self.shapes.get(name, tuple(t["shape"]))
            if not all(n in self.shapes for n in self._inputs()):
                return tuple(t["shape"])
            key = tuple(sorted(self.shapes.items()))
            if key not in self._out_cache:
                self._out_cache[key] = self.engine.output_shapes(dict(self.shapes))
            return self._out_cache[key][name]

        @property
        def all_binding_shapes_specified(self) -> bool:
            return all(n in self.shapes for n in self._inputs())

        def set_tensor_address(self, name: str, memory: int) -> bool:
            if name not in self.engine.io:
                return False
            self.addresses[name] = int(memory)
            return True

        def get_tensor_address(self, name: str) -> int:
            return self.addresses.get(name, 0)

        def execute_async_v3(self, stream_handle: int) -> bool:
            missing = [n for n in self.engine.names if n not in self.addresses]
            if missing or not self.all_binding_shapes_specified:
                emit(None, "ERROR", f"execute_async_v3: addresses or shapes not set for {missing or self._inputs()}")
                return False
            inputs = {n: self.shapes[n] for n in self._inputs()}
            outputs = {n: self.get_tensor_shape(n) for n in self.engine.names if n not in inputs}
            addresses = dict(self.addresses)
            engine = self.engine
            cudart = mod._cudart

            def kernel() -> None:
                feeds = {}
                for n, shape in inputs.items():
                    dt = np.dtype(_TRT_TO_NP[engine.io[n]["dtype"]])
                    size = math.prod(shape) * dt.itemsize
                    raw = cudart.read(addresses[n], size) if cudart else ctypes.string_at(addresses[n], size)
                    feeds[n] = np.frombuffer(raw, dt).reshape(shape)
                results = engine.session().run(None, feeds)
                for o, result in zip(engine.session().get_outputs(), results, strict=True):
                    value = np.ascontiguousarray(result, _TRT_TO_NP[engine.io[o.name]["dtype"]])
                    assert value.shape == outputs[o.name], (value.shape, outputs[o.name])
                    if cudart:
                        cudart.write(addresses[o.name], value.tobytes())
                    else:
                        ctypes.memmove(addresses[o.name], value.ctypes.data, value.nbytes)
                self.executions += 1
                mod.stats["executions"] += 1

            if cudart is None:
                kernel()
                return True
            return int(cudart.launch(stream_handle, kernel)) == 0

    mod.Runtime = Runtime
    mod.ICudaEngine = ICudaEngine
    mod.IExecutionContext = IExecutionContext
    return mod


class _ParseFailure(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# helpers for tests: a probe that saw a GPU, and the precision variants of a bundle's models


def fake_probe(
    name: str = "NVIDIA Fake GPU", compute_capability: str = "8.9", cuda: str = "13.0", trt_version: str | None = None
) -> Any:
    """A GpuProbe as the real one reports a working GPU."""
    from edge.engines.probe import GpuDevice, GpuProbe

    return GpuProbe(
        ok=True,
        devices=(GpuDevice(0, name, compute_capability, 24_000),),
        driver_version=cuda,
        cuda_runtime_available=True,
        cuda_runtime_version=cuda,
        tensorrt_version=trt_version,
        tensorrt_module="tensorrt",
    )


def write_fp16_detector(path: Path, size: int, input_name: str = "tiles", output: str = "raw") -> Path:
    """What autocast makes of the tiny detector, roughly: uint8 tiles → float16 rows ``[B, N, 6]`` (float16 output)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rows = size * size * 3 // 6
    graph = helper.make_graph(
        [
            helper.make_node("Cast", [input_name], ["half"], to=TensorProto.FLOAT16),
            helper.make_node("Reshape", ["half", "shape"], ["rows"]),
            helper.make_node("Sigmoid", ["rows"], [output]),
        ],
        "tiny_detector_fp16",
        [helper.make_tensor_value_info(input_name, TensorProto.UINT8, ["batch", size, size, 3])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT16, ["batch", rows, 6])],
        [numpy_helper.from_array(np.array([-1, rows, 6], np.int64), "shape")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def write_qdq_detector(path: Path, size: int, input_name: str = "tiles", output: str = "raw") -> Path:
    """An explicitly quantized (Q/DQ) tiny detector: uint8 → float → Q → DQ → rows ``[B, N, 6]``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rows = size * size * 3 // 6
    graph = helper.make_graph(
        [
            helper.make_node("Cast", [input_name], ["x"], to=TensorProto.FLOAT),
            helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["dq"]),
            helper.make_node("Reshape", ["dq", "shape"], [output]),
        ],
        "tiny_detector_qdq",
        [helper.make_tensor_value_info(input_name, TensorProto.UINT8, ["batch", size, size, 3])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", rows, 6])],
        [
            numpy_helper.from_array(np.array([-1, rows, 6], np.int64), "shape"),
            numpy_helper.from_array(np.array(1.0, np.float32), "scale"),
            numpy_helper.from_array(np.array(0, np.uint8), "zero"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def fake_plan_header(path: Path) -> dict[str, Any]:
    """What the fake builder recorded in a plan: flags, strongly typed, compatibility, workspace, I/O."""
    data = Path(path).read_bytes()
    assert data.startswith(PLAN_MAGIC), f"{path} is not a fake plan"
    (n,) = struct.unpack_from("<I", data, len(PLAN_MAGIC))
    start = len(PLAN_MAGIC) + 4
    header: dict[str, Any] = json.loads(data[start : start + n])
    return header
