"""The scan-time daemon: watcher, durable job queue, inference workers, gRPC API and metrics.

A slide the watcher hands over (or a client submits) becomes a queued job in the SQLite store.
Each worker analyses its slides in a child process (``daemon.isolation = "process"``, see
``edge.service.worker``) or in this one (``"thread"``, and whenever tests inject an analysis).
Workers claim jobs oldest first (manual submissions may carry a priority), analyse the slide,
write its exports into ``<data>/results/<job>-<slide stem>/`` (mode ``daemon.export_mode``) and
store the result, its detections and the "done" event in one transaction. A slide that fails for a
transient reason (``edge.errors.is_retryable``: an engine or disk hiccup, a crashed analysis process, a
file that changed while it was read) is retried with exponential backoff, then marked failed with the
last error; a deterministic failure (an unreadable file, a decode error, a bomb, the time limit) fails at
once. The reason says which. The daemon never dies because of one slide. On SIGTERM/SIGINT it stops
taking work, lets running slides finish within the grace period, re-queues what is left and exits 0.
"""

from __future__ import annotations

import grp
import logging
import os
import re
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge import __version__
from edge.analysis.exports import export_folder_name, is_export_folder
from edge.config import Config, accession_regex
from edge.engines import EngineSet, load_bundle
from edge.engines.manifest import find_bundle, list_bundles
from edge.errors import (
    ConfigError,
    DiskFullError,
    EdgeError,
    JobStateError,
    ManifestError,
    MissingMppError,
    RequestRefused,
    SlideChangedError,
    SlideNotFoundError,
    SlideReadError,
    StoreBusyError,
    StoreError,
    StreamCancelled,
    is_retryable,
)
from edge.fileio import real_path_inside
from edge.logsafe import untrusted
from edge.service.metrics import AnalysedSlide, DaemonMetrics
from edge.service.status import EngineInfo, ServerStatus
from edge.service.store import Job, Store
from edge.service.worker import AnalysisProcess, EngineCache, TimeLimit
from edge.vocab import JobState
from edge.wsi.fingerprint import Fingerprint, fingerprint_slide, slide_files

if TYPE_CHECKING:  # imported where used: grpc, the watcher and the pipeline load only when started
    from edge.analysis.pipeline import Analysis, Progress
    from edge.engines.probe import GpuProbe
    from edge.service.server import RunningServer
    from edge.service.watcher import SlideWatcher

log = logging.getLogger(__name__)

