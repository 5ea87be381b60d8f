"""The scan-time daemon: watcher, durable job queue, inference workers, gRPC API and metrics.

A slide the watcher hands over (or a client submits) becomes a queued job in the SQLite store.
Each worker analyses its slides in a child process (``daemon.isolation = "process"``, see
``edge.worker``) or in this one (``"thread"``, and whenever tests inject an analysis).
Workers claim jobs oldest first (manual submissions may carry a priority), analyse the slide,
write its exports into ``<data>/results/<job>/`` and store the result, its detections and the
"done" event in one transaction. A failing slide is retried with exponential backoff, then marked
failed with the last error; a slide that cannot be read is failed at once. The daemon never dies
because of one slide. On SIGTERM/SIGINT it stops taking work, lets running slides finish within
the grace period, re-queues what is left and exits 0.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from edge import __version__
from edge.config import Config
from edge.engines import EngineSet, load_bundle
from edge.errors import ConfigError, DiskFullError, EdgeError, SlideReadError, StreamCancelled
from edge.fingerprint import Fingerprint, fingerprint_slide
from edge.metrics import DaemonMetrics
from edge.store import Job, JobStateError, Store
from edge.worker import AnalysisProcess, EngineCache

log = logging.getLogger(__name__)

STORE_NAME = "edge.db"
RESULTS_DIR = "results"
IDLE_WAIT_S = 1.0  # a worker with nothing to do looks at the queue again after this long (or when woken)
HOUSEKEEPING_INTERVAL_S = 3600.0  # export retention runs this often
ANALYSIS_ERRORS = (EdgeError, OSError, MemoryError, ValueError, RuntimeError)


@dataclass
class _Running:
    job: Job
    cancel: threading.Event = field(default_factory=threading.Event)
    cancelled_by_user: bool = False


class Daemon:
    """Runs everything ``mitosis-edge serve`` promises. ``start()``, then ``stop()`` (or ``run()`` until a signal).

    ``analyze`` is injectable for tests: (path, config, engines, cancel_event, progress) -> Analysis;
    an injected analysis runs in this process.
    """

    def __init__(
        self,
        config: Config,
        *,
        analyze: Callable[..., Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.data_dir = config.daemon.data_path
        self.results_dir = self.data_dir / RESULTS_DIR
        self._analyze = analyze or _analyze_slide
        self._isolated = analyze is None and config.daemon.isolation == "process"
        self._child_engine_info: list[dict[str, str]] = []  # what the analysis processes loaded
        self._clock = clock
        self._started_at = time.monotonic()
        self._check_config()
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store.open(self.data_dir / STORE_NAME)
        self.metrics = DaemonMetrics()
        self.server: Any = None
        self.watcher: Any = None
        self._metrics_server: Any = None
        self._engines = EngineCache()  # "thread" isolation: the engines live in this process
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._wake = threading.Condition()
        self._running: dict[int, _Running] = {}
        self._running_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.engine_error: str | None = None

    # --- life cycle ------------------------------------------------------------------------------

    def start(self) -> Daemon:
        """Open the store (re-queueing jobs a crash left running), then start server, engines, watcher, workers."""
        recovered = self.store.recover_running()
        if recovered:
            log.warning("re-queued %d slide(s) left running by an earlier stop: %s",
                        len(recovered), ", ".join(j.slide_path for j in recovered))
        for job in recovered:
            if job.attempts >= self.config.daemon.max_attempts:
                self.store.fail_job(job.job_id, (
                    f"the daemon stopped {job.attempts} times while analysing this slide (a crash or kill each "
                    "time); it is not tried again automatically: check the slide, then submit it again"
                ))
        try:
            self._start_metrics()
            self._start_server()
            if not self._isolated:
                self._spawn("engines", self._load_default_engines)
            self._start_watcher()
            for i in range(self.config.daemon.workers):
                self._spawn(f"worker-{i}", self._work)
            if self.config.daemon.export_retention_days > 0:
                self._spawn("housekeeping", self._housekeeping)
        except BaseException:
            self.stop(grace=0.0)
            raise
        log.info("mitosis-edge %s serving: watching %s, data in %s%s", __version__,
                 ", ".join(self.config.watch.all_folders) or "no folder", self.data_dir,
                 f", gRPC on {self.server.address}" if self.server else "")
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop taking work, give running slides ``grace`` seconds (default: daemon.shutdown_grace_s) to
        finish, re-queue the rest, then stop the server and close everything. Safe to call twice."""
        if self._stopped.is_set():
            return
        grace = self.config.daemon.shutdown_grace_s if grace is None else grace
        self._stopping.set()
        if self.watcher is not None:
            self.watcher.stop()
        self._notify()
        deadline = time.monotonic() + grace
        workers = [t for t in self._threads if t.name.startswith("edge-worker")]
        for t in workers:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._running_lock:
            for running in self._running.values():
                running.cancel.set()  # out of grace: the worker re-queues its slide
        for t in self._threads:
            t.join(timeout=30.0)
        if self.server is not None:
            self.server.stop(grace=min(grace, 5.0))
        if self._metrics_server is not None:
            httpd, thread = self._metrics_server
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=5.0)
        self._engines.close()
        self.store.close()
        self._stopped.set()
        log.info("mitosis-edge stopped")

    def run(self) -> int:
        """Start, serve until SIGTERM or SIGINT, stop gracefully; the exit status (0)."""
        stop_requested = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("received %s: finishing the running slide(s), then stopping", signal.Signals(signum).name)
            stop_requested.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not stop_requested.wait(timeout=1.0):
                pass
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return 0

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what the gRPC server calls (edge.server.DaemonControl) ---------------------------------

    def submit_slide(
        self, path: Path, *, priority: int = 0, mpp_override: float | None = None, bundle: str | None = None
    ) -> Job:
        """Queue a slide a client asked for (always a new job: a client asking again means it)."""
        store = self.store
        if bundle:
            load_bundle(bundle)  # a wrong bundle is refused now, not after the queue
        fingerprint = _quiet_fingerprint(path, self.config.watch.fingerprint == "full")
        job, _ = store.add_job(
            str(path), fingerprint=fingerprint, source="submit", priority=priority,
            mpp_override=mpp_override, bundle=bundle or None, dedupe=False,
        )
        self._notify()
        return job

    def cancel_job(self, job_id: int) -> Job:
        job = self.store.cancel_job(job_id)
        with self._running_lock:
            running = self._running.get(job_id)
            if running is not None:
                running.cancelled_by_user = True
                running.cancel.set()
        return job

    def server_status(self) -> dict[str, Any]:
        engines = self._child_engine_info + self._engines.info()
        counts = self.store.counts_by_state()
        return {
            "version": __version__,
            "backend": self.config.engines.backend,
            "gpu": _gpu_name(self.config.engines.backend),
            "engines": engines,
            "bundle": engines[0]["bundle"] if engines else "",
            "queue_depth": counts.get("queued", 0),
            "running": counts.get("running", 0),
            "uptime_s": time.monotonic() - self._started_at,
            "watch_folders": list(self.config.watch.all_folders),
            "ready": self.is_ready(),
            "engine_error": self.engine_error or "",
        }

    def is_ready(self) -> bool:
        return self._ready.is_set()

    # --- watcher callbacks -------------------------------------------------------------------------

    def on_slide_ready(self, path: Path, fingerprint: Fingerprint) -> None:
        """A settled slide: a job, unless the same slide was seen before (watch.on_duplicate)."""
        meta = {"size": fingerprint.size, "mtime_ns": fingerprint.mtime_ns}
        if self.config.watch.on_duplicate == "skip":  # the store skips a fingerprint it has seen anywhere
            job, created = self.store.add_job(str(path), fingerprint=fingerprint.key, source="watch", slide_meta=meta)
        else:  # "reprocess": the same bytes under a new path are a new job; the same path again is not
            seen_here = [j for j in self.store.find_jobs_by_fingerprint(fingerprint.key) if j.slide_path == str(path)]
            if seen_here:
                job, created = seen_here[-1], False
            else:
                job, created = self.store.add_job(
                    str(path), fingerprint=fingerprint.key, source="watch", dedupe=False, slide_meta=meta
                )
        if created:
            self.metrics.picked_up(self._clock() - fingerprint.mtime_ns / 1e9)
            log.info("new slide %s: job %d queued", path, job.job_id)
            self._notify()
        else:
            log.info("slide %s already seen as job %d (%s): not queued again", path, job.job_id, job.state)

    def on_slide_failed(self, path: Path, reason: str) -> None:
        self.store.add_failed_job(str(path), reason, source="watch")
        self.metrics.failed(reason)
        log.error("slide %s failed before analysis: %s", path, reason)

    # --- workers ---------------------------------------------------------------------------------

    def _work(self) -> None:
        process = None
        if self._isolated:
            process = self._start_analysis_process()
            if process is None:
                return
        else:
            _lower_priority(self.config.daemon.analysis_nice)  # reader threads started from here inherit it
        try:
            while not self._stopping.is_set():
                job = self.store.claim_next_job() if self._ready.is_set() else None
                if job is None:
                    with self._wake:
                        self._wake.wait(timeout=IDLE_WAIT_S)
                    continue
                try:
                    self._process(job, process)
                except Exception:  # a bug must not kill the worker: record it on the job and go on
                    log.exception("unexpected error on job %d (%s)", job.job_id, job.slide_path)
                    self._fail(job, "internal error (see the daemon log)", retry=True)
        finally:
            if process is not None:
                process.close()

    def _start_analysis_process(self) -> AnalysisProcess | None:
        """This worker's child process with its engines open; until one is up, health says NOT_SERVING."""
        process = AnalysisProcess(self.config, nice=self.config.daemon.analysis_nice)
        try:
            self._child_engine_info = process.start()
        except EdgeError as exc:
            self.engine_error = str(exc)
            log.error("the engines could not be loaded, no slide will be analysed: %s", exc)
            return None
        self._set_ready()
        return process

    def _process(self, job: Job, process: AnalysisProcess | None = None) -> None:
        running = _Running(job)
        with self._running_lock:
            self._running[job.job_id] = running
        log.info("job %d: analysing %s (attempt %d)", job.job_id, job.slide_path, job.attempts)
        t0 = time.perf_counter()
        try:
            self._check_disk()
            config = self.config.with_overrides({"slide.mpp_override": job.mpp_override, "engines.bundle": job.bundle})
            with self.metrics.running(), self._exports_folder(job) as partial:
                if process is not None:
                    outcome = process.analyze(Path(job.slide_path), config, partial, running.cancel)
                    analysis = SimpleNamespace(result=outcome.result, tiles=outcome.tiles, times=outcome.times)
                    written = outcome.exports
                else:
                    analysis = self._analyze(
                        Path(job.slide_path), config, self._engines.get(config), running.cancel, None
                    )
                    try:
                        written = analysis.write_exports(partial)
                    except OSError as exc:
                        raise DiskFullError(f"writing the exports to {partial} failed: {exc}") from exc
            exports = {kind: self._export_dir(job.job_id) / path.name for kind, path in written.items()}
        except StreamCancelled:
            if not running.cancelled_by_user:
                self.store.requeue_job(job.job_id, "daemon stopping before the slide finished")
                log.info("job %d re-queued: the daemon is stopping", job.job_id)
            return
        except (SlideReadError, ConfigError) as exc:  # the slide itself is bad: retrying cannot help
            self._fail(job, _reason(exc), retry=False)
            return
        except ANALYSIS_ERRORS as exc:
            self._fail(job, _reason(exc), retry=True)
            return
        finally:
            with self._running_lock:
                self._running.pop(job.job_id, None)
        try:
            self.store.complete_job(job.job_id, analysis.result, exports, self.config.qc)
        except JobStateError:
            log.info("job %d was cancelled while it ran; its exports are removed", job.job_id)
            shutil.rmtree(self._export_dir(job.job_id), ignore_errors=True)
            return
        seconds = time.perf_counter() - t0
        self.metrics.done(analysis, seconds)
        if analysis.result.qc is not None:
            self.metrics.qc(self.store.qc_history(job_id=job.job_id))
        hotspot = analysis.result.scores.hotspot.counts
        log.info("job %d done in %.1f s: hotspot mitotic count %d, %d tiles (%s)", job.job_id, seconds,
                 hotspot.mitotic, analysis.tiles, job.slide_path)

    def _fail(self, job: Job, reason: str, *, retry: bool) -> None:
        settings = self.config.daemon
        retry_at = None
        if retry and job.attempts < settings.max_attempts:
            delay = min(settings.retry_backoff_s * 2 ** (job.attempts - 1), settings.retry_backoff_max_s)
            retry_at = self._clock() + delay
        try:
            self.store.fail_job(job.job_id, reason, retry_at=retry_at)
        except JobStateError:  # cancelled meanwhile
            return
        self.metrics.failed(reason)
        if retry_at is None:
            log.error("job %d failed (attempt %d): %s: %s", job.job_id, job.attempts, job.slide_path, reason)
        else:
            log.warning("job %d attempt %d failed, retry in %.0f s: %s: %s", job.job_id, job.attempts,
                        retry_at - self._clock(), job.slide_path, reason)

    def _export_dir(self, job_id: int) -> Path:
        return self.results_dir / str(job_id)

    @contextmanager
    def _exports_folder(self, job: Job) -> Iterator[Path]:
        """A ``results/<job>.partial`` folder for the job's exports, renamed to ``results/<job>`` when the
        block succeeds and removed when it fails: an export folder is never half there."""
        final = self._export_dir(job.job_id)
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            yield partial
            shutil.rmtree(final, ignore_errors=True)  # an earlier attempt that stopped before storing
            try:
                os.replace(partial, final)
            except OSError as exc:
                raise DiskFullError(f"moving the exports into {final} failed: {exc}") from exc
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise

    def _check_disk(self) -> None:
        need = self.config.daemon.min_free_disk_mb
        free_mb = shutil.disk_usage(self.results_dir).free / 2**20
        if free_mb < need:
            raise DiskFullError(
                f"only {free_mb:.0f} MB free in {self.results_dir}, {need} MB needed (daemon.min_free_disk_mb): "
                "free some space or move daemon.data_dir"
            )

    # --- engines ---------------------------------------------------------------------------------

    def _load_default_engines(self) -> None:
        """Load the configured bundle; until then health says NOT_SERVING and no job starts."""
        _lower_priority(self.config.daemon.analysis_nice)  # inference pool threads created here inherit it
        try:
            self._engines.get(self.config)
        except EdgeError as exc:
            self.engine_error = str(exc)
            log.error("the engines could not be loaded, no slide will be analysed: %s", exc)
            return
        self._set_ready()

    def _set_ready(self) -> None:
        if self._ready.is_set():
            return
        self._ready.set()
        if self.server is not None:
            self.server.set_serving(True)
        self._notify()
        log.info("engines loaded (%s%s): ready", self.config.engines.backend,
                 ", in a child process per worker" if self._isolated else "")

    # --- parts -----------------------------------------------------------------------------------

    def _check_config(self) -> None:
        for folder in self.config.watch.all_folders:
            if not Path(folder).is_dir():
                raise ConfigError(
                    f"watch folder {folder} does not exist or is not a folder; create it or fix watch.folders"
                )

    def _start_server(self) -> None:
        if not self.config.server.enabled:
            return
        from edge.server import start_server

        self.server = start_server(self.config.server, self, watch_folders=self.config.watch.all_folders)
        self.server.set_serving(False)

    def _start_watcher(self) -> None:
        if not self.config.watch.all_folders:
            return
        from edge.watcher import SlideWatcher

        self.watcher = SlideWatcher(self.config.watch, self.on_slide_ready, self.on_slide_failed)
        self.watcher.start()

    def _start_metrics(self) -> None:
        listen = self.config.daemon.metrics_listen
        if not listen:
            return
        self.metrics.attach_store(self.store)
        host, _, port = listen.rpartition(":")
        self._metrics_server = self.metrics.serve(host.strip("[]"), int(port))

    def metrics_address(self) -> str:
        if self._metrics_server is None:
            return ""
        host, port = self._metrics_server[0].server_address[:2]
        return f"{host}:{port}"

    def _housekeeping(self) -> None:
        """Export retention: prune at start, then every HOUSEKEEPING_INTERVAL_S until the daemon stops."""
        days = self.config.daemon.export_retention_days
        while True:
            self.prune_exports(self._clock() - days * 86400.0)
            if self._stopping.wait(timeout=HOUSEKEEPING_INTERVAL_S):
                return

    def prune_exports(self, cutoff: float) -> int:
        """Delete export folders of results older than ``cutoff`` (results and detections stay)."""
        pruned = self.store.delete_exports_older_than(cutoff)
        for result in pruned:
            shutil.rmtree(self._export_dir(result.job_id), ignore_errors=True)
        if pruned:
            log.info("retention: removed the exports of %d result(s)", len(pruned))
        return len(pruned)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=f"edge-{name}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Tests and the demo: wait until nothing is queued or running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = self.store.counts_by_state()
            if counts.get("queued", 0) == 0 and counts.get("running", 0) == 0 and not self._pending_watch():
                return True
            time.sleep(0.1)
        return False

    def _pending_watch(self) -> int:
        return int(self.watcher.pending()) if self.watcher is not None else 0


def _analyze_slide(path: Path, config: Config, engines: EngineSet, cancel: threading.Event, progress: Any) -> Any:
    from edge.pipeline import analyze_slide

    return analyze_slide(path, config, engines=engines, cancel_event=cancel, progress=progress)


def _lower_priority(nice: int) -> None:
    """Raise this thread's niceness (Linux: per thread, inherited by threads it starts), so inference
    yields the cores to the gRPC API and the watcher when they have work."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), nice))
    except OSError as exc:
        log.warning("could not lower the analysis threads' priority: %s", exc)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _quiet_fingerprint(path: Path, full: bool) -> str | None:
    try:
        return fingerprint_slide(path, full=full).key
    except OSError as exc:
        log.warning("no fingerprint for %s: %s", path, exc)
        return None


def _gpu_name(backend: str, probe: Any = None) -> str:
    """The first CUDA device's name for a GPU backend, or why there is none ("" on the CPU backend)."""
    if backend == "onnxruntime":
        return ""
    if probe is None:
        from edge.engines.probe import probe_gpu

        probe = probe_gpu()
    return str(probe.devices[0].name) if probe.ok and probe.devices else str(probe.reason)
