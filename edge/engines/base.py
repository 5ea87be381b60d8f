"""The one interface every inference backend offers: numpy in, numpy out, synchronous or submit/collect.

Engines take uint8 NHWC RGB batches (cast, normalisation and transpose live inside the ONNX graph),
so host code never converts pixels. A batch holds 1..max_batch items; results are owned arrays,
never views into buffers the engine reuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from edge.errors import EngineInputError

# The largest batch an engine takes when none is configured, by model role: a detector tile is 1024², a crop ~64².
DETECTOR_MAX_BATCH = 8
CLASSIFIER_MAX_BATCH = 64

Outputs = dict[str, np.ndarray]

DEFAULT_IN_FLIGHT = 2  # batches an engine keeps in flight: one computing while the next is copied in


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one engine input or output; ``None`` marks a dynamic dimension.

    >>> spec = TensorSpec("tiles", "uint8", (None, 1024, 1024, 3))
    >>> spec.describe()
    'tiles: uint8[B,1024,1024,3]'
    >>> spec.rank
    4
    """

    name: str
    dtype: str  # numpy dtype name: uint8, float16, float32, int32, int64, bool
    shape: tuple[int | None, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)

    def describe(self) -> str:
        dims = ",".join(
            "B" if i == 0 and d is None else ("?" if d is None else str(d)) for i, d in enumerate(self.shape)
        )
        return f"{self.name}: {self.dtype}[{dims}]"


class Pending(Protocol):
    """A batch submitted to an engine; ``result`` waits for its outputs."""

    def result(self, timeout: float | None = None) -> Outputs: ...

    def done(self) -> bool: ...


@runtime_checkable
class Engine(Protocol):
    """What the pipeline needs from a backend.

    ``submit`` starts a batch and returns at once (it may block while ``in_flight`` batches are
    already running), so reading the next batch overlaps inference of this one.
    """

    @property
    def name(self) -> str: ...

    @property
    def backend(self) -> str: ...

    @property
    def input_spec(self) -> TensorSpec: ...

    @property
    def output_spec(self) -> tuple[TensorSpec, ...]: ...

    @property
    def max_batch(self) -> int: ...

    def infer(self, batch: np.ndarray) -> Outputs: ...

    def submit(self, batch: np.ndarray) -> Pending: ...

    def close(self) -> None: ...


def check_batch(engine_name: str, spec: TensorSpec, max_batch: int, batch: np.ndarray) -> None:
    """Refuse a batch the engine cannot take, naming what was expected and what was given.

    >>> spec = TensorSpec("crops", "uint8", (None, 64, 64, 3))
    >>> check_batch("clf", spec, 8, np.zeros((2, 64, 64, 3), np.uint8))
    >>> check_batch("clf", spec, 2, np.zeros((3, 64, 64, 3), np.uint8))
    Traceback (most recent call last):
    ...
    edge.errors.EngineInputError: engine 'clf': batch of 3 is outside 1..max_batch=2
    """
    if not isinstance(batch, np.ndarray):
        raise EngineInputError(f"engine {engine_name!r}: input must be a numpy array, got {type(batch).__name__}")
    if batch.dtype != np.dtype(spec.dtype):
        raise EngineInputError(
            f"engine {engine_name!r}: input {spec.name} must be {spec.dtype}, got {batch.dtype}"
            " (engines take uint8 NHWC RGB; normalisation lives in the ONNX graph)"
        )
    if batch.ndim != spec.rank:
        raise EngineInputError(
            f"engine {engine_name!r}: input must have shape {spec.describe()}, got rank {batch.ndim} {batch.shape}"
        )
    n = batch.shape[0]
    if not 1 <= n <= max_batch:
        raise EngineInputError(f"engine {engine_name!r}: batch of {n} is outside 1..max_batch={max_batch}")
    for axis, (want, got) in enumerate(zip(spec.shape[1:], batch.shape[1:], strict=True), start=1):
        if want is not None and want != got:
            raise EngineInputError(
                f"engine {engine_name!r}: input must have shape {spec.describe()}, got {batch.shape} (axis {axis})"
            )


def split_batches(items: np.ndarray, max_batch: int) -> list[np.ndarray]:
    """Cut an array of any length into consecutive batches of at most ``max_batch`` (views, no copies).

    >>> [len(b) for b in split_batches(np.zeros((10, 2)), 4)]
    [4, 4, 2]
    """
    return [items[i : i + max_batch] for i in range(0, len(items), max_batch)]