STORE_NAME = "edge.db"
RESULTS_DIR = "results"
IDLE_WAIT_S = 1.0  # a worker with nothing to do looks at the queue again after this long (or when woken)
HOUSEKEEPING_INTERVAL_S = 3600.0  # export retention runs this often
ANALYSIS_ERRORS = (EdgeError, OSError, MemoryError, ValueError, RuntimeError)
BUNDLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # what SubmitSlide's bundle may be: a name, no path
WORKER_BACKOFF_S = 1.0  # a worker hit by an unexpected error (a store it cannot write) waits this long, doubling
WORKER_BACKOFF_MAX_S = 10.0
MONITOR_INTERVAL_S = 1.0  # how often the daemon checks its store file and its workers
STORE_PROBLEM = "store"
WORKERS_PROBLEM = "workers"


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
        self._child_engine_info: list[EngineInfo] = []  # what the analysis processes loaded
        self._clock = clock
        self._started_at = time.monotonic()
        self._check_config()
        store_path = self.data_dir / STORE_NAME
        _refuse_lost_store(store_path, self.results_dir)
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store.open(store_path)
        try:
            _refuse_lost_store(store_path, self.results_dir, store=self.store)
            self._store_identity = _file_identity(store_path)
        except BaseException:
            self.store.close()
            raise
        self.metrics = DaemonMetrics()
        self.server: RunningServer | None = None
        self.watcher: SlideWatcher | None = None
        self._metrics_server: tuple[Any, threading.Thread] | None = None
        self._web_server: tuple[ThreadingHTTPServer, threading.Thread] | None = None  # the review page ([web] listen)
        self._engines = EngineCache()  # "thread" isolation: the engines live in this process
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._wake = threading.Condition()
        self._running: dict[int, _Running] = {}
        self._running_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._bundles_checked: set[str] = set()
        self.engine_error: str | None = None
        self._bundle = ("", "", "")  # name, version, intended use of the configured bundle
        pattern = config.watch.accession_pattern
        self._accession_regex = accession_regex(pattern) if pattern else None
        self._export_gid = export_group_id(config.daemon.export_group)
        # Where a queued slide may be read from when it is opened: the API's roots, the watch folders and
        # the folders their symlinks may point into.
        watch = config.watch
        self.slide_roots = (*(config.server.allowed_roots or watch.all_folders), *watch.all_folders,
                            *watch.symlink_roots)
        self._problems: dict[str, str] = {}  # what keeps the daemon from scoring now -> why (health NOT_SERVING)
        self._problems_lock = threading.Lock()
        self.fatal_error: str | None = None  # set when the daemon cannot go on (its store file vanished)
        self._fatal = threading.Event()

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
            self._start_web()
            if not self._isolated:
                self._spawn("engines", self._load_default_engines)
            self._start_watcher()
            for i in range(self.config.daemon.workers):
                self._spawn(f"worker-{i}", self._work)
            if self.config.daemon.export_retention_days > 0:
                self._spawn("housekeeping", self._housekeeping)
            self._spawn("monitor", self._monitor)
        except BaseException:
            self.stop(grace=0.0)
            raise
        self._log_bundle()
        log.info("mitosis-edge %s serving: watching %s, data in %s%s", __version__,
                 ", ".join(self.config.watch.all_folders) or "no folder", self.data_dir,
                 (f", gRPC on {self.server.address}" if self.server else "")
                 + (f", review page on {self.web_address()}" if self._web_server else ""))
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
        for http_server in (self._metrics_server, self._web_server):
            if http_server is not None:
                httpd, thread = http_server
                httpd.shutdown()
                httpd.server_close()
                thread.join(timeout=5.0)
        self._engines.close()
        self.store.close()
        self._stopped.set()
        log.info("mitosis-edge stopped")

    def run(self) -> int:
        """Start, serve until SIGTERM or SIGINT, stop gracefully; the exit status: 0, or 1 after a fatal
        error (the store file vanished)."""
        stop_requested = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("received %s: finishing the running slide(s), then stopping", signal.Signals(signum).name)
            stop_requested.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not stop_requested.wait(timeout=1.0) and not self._fatal.is_set():
                pass
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
        if self.fatal_error:
            log.critical("mitosis-edge stopped because of a fatal error: %s", self.fatal_error)
            return 1
        return 0

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what the gRPC server calls (edge.service.server.DaemonControl) ---------------------------------

    def submit_slide(
        self,
        path: Path,
        *,
        priority: int = 0,
        mpp_override: float | None = None,
        bundle: str | None = None,
        submitted_by: str | None = None,
        accession: str | None = None,
        labels: tuple[str, ...] = (),
    ) -> Job:
        """Queue a slide a client asked for (always a new job: a client asking again means it).

        ``bundle`` is the name of a bundle the configuration allows (RequestRefused otherwise). The slide is
        fingerprinted now (SlideReadError if it cannot be read), so the bytes analysed later are these.
        Without an ``accession`` the one ``watch.accession_pattern`` finds in the path is used.
        """
        folder = self.allowed_bundle(bundle) if bundle else None
        fingerprint = fingerprint_slide(path, full=self.config.watch.fingerprint == "full").key
        with self._store_write():
            job, _ = self.store.add_job(
                str(path), fingerprint=fingerprint, source="submit", priority=priority,
                mpp_override=mpp_override, bundle=str(folder) if folder else None, dedupe=False,
                submitted_by=submitted_by, accession=accession or self._accession(path), labels=labels,
            )
        self._notify()
        return job

    @contextmanager
    def _store_write(self) -> Iterator[None]:
        """A store write outside the workers (watcher, API): a failure turns health NOT_SERVING with the
        reason and reaches the caller as a StoreError (gRPC UNAVAILABLE; the watcher tries again)."""
        try:
            yield
        except (sqlite3.Error, StoreBusyError) as exc:
            reason = f"the store {self.store.path} cannot be written: {exc}"
            self._set_problem(STORE_PROBLEM, reason)
            raise StoreError(f"{reason}; free space in {self.data_dir}, then try again") from exc

    def bundle_choices(self) -> dict[str, Path]:
        """The bundles SubmitSlide may name: engines.allowed_bundles (names on the search path, or folders the
        configuration gives), else every bundle on the search path; always the configured one."""
        engines = self.config.engines
        choices: dict[str, Path] = {}
        wanted = engines.allowed_bundles or tuple(str(folder) for folder in list_bundles())
        for entry in (engines.bundle, *wanted):
            try:
                folder = find_bundle(entry)
            except ManifestError:
                log.warning("engines.allowed_bundles names %s, which is no bundle; it cannot be chosen", entry)
                continue
            choices.setdefault(Path(entry).name if entry else folder.name, folder)
        return choices

    def allowed_bundle(self, name: str) -> Path:
        """The folder of the allowed bundle ``name``, checked once; RequestRefused naming the choices otherwise."""
        choices = self.bundle_choices()
        shown = ", ".join(sorted(choices)) or "none"
        if not BUNDLE_NAME.fullmatch(name):
            raise RequestRefused(
                "INVALID_ARGUMENT",
                f"bundle {untrusted(name, 64)} is not a bundle name (letters, digits, '.', '_', '-'; never a path); "
                f"this server offers: {shown}",
            )
        folder = choices.get(name)
        if folder is None:
            raise RequestRefused(
                "PERMISSION_DENIED",
                f"bundle {name!r} is not one this server allows; choose one of: {shown} (engines.allowed_bundles)",
            )
        if name not in self._bundles_checked:
            try:
                load_bundle(folder)  # a broken bundle is refused now, not after the queue
            except ManifestError as exc:
                raise RequestRefused(
                    "FAILED_PRECONDITION", f"bundle {name!r} is allowed but does not load on this server; see its log",
                    f"bundle {name} ({folder}) does not load: {exc}",
                ) from None
            self._bundles_checked.add(name)
        return folder

    def cancel_job(self, job_id: int, *, cancelled_by: str | None = None) -> Job:
        job = self.store.cancel_job(job_id, cancelled_by=cancelled_by)
        with self._running_lock:
            running = self._running.get(job_id)
            if running is not None:
                running.cancelled_by_user = True
                running.cancel.set()
        return job

    def server_status(self) -> ServerStatus:
        engines = self._child_engine_info + self._engines.info()
        counts = self.store.counts_by_state()
        bundle = engines[0]["bundle"] if engines else ""
        if not bundle and self._bundle[0]:
            bundle = f"{self._bundle[0]} {self._bundle[1]}"
        return ServerStatus(
            version=__version__,
            backend=self.config.engines.backend,
            gpu=_gpu_name(self.config.engines.backend),
            engines=engines,
            bundle=bundle,
            queue_depth=counts.get(JobState.QUEUED, 0),
            running=counts.get(JobState.RUNNING, 0),
            uptime_s=time.monotonic() - self._started_at,
            watch_folders=list(self.config.watch.all_folders),
            ready=self.is_ready(),
            engine_error=self.engine_error or "",
            not_ready_reason=self.not_ready_reason(),
            waiting_slides=self.watcher.waiting() if self.watcher is not None else [],
            intended_use=self._bundle[2],
        )

    def _log_bundle(self) -> None:
        """Name, version and intended use of the configured bundle, in the log and in server_status.

        The manifest alone says these; hashing and checking every model file is the engine loader's job
        (it reports a broken model as engine_error), so start-up does not read the models twice."""
        try:
            bundle = load_bundle(self.config.engines.bundle, check_graphs=False)
        except EdgeError as exc:  # the engines' loader reports it too, as engine_error
            log.error("model bundle %r cannot be read: %s", self.config.engines.bundle or "demo", exc)
            return
        self._bundle = (bundle.name, bundle.version, bundle.intended_use)
        log.info("model bundle %s %s; intended use: %s", bundle.name, bundle.version, bundle.intended_use)

    def is_ready(self) -> bool:
        """Engines loaded, a worker alive, the store writable, no fatal error: the health status."""
        return self._ready.is_set() and not self.not_ready_reason()

    def not_ready_reason(self) -> str:
        """Why the daemon does not score slides now ("" when it does, or while the engines load)."""
        if self.fatal_error:
            return self.fatal_error
        with self._problems_lock:
            return "; ".join(self._problems.values())

    def _set_problem(self, key: str, reason: str | None) -> None:
        """Record (or clear, with None) something that keeps the daemon from scoring; health follows."""
        with self._problems_lock:
            before = self._problems.get(key)
            if reason is None:
                self._problems.pop(key, None)
            else:
                self._problems[key] = reason
        if before == reason:
            return
        if reason is None:
            log.info("recovered (%s): scoring again", before)
        else:
            log.error("not ready: %s", reason)
        self._update_health()

    def _update_health(self) -> None:
        if self.server is not None and self._ready.is_set():
            self.server.set_serving(self.is_ready())

    # --- watcher callbacks -------------------------------------------------------------------------

    def on_slide_ready(self, path: Path, fingerprint: Fingerprint) -> None:
        """A settled slide: a job, unless the same slide was seen before (watch.on_duplicate) and its last job
        did not fail for a transient reason: a slide dropped again after such a failure is queued again."""
        meta = {"size": fingerprint.size, "mtime_ns": fingerprint.mtime_ns}
        accession = self._accession(path)
        mpp = self.config.watch.mpp_for(path)  # watch.folder_mpp: a scanner that records no pixel size
        earlier = self._seen_under_legacy_key(path, fingerprint)
        if earlier is not None:
            job, created = earlier, False
        elif self.config.watch.on_duplicate == "skip":  # the store skips a fingerprint it has seen anywhere
            job, created = self.store.add_job(
                str(path), fingerprint=fingerprint.key, source="watch", slide_meta=meta, accession=accession,
                mpp_override=mpp,
            )
        else:  # "reprocess": the same bytes under a new path are a new job; the same path again is not
            seen_here = [j for j in self.store.find_jobs_by_fingerprint(fingerprint.key) if j.slide_path == str(path)]
            if seen_here:
                job, created = seen_here[-1], False
            else:
                job, created = self.store.add_job(
                    str(path), fingerprint=fingerprint.key, source="watch", dedupe=False, slide_meta=meta,
                    accession=accession, mpp_override=mpp,
                )
        if not created and job.state == JobState.FAILED and job.retryable:
            log.info("slide %s dropped again; its job %d failed for a transient reason (%s): queued again",
                     path, job.job_id, job.error)
            job, created = self.store.add_job(
                str(path), fingerprint=fingerprint.key, source="watch", dedupe=False, slide_meta=meta,
                accession=accession, mpp_override=mpp,
            )
        if created:
            self.metrics.picked_up(self._clock() - fingerprint.mtime_ns / 1e9)
            log.info("new slide %s: job %d queued", path, job.job_id)
            self._notify()
        else:
            log.info("slide %s already seen as job %d (%s): not queued again", path, job.job_id, job.state)

    def failed_for_a_transient_reason(self, path: Path, key: str) -> bool:
        """Whether the last job of this path and fingerprint failed for a transient reason: the watcher hands
        such a slide over again when it settles again (dropped again, or touched)."""
        jobs = [j for j in self.store.find_jobs_by_fingerprint(key) if j.slide_path == str(path)]
        return bool(jobs) and jobs[-1].state == JobState.FAILED and bool(jobs[-1].retryable)

    def _seen_under_legacy_key(self, path: Path, fingerprint: Fingerprint) -> Job | None:
        """The newest job of this path stored under the key of a version that did not sample the middle of
        files: after an upgrade, slides still in the watch folders are not analysed again."""
        if fingerprint.legacy_key == fingerprint.key:
            return None
        jobs = self.store.find_jobs_by_fingerprint(fingerprint.legacy_key)
        same_path = [j for j in jobs if j.slide_path == str(path)]
        return same_path[-1] if same_path else None

    def on_slide_failed(self, path: Path, reason: str) -> None:
        self.store.add_failed_job(str(path), reason, source="watch", accession=self._accession(path))
        self.metrics.failed(reason)
        log.error("slide %s failed before analysis: %s", path, reason)

    def _accession(self, path: Path) -> str | None:
        return accession_from_path(path, self._accession_regex)

    # --- workers ---------------------------------------------------------------------------------

    def _work(self) -> None:
        process = None
        if self._isolated:
            process = self._start_analysis_process()
            if process is None:
                return
        else:
            _lower_priority(self.config.daemon.analysis_nice)  # reader threads started from here inherit it
        backoff = WORKER_BACKOFF_S
        unsettled: list[int] = []  # jobs this worker claimed but could not record the outcome of
        try:
            while not self._stopping.is_set():
                try:
                    self._work_once(process, unsettled)
                    backoff = WORKER_BACKOFF_S
                except Exception as exc:  # anything at all (a store that cannot be written): log, back off, go on
                    if backoff == WORKER_BACKOFF_S:  # the traceback once per streak, then one line per try
                        log.exception("worker step failed; trying again in %.0f s", backoff)
                    else:
                        log.error("worker step failed again (%s: %s); trying again in %.0f s",
                                  type(exc).__name__, exc, backoff)
                    if isinstance(exc, sqlite3.Error | StoreError):
                        self._set_problem(STORE_PROBLEM, f"the store {self.store.path} cannot be written: {exc}")
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, WORKER_BACKOFF_MAX_S)
        finally:
            if process is not None:
                process.close()

    def _work_once(self, process: AnalysisProcess | None, unsettled: list[int]) -> None:
        """Claim and analyse one job (or wait for one). What the store raises goes to ``_work``."""
        while unsettled:  # re-queue what an earlier store error left "running"
            try:
                self.store.requeue_job(unsettled[0], "the store could not be written; tried again")
                log.info("job %d re-queued after the store error", unsettled[0])
            except JobStateError:  # cancelled meanwhile
                pass
            unsettled.pop(0)
        if self._problem(STORE_PROBLEM):
            self.store.check_writable()
            self._set_problem(STORE_PROBLEM, None)
        job = self.store.claim_next_job() if self._ready.is_set() else None
        if job is None:
            with self._wake:
                self._wake.wait(timeout=IDLE_WAIT_S)
            return
        unsettled.append(job.job_id)
        try:
            self._process(job, process)
        except Exception as exc:  # a bug must not kill the worker: record it on the job and go on
            if isinstance(exc, sqlite3.Error | StoreError):
                raise
            log.exception("unexpected error on job %d (%s)", job.job_id, job.slide_path)
            self._fail(job, "internal error (see the daemon log)", retry=True)
        unsettled.remove(job.job_id)

    def _problem(self, key: str) -> str | None:
        with self._problems_lock:
            return self._problems.get(key)

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
        before = _file_states(Path(job.slide_path))
        limit = TimeLimit.of(self.config.daemon)
        try:
            self._check_disk()
            slide = self._slide_to_open(job)
            config = self.config.with_overrides({"slide.mpp_override": job.mpp_override, "engines.bundle": job.bundle})
            with self.metrics.running(), self._exports_folder(job) as partial:
                if process is not None:
                    outcome = process.analyze(slide, config, partial, running.cancel, limit)
                    analysis: AnalysedSlide = outcome
                    written = outcome.exports
                else:
                    analysis = self._analyze(
                        slide, config, self._engines.get(config), running.cancel, _limited_progress(slide, limit),
                    )
                    if limit.expired():
                        raise limit.error(slide)
                    try:
                        written = analysis.write_exports(partial)
                    except OSError as exc:
                        raise DiskFullError(f"writing the exports to {partial} failed: {exc}") from exc
            exports = {kind: self._export_dir(job) / path.name for kind, path in written.items()}
        except StreamCancelled:
            if not running.cancelled_by_user:
                self.store.requeue_job(job.job_id, "daemon stopping before the slide finished")
                log.info("job %d re-queued: the daemon is stopping", job.job_id)
            return
        except ANALYSIS_ERRORS as exc:
            if isinstance(exc, SlideReadError) and not exc.retryable:
                exc = _changed_meanwhile(Path(job.slide_path), before, exc)
            self._fail(job, _reason(exc), retry=is_retryable(exc))
            return
        finally:
            with self._running_lock:
                self._running.pop(job.job_id, None)
        try:
            self.store.complete_job(job.job_id, analysis.result, exports, self.config.qc)
        except JobStateError:
            log.info("job %d was cancelled while it ran; its exports are removed", job.job_id)
            shutil.rmtree(self._export_dir(job), ignore_errors=True)
            return
        seconds = time.perf_counter() - t0
        self.metrics.done(analysis, seconds)
        if analysis.result.qc is not None:
            self.metrics.qc(self.store.qc_history(job_id=job.job_id))
        hotspot = analysis.result.scores.hotspot.counts
        log.info("job %d done in %.1f s: hotspot mitotic count %d, %d tiles (%s)", job.job_id, seconds,
                 hotspot.mitotic, analysis.tiles, job.slide_path)

    def _slide_to_open(self, job: Job) -> Path:
        """The slide's real path, checked again as it is opened: every file inside the allowed roots (a symlink
        swapped in after the job was queued is refused) and the same fingerprint as when it was queued.
        A daemon with no roots at all (no watch folder, no server.allowed_roots) takes slides only from
        Python callers in its own process, and checks only the fingerprint."""
        real = Path(os.path.realpath(job.slide_path))
        if self.slide_roots:
            outside = [file for _, file in slide_files(real) if real_path_inside(file, self.slide_roots) is None]
            if outside:
                log.warning("job %d: %s leads outside the allowed roots now (to %s); not opened", job.job_id,
                            untrusted(job.slide_path), untrusted(os.path.realpath(outside[0])))
                raise SlideReadError(job.slide_path, "leads outside the allowed roots now (a symlink or folder "
                                     "was swapped after the job was queued); it was not opened")
        if job.fingerprint is not None:
            found = fingerprint_slide(real, full=self.config.watch.fingerprint == "full").key
            if found != job.fingerprint:
                raise SlideReadError(job.slide_path, "its content changed after the job was queued (another "
                                     "fingerprint); it was not analysed: submit it again if the new content is right")
        return real

    def _fail(self, job: Job, reason: str, *, retry: bool) -> None:
        """Record the failure; ``retry``: the error is transient, so try again after a backoff while attempts
        are left. The stored reason ends with which kind it was and what happens next."""
        settings = self.config.daemon
        retry_at = None
        if retry and job.attempts < settings.max_attempts:
            delay = min(settings.retry_backoff_s * 2 ** (job.attempts - 1), settings.retry_backoff_max_s)
            retry_at = self._clock() + delay
            reason += f" [transient error: retry {job.attempts + 1} of {settings.max_attempts} in {delay:.0f} s]"
        elif retry:
            reason += (f" [transient error: gave up after {job.attempts} attempt(s); drop the slide again or "
                       "submit it to retry]")
        else:
            reason += (" [deterministic error: not retried, the same slide fails the same way; fix or replace "
                       "the slide, then submit it again]")
        try:
            self.store.fail_job(job.job_id, reason, retry_at=retry_at, retryable=retry)
        except JobStateError:  # cancelled meanwhile
            return
        self.metrics.failed(reason)
        if retry_at is None:
            log.error("job %d failed (attempt %d): %s: %s", job.job_id, job.attempts, job.slide_path, reason)
        else:
            log.warning("job %d attempt %d failed, retry in %.0f s: %s: %s", job.job_id, job.attempts,
                        retry_at - self._clock(), job.slide_path, reason)

    def _export_dir(self, job: Job) -> Path:
        return self.results_dir / export_folder_name(job.job_id, job.slide_path)

    @contextmanager
    def _exports_folder(self, job: Job) -> Iterator[Path]:
        """A ``results/<job>-<stem>.partial`` folder for the job's exports, given ``daemon.export_mode`` and
        ``export_group`` and renamed to ``results/<job>-<stem>`` when the block succeeds, removed when it
        fails: an export folder is never half there."""
        final = self._export_dir(job)
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            yield partial
            share_exports(partial, self.config.daemon.export_file_mode, self._export_gid)
            _set_aside_foreign_exports(final, job)
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
        self._update_health()
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
        from edge.service.server import start_server

        self.server = start_server(
            self.config.server, self, watch_folders=self.config.watch.all_folders, export_root=self.results_dir
        )
        self.server.set_serving(False)

    def _start_watcher(self) -> None:
        if not self.config.watch.all_folders:
            return
        from edge.service.watcher import SlideWatcher

        def on_ready(path: Path, fingerprint: Fingerprint) -> None:
            with self._store_write():  # a full store: health says so, the watcher hands the slide over later
                self.on_slide_ready(path, fingerprint)

        def on_failed(path: Path, reason: str) -> None:
            with self._store_write():
                self.on_slide_failed(path, reason)

        self.watcher = SlideWatcher(self.config.watch, on_ready, on_failed, again=self.failed_for_a_transient_reason)
        self.watcher.start()

    def _start_metrics(self) -> None:
        listen = self.config.daemon.metrics_listen
        if not listen:
            return
        self.metrics.attach_store(self.store)
        host, _, port = listen.rpartition(":")
        try:
            self._metrics_server = self.metrics.serve(host.strip("[]"), int(port))
        except OSError as exc:  # a configuration problem: exit 2, which systemd does not restart in a loop
            raise ConfigError(
                f"cannot serve metrics on daemon.metrics_listen={listen!r} (--metrics): {exc.strerror or exc}; "
                "is another daemon or program using the port? choose another one, or \"\" to turn metrics off"
            ) from None

    def _start_web(self) -> None:
        if not self.config.web.listen:
            return
        from edge.service.web import start_web

        self._web_server = start_web(self.config, self.store, self.results_dir, on_review=self.metrics.reviewed)

    def grpc_address(self) -> str:
        """HOST:PORT of the gRPC API; "" before the daemon started it."""
        return self.server.address if self.server is not None else ""

    def web_address(self) -> str:
        """HOST:PORT of the review page; "" when [web] listen is not set."""
        if self._web_server is None:
            return ""
        host, port = self._web_server[0].server_address[:2]
        return f"{host.decode() if isinstance(host, bytes) else host}:{port}"

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
            folders = {Path(p).parent for p in result.exports.values()} or {self.results_dir / str(result.job_id)}
            for folder in folders:
                if folder.parent == self.results_dir:  # never outside results/, whatever the store says
                    shutil.rmtree(folder, ignore_errors=True)
        if pruned:
            log.info("retention: removed the exports of %d result(s)", len(pruned))
        return len(pruned)

    def _monitor(self) -> None:
        """Every MONITOR_INTERVAL_S: the store file is still the one opened, and a worker is alive."""
        while not self._stopping.wait(timeout=MONITOR_INTERVAL_S):
            self.check_health()

    def check_health(self) -> None:
        """One look of the monitor (tests call it directly)."""
        lost = _store_lost(self.store.path, self._store_identity)
        if lost and not self.fatal_error:
            self.fatal_error = (
                f"{lost}; results can no longer be stored. Stop the daemon, restore {self.store.path.name} "
                f"(with its -wal file) from a backup into {self.data_dir} and start it again"
            )
            log.critical("fatal: %s", self.fatal_error)
            self._fatal.set()
            self._stopping.set()  # nothing more is written into a file nobody will read
            self._notify()
            if self.server is not None:
                self.server.set_serving(False)
            return
        workers = [t for t in self._threads if t.name.startswith("edge-worker")]
        if self._ready.is_set() and workers and not any(t.is_alive() for t in workers):
            self._set_problem(WORKERS_PROBLEM, "no worker thread is alive (see the daemon log); restart the daemon")
        self.metrics.ready.set(1 if self.is_ready() else 0)
        self.metrics.slides_waiting.set(len(self.watcher.waiting()) if self.watcher is not None else 0)

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
            idle = counts.get(JobState.QUEUED, 0) == 0 and counts.get(JobState.RUNNING, 0) == 0
            if idle and not self._pending_watch():
                return True
            time.sleep(0.1)
        return False

    def _pending_watch(self) -> int:
        return int(self.watcher.pending()) if self.watcher is not None else 0


