"""An in-memory engine for tests: the Engine protocol with a Python function instead of a model.

Shipped in the package (like httpx's mock transport) so pipeline and daemon tests, and users'
own tests, can run without model files. It checks batches exactly as real backends do.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

from edge.engines.base import Outputs, Pending, TensorSpec, check_batch
from edge.errors import EngineError

InferFn = Callable[[np.ndarray], Outputs]


class FakeEngine:
    """Runs ``fn(batch) -> {output name: array}``; with no ``fn``, returns zeros shaped like the outputs.

    Every batch it saw is counted in ``batches_seen`` and ``items_seen``. ``fail_after`` makes
    the n-th and later batches raise EngineError, to test failure paths.

    >>> engine = FakeEngine(TensorSpec("crops", "uint8", (None, 8, 8, 3)),
    ...                     (TensorSpec("mitotic", "float32", (None, 1)),), max_batch=4)
    >>> engine.infer(np.zeros((2, 8, 8, 3), np.uint8))["mitotic"].shape
    (2, 1)
    >>> engine.submit(np.zeros((1, 8, 8, 3), np.uint8)).result()["mitotic"].shape
    (1, 1)
    >>> engine.items_seen
    3
    """

    def __init__(
        self,
        input_spec: TensorSpec,
        output_spec: tuple[TensorSpec, ...],
        fn: InferFn | None = None,
        *,
        name: str = "fake",
        max_batch: int = 8,
        fail_after: int | None = None,
    ) -> None:
        self._input = input_spec
        self._outputs = output_spec
        self._fn = fn
        self._name = name
        self._max_batch = max_batch
        self.fail_after = fail_after
        self.batches_seen = 0
        self.items_seen = 0
        self.closed = False
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self._name

    @property
    def backend(self) -> str:
        return "fake"

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
        if self.closed:
            raise EngineError(f"engine {self._name!r} is closed")
        check_batch(self._name, self._input, self._max_batch, batch)
        with self._lock:
            self.batches_seen += 1
            self.items_seen += len(batch)
            failing = self.fail_after is not None and self.batches_seen > self.fail_after
        if failing:
            raise EngineError(f"engine {self._name!r}: simulated failure on batch {self.batches_seen}")
        if self._fn is not None:
            return self._fn(batch)
        return {o.name: np.zeros((len(batch), *(d or 1 for d in o.shape[1:])), dtype=o.dtype) for o in self._outputs}

    def submit(self, batch: np.ndarray) -> Pending:
        """Runs at once; the returned future holds the outputs or the error."""
        future: Future[Outputs] = Future()
        try:
            future.set_result(self.infer(batch))
        except EngineError as exc:
            if self.closed or isinstance(exc, ValueError):
                raise
            future.set_exception(exc)
        return future

    def close(self) -> None:
        self.closed = True
