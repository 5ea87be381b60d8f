"""The TensorRT backend: a deserialized plan behind the Engine protocol, with batches kept in flight on CUDA streams.

Each of ``in_flight`` slots owns a stream, an execution context, page-locked host buffers and device
buffers sized for the plan's largest batch. ``submit`` copies the batch once into the slot's pinned
input, queues H2D copy, inference and D2H copies, and returns at once; the next batch goes to the
next slot, so host work, copies and compute overlap. Only TensorRT 10+'s name-based I/O tensor API
is used, which TensorRT 11 keeps. ``tensorrt`` is imported lazily, after a safe GPU probe.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.engines.base import DEFAULT_IN_FLIGHT, Outputs, TensorSpec, check_batch
from edge.engines.cuda import CudaGraph, CudaRuntime, DeviceBuffer, HostBuffer, Stream
from edge.engines.plans import MachineInfo, plan_matches_machine, read_sidecar, sidecar_path
from edge.engines.probe import GpuProbe, require_gpu
from edge.errors import BackendUnavailableError, EngineError, EngineInputError, PlanError

log = logging.getLogger(__name__)

TENSORRT_HINT = (
    "pip install 'tensorrt>=10' (or 'mitosis-edge[gpu]'); "
    "the lean runtime 'tensorrt_lean' runs plans but cannot build them"
)
MIN_TENSORRT_MAJOR = 10  # the name-based I/O tensor API (execute_async_v3, set_tensor_address)
POLL_INTERVAL = 0.0005  # seconds between stream queries while waiting with a timeout

_NUMPY_OF = {
    "FLOAT": "float32",
    "HALF": "float16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "UINT8": "uint8",
}


# ---------------------------------------------------------------------------------------------
# the tensorrt module: import, version, logging, dtypes


def load_tensorrt(module: Any | None = None, *, need_builder: bool = False, probe: GpuProbe | None = None) -> Any:
    """The ``tensorrt`` module (else ``tensorrt_lean``), or ``module`` when given (tests pass a fake).

    Call :func:`edge.engines.probe.require_gpu` first: importing TensorRT without a GPU can crash.
    A probe that saw ``import tensorrt`` crash in its child stops us from crashing this process.
    """
    if module is None:
        if probe is not None and probe.tensorrt_version is None and "crashed" in probe.tensorrt_error:
            raise BackendUnavailableError(f"TensorRT cannot be used here: {probe.tensorrt_error}")
        errors = []
        for name in ("tensorrt", "tensorrt_lean"):
            try:
                module = __import__(name)
                break
            except ImportError as exc:
                errors.append(f"{name}: {exc}")
        else:
            raise BackendUnavailableError(f"TensorRT is not installed ({'; '.join(errors)}): {TENSORRT_HINT}")
    major = trt_major(module)
    if major < MIN_TENSORRT_MAJOR:
        raise BackendUnavailableError(
            f"TensorRT {module.__version__} is too old; mitosis-edge needs TensorRT {MIN_TENSORRT_MAJOR} or newer: "
            f"{TENSORRT_HINT}"
        )
    if need_builder and not hasattr(module, "Builder"):
        raise BackendUnavailableError(
            f"{module.__name__} {module.__version__} has no builder (only the lean runtime is installed); building "
            "plans needs the full TensorRT: pip install 'tensorrt>=10'"
        )
    return module


def trt_major(trt: Any) -> int:
    """Major version of a tensorrt module, from ``__version__`` ("10.13.3.9" -> 10)."""
    try:
        return int(str(trt.__version__).split(".")[0])
    except (AttributeError, ValueError):
        raise BackendUnavailableError(f"cannot read the TensorRT version from {trt!r}: {TENSORRT_HINT}") from None


class TrtLog:
    """Forwards TensorRT's messages to Python logging and keeps the recent ones for error messages.

    TensorRT keeps one process-wide logger (the first one given wins), so there is one per module.
    """

    def __init__(self, maxlen: int = 400) -> None:
        self.messages: collections.deque[tuple[int, str, str]] = collections.deque(maxlen=maxlen)
        self._count = 0
        self._lock = threading.Lock()

    def record(self, severity: str, message: str) -> None:
        level = {
            "INTERNAL_ERROR": logging.ERROR,
            "ERROR": logging.ERROR,
            "WARNING": logging.WARNING,
            "INFO": logging.DEBUG,
        }.get(severity)
        if level is None:  # VERBOSE: far too much for any log
            return
        log.log(level, "TensorRT: %s", message)
        with self._lock:
            self._count += 1
            self.messages.append((self._count, severity, message))

    def mark(self) -> int:
        with self._lock:
            return self._count

    def since(self, mark: int, min_severity: str = "WARNING") -> list[str]:
        """Messages at ``min_severity`` or worse logged after ``mark``."""
        order = ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO"]
        keep = set(order[: order.index(min_severity) + 1])
        with self._lock:
            return [f"[{sev}] {msg}" for n, sev, msg in self.messages if n > mark and sev in keep]


_LOGGERS: dict[int, tuple[Any, Any, TrtLog]] = {}
_LOGGERS_LOCK = threading.Lock()


def trt_logger(trt: Any) -> tuple[Any, TrtLog]:
    """The ILogger to give TensorRT (one per module), and the TrtLog that collects its messages."""
    with _LOGGERS_LOCK:
        entry = _LOGGERS.get(id(trt))
        if entry is None or entry[0] is not trt:
            relay = TrtLog()

            class _Logger(trt.ILogger):  # type: ignore[misc, unused-ignore]  # tensorrt: no stubs
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)

                def log(self, severity: Any, msg: str) -> None:
                    relay.record(getattr(severity, "name", str(severity)).rsplit(".", 1)[-1], str(msg))

            entry = (trt, _Logger(), relay)
            _LOGGERS[id(trt)] = entry
        return entry[1], entry[2]


def numpy_dtype(trt: Any, dtype: Any) -> np.dtype[Any]:
    """The numpy dtype of a TensorRT DataType; EngineError for types numpy cannot hold (BF16, FP8, INT4)."""
    for name, np_name in _NUMPY_OF.items():
        member = getattr(trt.DataType, name, None)
        if member is not None and dtype == member:
            return np.dtype(np_name)
    raise EngineError(
        f"TensorRT data type {dtype} has no numpy equivalent (supported: {', '.join(_NUMPY_OF.values())}); "
        "keep the model's inputs and outputs uint8/float32/float16 (e.g. autocast with keep_io_types)"
    )


# ---------------------------------------------------------------------------------------------
# the engine


@dataclass
class _Slot:
    """One batch in flight: its own stream, context and buffers."""

    index: int
    stream: Stream
    context: Any
    host_in: HostBuffer
    dev_in: DeviceBuffer
    host_out: dict[str, HostBuffer]
    dev_out: dict[str, DeviceBuffer]
    pending: _TrtPending | None = None
    runs: collections.Counter[int] = field(default_factory=collections.Counter)  # plain launches per batch size
    graphs: dict[int, CudaGraph | None] = field(default_factory=dict)  # None: capture failed, do not retry


class _TrtPending:
    """A batch submitted to a TensorRTEngine; result() waits for its stream and returns owned copies."""

    def __init__(self, engine: TensorRTEngine, slot: _Slot, shapes: dict[str, tuple[int, ...]]) -> None:
        self._engine = engine
        self._slot = slot
        self._shapes = shapes
        self._outputs: Outputs | None = None
        self._error: EngineError | None = None

    def done(self) -> bool:
        if self._outputs is not None or self._error is not None:
            return True
        with self._engine._lock:
            if self._outputs is not None or self._slot.pending is not self or self._engine._closed:
                return True
            return self._slot.stream.done()

    def result(self, timeout: float | None = None) -> Outputs:
        if self._outputs is None and timeout is not None:
            deadline = time.monotonic() + timeout
            while not self.done():
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"engine {self._engine.name!r}: batch not done after {timeout:g} s")
                time.sleep(POLL_INTERVAL)
        if self._outputs is None:
            self._engine._collect(self)
        assert self._outputs is not None
        return self._outputs


class TensorRTEngine:
    """A TensorRT plan behind the Engine protocol (uint8 NHWC in, numpy out).

    ``trt``, ``cudart`` and ``probe`` are injectable for tests; by default the GPU is probed in a
    child process first, then ``tensorrt`` and cuda-python are imported. A plan with a sidecar
    (``<plan>.json``, written by the builder) is checked against this machine before loading.
    """

    def __init__(
        self,
        plan: str | Path,
        *,
        name: str | None = None,
        in_flight: int = DEFAULT_IN_FLIGHT,
        max_batch: int | None = None,
        cuda_graphs: bool = False,
        device: int = 0,
        rebuild_command: str = "",
        check_sidecar: bool = True,
        trt: Any | None = None,
        cudart: Any | None = None,
        probe: GpuProbe | None = None,
    ) -> None:
        self.plan_path = Path(plan)
        if not 1 <= in_flight <= 8:
            raise EngineError(f"in_flight={in_flight} must be between 1 and 8")
        self._lock = threading.RLock()
        self._closed = False
        self._slots: list[_Slot] = []
        self._next = 0
        self._cuda: CudaRuntime | None = None
        self._engine: Any = None
        self._runtime: Any = None
        self.cuda_graphs = cuda_graphs
        self.in_flight = in_flight
        self.device = device

        found = require_gpu(probe)  # before importing TensorRT: without a GPU the import itself may crash
        found.device(device)
        self._trt = load_tensorrt(trt, probe=found)
        self.sidecar = (read_sidecar(sidecar_path(self.plan_path)) or {}) if check_sidecar else {}
        self.rebuild_command = rebuild_command or str(self.sidecar.get("build_command", ""))
        self._name = name or str(self.sidecar.get("model") or self.plan_path.stem)
        if self.sidecar:
            machine = MachineInfo.from_probe(found, self._trt, device)
            ok, reason = plan_matches_machine(self.sidecar, machine)
            if not ok:
                raise PlanError(f"plan {self.plan_path} does not fit this machine: {reason}", self.rebuild_command)
        try:
            self._open(max_batch, cudart)
        except BaseException:
            self.close()
            raise

    # -- Engine protocol -----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def backend(self) -> str:
        return "tensorrt"

    @property
    def input_spec(self) -> TensorSpec:
        return self._input_spec

    @property
    def output_spec(self) -> tuple[TensorSpec, ...]:
        return self._output_spec

    @property
    def max_batch(self) -> int:
        return self._max_batch

    def infer(self, batch: np.ndarray) -> Outputs:
        return self.submit(batch).result()

    def submit(self, batch: np.ndarray) -> _TrtPending:
        """Queue one batch; blocks only while every slot is busy (then it waits for the oldest)."""
        check_batch(self.name, self._input_spec, self._max_batch, batch)
        with self._lock:
            self._check_open()
            slot = self._slots[self._next]
            if slot.pending is not None:
                self._collect(slot.pending)  # the oldest batch: keep its outputs, free the slot
            self._next = (self._next + 1) % len(self._slots)
            return self._enqueue_batch(slot, batch)

    def gpu_times_ms(self, batch: np.ndarray, repeats: int = 10) -> list[float]:
        """GPU milliseconds of ``repeats`` runs of one batch, copies included, timed with CUDA events.

        For benchmarks: host-side noise (Python, the pinned copy) is left out. Waits for batches in flight first.
        """
        check_batch(self.name, self._input_spec, self._max_batch, batch)
        with self._lock:
            self._check_open()
            assert self._cuda is not None
            for slot in self._slots:
                if slot.pending is not None:
                    self._collect(slot.pending)
            slot = self._slots[0]
            start, end = self._cuda.event(), self._cuda.event()
            times = []
            try:
                for _ in range(repeats):
                    start.record(slot.stream)
                    pending = self._enqueue_batch(slot, batch)
                    end.record(slot.stream)
                    self._collect(pending)
                    times.append(end.elapsed_ms(start))
            finally:
                start.close()
                end.close()
            return times

    def _enqueue_batch(self, slot: _Slot, batch: np.ndarray) -> _TrtPending:
        """Stage the batch in the slot's pinned input, then queue H2D, inference and D2H on its stream."""
        cuda = self._cuda
        assert cuda is not None
        cuda.use_device()
        staged = slot.host_in.array(self._in_dtype, batch.shape)
        np.copyto(staged, batch)  # the one host copy: into pinned memory
        if not slot.context.set_input_shape(self._in_name, batch.shape):
            raise EngineInputError(
                f"engine {self.name!r}: TensorRT refused input shape {batch.shape} "
                f"(plan profile {self._profile}): {self._recent_errors()}"
            )
        cuda.memcpy_htod_async(slot.dev_in, slot.host_in, staged.nbytes, slot.stream)
        self._launch(slot, batch.shape[0])
        shapes = self._output_shapes(slot, batch.shape)
        for out in self._output_spec:
            nbytes = math.prod(shapes[out.name]) * np.dtype(out.dtype).itemsize
            cuda.memcpy_dtoh_async(slot.host_out[out.name], slot.dev_out[out.name], nbytes, slot.stream)
        pending = _TrtPending(self, slot, shapes)
        slot.pending = pending
        return pending

    def close(self) -> None:
        """Finish what is in flight (its results stay readable), then free every GPU resource. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for slot in self._slots:
                if slot.pending is not None:
                    try:
                        self._collect(slot.pending, closing=True)
                    except EngineError as exc:
                        log.warning("engine %r: a batch in flight failed while closing: %s", self.name, exc)
            for slot in self._slots:
                for graph in slot.graphs.values():
                    if graph is not None:
                        graph.close()
                slot.stream.close()
                slot.context = None  # contexts go before the engine, the engine before the runtime
            self._engine = None
            self._runtime = None
            for slot in self._slots:
                for buffer in (slot.host_in, slot.dev_in, *slot.host_out.values(), *slot.dev_out.values()):
                    buffer.close()
            self._slots = []
            self._free_partial()

    def __enter__(self) -> TensorRTEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"TensorRTEngine({self.name!r}, plan={str(self.plan_path)!r}, max_batch={self._max_batch_or_0()}, "
            f"in_flight={self.in_flight}{', closed' if self._closed else ''})"
        )

    # -- opening ---------------------------------------------------------------------------------

    def _open(self, max_batch: int | None, cudart: Any | None) -> None:
        trt = self._trt
        logger, self._log = trt_logger(trt)
        try:
            data = self.plan_path.read_bytes()
        except OSError as exc:
            raise PlanError(f"cannot read TensorRT plan {self.plan_path}: {exc}", self.rebuild_command) from None
        self._cuda = CudaRuntime(cudart, self.device)
        self._partial: list[Any] = []  # resources made before the slots exist, freed if opening fails
        mark = self._log.mark()
        self._runtime = trt.Runtime(logger)
        if self.sidecar.get("version_compatible"):
            self._runtime.engine_host_code_allowed = True  # a version-compatible plan carries its lean runtime
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            why = "; ".join(self._log.since(mark, "ERROR")) or "no reason given"
            raise PlanError(
                f"TensorRT {trt.__version__} could not deserialize plan {self.plan_path} ({why}); it was built by "
                "another TensorRT version or GPU, or the file is damaged",
                self.rebuild_command,
            )
        self._bind_tensors(max_batch)
        for index in range(self.in_flight):
            self._slots.append(self._make_slot(index))

    def _bind_tensors(self, max_batch: int | None) -> None:
        engine, trt = self._engine, self._trt
        inputs: list[str] = []
        outputs: list[str] = []
        for i in range(engine.num_io_tensors):
            tname = engine.get_tensor_name(i)
            mode = engine.get_tensor_mode(tname)
            (inputs if mode == trt.TensorIOMode.INPUT else outputs).append(tname)
        if len(inputs) != 1 or not outputs:
            raise EngineError(
                f"plan {self.plan_path} has inputs {inputs} and outputs {outputs}; engines take exactly one "
                "uint8 NHWC input and give at least one output"
            )
        self._in_name = inputs[0]
        self._in_dtype = numpy_dtype(trt, engine.get_tensor_dtype(self._in_name))
        in_shape = tuple(int(d) for d in engine.get_tensor_shape(self._in_name))
        lo, opt, hi = (tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(self._in_name, 0))
        self._profile = f"min {lo}, opt {opt}, max {hi}"
        plan_max = hi[0]
        if max_batch is not None and max_batch < 1:
            raise EngineError(f"max_batch={max_batch} must be at least 1 (or None for the plan's maximum)")
        if max_batch is not None and max_batch > plan_max:
            raise PlanError(
                f"max_batch={max_batch} is more than plan {self.plan_path} allows "
                f"({plan_max}, profile {self._profile})",
                self.rebuild_command,
            )
        self._max_batch = max_batch or plan_max
        self._in_max_shape = (self._max_batch, *hi[1:])
        self._input_spec = TensorSpec(self._in_name, self._in_dtype.name, tuple(None if d < 0 else d for d in in_shape))
        probe_ctx = engine.create_execution_context()
        if probe_ctx is None:
            raise EngineError(
                f"TensorRT could not create an execution context for {self.plan_path} (out of GPU memory?)"
            )
        if not probe_ctx.set_input_shape(self._in_name, self._in_max_shape):
            raise PlanError(
                f"plan {self.plan_path} refuses its own largest input {self._in_max_shape}: {self._recent_errors()}",
                self.rebuild_command,
            )
        specs, self._out_max_shape = [], {}
        for tname in outputs:
            dtype = numpy_dtype(trt, engine.get_tensor_dtype(tname))
            declared = tuple(int(d) for d in engine.get_tensor_shape(tname))
            largest = tuple(int(d) for d in probe_ctx.get_tensor_shape(tname))
            if any(d < 0 for d in largest):
                raise EngineError(
                    f"output {tname} of {self.plan_path} has a data-dependent shape {largest}; "
                    "only shapes fixed by the input shape are supported"
                )
            self._out_max_shape[tname] = largest
            specs.append(TensorSpec(tname, dtype.name, tuple(None if d < 0 else d for d in declared)))
        del probe_ctx
        self._output_spec = tuple(specs)
        self._shape_cache: dict[tuple[int, ...], dict[str, tuple[int, ...]]] = {}

    def _make_slot(self, index: int) -> _Slot:
        cuda = self._cuda
        assert cuda is not None
        made: list[Any] = []
        self._partial = made
        stream = cuda.stream()
        made.append(stream)
        context = self._engine.create_execution_context()
        if context is None:
            raise EngineError(
                f"TensorRT could not create execution context {index} for {self.plan_path} "
                "(out of GPU memory? lower in_flight)"
            )
        in_bytes = math.prod(self._in_max_shape) * self._in_dtype.itemsize
        host_in = cuda.host_buffer(in_bytes)
        made.append(host_in)
        dev_in = cuda.device_buffer(in_bytes)
        made.append(dev_in)
        host_out, dev_out = {}, {}
        for spec in self._output_spec:
            nbytes = math.prod(self._out_max_shape[spec.name]) * np.dtype(spec.dtype).itemsize
            host_out[spec.name] = cuda.host_buffer(nbytes)
            made.append(host_out[spec.name])
            dev_out[spec.name] = cuda.device_buffer(nbytes)
            made.append(dev_out[spec.name])
        bound = [context.set_tensor_address(self._in_name, dev_in.ptr)]
        bound += [context.set_tensor_address(n, b.ptr) for n, b in dev_out.items()]
        if not all(bound):
            raise EngineError(f"TensorRT refused a tensor address for {self.plan_path}: {self._recent_errors()}")
        self._partial = []
        return _Slot(index, stream, context, host_in, dev_in, host_out, dev_out)

    def _free_partial(self) -> None:
        for resource in reversed(getattr(self, "_partial", [])):
            resource.close()
        self._partial = []

    # -- running ---------------------------------------------------------------------------------

    def _launch(self, slot: _Slot, n: int) -> None:
        if self.cuda_graphs:
            graph = slot.graphs.get(n, _MISSING)
            if isinstance(graph, CudaGraph):
                graph.launch(slot.stream)
                return
            if graph is _MISSING and slot.runs[n] >= 1:  # TensorRT wants one plain run per shape before capture
                captured = self._capture(slot, n)
                if captured is not None:
                    captured.launch(slot.stream)  # capturing records without running; now run it
                    return
        self._enqueue(slot)
        slot.runs[n] += 1

    def _capture(self, slot: _Slot, n: int) -> CudaGraph | None:
        assert self._cuda is not None
        try:
            graph = self._cuda.capture_graph(slot.stream, lambda: self._enqueue(slot))
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to plain launches
            log.warning(
                "engine %r: CUDA graph capture for batch %d failed, using plain launches: %s", self.name, n, exc
            )
            slot.graphs[n] = None
            return None
        slot.graphs[n] = graph
        log.debug("engine %r: captured a CUDA graph for batch %d on slot %d", self.name, n, slot.index)
        return graph

    def _enqueue(self, slot: _Slot) -> None:
        mark = self._log.mark()
        if not slot.context.execute_async_v3(slot.stream.handle):
            errors = "; ".join(self._log.since(mark, "ERROR")) or "no reason given"
            raise EngineError(f"engine {self.name!r}: TensorRT execute_async_v3 failed: {errors}")

    def _output_shapes(self, slot: _Slot, in_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Output shapes for an input shape (the context has that input shape set)."""
        shapes = self._shape_cache.get(in_shape)
        if shapes is None:
            shapes = {o.name: tuple(int(d) for d in slot.context.get_tensor_shape(o.name)) for o in self._output_spec}
            self._shape_cache[in_shape] = shapes
        return shapes

    def _collect(self, pending: _TrtPending, closing: bool = False) -> None:
        """Wait for a pending batch and copy its outputs out of the slot's pinned buffers."""
        with self._lock:
            if pending._outputs is not None:
                return
            if pending._error is not None:
                raise pending._error
            slot = pending._slot
            if self._closed and not closing:
                raise EngineError(f"engine {self.name!r} was closed before this batch's result was collected")
            try:
                assert self._cuda is not None
                self._cuda.use_device()
                slot.stream.synchronize()
                pending._outputs = {
                    spec.name: slot.host_out[spec.name].array(spec.dtype, pending._shapes[spec.name]).copy()
                    for spec in self._output_spec
                }
            except EngineError as exc:
                pending._error = exc
                raise
            finally:
                if slot.pending is pending:
                    slot.pending = None

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError(f"engine {self.name!r} is closed")

    def _recent_errors(self) -> str:
        return "; ".join(self._log.since(0, "ERROR")[-3:]) or "no reason given"

    def _max_batch_or_0(self) -> int:
        return getattr(self, "_max_batch", 0)


_MISSING: Any = object()
