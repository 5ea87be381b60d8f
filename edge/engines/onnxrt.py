"""ONNX Runtime backend: the embedded default (CPU), or ONNX Runtime's CUDA provider when installed.

The only module that imports onnxruntime. ``submit`` runs batches on one worker thread (ONNX
Runtime releases the GIL), so the pipeline reads the next batch while this one computes.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edge.engines.base import DEFAULT_IN_FLIGHT, Outputs, Pending, TensorSpec, check_batch
from edge.errors import BackendUnavailableError, EngineError

log = logging.getLogger(__name__)

Device = Literal["cpu", "cuda"]
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_ORT_TYPES = {
    "tensor(uint8)": "uint8",
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
    "tensor(double)": "float64",
}


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - a dependency; guards a broken install
        raise BackendUnavailableError("onnxruntime is not installed: pip install 'onnxruntime>=1.17'") from None
    return onnxruntime


def new_session(path: str | Path | bytes, *, intra_op_threads: int = 0, device: Device = "cpu") -> Any:
    """An ONNX Runtime session with the settings every engine uses (also the baseline of ``bench engine``).

    ``path``: an ONNX file, or a serialized model (bytes).
    """
    ort = _ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads or (os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings from graph optimisers are noise for users
    # Idle pool threads sleep instead of spinning: the tile readers share these cores (bench analyze on
    # 2 cores: end to end 0.71-0.73 of detector-only with sleeping pools, 0.64-0.66 with spinning ones).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [CUDA, CPU] if device == "cuda" else [CPU]
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, sess_options=options, providers=providers)


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d > 0 else None for d in arg.shape)
    return TensorSpec(arg.name, _ORT_TYPES.get(arg.type, arg.type), shape)


class OnnxRuntimeEngine:
    """One ONNX model in an ONNX Runtime session, behind the Engine protocol.

    ``intra_op_threads`` = 0 uses one thread per core. ``device="cuda"`` needs onnxruntime-gpu.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        device: Device = "cpu",
        intra_op_threads: int = 0,
        max_batch: int = 64,
        in_flight: int = DEFAULT_IN_FLIGHT,
    ) -> None:
        ort = _ort()
        self._name = name or Path(path).stem
        if device == "cuda" and CUDA not in ort.get_available_providers():
            raise BackendUnavailableError(
                f"engine {self._name!r}: ONNX Runtime has no CUDA provider here (providers: "
                f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu instead of onnxruntime, "
                "or use the CPU backend"
            )
        try:
            self._session = new_session(path, intra_op_threads=intra_op_threads, device=device)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for bad models
            raise EngineError(f"engine {self._name!r}: ONNX Runtime cannot load {path}: {exc}") from None
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise EngineError(f"engine {self._name!r}: expected one input in {path}, found {[i.name for i in inputs]}")
        self._input = _spec(inputs[0])
        self._outputs = tuple(_spec(o) for o in self._session.get_outputs())
        self._output_names = [o.name for o in self._outputs]
        self._max_batch = max_batch
        self._device = device
        self._executor: ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(max(1, in_flight))
        self._lock = threading.Lock()
        self._closed = False
        log.debug(
            "ONNX Runtime engine %s on %s: %s -> %s",
            self._name,
            self._session.get_providers(),
            self._input.describe(),
            ", ".join(o.describe() for o in self._outputs),
        )

    @property
    def name(self) -> str:
        return self._name

    @property
    def backend(self) -> str:
        return "onnxruntime" if self._device == "cpu" else "onnxruntime-cuda"

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers())

    @property
    def input_spec(self) -> TensorSpec:
        return self._input

    @property
    def output_spec(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    @property
    def max_batch(self) -> int:
        return self._max_batch

    def infer(self, batch: np.ndarray) -> Outputs:
        """Run one batch and wait for its outputs."""
        self._check_open()
        check_batch(self._name, self._input, self._max_batch, batch)
        return self._run(batch)

    def submit(self, batch: np.ndarray) -> Pending:
        """Start one batch on the engine's worker thread; blocks while ``in_flight`` batches are pending."""
        self._check_open()
        check_batch(self._name, self._input, self._max_batch, batch)
        self._slots.acquire()
        try:
            with self._lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{self._name}")
                future: Future[Outputs] = self._executor.submit(self._run, batch)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def _run(self, batch: np.ndarray) -> Outputs:
        try:
            values = self._session.run(self._output_names, {self._input.name: batch})
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types at run time
            raise EngineError(f"engine {self._name!r}: inference failed on a batch of {len(batch)}: {exc}") from None
        return dict(zip(self._output_names, values, strict=True))

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError(f"engine {self._name!r} is closed")

    def close(self) -> None:
        """Wait for batches in flight, stop the worker thread and release the session. Idempotent."""
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def __enter__(self) -> OnnxRuntimeEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
