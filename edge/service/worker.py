"""Slides analysed in a child process: a reader library that crashes on a slide kills the child, not the daemon.

The child keeps its engines open between slides and writes each slide's exports into a folder the
parent renames into place. The parent keeps the store, the watcher and the gRPC API, so a slide
being analysed never holds the interpreter lock the API needs. On cancel or shutdown, or when the
slide runs past its time limit (:class:`TimeLimit`), the parent ends the child; the next slide starts a
new one. A child whose parent dies is killed with it
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
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge import logs
from edge.config import Config, DaemonConfig
from edge.errors import AnalysisCrashed, SlideTimeLimitError, StreamCancelled
from edge.service.status import EngineInfo

if TYPE_CHECKING:  # imported where used: the daemon starts without loading the engines' libraries
    from multiprocessing.process import BaseProcess

    from edge.analysis.pipeline import StageTimes
    from edge.analysis.scoring import SlideResult
    from edge.engines import EngineSet

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # engines may build TensorRT plans on first start
POLL_S = 0.2  # how often the parent looks at the cancel event while the child works
STOP_TIMEOUT_S = 5.0
PR_SET_PDEATHSIG = 1
SLIDE_BASE_SECONDS = 300.0  # the derived time limit's allowance for opening a slide and planning its tiles
FINISH_SECONDS = 60.0  # ... and after its tiles, for scoring, the overlay's thumbnail and the exports


@dataclass
class TimeLimit:
    """One slide's time limit: ``daemon.max_slide_seconds``, or (0) derived from its tile plan: up to
    SLIDE_BASE_SECONDS to open the slide and plan its tiles, then ``daemon.seconds_per_tile`` per planned tile
    and FINISH_SECONDS for the rest.

    >>> limit = TimeLimit(fixed_s=0.0, per_tile_s=0.5, started=100.0)
    >>> limit.seconds, limit.planned(40, now=110.0), limit.seconds
    (300.0, None, 90.0)
    """

    fixed_s: float
    per_tile_s: float
    tiles: int | None = None
    started: float = field(default_factory=time.monotonic)
    planned_after: float = 0.0  # seconds from the start until the tile plan was known

    @classmethod
    def of(cls, settings: DaemonConfig) -> TimeLimit:
        return cls(settings.max_slide_seconds, settings.seconds_per_tile)

    @property
    def seconds(self) -> float:
        if self.fixed_s > 0:
            return self.fixed_s
        if self.tiles is None:
            return SLIDE_BASE_SECONDS
        return self.planned_after + self.per_tile_s * self.tiles + FINISH_SECONDS

    def planned(self, tiles: int, now: float | None = None) -> None:
        self.tiles = tiles
        self.planned_after = (time.monotonic() if now is None else now) - self.started

    def expired(self) -> bool:
        return time.monotonic() - self.started > self.seconds

    def error(self, path: Path) -> SlideTimeLimitError:
        if self.fixed_s > 0:
            how = "daemon.max_slide_seconds"
        elif self.tiles is None:
            how = f"{SLIDE_BASE_SECONDS:g} s to open the slide and plan its tiles (daemon.max_slide_seconds = 0)"
        else:
            how = (f"derived from its {self.tiles} planned tiles: {self.planned_after:.3g} s to plan them + "
                   f"daemon.seconds_per_tile = {self.per_tile_s:g} s per tile + {FINISH_SECONDS:g} s to finish")
        return SlideTimeLimitError(
            path,
            f"still being analysed after {time.monotonic() - self.started:.3g} s, past its time limit of "
            f"{self.seconds:.3g} s ({how}); it was stopped so the next slide can go on. If the slide is real, raise "
            "daemon.max_slide_seconds (or daemon.seconds_per_tile)",
        )


@dataclass
class Outcome:
    """What the child reports for one slide: the result, the export files, and figures for the metrics."""

    result: SlideResult
    exports: dict[str, Path]
    tiles: int
    times: StageTimes


class EngineCache:
    """Engine sets by bundle, opened on first use and kept until ``close``; thread-safe."""

    def __init__(self) -> None:
        self._sets: dict[str, EngineSet] = {}
        self._lock = threading.Lock()

    def get(self, config: Config) -> EngineSet:
        """The engines of ``config.engines.bundle`` ("" = the demo bundle) with the config's engine settings."""
        from edge.engines import load_bundle, open_engines

        key = config.engines.bundle
        with self._lock:
            if key not in self._sets:
                self._sets[key] = open_engines(load_bundle(key), config.engines,
                                               detector_batch=config.stream.batch_size)
            return self._sets[key]

    def info(self) -> list[EngineInfo]:
        """name, role, cache_key and bundle of every engine opened so far."""
        with self._lock:
            sets = list(self._sets.values())
        return [entry for engines in sets for entry in engine_info(engines)]

    def close(self) -> None:
        with self._lock:
            for engines in self._sets.values():
                engines.close()
            self._sets.clear()


