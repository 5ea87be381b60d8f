"""Is an NVIDIA GPU usable here, and which CUDA and TensorRT? Asked in a child process, never in this one.

A CUDA or TensorRT runtime on a machine without a working GPU can segfault or hang instead of raising,
so the real check runs in ``python -m edge.engines.probe``; this process only reads the one JSON line
the child prints. A crash, a hang or garbage becomes ``GpuProbe(ok=False, reason=...)``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge.errors import BackendUnavailableError

log = logging.getLogger(__name__)

DEFAULT_PROBE_TIMEOUT = 20.0  # seconds; a first cuInit on a big box can take several

GPU_INSTALL_HINT = (
    "TensorRT needs an NVIDIA GPU with its driver (check with `nvidia-smi`) and the GPU extras "
    "(pip install 'mitosis-edge[gpu]'); without one, use the CPU backend: --backend onnxruntime"
)


@dataclass(frozen=True)
class GpuDevice:
    """One CUDA device as the driver reports it."""

    index: int
    name: str
    compute_capability: str  # "8.9"
    memory_mb: int


@dataclass(frozen=True)
class GpuProbe:
    """What the probe found. ``ok`` means at least one CUDA device answered; ``reason`` says why not.

    >>> GpuProbe(ok=False, reason="no GPU: libcuda.so.1 not found").to_json_dict()["devices"]
    []
    """

    ok: bool
    reason: str = ""
    devices: tuple[GpuDevice, ...] = ()
    driver_version: str | None = None  # the CUDA version the driver supports, "12.8"
    cuda_runtime_available: bool = False  # cuda-python's cuda.bindings.runtime imports
    cuda_runtime_version: str | None = None  # the CUDA runtime cuda-python ships, "13.0"
    tensorrt_version: str | None = None  # tensorrt (or tensorrt_lean) imports, at this version
    tensorrt_module: str | None = None  # "tensorrt" or "tensorrt_lean"
    tensorrt_error: str = ""  # why TensorRT did not import, when it did not
    details: tuple[str, ...] = field(default=())  # further notes from the child, in order

    @property
    def cuda_major(self) -> int | None:
        """CUDA major of the runtime if known, else of the driver."""
        version = self.cuda_runtime_version or self.driver_version
        return int(version.split(".")[0]) if version else None

    def device(self, index: int = 0) -> GpuDevice:
        for d in self.devices:
            if d.index == index:
                return d
        raise BackendUnavailableError(
            f"CUDA device {index} not found; this machine has {len(self.devices)} device(s)"
            + (f": {', '.join(f'{d.index}={d.name}' for d in self.devices)}" if self.devices else "")
        )

    def to_json_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["devices"] = [asdict(d) for d in self.devices]
        data["details"] = list(self.details)
        return data

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> GpuProbe:
        """Build from the child's JSON; unknown keys are ignored so an older parent reads a newer child."""
        devices = tuple(
            GpuDevice(int(d["index"]), str(d["name"]), str(d["compute_capability"]), int(d["memory_mb"]))
            for d in data.get("devices", [])
        )
        known = {f for f in cls.__dataclass_fields__ if f not in ("devices", "details")}
        kwargs = {k: v for k, v in data.items() if k in known}
        return cls(devices=devices, details=tuple(str(x) for x in data.get("details", [])), **kwargs)


def probe_gpu(
    timeout: float = DEFAULT_PROBE_TIMEOUT,
    *,
    refresh: bool = False,
    check_tensorrt: bool = True,
    command: Sequence[str] | None = None,
) -> GpuProbe:
    """Probe once per process (cached); ``refresh=True`` asks again.

    ``command`` replaces the child command line (tests use it to simulate a crashing child).
    """
    if refresh:
        _cached_probe.cache_clear()
    return _cached_probe(float(timeout), check_tensorrt, tuple(command) if command is not None else None)


@functools.cache
def _cached_probe(timeout: float, check_tensorrt: bool, command: tuple[str, ...] | None) -> GpuProbe:
    return run_probe(timeout, check_tensorrt=check_tensorrt, command=command)


def run_probe(
    timeout: float = DEFAULT_PROBE_TIMEOUT, *, check_tensorrt: bool = True, command: Sequence[str] | None = None
) -> GpuProbe:
    """Run the child and interpret what it left behind (uncached)."""
    argv = list(command) if command is not None else [sys.executable, "-m", "edge.engines.probe"]
    if command is None and not check_tensorrt:
        argv.append("--no-tensorrt")
    # The child must import this package even when it is run from a source checkout, not installed.
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, env=env)
    except subprocess.TimeoutExpired:
        return GpuProbe(ok=False, reason=f"GPU probe timed out after {timeout:g} s (a hung driver or CUDA runtime?)")
    except OSError as exc:
        return GpuProbe(ok=False, reason=f"GPU probe could not start {argv[0]!r}: {exc}")
    return interpret_probe_output(done.returncode, done.stdout, done.stderr)


