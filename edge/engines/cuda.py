"""A thin, checked layer over cuda-python's runtime API: pinned host buffers, device buffers, streams, events, graphs.

cuda-python returns ``(err, value)`` tuples instead of raising; forgetting to look at ``err`` turns a
failed copy into silently wrong results. Every call here goes through :meth:`CudaRuntime.call`, which
raises with the CUDA error's name. The module is imported lazily and can be injected, so tests run
the same code over a fake runtime that keeps "device" memory in host RAM.
"""

from __future__ import annotations

import ctypes
import logging
import math
from collections.abc import Callable
from types import TracebackType
from typing import Any

import numpy as np

from edge.errors import BackendUnavailableError, EngineError

log = logging.getLogger(__name__)

CUDA_PYTHON_HINT = "pip install 'cuda-python>=12.6' (or 'mitosis-edge[gpu]')"

# Errors meaning "no usable GPU here" rather than "this call went wrong".
_UNAVAILABLE_ERRORS = frozenset(
    {
        "cudaErrorNoDevice",
        "cudaErrorInsufficientDriver",
        "cudaErrorInitializationError",
        "cudaErrorStubLibrary",
        "cudaErrorDevicesUnavailable",
        "cudaErrorSystemDriverMismatch",
        "cudaErrorCompatNotSupportedOnDevice",
        "cudaErrorInvalidDevice",
        "cudaErrorCallRequiresNewerDriver",
        "cudaErrorSystemNotReady",
    }
)
_NOT_READY = "cudaErrorNotReady"


def import_cudart(module: Any | None = None) -> Any:
    """cuda-python's runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6), or ``module``."""
    if module is not None:
        return module
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise BackendUnavailableError(f"cuda-python is not installed: {CUDA_PYTHON_HINT}") from None
    return runtime