def engine_info(engines: EngineSet) -> list[EngineInfo]:
    """What GetServerStatus shows of an engine set: name, role, cache key (a TensorRT plan's, or the ONNX
    file's sha256) and bundle."""
    bundle = engines.bundle
    info: list[EngineInfo] = []
    for role, name in [("detector", "detector"), *[("classifier", n) for n in engines.classifiers]]:
        key = engines.plan_keys.get(name) or f"onnx-sha256:{bundle.model(name).sha256}"
        info.append(EngineInfo(name=f"{bundle.name}/{name}", role=role, cache_key=key,
                               bundle=f"{bundle.name} {bundle.version}"))
    return info


class AnalysisProcess:
    """One child process analysing one slide at a time; ``analyze`` blocks until it is done."""

    def __init__(self, config: Config, *, nice: int = 0) -> None:
        self.config = config
        self.nice = nice
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()

    def start(self) -> list[EngineInfo]:
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
        info: list[EngineInfo] = reply[1]
        return info

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def analyze(
        self, path: Path, config: Config, partial: Path, cancel: threading.Event, limit: TimeLimit | None = None
    ) -> Outcome:
        """Analyse ``path`` in the child, exports into ``partial``. Raises StreamCancelled when ``cancel`` is
        set (the child is ended), SlideTimeLimitError past ``limit`` (the child is ended), AnalysisCrashed when
        the child dies, or the child's own error."""
        with self._lock:
            if not self.alive:
                self.start()
            if limit is not None:  # a restarted child's engine loading is not the slide's time
                limit.started = time.monotonic()
            assert self._conn is not None
            self._conn.send(("analyze", str(path), config, str(partial)))
            reply = self._receive(None, cancel, limit, path)
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

    def _receive(
        self,
        timeout: float | None,
        cancel: threading.Event | None,
        limit: TimeLimit | None = None,
        path: Path | None = None,
    ) -> tuple[Any, ...]:
        assert self._conn is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if cancel is not None and cancel.is_set():
                self._end(graceful=False)
                raise StreamCancelled("analysis cancelled; its process was ended")
            if limit is not None and limit.expired():
                self._end(graceful=False)
                raise limit.error(path or Path("?"))
            try:
                if self._conn.poll(POLL_S):
                    message = tuple(self._conn.recv())
                    if message[0] == "planned":  # the tile count, for a limit derived from it
                        if limit is not None:
                            limit.planned(int(message[1]))
                        continue
                    return message
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
                _send(conn, _analyze_one(conn, Path(path), cfg, Path(partial), engines, parent_pid))
            except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
                _send(conn, ("error", _portable(exc)))
    finally:
        engines.close()


def _analyze_one(
    conn: Connection, path: Path, config: Config, partial: Path, engines: EngineCache, parent_pid: int
) -> tuple[Any, ...]:
    from edge.analysis.pipeline import analyze_slide

    planned = False

    def progress(stage: str, done: int, total: int) -> None:
        nonlocal planned
        if os.getppid() != parent_pid:  # orphaned where PR_SET_PDEATHSIG is not available
            raise StreamCancelled("the daemon that asked for this analysis is gone")
        if not planned and stage == "detect":
            planned = True
            _send(conn, ("planned", total))

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