def interpret_probe_output(returncode: int, stdout: str, stderr: str) -> GpuProbe:
    """The child's last complete JSON line, with a crash or a failed exit turned into a clear reason.

    The child prints a fresh snapshot after each stage, so a crash in a late stage (importing
    TensorRT) still leaves what the earlier stages found.

    >>> interpret_probe_output(-11, '{"ok": false, "stage": "the driver"}', "").reason
    'probe crashed with signal 11 (SIGSEGV) while checking the driver'
    >>> interpret_probe_output(0, "garbage", "").reason
    "GPU probe printed no result (stdout: 'garbage')"
    """
    snapshot: dict[str, Any] | None = None
    for raw in stdout.splitlines():
        line = raw.strip()
        if line.startswith("{"):
            try:
                parsed = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(parsed, dict):
                snapshot = parsed
    tail = _tail(stderr)
    if returncode < 0 or returncode > 128:
        signum = -returncode if returncode < 0 else returncode - 128
        try:
            signame = f" ({signal.Signals(signum).name})"
        except ValueError:
            signame = ""
        stage = f" while checking {snapshot.get('stage', 'the GPU')}" if snapshot else " before it reported anything"
        reason = f"probe crashed with signal {signum}{signame}{stage}" + (f": {tail}" if tail else "")
        if snapshot and snapshot.get("stage") == "tensorrt" and snapshot.get("ok"):
            # The GPU answered; only importing TensorRT crashed. The GPU stays usable (ONNX Runtime's CUDA
            # provider may still run); TensorRT is marked unusable so no process imports it in-process.
            found = _from_snapshot(snapshot)
            return GpuProbe(
                **{
                    **_fields(found),
                    "tensorrt_version": None,
                    "tensorrt_module": None,
                    "tensorrt_error": f"importing TensorRT crashed the probe: {reason}",
                }
            )
        return GpuProbe(ok=False, reason=reason)
    if snapshot is None:
        shown = (stdout.strip() or stderr.strip())[:200]
        what = f"stdout: {shown!r}" if stdout.strip() else (f"stderr: {shown!r}" if shown else "no output")
        return GpuProbe(ok=False, reason=f"GPU probe printed no result ({what})")
    if returncode != 0 and snapshot.get("ok"):
        return GpuProbe(ok=False, reason=f"GPU probe exited with status {returncode}" + (f": {tail}" if tail else ""))
    try:
        return _from_snapshot(snapshot)
    except (KeyError, TypeError, ValueError) as exc:
        return GpuProbe(ok=False, reason=f"GPU probe printed a malformed result ({exc}): {json.dumps(snapshot)[:200]}")


def _from_snapshot(snapshot: dict[str, Any]) -> GpuProbe:
    data = {k: v for k, v in snapshot.items() if k != "stage"}
    return GpuProbe.from_json_dict(data)


def _fields(p: GpuProbe) -> dict[str, Any]:
    return {f: getattr(p, f) for f in p.__dataclass_fields__}


def _tail(text: str, limit: int = 300) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-3:])[-limit:]


def require_gpu(probe: GpuProbe | None = None, *, need_cuda_runtime: bool = False) -> GpuProbe:
    """The probe, or BackendUnavailableError saying why the GPU cannot be used and what to install."""
    found = probe if probe is not None else probe_gpu()
    if not found.ok:
        raise BackendUnavailableError(f"no usable NVIDIA GPU: {found.reason}. {GPU_INSTALL_HINT}")
    if need_cuda_runtime and not found.cuda_runtime_available:
        raise BackendUnavailableError(
            "the GPU is there but cuda-python is not installed (cuda.bindings.runtime does not import): "
            "pip install 'cuda-python>=12.6' (or 'mitosis-edge[gpu]')"
        )
    return found


# ---------------------------------------------------------------------------------------------
# the child: runs in a separate interpreter, prints JSON snapshots, imports nothing from edge


_CUDA_ERRORS = {  # the driver API errors a GPU-less or broken box gives, for messages without cuGetErrorName
    3: "CUDA_ERROR_NOT_INITIALIZED",
    34: "CUDA_ERROR_STUB_LIBRARY",
    35: "CUDA_ERROR_INSUFFICIENT_DRIVER",
    100: "CUDA_ERROR_NO_DEVICE",
    101: "CUDA_ERROR_INVALID_DEVICE",
    999: "CUDA_ERROR_UNKNOWN",
}
_ATTR_CC_MAJOR = 75  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
_ATTR_CC_MINOR = 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR


