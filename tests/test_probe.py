"""The GPU probe: runs in a child, never crashes this process, and says plainly why there is no GPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from edge.engines.probe import (
    GpuDevice,
    GpuProbe,
    interpret_probe_output,
    probe_gpu,
    require_gpu,
    run_probe,
)
from edge.engines.tensorrt import load_tensorrt
from edge.errors import BackendUnavailableError

NO_CORE = "import resource; resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); "


def child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_probe_on_this_machine_does_not_crash_and_says_why_there_is_no_gpu() -> None:
    found = run_probe()
    if found.ok:  # pragma: no cover - on a GPU box
        assert found.devices and found.devices[0].compute_capability.count(".") == 1
        return
    assert found.reason.startswith(("no GPU", "no usable")), found.reason
    assert found.devices == ()
    assert found.cuda_major is None or found.cuda_major >= 11  # cuda-python may be importable without a GPU


def test_a_crashing_child_gives_a_clear_reason_instead_of_crashing_us() -> None:
    found = run_probe(command=child(NO_CORE + "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"))
    assert not found.ok
    assert found.reason == "probe crashed with signal 11 (SIGSEGV) before it reported anything"


def test_a_crash_while_importing_tensorrt_keeps_the_gpu_but_marks_tensorrt_unusable() -> None:
    snapshot = {
        "ok": True,
        "devices": [{"index": 0, "name": "NVIDIA L4", "compute_capability": "8.9", "memory_mb": 22_000}],
        "driver_version": "12.8",
        "stage": "tensorrt",
    }
    code = (
        f"print({json.dumps(json.dumps(snapshot))}, flush=True); "
        + NO_CORE
        + "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    )
    found = run_probe(command=child(code))
    assert found.ok and found.devices[0].name == "NVIDIA L4" and found.tensorrt_version is None
    assert (
        "importing TensorRT crashed the probe: probe crashed with signal 11 (SIGSEGV) while checking tensorrt"
        in found.tensorrt_error
    )
    with pytest.raises(BackendUnavailableError, match="TensorRT cannot be used here"):
        load_tensorrt(probe=found)  # never imported in-process after the child crashed on it


def test_a_hung_child_times_out() -> None:
    found = run_probe(timeout=0.5, command=child("import time; time.sleep(30)"))
    assert not found.ok and found.reason.startswith("GPU probe timed out after 0.5 s")


@pytest.mark.parametrize(
    ("returncode", "stdout", "stderr", "reason"),
    [
        (0, "garbage\n", "", "GPU probe printed no result (stdout: 'garbage')"),
        (
            1,
            "",
            "Traceback ...\nImportError: boom\n",
            "GPU probe printed no result (stderr: 'Traceback ...\\nImportError: boom')",
        ),
        (3, '{"ok": true, "devices": []}', "oops", "GPU probe exited with status 3: oops"),
        (
            -6,
            '{"ok": false, "stage": "the driver"}',
            "",
            "probe crashed with signal 6 (SIGABRT) while checking the driver",
        ),
        (0, '{"ok": true, "devices": [{"index": "x"}]}', "", "GPU probe printed a malformed result"),
    ],
)
def test_bad_child_output_becomes_a_reason(returncode: int, stdout: str, stderr: str, reason: str) -> None:
    found = interpret_probe_output(returncode, stdout, stderr)
    assert not found.ok
    assert found.reason.startswith(reason), found.reason


def test_the_last_snapshot_wins() -> None:
    lines = [
        json.dumps({"ok": False, "stage": "the driver"}),
        json.dumps(
            {
                "ok": True,
                "stage": "done",
                "tensorrt_version": "10.13.3.9",
                "future_field": 1,
                "devices": [{"index": 0, "name": "H100", "compute_capability": "9.0", "memory_mb": 80_000}],
            }
        ),
    ]
    found = interpret_probe_output(0, "\n".join(lines), "")
    assert found.ok and found.tensorrt_version == "10.13.3.9"
    assert found.devices == (GpuDevice(0, "H100", "9.0", 80_000),)


def test_probe_is_cached_per_process_until_refresh(tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    code = (
        f"import pathlib; p = pathlib.Path({str(counter)!r}); p.write_text(p.read_text() + 'x' "
        'if p.exists() else \'x\'); print(\'{"ok": false, "reason": "no GPU: fake"}\')'
    )
    first = probe_gpu(command=child(code))
    again = probe_gpu(command=child(code))
    assert first is again and counter.read_text() == "x"
    refreshed = probe_gpu(command=child(code), refresh=True)
    assert counter.read_text() == "xx" and refreshed == first
    probe_gpu(refresh=True, command=child("print('{}')"))  # leave no surprising cache entry for others


def test_require_gpu_raises_with_the_reason_and_what_to_install() -> None:
    with pytest.raises(BackendUnavailableError) as info:
        require_gpu(GpuProbe(ok=False, reason="no GPU: libcuda.so.1 not found (NVIDIA driver not installed)"))
    text = str(info.value)
    assert "libcuda.so.1 not found" in text and "nvidia-smi" in text and "mitosis-edge[gpu]" in text
    assert "--backend onnxruntime" in text
    ok = GpuProbe(ok=True, devices=(GpuDevice(0, "L4", "8.9", 22_000),))
    assert require_gpu(ok) is ok
    with pytest.raises(BackendUnavailableError, match="cuda-python"):
        require_gpu(ok, need_cuda_runtime=True)
    with pytest.raises(BackendUnavailableError, match="CUDA device 1 not found; this machine has 1 device"):
        ok.device(1)


def test_probe_round_trips_through_json() -> None:
    found = GpuProbe(
        ok=True,
        devices=(GpuDevice(0, "L4", "8.9", 22_000),),
        driver_version="12.8",
        cuda_runtime_available=True,
        cuda_runtime_version="13.0",
        tensorrt_version="11.1.0",
        details=("note",),
    )
    data = json.loads(json.dumps(found.to_json_dict()))
    assert GpuProbe.from_json_dict(data) == found
    assert found.cuda_major == 13