def _file_identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def _store_lost(path: Path, identity: tuple[int, int]) -> str:
    """Why the open store is no longer the file at ``path`` ("" when it still is)."""
    try:
        now = _file_identity(path)
    except FileNotFoundError:
        return f"the store file {path} was deleted while the daemon ran"
    except OSError as exc:
        return f"the store file {path} cannot be looked at: {exc}"
    if now != identity:
        return f"the store file {path} was replaced by another file while the daemon ran"
    return ""


def _refuse_lost_store(path: Path, results_dir: Path, *, store: Store | None = None) -> None:
    """A data dir with export folders but a missing, empty or job-less store: the store was lost. Starting
    would re-number jobs from 1 and write over those exports, so refuse and say how to recover."""
    if store is None:
        if path.exists() and path.stat().st_size > 0:
            return
    elif store.list_jobs(limit=1):
        return
    try:
        exports = sorted(p.name for p in results_dir.iterdir() if is_export_folder(p.name))
    except FileNotFoundError:
        return
    if not exports:
        return
    what = "is missing" if store is None and not path.exists() else "holds no jobs"
    raise StoreError(
        f"the store {path} {what}, but {results_dir} holds {len(exports)} export folder(s) "
        f"({', '.join(exports[:3])}{', ...' if len(exports) > 3 else ''}) from an earlier store: the store "
        f"was deleted or replaced. Restore {path.name} (with its -wal file) from a backup; or, to start "
        f"over, move {results_dir} somewhere else (the new store would re-number jobs from 1)"
    )


