"""The checked cuda-python layer, run over a fake runtime that keeps device memory in host RAM."""

from __future__ import annotations

import numpy as np
import pytest

from edge.engines.cuda import CudaRuntime
from edge.errors import BackendUnavailableError, EngineError
from tests.fake_cudart import FakeCudart, cudaError_t


@pytest.fixture
def fake() -> FakeCudart:
    return FakeCudart()


def test_real_cuda_python_without_a_gpu_raises_backend_unavailable_with_the_error_name() -> None:
    pytest.importorskip("cuda.bindings.runtime")
    try:
        runtime = CudaRuntime()
    except BackendUnavailableError as exc:
        assert "cudaSetDevice failed: cudaError" in str(exc) and "nvidia-smi" in str(exc)
    else:  # pragma: no cover - on a GPU box
        runtime.device_buffer(16).close()


def test_copies_round_trip_through_device_memory_only_after_synchronize(fake: FakeCudart) -> None:
    cuda = CudaRuntime(fake)
    host_in, host_out = cuda.host_buffer(64), cuda.host_buffer(64)
    device, stream = cuda.device_buffer(64), cuda.stream()
    src = host_in.array(np.float32, (4, 4))
    src[...] = np.arange(16, dtype=np.float32).reshape(4, 4)
    cuda.memcpy_htod_async(device, host_in, 64, stream)
    cuda.memcpy_dtoh_async(host_out, device, 64, stream)
    dst = host_out.array(np.float32, (4, 4))
    assert not dst.any()  # queued, not run: reading before synchronizing sees stale memory, as on a GPU
    assert not stream.done()
    stream.synchronize()
    np.testing.assert_array_equal(dst, src)
    assert stream.done()
    for resource in (host_in, host_out, device, stream):
        resource.close()
        resource.close()  # idempotent
    assert fake.live() == dict.fromkeys(fake.live(), 0)


def test_every_error_code_is_checked_and_named(fake: FakeCudart) -> None:
    cuda = CudaRuntime(fake)
    fake.fail["cudaMalloc"] = cudaError_t.cudaErrorMemoryAllocation
    with pytest.raises(
        EngineError,
        match=r"CUDA cudaMalloc \(1024 GPU bytes\) failed: cudaErrorMemoryAllocation "
        r"\(2\); out of GPU or pinned memory: lower max_batch or in_flight",
    ):
        cuda.device_buffer(1024)
    stream = cuda.stream()
    with pytest.raises(EngineError, match=r"cudaMemcpyAsync .* failed: cudaErrorInvalidValue"):
        cuda.memcpy_htod_async(12345, 678, 8, stream)  # pointers outside any allocation
    stream.close()


def test_no_device_is_backend_unavailable() -> None:
    with pytest.raises(BackendUnavailableError, match="cudaErrorNoDevice"):
        CudaRuntime(FakeCudart(device_count=0))


def test_host_buffer_views_are_bounded(fake: FakeCudart) -> None:
    cuda = CudaRuntime(fake)
    with cuda.host_buffer(16) as buffer:
        assert buffer.array(np.uint8, (2, 8)).shape == (2, 8)
        with pytest.raises(EngineError, match=r"view of \(5,\) float32 needs 20 bytes; the pinned buffer holds 16"):
            buffer.array(np.float32, (5,))
    with pytest.raises(EngineError, match="HostBuffer is closed"):
        buffer.array(np.uint8, (1,))


def test_events_time_the_work_between_them(fake: FakeCudart) -> None:
    cuda = CudaRuntime(fake)
    stream, start, end = cuda.stream(), cuda.event(), cuda.event()
    start.record(stream)
    end.record(stream)
    assert not end.done()
    end.synchronize()
    assert end.done() and end.elapsed_ms(start) >= 0.0
    for r in (start, end, stream):
        r.close()


def test_a_captured_graph_replays_its_copies(fake: FakeCudart) -> None:
    cuda = CudaRuntime(fake)
    host, device, stream = cuda.host_buffer(8), cuda.device_buffer(8), cuda.stream()
    back = cuda.host_buffer(8)

    def enqueue() -> None:
        cuda.memcpy_htod_async(device, host, 8, stream)
        cuda.memcpy_dtoh_async(back, device, 8, stream)

    graph = cuda.capture_graph(stream, enqueue)
    assert not back.array(np.uint8, (8,)).any()  # capturing records, runs nothing
    for value in (3, 7):
        host.array(np.uint8, (8,))[:] = value
        graph.launch(stream)
        stream.synchronize()
        assert (back.array(np.uint8, (8,)) == value).all()
    for r in (graph, host, device, back, stream):
        r.close()
    assert fake.live() == dict.fromkeys(fake.live(), 0)


def test_a_failed_capture_leaves_the_stream_usable(fake: FakeCudart) -> None:
    cuda = CudaRuntime(fake)
    stream = cuda.stream()

    def broken() -> None:
        raise EngineError("kernel refused")

    with pytest.raises(EngineError, match="kernel refused"):
        cuda.capture_graph(stream, broken)
    fake.fail["cudaStreamBeginCapture"] = cudaError_t.cudaErrorStreamCaptureUnsupported
    with pytest.raises(EngineError, match="cudaErrorStreamCaptureUnsupported"):
        cuda.capture_graph(stream, lambda: None)
    stream.synchronize()  # not stuck in capture mode
    stream.close()
    assert fake.live()["graphs"] == 0


def test_device_properties(fake: FakeCudart) -> None:
    props = CudaRuntime(fake).device_properties()
    assert props == {"name": "NVIDIA Fake GPU", "compute_capability": "8.9", "memory_mb": 24_000}