class CudaRuntime:
    """cuda-python's runtime API with every returned error checked. Pass ``module`` to use a fake.

    ``device`` is made current at creation and by :meth:`use_device` (the runtime API keeps the
    current device per thread, so a thread that collects results calls it first).
    """

    def __init__(self, module: Any | None = None, device: int = 0) -> None:
        self.rt = import_cudart(module)
        self.device = device
        self.use_device()

    def use_device(self) -> None:
        self.call("cudaSetDevice", self.device)

    def error_name(self, err: Any) -> str:
        try:
            status, name = self.rt.cudaGetErrorName(err)
            if _code(status) == 0:
                return name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # noqa: BLE001 - naming an error must never raise a second one
            pass
        return str(getattr(err, "name", err))

    def call(self, fn_name: str, *args: Any, what: str = "") -> Any:
        """Call ``cudart.<fn_name>(*args)``; raise on error; return the value(s) after the error code."""
        try:
            fn = getattr(self.rt, fn_name)
        except AttributeError:
            raise BackendUnavailableError(
                f"cuda-python has no {fn_name}; it is too old or too new for mitosis-edge: {CUDA_PYTHON_HINT}"
            ) from None
        result = fn(*args)
        err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
        code = _code(err)
        if code != 0:
            raise self._error(fn_name, err, code, what)
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    def _error(self, fn_name: str, err: Any, code: int, what: str) -> EngineError:
        name = self.error_name(err)
        message = f"CUDA {fn_name}{f' ({what})' if what else ''} failed: {name} ({code})"
        if name in _UNAVAILABLE_ERRORS:
            return BackendUnavailableError(f"{message}; the GPU is not usable. Check `nvidia-smi` and the driver")
        if name == "cudaErrorMemoryAllocation":
            return EngineError(f"{message}; out of GPU or pinned memory: lower max_batch or in_flight")
        return EngineError(message)

    def query(self, fn_name: str, handle: Any) -> bool:
        """True when the work behind ``handle`` is done, False while it runs (cudaErrorNotReady)."""
        result = getattr(self.rt, fn_name)(handle)
        err = result[0] if isinstance(result, tuple) else result
        code = _code(err)
        if code == 0:
            return True
        if self.error_name(err) == _NOT_READY:
            return False
        raise self._error(fn_name, err, code, "")

    # -- factories ---------------------------------------------------------------------------

    def host_buffer(self, nbytes: int) -> HostBuffer:
        return HostBuffer(self, nbytes)

    def device_buffer(self, nbytes: int) -> DeviceBuffer:
        return DeviceBuffer(self, nbytes)

    def stream(self) -> Stream:
        return Stream(self)

    def event(self, timing: bool = True) -> Event:
        return Event(self, timing=timing)

    # -- copies ------------------------------------------------------------------------------

    def memcpy_htod_async(self, dst: DeviceBuffer | int, src: HostBuffer | int, nbytes: int, stream: Stream) -> None:
        """Queue a host-to-device copy on ``stream``; ``src`` should be pinned for the copy to be asynchronous."""
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.call("cudaMemcpyAsync", _ptr(dst), _ptr(src), nbytes, kind, stream.raw, what=f"{nbytes} bytes to GPU")

    def memcpy_dtoh_async(self, dst: HostBuffer | int, src: DeviceBuffer | int, nbytes: int, stream: Stream) -> None:
        """Queue a device-to-host copy on ``stream``."""
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.call("cudaMemcpyAsync", _ptr(dst), _ptr(src), nbytes, kind, stream.raw, what=f"{nbytes} bytes from GPU")

    # -- graphs ------------------------------------------------------------------------------

    def capture_graph(self, stream: Stream, enqueue: Callable[[], None]) -> CudaGraph:
        """Record what ``enqueue`` queues on ``stream`` as a CUDA graph (nothing runs while capturing).

        On any failure the capture is ended and its partial graph freed before the error propagates,
        so the stream stays usable for plain launches.
        """
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self.call("cudaStreamBeginCapture", stream.raw, mode)
        graph: Any = None
        try:
            enqueue()
            graph = self.call("cudaStreamEndCapture", stream.raw)
            executable = self.call("cudaGraphInstantiate", graph, 0)
        except BaseException:
            if graph is None:
                try:  # leave capture mode whatever state it is in; the error that matters is already raised
                    result = self.rt.cudaStreamEndCapture(stream.raw)
                    graph = result[1] if isinstance(result, tuple) and len(result) > 1 else None
                except Exception:  # noqa: BLE001
                    graph = None
            if graph is not None:
                self.rt.cudaGraphDestroy(graph)
            raise
        return CudaGraph(self, graph, executable)

    def device_properties(self, device: int | None = None) -> dict[str, Any]:
        """Name, compute capability and memory of a device, read through the runtime API."""
        props = self.call("cudaGetDeviceProperties", self.device if device is None else device)
        name = props.name
        name = name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(name, bytes) else str(name)
        return {
            "name": name,
            "compute_capability": f"{props.major}.{props.minor}",
            "memory_mb": int(props.totalGlobalMem) // (1 << 20),
        }


def _code(err: Any) -> int:
    try:
        return int(err)
    except (TypeError, ValueError):
        return int(getattr(err, "value", -1))


def _ptr(buffer: HostBuffer | DeviceBuffer | int) -> int:
    return buffer if isinstance(buffer, int) else buffer.ptr


class _Resource:
    """Something freed exactly once: ``close`` is idempotent; usable as a context manager."""

    _closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._free()
        except EngineError as exc:  # freeing during shutdown must not hide the error that caused it
            log.warning("%s: %s", type(self).__name__, exc)

    def _free(self) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError(f"{type(self).__name__} is closed")

    def __enter__(self) -> _Resource:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class HostBuffer(_Resource):
    """Page-locked host memory (cudaHostAlloc), seen from numpy without a copy.

    Copies from pinned memory are truly asynchronous and run at full PCIe speed. Views returned by
    :meth:`array` are valid only until :meth:`close`; copy anything that must outlive the buffer.
    """

    def __init__(self, cuda: CudaRuntime, nbytes: int) -> None:
        self.cuda = cuda
        self.nbytes = max(int(nbytes), 1)
        flags = getattr(cuda.rt, "cudaHostAllocDefault", 0)
        self.ptr: int = int(cuda.call("cudaHostAlloc", self.nbytes, flags, what=f"{self.nbytes} pinned bytes"))
        raw = (ctypes.c_uint8 * self.nbytes).from_address(self.ptr)
        self._bytes = np.ctypeslib.as_array(raw)

    def array(self, dtype: np.dtype[Any] | str | type, shape: tuple[int, ...]) -> np.ndarray:
        """A view of the first ``prod(shape) * itemsize`` bytes as ``dtype[shape]``."""
        self._check_open()
        dt = np.dtype(dtype)
        size = math.prod(shape) * dt.itemsize
        if size > self.nbytes:
            raise EngineError(f"view of {shape} {dt} needs {size} bytes; the pinned buffer holds {self.nbytes}")
        return self._bytes[:size].view(dt).reshape(shape)

    def _free(self) -> None:
        self._bytes = np.empty(0, np.uint8)
        self.cuda.call("cudaFreeHost", self.ptr)