def _set_aside_foreign_exports(folder: Path, job: Job) -> None:
    """An export folder older than the job cannot be an earlier attempt of it: it belongs to a lost store's
    job of the same number. It is renamed aside, never overwritten."""
    try:
        written = folder.stat().st_mtime
    except FileNotFoundError:
        return
    if written < job.created_at:
        aside = folder.with_name(f"{folder.name}.earlier-store-{int(written)}")
        os.replace(folder, aside)
        log.warning("%s predates job %d (an earlier store's exports): kept as %s", folder, job.job_id, aside)


def _analyze_slide(
    path: Path, config: Config, engines: EngineSet, cancel: threading.Event, progress: Progress
) -> Analysis:
    from edge.analysis.pipeline import analyze_slide

    return analyze_slide(path, config, engines=engines, cancel_event=cancel, progress=progress)


def _limited_progress(path: Path, limit: TimeLimit) -> Callable[[str, int, int], None]:
    """In-process analysis: the pipeline's progress callback learns the tile plan and stops the analysis
    (by raising) once the time limit has passed; the child process has its parent watch the clock instead."""

    def progress(stage: str, done: int, total: int) -> None:
        if limit.tiles is None and stage == "detect":
            limit.planned(total)
        if limit.expired():
            raise limit.error(path)

    return progress


