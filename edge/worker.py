"""Slides analysed in a child process: a reader library that crashes on a slide kills the child, not the daemon.

The child keeps its engines open between slides and writes each slide's exports into a folder the
parent renames into place. The parent keeps the store, the watcher and the gRPC API, so a slide
being analysed never holds the interpreter lock the API needs. On cancel or shutdown the parent
ends the child; the next slide starts a new one. A child whose parent dies is killed with it
(Linux ``PR_SET_PDEATHSIG``), so a restarted daemon never races an orphan.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from edge import logs
from edge.config import Config
from edge.errors import AnalysisCrashed, StreamCancelled

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # engines may build TensorRT plans on first start
POLL_S = 0.2  # how often the parent looks at the cancel event while the child works
STOP_TIMEOUT_S = 5.0
PR_SET_PDEATHSIG = 1


@dataclass
class Outcome:
    """What the child reports for one slide: the result, the export files, and figures for the metrics."""

    result: Any  # SlideResult
    exports: dict[str, Path]
    tiles: int
    times: Any  # pipeline.StageTimes


class EngineCache:
    """Engine sets by bundle, opened on first use and kept until ``close``; thread-safe."""

    def __init__(self) -> None:
        self._sets: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, config: Config) -> Any:
        """The engines of ``config.engines.bundle`` ("" = the demo bundle) with the config's engine settings."""
        from edge.engines import load_bundle, open_engines

        key = config.engines.bundle
        with self._lock:
            if key not in self._sets:
                self._sets[key] = open_engines(load_bundle(key), config.engines,
                                               detector_batch=config.stream.batch_size)
            return self._sets[key]

    def info(self) -> list[dict[str, str]]:
        """name, role, cache_key and bundle of every engine opened so far."""
        with self._lock:
            sets = list(self._sets.values())
        return [entry for engines in sets for entry in engine_info(engines)]

    def close(self) -> None:
        with self._lock:
            for engines in self._sets.values():
                engines.close()
            self._sets.clear()


def engine_info(engines: Any) -> list[dict[str, str]]:
    """What GetServerStatus shows of an engine set: name, role, cache key (a TensorRT plan's, or the ONNX
    file's sha256) and bundle."""
    bundle = engines.bundle
    info = []
    for role, name in [("detector", "detector"), *[("classifier", n) for n in engines.classifiers]]:
        key = engines.plan_keys.get(name) or f"onnx-sha256:{bundle.model(name).sha256}"
        info.append({"name": f"{bundle.name}/{name}", "role": role, "cache_key": key,
                     "bundle": f"{bundle.name} {bundle.version}"})
    return info


class AnalysisProcess:
    """One child process analysing one slide at a time; ``analyze`` blocks until it is done."""

    def __init__(self, config: Config, *, nice: int = 0) -> None:
        self.config = config
        self.nice = nice
        self._process: Any = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()

    def start(self) -> list[dict[str, str]]:
        """Start the child and wait until its engines are open (returns their ``engine_info``); raises what
        the child raised."""
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self._process = ctx.Process(
            target=_child_main, args=(child, self.config, self.nice, os.getpid(), logs.current_settings()),
            name="edge-analysis", daemon=True,
        )
        self._process.start()
        child.close()
        self._conn = parent
        reply = self._receive(START_TIMEOUT_S, None)
        if reply[0] == "error":
            self.close()
            raise reply[1]
        info: list[dict[str, str]] = reply[1]
        return info

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def analyze(self, path: Path, config: Config, partial: Path, cancel: threading.Event) -> Outcome:
        """Analyse ``path`` in the child, exports into ``partial``. Raises StreamCancelled when ``cancel`` is
        set (the child is ended), AnalysisCrashed when the child dies, or the child's own error."""
        with self._lock:
            if not self.alive:
                self.start()
            assert self._conn is not None
            self._conn.send(("analyze", str(path), config, str(partial)))
            reply = self._receive(None, cancel)
        if reply[0] == "error":
            raise reply[1]
        _, result, exports, tiles, times = reply
        return Outcome(result, {k: Path(v) for k, v in exports.items()}, tiles, times)

    def close(self) -> None:
        """Ask the child to stop, then end it if it does not."""
        if self._conn is not None:
            try:
                self._conn.send(("stop",))
            except (OSError, ValueError):
                pass
        self._end(graceful=True)

    def _receive(self, timeout: float | None, cancel: threading.Event | None) -> tuple[Any, ...]:
        assert self._conn is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if cancel is not None and cancel.is_set():
                self._end(graceful=False)
                raise StreamCancelled("analysis cancelled; its process was ended")
            try:
                if self._conn.poll(POLL_S):
                    return tuple(self._conn.recv())
            except (EOFError, OSError):
                pass  # the child is gone: said below
            if not self.alive:
                code = self._process.exitcode if self._process is not None else None
                self._end(graceful=False)
                how = f"signal {-code} ({signal.Signals(-code).name})" if code and code < 0 else f"exit status {code}"
                raise AnalysisCrashed(f"the analysis process died ({how}) while it worked on this slide")
            if deadline is not None and time.monotonic() > deadline:
                self._end(graceful=False)
                raise AnalysisCrashed(f"the analysis process did not start within {timeout:.0f} s")

    def _end(self, *, graceful: bool) -> None:
        process, conn = self._process, self._conn
        self._process, self._conn = None, None
        if process is not None:
            if graceful:
                process.join(STOP_TIMEOUT_S)
            if process.is_alive():
                process.kill()
            process.join(STOP_TIMEOUT_S)
            process.close()
        if conn is not None:
            conn.close()


# --- in the child ---------------------------------------------------------------------------------


def _child_main(
    conn: Connection, config: Config, nice: int, parent_pid: int, log_settings: logs.LogSettings
) -> None:  # pragma: no cover
    """The child's loop (runs in the spawned process; covered by the daemon tests)."""
    _die_with_parent(parent_pid)
    logs.configure(log_settings.level, log_settings.format)  # the same lines as the daemon's
    if nice > 0:
        try:
            os.nice(nice)
        except OSError:
            pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal: the parent decides
    engines = EngineCache()
    try:
        default = engines.get(config)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
        _send(conn, ("error", _portable(exc)))
        return
    _send(conn, ("ready", engine_info(default)))
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return
            if message[0] == "stop":
                return
            _, path, cfg, partial = message
            try:
                _send(conn, _analyze_one(Path(path), cfg, Path(partial), engines, parent_pid))
            except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
                _send(conn, ("error", _portable(exc)))
    finally:
        engines.close()


def _analyze_one(path: Path, config: Config, partial: Path, engines: EngineCache, parent_pid: int) -> tuple[Any, ...]:
    from edge.pipeline import analyze_slide

    def progress(stage: str, done: int, total: int) -> None:
        if os.getppid() != parent_pid:  # orphaned where PR_SET_PDEATHSIG is not available
            raise StreamCancelled("the daemon that asked for this analysis is gone")

    analysis = analyze_slide(path, config, engines=engines.get(config), progress=progress)
    paths = analysis.write_exports(partial)
    return ("done", analysis.result, {k: str(v) for k, v in paths.items()}, analysis.tiles, analysis.times)


def _send(conn: Connection, message: tuple[Any, ...]) -> None:
    try:
        conn.send(message)
    except (OSError, ValueError):
        pass  # the parent is gone


def _portable(exc: BaseException) -> BaseException:
    """The exception itself when it survives pickling (the error hierarchy does), else a plain one."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any pickling failure means: send a plain copy
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel kills this process when its parent dies (a kill -9 of the daemon)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