def _emit(state: dict[str, Any], stage: str) -> None:
    # the child's protocol with its parent: one JSON line per stage on stdout (not logging: it is data)
    sys.stdout.write(json.dumps({**state, "stage": stage}) + "\n")
    sys.stdout.flush()


def _child(check_tensorrt: bool) -> int:  # pragma: no cover - runs in the child; covered via run_probe
    import ctypes

    state: dict[str, Any] = {"ok": False, "reason": "", "devices": [], "details": []}
    _emit(state, "the driver")  # each snapshot names the step about to run, so a crash names its step
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        detail = "" if "cannot open shared object file" in str(exc) else f": {exc}"
        state["reason"] = f"no GPU: libcuda.so.1 not found (NVIDIA driver not installed){detail}"
        cuda = None
    if cuda is not None:
        _probe_driver(cuda, state)
    _emit(state, "cuda-python")
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python 12.x before cuda.bindings
        except ImportError as exc:
            state["details"].append(f"cuda-python not importable: {exc}")
            cudart = None
    if cudart is not None:
        state["cuda_runtime_available"] = True
        try:
            err, version = cudart.cudaRuntimeGetVersion()
            if int(err) == 0:
                state["cuda_runtime_version"] = f"{version // 1000}.{version % 1000 // 10}"
        except Exception as exc:  # noqa: BLE001 - any failure here is only a missing detail
            state["details"].append(f"cudaRuntimeGetVersion failed: {exc}")
    if check_tensorrt:
        _emit(state, "tensorrt")
        errors = []
        for module in ("tensorrt", "tensorrt_lean"):
            try:
                trt = __import__(module)
            except Exception as exc:  # noqa: BLE001 - ImportError, or OSError from a missing libnvinfer
                errors.append(f"{module}: {type(exc).__name__}: {exc}")
                continue
            state["tensorrt_version"] = str(getattr(trt, "__version__", "unknown"))
            state["tensorrt_module"] = module
            break
        else:
            state["tensorrt_error"] = "; ".join(errors)
    _emit(state, "done")
    return 0


def _probe_driver(cuda: Any, state: dict[str, Any]) -> None:  # pragma: no cover - needs a driver
    import ctypes

    def name_of(code: int) -> str:
        text = ctypes.c_char_p()
        try:
            if cuda.cuGetErrorName(code, ctypes.byref(text)) == 0 and text.value:
                return f"{text.value.decode()} ({code})"
        except AttributeError:
            pass
        return f"{_CUDA_ERRORS.get(code, 'CUDA error')} ({code})"

    rc = cuda.cuInit(0)
    if rc != 0:
        hint = {
            100: "no CUDA device is visible",
            35: "the driver is older than this CUDA needs",
            34: "only the CUDA stub library is installed, not the driver",
        }.get(rc, "")
        state["reason"] = f"no GPU: cuInit failed with {name_of(rc)}" + (f" ({hint})" if hint else "")
        return
    version = ctypes.c_int(0)
    if cuda.cuDriverGetVersion(ctypes.byref(version)) == 0 and version.value:
        state["driver_version"] = f"{version.value // 1000}.{version.value % 1000 // 10}"
    count = ctypes.c_int(0)
    rc = cuda.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0:
        state["reason"] = f"no GPU: cuDeviceGetCount failed with {name_of(rc)}"
        return
    for index in range(count.value):
        dev = ctypes.c_int(0)
        if cuda.cuDeviceGet(ctypes.byref(dev), index) != 0:
            state["details"].append(f"cuDeviceGet({index}) failed")
            continue
        name = ctypes.create_string_buffer(256)
        cuda.cuDeviceGetName(name, 256, dev)
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        cuda.cuDeviceGetAttribute(ctypes.byref(major), _ATTR_CC_MAJOR, dev)
        cuda.cuDeviceGetAttribute(ctypes.byref(minor), _ATTR_CC_MINOR, dev)
        total = ctypes.c_size_t(0)
        get_mem = getattr(cuda, "cuDeviceTotalMem_v2", None) or cuda.cuDeviceTotalMem
        get_mem(ctypes.byref(total), dev)
        state["devices"].append(
            {
                "index": index,
                "name": name.value.decode(errors="replace"),
                "compute_capability": f"{major.value}.{minor.value}",
                "memory_mb": total.value // (1 << 20),
            }
        )
    if state["devices"]:
        state["ok"] = True
    else:
        state["reason"] = "no GPU: the driver is installed but reports 0 CUDA devices"


if __name__ == "__main__":  # pragma: no cover - the child entry point
    sys.exit(_child(check_tensorrt="--no-tensorrt" not in sys.argv[1:]))