def accession_from_path(path: Path, regex: re.Pattern[str] | None) -> str | None:
    """The accession number ``watch.accession_pattern`` finds in a slide's path, or None.

    >>> accession_from_path(Path("/scans/S24-00042/HE.svs"), re.compile(r"(?P<accession>S\\d{2}-\\d+)"))
    'S24-00042'
    """
    if regex is None:
        return None
    match = regex.search(str(path))
    return match["accession"] if match and match["accession"] else None


def share_exports(folder: Path, mode: int, gid: int | None) -> None:
    """Give an export folder and its files ``mode`` (folders: plus x where r is set) and the group ``gid``."""
    folder_mode = mode | ((mode & 0o444) >> 2)
    for path in (folder, *folder.iterdir()):
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, folder_mode if path.is_dir() else mode)


def export_group_id(name: str) -> int | None:
    if not name:
        return None
    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(
            f"daemon.export_group={name!r} is not a group on this machine; create it (groupadd) or fix the setting"
        ) from None
    if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        raise ConfigError(
            f"daemon.export_group={name!r}: the daemon's user is not in that group, so it cannot give its exports "
            f"to it; add the user to the group (usermod -aG {name} USER, or SupplementaryGroups= in the unit)"
        )
    return gid


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
    if isinstance(exc, MissingMppError):  # the slide's own hint names analyze's flag; say what works here
        return (
            f"MissingMppError: {exc.path}: the slide records no pixel size (mpp); submit it again with the scan's "
            f"µm/px: mitosis-edge client submit {exc.path} --mpp 0.25 (for example); for every slide of a scanner "
            "that records none, add \"FOLDER=MPP\" for its folder to watch.folder_mpp in the daemon's config"
        )
    return f"{type(exc).__name__}: {exc}"


