"""A fake of cuda-python's ``cuda.bindings.runtime`` that keeps "device" memory in host RAM.

Same calling conventions as the real module: every function returns a tuple whose first item is a
``cudaError_t``; handles are objects that convert to int. Work queued on a stream is deferred until
the stream (or an event on it) is synchronized, so code that reads results before synchronizing gets
stale data here as it would on a GPU. Copies check that both ends lie inside live allocations of
the right kind (device, or pinned host with ``strict_pinned``); a bad pointer at execution time
becomes a sticky ``cudaErrorIllegalAddress``, like a real kernel fault.

``launch(stream_handle, op)`` lets a fake TensorRT queue its work on a stream (and into a graph
being captured), so the whole engine data path runs for real against this module.
"""

from __future__ import annotations

import ctypes
import enum
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

Op = Callable[[], None]


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInitializationError = 3
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidResourceHandle = 400
    cudaErrorIllegalState = 401
    cudaErrorNotReady = 600
    cudaErrorIllegalAddress = 700
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaStreamCaptureMode(enum.IntEnum):
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


class _Handle:
    """A handle that converts to int, as cuda-python's cudaStream_t / cudaEvent_t do."""

    def __init__(self, value: int) -> None:
        self._value = value

    def __int__(self) -> int:
        return self._value

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._value:#x}>"


class cudaStream_t(_Handle):
    pass


class cudaEvent_t(_Handle):
    pass


class cudaGraph_t(_Handle):
    pass


class cudaGraphExec_t(_Handle):
    pass


class _Stream:
    def __init__(self, handle: cudaStream_t) -> None:
        self.handle = handle
        self.queue: deque[Op] = deque()
        self.capture: list[Op] | None = None


class _Event:
    def __init__(self, handle: cudaEvent_t, timing: bool) -> None:
        self.handle = handle
        self.timing = timing
        self.stream: _Stream | None = None
        self.time: float | None = None
        self.pending = False


_OK = cudaError_t.cudaSuccess
E = cudaError_t