class DeviceBuffer(_Resource):
    """GPU memory (cudaMalloc); ``ptr`` is what TensorRT's ``set_tensor_address`` takes."""

    def __init__(self, cuda: CudaRuntime, nbytes: int) -> None:
        self.cuda = cuda
        self.nbytes = max(int(nbytes), 1)
        self.ptr: int = int(cuda.call("cudaMalloc", self.nbytes, what=f"{self.nbytes} GPU bytes"))

    def _free(self) -> None:
        self.cuda.call("cudaFree", self.ptr)


class Stream(_Resource):
    """A non-blocking CUDA stream (it does not wait for the legacy default stream)."""

    def __init__(self, cuda: CudaRuntime) -> None:
        self.cuda = cuda
        flags = getattr(cuda.rt, "cudaStreamNonBlocking", 1)
        self.raw: Any = cuda.call("cudaStreamCreateWithFlags", flags)

    @property
    def handle(self) -> int:
        """The stream as an integer, as TensorRT's ``execute_async_v3`` takes it."""
        return int(self.raw)

    def synchronize(self) -> None:
        self._check_open()
        self.cuda.call("cudaStreamSynchronize", self.raw)

    def done(self) -> bool:
        self._check_open()
        return self.cuda.query("cudaStreamQuery", self.raw)

    def _free(self) -> None:
        try:
            self.cuda.call("cudaStreamSynchronize", self.raw)
        finally:
            self.cuda.call("cudaStreamDestroy", self.raw)


class Event(_Resource):
    """A CUDA event: mark a point in a stream, wait for it, or time between two of them."""

    def __init__(self, cuda: CudaRuntime, timing: bool = True) -> None:
        self.cuda = cuda
        flags = getattr(cuda.rt, "cudaEventDefault", 0) if timing else getattr(cuda.rt, "cudaEventDisableTiming", 2)
        self.raw: Any = cuda.call("cudaEventCreateWithFlags", flags)

    def record(self, stream: Stream) -> None:
        self._check_open()
        self.cuda.call("cudaEventRecord", self.raw, stream.raw)

    def synchronize(self) -> None:
        self._check_open()
        self.cuda.call("cudaEventSynchronize", self.raw)

    def done(self) -> bool:
        self._check_open()
        return self.cuda.query("cudaEventQuery", self.raw)

    def elapsed_ms(self, since: Event) -> float:
        """Milliseconds of GPU time from ``since`` to this event (both recorded and completed)."""
        return float(self.cuda.call("cudaEventElapsedTime", since.raw, self.raw))

    def _free(self) -> None:
        self.cuda.call("cudaEventDestroy", self.raw)


class CudaGraph(_Resource):
    """An instantiated CUDA graph: one launch replays everything that was captured."""

    def __init__(self, cuda: CudaRuntime, graph: Any, executable: Any) -> None:
        self.cuda = cuda
        self.graph = graph
        self.executable = executable

    def launch(self, stream: Stream) -> None:
        self._check_open()
        self.cuda.call("cudaGraphLaunch", self.executable, stream.raw)

    def _free(self) -> None:
        try:
            self.cuda.call("cudaGraphExecDestroy", self.executable)
        finally:
            self.cuda.call("cudaGraphDestroy", self.graph)
