"""Shared fixtures: real test files from ../shared/data, synthetic slides from the project's generator,
and a guard that fails any test leaking a thread."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge.service.store import Store

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MITOSIS_EDGE_TEST_DATA", ROOT.parent / "shared" / "data"))


def data_file(relative: str) -> Path:
    """A real test file, or skip the test with the reason when the data folder is absent."""
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"real test data {path} not found (set MITOSIS_EDGE_TEST_DATA or provide ../shared/data)")
    return path


# Process-wide worker threads that libraries start once and keep on purpose (zarr 3's I/O loop,
# used by tiffslide): not leaks of the code under test.
LIBRARY_THREADS = ("zarr_io", "asyncio_")


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    leaked = [
        t for t in threading.enumerate() if t not in before and t.is_alive() and not t.name.startswith(LIBRARY_THREADS)
    ]
    for t in leaked:
        t.join(timeout=2.0)
    leaked = [t for t in leaked if t.is_alive()]
    assert not leaked, f"test leaked threads: {[t.name for t in leaked]}"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """An empty job store in tmp_path/data, closed after the test (tests/test_store.py has its own, with a clock)."""
    with Store.open(tmp_path / "data" / "edge.db") as opened:
        yield opened


SynthFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def synth_slide(tmp_path_factory: pytest.TempPathFactory) -> SynthFactory:
    """make(width=, height=, mpp=, seed=, fmt=, **params) -> path of a cached synthetic slide."""
    from edge.devtools.synth import SynthParams, default_truth_path, generate_slide

    cache: dict[tuple[object, ...], Path] = {}
    folder = tmp_path_factory.mktemp("synth")

    def make(
        width: int = 3072, height: int = 2560, mpp: float = 0.25, seed: int = 1, fmt: str = "tiff", **kw: object
    ) -> Path:
        key = (width, height, mpp, seed, fmt, tuple(sorted(kw.items())))
        if key not in cache:
            suffix = ".ome.tiff" if fmt == "ome" else ".tiff"
            path = folder / f"synth-{len(cache)}{suffix}"
            generate_slide(
                path,
                SynthParams(width=width, height=height, mpp=mpp, seed=seed, fmt=fmt, **kw),
                default_truth_path(path),
            )  # type: ignore[arg-type]
            cache[key] = path
        return cache[key]

    return make