class FakeCudart:
    """One fake GPU. ``deferred=False`` runs stream work at once (simpler, less realistic)."""

    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind
    cudaStreamCaptureMode = cudaStreamCaptureMode
    cudaStream_t = cudaStream_t
    cudaEvent_t = cudaEvent_t
    cudaStreamDefault = 0
    cudaStreamNonBlocking = 1
    cudaHostAllocDefault = 0
    cudaHostAllocPortable = 1
    cudaEventDefault = 0
    cudaEventBlockingSync = 1
    cudaEventDisableTiming = 2

    def __init__(
        self,
        *,
        deferred: bool = True,
        device_count: int = 1,
        name: str = "NVIDIA Fake GPU",
        compute_capability: tuple[int, int] = (8, 9),
        memory_mb: int = 24_000,
        strict_pinned: bool = True,
        runtime_version: int = 13000,
    ) -> None:
        self.deferred = deferred
        self.device_count = device_count
        self.name = name
        self.compute_capability = compute_capability
        self.memory_mb = memory_mb
        self.strict_pinned = strict_pinned
        self.runtime_version = runtime_version
        self.device_mem: dict[int, ctypes.Array[ctypes.c_char]] = {}
        self.host_mem: dict[int, ctypes.Array[ctypes.c_char]] = {}
        self.streams: dict[int, _Stream] = {}
        self.events: dict[int, _Event] = {}
        self.graphs: dict[int, list[Op]] = {}
        self.graph_execs: dict[int, list[Op]] = {}
        self.calls: Counter[str] = Counter()
        self.fail: dict[str, cudaError_t] = {}  # function name -> error it returns (once per entry)
        self.fail_always: dict[str, cudaError_t] = {}
        self.sticky: cudaError_t | None = None
        self.current_device = 0
        self._next_handle = 0x1000
        self._lock = threading.RLock()

    # -- bookkeeping ---------------------------------------------------------------------------

    def _enter(self, fn: str) -> cudaError_t | None:
        self.calls[fn] += 1
        if self.device_count <= 0:
            return E.cudaErrorNoDevice
        if fn in self.fail:
            return self.fail.pop(fn)
        if fn in self.fail_always:
            return self.fail_always[fn]
        return None

    def _handle(self) -> int:
        self._next_handle += 0x10
        return self._next_handle

    def live(self) -> dict[str, int]:
        """What is still allocated: a test asserts all zeros after close."""
        return {
            "device": len(self.device_mem),
            "host": len(self.host_mem),
            "streams": len(self.streams),
            "events": len(self.events),
            "graphs": len(self.graphs),
            "graph_execs": len(self.graph_execs),
        }

    @staticmethod
    def _inside(pool: dict[int, ctypes.Array[ctypes.c_char]], ptr: int, count: int) -> bool:
        return any(base <= ptr and ptr + count <= base + len(buf) for base, buf in pool.items())

    def _stream(self, stream: Any) -> _Stream | None:
        """The stream behind a handle; None for the legacy default stream (0); KeyError if unknown."""
        key = int(stream) if stream is not None else 0
        if key == 0:
            return None
        return self.streams[key]

    def _enqueue(self, stream: _Stream | None, op: Op) -> None:
        if stream is not None and stream.capture is not None:
            stream.capture.append(op)
        elif stream is not None and self.deferred:
            stream.queue.append(op)
        else:
            self._run(op)

    def _run(self, op: Op) -> None:
        try:
            op()
        except _Fault as fault:
            self.sticky = fault.error

    def _drain(self, stream: _Stream) -> None:
        while stream.queue:
            self._run(stream.queue.popleft())

    def _drain_all(self) -> None:
        for s in list(self.streams.values()):
            self._drain(s)

    def launch(self, stream_handle: int, op: Op) -> cudaError_t:
        """Queue ``op`` (a fake kernel) on a stream: how a fake TensorRT runs on this fake GPU."""
        with self._lock:
            try:
                stream = self._stream(stream_handle)
            except KeyError:
                return E.cudaErrorInvalidResourceHandle
            self._enqueue(stream, op)
            return _OK

    def read(self, ptr: int, count: int) -> bytes:
        """Bytes at a device pointer (a fake kernel's load); raises _Fault outside live device memory."""
        if not self._inside(self.device_mem, ptr, count):
            raise _Fault(E.cudaErrorIllegalAddress)
        return ctypes.string_at(ptr, count)

    def write(self, ptr: int, data: bytes) -> None:
        if not self._inside(self.device_mem, ptr, len(data)):
            raise _Fault(E.cudaErrorIllegalAddress)
        ctypes.memmove(ptr, data, len(data))

    # -- errors and devices ----------------------------------------------------------------------

    def cudaGetErrorName(self, error: cudaError_t) -> tuple[cudaError_t, bytes]:
        return _OK, cudaError_t(int(error)).name.encode()

    def cudaGetErrorString(self, error: cudaError_t) -> tuple[cudaError_t, bytes]:
        return _OK, f"fake: {cudaError_t(int(error)).name}".encode()

    def cudaGetDeviceCount(self) -> tuple[cudaError_t, int]:
        err = self._enter("cudaGetDeviceCount")
        return (err, 0) if err else (_OK, self.device_count)

    def cudaSetDevice(self, device: int) -> tuple[cudaError_t]:
        err = self._enter("cudaSetDevice")
        if err:
            return (err,)
        if not 0 <= device < self.device_count:
            return (E.cudaErrorInvalidDevice,)
        self.current_device = device
        return (_OK,)

    def cudaGetDeviceProperties(self, device: int) -> tuple[cudaError_t, Any]:
        err = self._enter("cudaGetDeviceProperties")
        if err:
            return err, None
        if not 0 <= device < self.device_count:
            return E.cudaErrorInvalidDevice, None
        major, minor = self.compute_capability
        return _OK, SimpleNamespace(
            name=self.name.encode(), major=major, minor=minor, totalGlobalMem=self.memory_mb << 20
        )

    def cudaRuntimeGetVersion(self) -> tuple[cudaError_t, int]:
        return _OK, self.runtime_version

    def cudaDriverGetVersion(self) -> tuple[cudaError_t, int]:
        return _OK, self.runtime_version

    # -- memory ------------------------------------------------------------------------------------

    def _alloc(self, pool: dict[int, ctypes.Array[ctypes.c_char]], fn: str, size: int) -> tuple[cudaError_t, int]:
        with self._lock:
            err = self._enter(fn)
            if err:
                return err, 0
            if size <= 0:
                return E.cudaErrorInvalidValue, 0
            buf = ctypes.create_string_buffer(int(size))
            ptr = ctypes.addressof(buf)
            pool[ptr] = buf
            return _OK, ptr

    def _free(self, pool: dict[int, ctypes.Array[ctypes.c_char]], fn: str, ptr: int) -> tuple[cudaError_t]:
        with self._lock:
            err = self._enter(fn)
            if err:
                return (err,)
            self._drain_all()  # cudaFree synchronizes the device
            if int(ptr) not in pool:
                return (E.cudaErrorInvalidValue,)
            del pool[int(ptr)]
            return (_OK,)

    def cudaMalloc(self, size: int) -> tuple[cudaError_t, int]:
        return self._alloc(self.device_mem, "cudaMalloc", size)

    def cudaFree(self, devPtr: int) -> tuple[cudaError_t]:
        return self._free(self.device_mem, "cudaFree", devPtr)

    def cudaHostAlloc(self, size: int, flags: int) -> tuple[cudaError_t, int]:
        return self._alloc(self.host_mem, "cudaHostAlloc", size)

    def cudaMallocHost(self, size: int) -> tuple[cudaError_t, int]:
        return self._alloc(self.host_mem, "cudaMallocHost", size)

    def cudaFreeHost(self, ptr: int) -> tuple[cudaError_t]:
        return self._free(self.host_mem, "cudaFreeHost", ptr)

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, kind: cudaMemcpyKind, stream: Any) -> tuple[cudaError_t]:
        with self._lock:
            err = self._enter("cudaMemcpyAsync")
            if err:
                return (err,)
            try:
                s = self._stream(stream)
            except KeyError:
                return (E.cudaErrorInvalidResourceHandle,)
            dst, src, count = int(dst), int(src), int(count)
            pinned = self.host_mem if self.strict_pinned else None
            if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
                ok = self._inside(self.device_mem, dst, count) and (pinned is None or self._inside(pinned, src, count))
            elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
                ok = self._inside(self.device_mem, src, count) and (pinned is None or self._inside(pinned, dst, count))
            else:
                ok = True
            if not ok:
                return (E.cudaErrorInvalidValue,)

            def copy() -> None:
                dev = self.device_mem
                if kind == cudaMemcpyKind.cudaMemcpyHostToDevice and not self._inside(dev, dst, count):
                    raise _Fault(E.cudaErrorIllegalAddress)
                if kind == cudaMemcpyKind.cudaMemcpyDeviceToHost and not self._inside(dev, src, count):
                    raise _Fault(E.cudaErrorIllegalAddress)
                ctypes.memmove(dst, src, count)

            self._enqueue(s, copy)
            return (_OK,)

    # -- streams -----------------------------------------------------------------------------------

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[cudaError_t, Any]:
        with self._lock:
            err = self._enter("cudaStreamCreateWithFlags")
            if err:
                return err, None
            handle = cudaStream_t(self._handle())
            self.streams[int(handle)] = _Stream(handle)
            return _OK, handle

    def cudaStreamCreate(self) -> tuple[cudaError_t, Any]:
        return self.cudaStreamCreateWithFlags(0)

    def cudaStreamSynchronize(self, stream: Any) -> tuple[cudaError_t]:
        with self._lock:
            err = self._enter("cudaStreamSynchronize")
            if err:
                return (err,)
            try:
                s = self._stream(stream)
            except KeyError:
                return (E.cudaErrorInvalidResourceHandle,)
            if s is None:
                self._drain_all()
            elif s.capture is not None:
                s.capture = None  # synchronizing a capturing stream invalidates the capture
                return (E.cudaErrorStreamCaptureUnsupported,)
            else:
                self._drain(s)
            return (self.sticky or _OK,)

    def cudaStreamQuery(self, stream: Any) -> tuple[cudaError_t]:
        """NotReady while work is queued; each query lets the queued work finish, so polling ends."""
        with self._lock:
            err = self._enter("cudaStreamQuery")
            if err:
                return (err,)
            try:
                s = self._stream(stream)
            except KeyError:
                return (E.cudaErrorInvalidResourceHandle,)
            if s is not None and s.queue:
                self._drain(s)
                return (E.cudaErrorNotReady,)
            return (self.sticky or _OK,)

    def cudaStreamDestroy(self, stream: Any) -> tuple[cudaError_t]:
        with self._lock:
            err = self._enter("cudaStreamDestroy")
            if err:
                return (err,)
            s = self.streams.pop(int(stream), None)
            if s is None:
                return (E.cudaErrorInvalidResourceHandle,)
            self._drain(s)
            return (_OK,)

    # -- events ------------------------------------------------------------------------------------

    def cudaEventCreateWithFlags(self, flags: int) -> tuple[cudaError_t, Any]:
        with self._lock:
            err = self._enter("cudaEventCreateWithFlags")
            if err:
                return err, None
            handle = cudaEvent_t(self._handle())
            self.events[int(handle)] = _Event(handle, timing=not flags & self.cudaEventDisableTiming)
            return _OK, handle

    def cudaEventCreate(self) -> tuple[cudaError_t, Any]:
        return self.cudaEventCreateWithFlags(0)

    def cudaEventRecord(self, event: Any, stream: Any) -> tuple[cudaError_t]:
        with self._lock:
            err = self._enter("cudaEventRecord")
            if err:
                return (err,)
            ev = self.events.get(int(event))
            if ev is None:
                return (E.cudaErrorInvalidResourceHandle,)
            try:
                s = self._stream(stream)
            except KeyError:
                return (E.cudaErrorInvalidResourceHandle,)
            ev.stream, ev.pending, ev.time = s, True, None

            def mark() -> None:
                ev.time, ev.pending = time.perf_counter(), False

            self._enqueue(s, mark)
            return (_OK,)

    def cudaEventSynchronize(self, event: Any) -> tuple[cudaError_t]:
        with self._lock:
            err = self._enter("cudaEventSynchronize")
            if err:
                return (err,)
            ev = self.events.get(int(event))
            if ev is None:
                return (E.cudaErrorInvalidResourceHandle,)
            if ev.pending and ev.stream is not None:
                self._drain(ev.stream)
            return (self.sticky or _OK,)

    def cudaEventQuery(self, event: Any) -> tuple[cudaError_t]:
        with self._lock:
            ev = self.events.get(int(event))
            if ev is None:
                return (E.cudaErrorInvalidResourceHandle,)
            if ev.pending:
                if ev.stream is not None:
                    self._drain(ev.stream)
                return (E.cudaErrorNotReady,)
            return (_OK,)

    def cudaEventElapsedTime(self, start: Any, end: Any) -> tuple[cudaError_t, float]:
        with self._lock:
            a, b = self.events.get(int(start)), self.events.get(int(end))
            if a is None or b is None or not (a.timing and b.timing):
                return E.cudaErrorInvalidResourceHandle, 0.0
            if a.time is None or b.time is None:
                return E.cudaErrorNotReady, 0.0
            return _OK, (b.time - a.time) * 1000.0

    def cudaEventDestroy(self, event: Any) -> tuple[cudaError_t]:
        with self._lock:
            return (_OK,) if self.events.pop(int(event), None) else (E.cudaErrorInvalidResourceHandle,)

    # -- graphs ------------------------------------------------------------------------------------

    def cudaStreamBeginCapture(self, stream: Any, mode: cudaStreamCaptureMode) -> tuple[cudaError_t]:
        with self._lock:
            err = self._enter("cudaStreamBeginCapture")
            if err:
                return (err,)
            try:
                s = self._stream(stream)
            except KeyError:
                return (E.cudaErrorInvalidResourceHandle,)
            if s is None:
                return (E.cudaErrorStreamCaptureUnsupported,)
            if s.capture is not None:
                return (E.cudaErrorIllegalState,)
            self._drain(s)
            s.capture = []
            return (_OK,)

    def cudaStreamIsCapturing(self, stream: Any) -> tuple[cudaError_t, int]:
        s = self._stream(stream)
        return _OK, int(s is not None and s.capture is not None)

    def cudaStreamEndCapture(self, stream: Any) -> tuple[cudaError_t, Any]:
        with self._lock:
            err = self._enter("cudaStreamEndCapture")
            try:
                s = self._stream(stream)
            except KeyError:
                return E.cudaErrorInvalidResourceHandle, None
            if s is None or s.capture is None:
                return err or E.cudaErrorIllegalState, None
            ops, s.capture = s.capture, None
            if err:
                return err, None
            handle = cudaGraph_t(self._handle())
            self.graphs[int(handle)] = ops
            return _OK, handle

    def cudaGraphInstantiate(self, graph: Any, flags: int) -> tuple[cudaError_t, Any]:
        with self._lock:
            err = self._enter("cudaGraphInstantiate")
            if err:
                return err, None
            ops = self.graphs.get(int(graph))
            if ops is None:
                return E.cudaErrorInvalidResourceHandle, None
            handle = cudaGraphExec_t(self._handle())
            self.graph_execs[int(handle)] = list(ops)
            return _OK, handle

    def cudaGraphLaunch(self, graphExec: Any, stream: Any) -> tuple[cudaError_t]:
        with self._lock:
            err = self._enter("cudaGraphLaunch")
            if err:
                return (err,)
            ops = self.graph_execs.get(int(graphExec))
            if ops is None:
                return (E.cudaErrorInvalidResourceHandle,)
            try:
                s = self._stream(stream)
            except KeyError:
                return (E.cudaErrorInvalidResourceHandle,)
            for op in ops:
                self._enqueue(s, op)
            return (_OK,)

    def cudaGraphExecDestroy(self, graphExec: Any) -> tuple[cudaError_t]:
        with self._lock:
            return (
                (_OK,)
                if self.graph_execs.pop(int(graphExec), None) is not None
                else (E.cudaErrorInvalidResourceHandle,)
            )

    def cudaGraphDestroy(self, graph: Any) -> tuple[cudaError_t]:
        with self._lock:
            return (_OK,) if self.graphs.pop(int(graph), None) is not None else (E.cudaErrorInvalidResourceHandle,)


class _Fault(Exception):
    """A fake kernel touched memory it must not: becomes the runtime's sticky error."""

    def __init__(self, error: cudaError_t) -> None:
        super().__init__(error.name)
        self.error = error