FileStates = tuple[tuple[str, int, int], ...] | None


def _file_states(path: Path) -> FileStates:
    """(name, size, mtime_ns) of every file of the slide, or None when it cannot be listed."""
    try:
        return tuple((name, (st := file.stat()).st_size, st.st_mtime_ns) for name, file in slide_files(path))
    except OSError:
        return None


def _changed_meanwhile(path: Path, before: FileStates, exc: SlideReadError) -> SlideReadError:
    """A read error on a slide whose files changed during the attempt (overwritten, still being copied,
    removed) is no fault of the slide: a SlideChangedError, which is retried."""
    if before is None:
        return exc
    try:
        slide_files(path)
    except SlideNotFoundError:
        return SlideChangedError(path, f"it vanished while it was analysed ({exc.reason})")
    except OSError:
        return exc
    if _file_states(path) == before:
        return exc
    return SlideChangedError(path, f"its files changed while it was analysed ({exc.reason})")


def _gpu_name(backend: str, probe: GpuProbe | None = None) -> str:
    """The first CUDA device's name for a GPU backend, or why there is none ("" on the CPU backend)."""
    if backend == "onnxruntime":
        return ""
    if probe is None:
        from edge.engines.probe import probe_gpu

        probe = probe_gpu()
    return str(probe.devices[0].name) if probe.ok and probe.devices else str(probe.reason)
