"""The daemon's durable state in one SQLite file: jobs, slides, results, detections and the event log.

WAL mode: one writer connection behind a lock, pooled reader connections that never wait on a write.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from edge.analysis.drift import Assessment, HistoryPoint, assess, measures_of
from edge.analysis.scoring import Figure, SlideResult
from edge.config import QcConfig
from edge.errors import (
    JobNotFoundError,
    JobStateError,
    ResultNotFoundError,
    StoreBusyError,
    StoreCorruptError,
    StoreError,
)
from edge.vocab import JOB_STATES, JobState
from edge.wsi.slide import UNKNOWN_SCANNER

__all__ = [
    "DETECTION_CLASSES",
    "EVENT_TYPES",
    "JOB_SOURCES",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Event",
    "Job",
    "QcRecord",
    "Store",
    "StoredResult",
    "StoredReview",
    "failure_reason",
    "result_mpp",
]

log = logging.getLogger(__name__)

JOB_SOURCES = ("watch", "submit")
EVENT_TYPES = (
    "job_queued",
    "job_running",
    "job_retry",
    "job_done",
    "job_failed",
    "job_cancelled",
    "job_requeued",
    "result_reviewed",
    "qc_flagged",  # the slide's scan QC verdict is review or rescan (before its job_done)
    "drift",  # a run of a scanner's slides left its baseline (stain, focus or MF density)
)
# "normal", "atypical", "uncertain": mitotic figures by subtype; "non_mitotic": rejected candidates.
DETECTION_CLASSES = ("normal", "atypical", "uncertain", "non_mitotic")

APPLICATION = "mitosis-edge"  # meta.application: tells our store from any other SQLite file
BUSY_TIMEOUT_MS = 10_000  # another process (a CLI, a second daemon) holding the write lock
EVENT_POLL_S = 0.5  # wait_for_events also sees events written by other processes this often
DEFAULT_DETECTION_BATCH = 500
MAX_PAGE = 10_000  # most rows one list_jobs or events_after call returns
RESTART_REASON = "daemon restarted"
FAILURE_REASON_CHARS = 60  # failure reasons (failure_counts keys, metric labels): short and few

# Migration i takes the schema from version i to i + 1; each is a list of single SQL statements
# run in one transaction with the version bump. A new version is one more entry at the end;
# a released entry never changes (its text is literal SQL, not built from the constants above).
_V1 = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "INSERT INTO meta (key, value) VALUES ('application', 'mitosis-edge')",
    """CREATE TABLE slides (
        slide_id INTEGER PRIMARY KEY,
        path TEXT NOT NULL,
        fingerprint TEXT,
        meta TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL
    )""",
    "CREATE INDEX slides_by_fingerprint ON slides (fingerprint)",
    "CREATE INDEX slides_by_path ON slides (path)",
    """CREATE TABLE jobs (
        job_id INTEGER PRIMARY KEY AUTOINCREMENT,
        slide_id INTEGER NOT NULL REFERENCES slides (slide_id),
        state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
        source TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        mpp_override REAL,
        bundle TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        not_before REAL
    )""",
    "CREATE INDEX jobs_by_slide ON jobs (slide_id)",
    "CREATE INDEX jobs_to_claim ON jobs (state, priority DESC, created_at, job_id)",
    """CREATE TABLE results (
        job_id INTEGER PRIMARY KEY REFERENCES jobs (job_id),
        summary TEXT NOT NULL,
        exports TEXT NOT NULL,
        detections INTEGER NOT NULL,
        created_at REAL NOT NULL,
        pruned_at REAL
    )""",
    "CREATE INDEX results_by_age ON results (created_at)",
    """CREATE TABLE detections (
        detection_id INTEGER PRIMARY KEY,
        job_id INTEGER NOT NULL REFERENCES results (job_id),
        class TEXT NOT NULL CHECK (class IN ('normal', 'atypical', 'uncertain', 'non_mitotic')),
        p_mitotic REAL NOT NULL,
        x_px REAL NOT NULL,
        y_px REAL NOT NULL,
        figure TEXT NOT NULL
    )""",
    # (job_id, detection_id): keyset pages scan each job's rows in order, whatever the filter.
    "CREATE INDEX detections_by_job ON detections (job_id)",
    """CREATE TABLE events (
        sequence INTEGER PRIMARY KEY AUTOINCREMENT,
        type TEXT NOT NULL,
        job_id INTEGER REFERENCES jobs (job_id),
        payload TEXT NOT NULL,
        created_at REAL NOT NULL
    )""",
)
# Issue 11: whether a failed job's last error was retryable (transient): a failed slide dropped again
# is queued again only then. NULL for jobs that never failed and for failures stored before this.
_V_I11A = ("ALTER TABLE jobs ADD COLUMN retryable INTEGER",)
# issue 12: who submitted and who cancelled a job (token name or certificate subject; NULL = the watcher)
_V_I12 = (
    "ALTER TABLE jobs ADD COLUMN submitted_by TEXT",
    "ALTER TABLE jobs ADD COLUMN cancelled_by TEXT",
)
# The case a slide belongs to: its accession number and free labels (a JSON array of strings).
_V_I15 = (
    "ALTER TABLE jobs ADD COLUMN accession TEXT",
    "ALTER TABLE jobs ADD COLUMN labels TEXT NOT NULL DEFAULT '[]'",
    "CREATE INDEX jobs_by_accession ON jobs (accession)",
)
# Scan QC per slide and scanner: the history drift baselines are drawn from (edge.analysis.drift).
_V_I18 = (
    """CREATE TABLE qc_history (
        job_id INTEGER PRIMARY KEY REFERENCES results (job_id),
        scanner TEXT NOT NULL,
        verdict TEXT NOT NULL,
        measures TEXT NOT NULL,
        in_band INTEGER NOT NULL,
        assessment TEXT NOT NULL,
        created_at REAL NOT NULL
    )""",
    "CREATE INDEX qc_history_by_scanner ON qc_history (scanner, created_at)",
)
# issue 19: pathologists' signed reviews, kept beside (never over) the automatic result; a job may be
# signed again (the newest signature is current). result_created_at ties a review to the result it saw.
_V_I19 = (
    """CREATE TABLE reviews (
        review_id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER NOT NULL REFERENCES jobs (job_id),
        result_created_at REAL NOT NULL,
        reviewer TEXT NOT NULL,
        signed_at REAL NOT NULL,
        counts TEXT NOT NULL,
        automatic TEXT NOT NULL,
        changes TEXT NOT NULL,
        exports TEXT NOT NULL DEFAULT '{}'
    )""",
    "CREATE INDEX reviews_by_job ON reviews (job_id, review_id)",
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1, _V_I11A, _V_I12, _V_I15, _V_I18, _V_I19)
QC_HISTORY_READ = 500  # rows of a scanner's history read to find its baseline and the current run
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class Job:
    """One slide to analyse and where it stands. Times are unix seconds."""

    job_id: int
    state: JobState
    slide_path: str
    fingerprint: str | None
    source: str
    priority: int
    mpp_override: float | None
    bundle: str | None
    attempts: int
    error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    not_before: float | None
    submitted_by: str | None = None  # the API caller's token name or certificate subject; None = the watcher
    cancelled_by: str | None = None  # who cancelled it over the API
    retryable: bool | None = None  # the last failure's kind: transient (True) or deterministic (False)
    accession: str | None = None  # the case's accession number, from the submit, the path or the slide
    labels: tuple[str, ...] = ()  # free labels given at submit

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", JobState(self.state))  # SQLite gives the text
        if self.retryable is not None:  # SQLite gives 0/1
            object.__setattr__(self, "retryable", bool(self.retryable))

    def to_json_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        data["labels"] = list(self.labels)
        return data


@dataclass(frozen=True)
class StoredResult:
    """A done job's result: the slide summary (SlideResult without figures) and its export paths."""

    job_id: int
    slide_path: str
    fingerprint: str | None
    summary: dict[str, Any]
    exports: dict[str, str]
    detections: int
    created_at: float
    pruned_at: float | None = None  # when the export files were handed out for deletion

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StoredReview:
    """A pathologist's signed review of a done job (issue 19); the automatic result is never changed.

    `counts` and `automatic` hold mitotic, atypical, normal, uncertain, atypical_ratio (hotspot);
    `changes` the reviewer's decisions (edge.analysis.review). `superseded_by` is the newer done job of the same
    slide when the slide was analysed again: the review then refers to this earlier result.
    """

    review_id: int
    job_id: int
    reviewer: str
    signed_at: float
    counts: dict[str, Any]
    automatic: dict[str, Any]
    changes: list[dict[str, Any]]
    result_created_at: float
    exports: dict[str, str]
    superseded_by: int | None = None

    @property
    def current(self) -> bool:
        return self.superseded_by is None

    def to_json_dict(self) -> dict[str, Any]:
        return {**asdict(self), "current": self.current}


@dataclass(frozen=True)
class Event:
    """One entry of the event log; `sequence` increases by one per event, from 1."""

    sequence: int
    type: str
    job_id: int | None
    payload: dict[str, Any]
    created_at: float

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)


_JOB_SELECT = """SELECT j.job_id, j.state, s.path, s.fingerprint, j.source, j.priority, j.mpp_override,
    j.bundle, j.attempts, j.error, j.created_at, j.started_at, j.finished_at, j.not_before, j.submitted_by,
    j.cancelled_by, j.retryable, j.accession, j.labels FROM jobs j JOIN slides s ON s.slide_id = j.slide_id"""
_JOB_UPDATE = """UPDATE jobs SET state = ?, attempts = ?, error = ?, started_at = ?, finished_at = ?,
    not_before = ?, retryable = ? WHERE job_id = ?"""
_RESULT_SELECT = """SELECT r.job_id, s.path, s.fingerprint, r.summary, r.exports, r.detections, r.created_at,
    r.pruned_at FROM results r JOIN jobs j ON j.job_id = r.job_id JOIN slides s ON s.slide_id = j.slide_id"""
@dataclass(frozen=True)
class QcRecord:
    """One slide's stored scan QC: its scanner, verdict, drift measures and how they compared with the baseline."""

    job_id: int
    scanner: str
    verdict: str
    measures: dict[str, Any]
    in_band: bool
    assessment: dict[str, Any]
    created_at: float
    slide_path: str


_EVENT_SELECT = "SELECT sequence, type, job_id, payload, created_at FROM events"


class Store:
    """The job store. Thread-safe: the watcher, the workers and gRPC threads call it at once.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder, Store.open(Path(folder) / "edge.db") as store:
    ...     job, created = store.add_job("/scans/a.svs", fingerprint="sha256:ab")
    ...     store.add_job("/scans/a-copy.svs", fingerprint="sha256:ab")[1], str(store.claim_next_job().state)
    (False, 'running')
    """

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._write_lock = threading.Lock()
        self._pool_lock = threading.Lock()
        self._idle_readers: list[sqlite3.Connection] = []
        self._closed = False
        self._events_changed = threading.Condition()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._writer = _connect(self.path)
        except sqlite3.Error as exc:
            raise _open_error(self.path, exc) from exc
        try:
            _prepare(self._writer, self.path, MIGRATIONS)
        except BaseException as exc:
            self._writer.close()
            if isinstance(exc, sqlite3.Error):
                raise _open_error(self.path, exc) from exc
            raise

    @classmethod
    def open(cls, path: str | Path, *, clock: Callable[[], float] = time.time) -> Store:
        """Open the store at `path`: created from nothing, or migrated from an older schema."""
        return cls(path, clock=clock)

    def close(self) -> None:
        """Close every connection; waiters in `wait_for_events` return at once. Idempotent."""
        with self._pool_lock:
            if self._closed:
                return
            self._closed = True
            idle, self._idle_readers = self._idle_readers, []
        for conn in idle:
            conn.close()
        with self._write_lock:
            self._writer.close()
        with self._events_changed:
            self._events_changed.notify_all()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    @property
    def schema_version(self) -> int:
        with self._read() as conn:
            return int(_one(conn, "PRAGMA user_version")[0])

    # --- connections ------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT); rolled back on any exception."""
        with self._write_lock, _busy_as_store_error(self.path):
            self._check_open()
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        with self._events_changed:
            self._events_changed.notify_all()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A reader connection from the pool (a new one when all are busy), returned after use."""
        with self._pool_lock:
            self._check_open()
            conn = self._idle_readers.pop() if self._idle_readers else None
        if conn is None:
            with _busy_as_store_error(self.path):
                conn = _connect(self.path, reader=True)
        try:
            with _busy_as_store_error(self.path):
                yield conn
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            with self._pool_lock:
                closed = self._closed
                if not closed:
                    self._idle_readers.append(conn)
            if closed:
                conn.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"store {self.path} is closed; open it again with Store.open")

    # --- jobs --------------------------------------------------------------------------------

    def add_job(
        self,
        slide_path: str,
        *,
        fingerprint: str | None = None,
        source: str = "watch",
        priority: int = 0,
        mpp_override: float | None = None,
        bundle: str | None = None,
        dedupe: bool = True,
        slide_meta: Mapping[str, Any] | None = None,
        submitted_by: str | None = None,
        accession: str | None = None,
        labels: Sequence[str] = (),
    ) -> tuple[Job, bool]:
        """Queue a slide; returns (job, created).

        With `dedupe` and a fingerprint seen before (in any state, so a bad file is not retried
        in a loop) nothing is written and the newest job with it comes back with created False.
        """
        _check_source(source)
        meta = json.dumps(dict(slide_meta or {}))
        now = self._clock()
        with self._write() as conn:
            if dedupe and fingerprint is not None:
                row = _one(
                    conn, f"{_JOB_SELECT} WHERE s.fingerprint = ? ORDER BY j.job_id DESC LIMIT 1", (fingerprint,)
                )
                if row is not None:
                    return _job_from_row(row), False
            slide_id = _slide_id(conn, str(slide_path), fingerprint, meta, now)
            job = _insert_job(
                conn, self.path, slide_id, source, int(priority), mpp_override, bundle, now,
                case=(accession or None, tuple(labels)),
            )
            if submitted_by is not None:
                conn.execute("UPDATE jobs SET submitted_by = ? WHERE job_id = ?", (submitted_by, job.job_id))
                job = replace(job, submitted_by=submitted_by)
        return job, True

    def add_failed_job(
        self,
        slide_path: str,
        error: str,
        *,
        fingerprint: str | None = None,
        source: str = "watch",
        accession: str | None = None,
    ) -> Job:
        """Record a slide that failed before it could be queued (e.g. never settled), in one transaction.

        Appends "job_queued" then "job_failed", like any job that fails; never deduplicated.
        """
        _check_source(source)
        now = self._clock()
        with self._write() as conn:
            slide_id = _slide_id(conn, str(slide_path), fingerprint, "{}", now)
            job = _insert_job(conn, self.path, slide_id, source, 0, None, None, now, case=(accession or None, ()))
            failed = _save(conn, replace(job, state=JobState.FAILED, error=error, finished_at=now))
            _append_event(conn, "job_failed", failed, now, {"error": error, "attempts": 0})
        return failed

    def claim_next_job(self, now: float | None = None) -> Job | None:
        """Start the next job: queued and due, highest priority first, then the oldest. None if none."""
        moment = self._clock() if now is None else now
        with self._write() as conn:
            row = _one(
                conn,
                f"{_JOB_SELECT} WHERE j.state = 'queued' AND (j.not_before IS NULL OR j.not_before <= ?)"
                " ORDER BY j.priority DESC, j.created_at, j.job_id LIMIT 1",
                (moment,),
            )
            if row is None:
                return None
            job = _job_from_row(row)
            running = _save(conn, replace(job, state=JobState.RUNNING, attempts=job.attempts + 1, started_at=moment))
            _append_event(conn, "job_running", running, moment, {"attempts": running.attempts})
        return running

    def complete_job(
        self, job_id: int, result: SlideResult, exports: Mapping[str, str | Path], qc: QcConfig | None = None
    ) -> Job:
        """Store the result, one detection row per figure and the "job_done" event in one transaction.

        A result with a qc section also gets its qc_history row, a "qc_flagged" event when its verdict
        is not pass and a "drift" event when it completes a run of its scanner's slides outside the
        baseline (``qc`` holds the drift settings), all before "job_done".
        Only a running job can complete; otherwise (e.g. cancelled meanwhile) JobStateError and
        nothing is written.
        """
        summary = replace(result, figures=()).to_json_dict()
        summary.pop("figures")
        summary_json = json.dumps(summary)
        exports_json = json.dumps({str(kind): str(Path(p).absolute()) for kind, p in exports.items()})
        slide_json = json.dumps(dict(result.slide))
        now = self._clock()
        hotspot, totals = result.scores.hotspot.counts, result.scores.totals
        with self._write() as conn:
            job = _transition(conn, self.path, job_id, ("running",), "completed")
            barcode = result.slide.get("barcode")
            if job.accession is None and barcode:  # no accession from the submit or the path: the slide's own
                conn.execute("UPDATE jobs SET accession = ? WHERE job_id = ?", (str(barcode), job_id))
                job = replace(job, accession=str(barcode))
            done = _save(conn, replace(job, state=JobState.DONE, finished_at=now, error=None, retryable=None))
            conn.execute(
                "INSERT INTO results (job_id, summary, exports, detections, created_at) VALUES (?, ?, ?, ?, ?)",
                (job_id, summary_json, exports_json, len(result.figures), now),
            )
            conn.executemany(
                "INSERT INTO detections (job_id, class, p_mitotic, x_px, y_px, figure) VALUES (?, ?, ?, ?, ?, ?)",
                (_detection_row(job_id, figure) for figure in result.figures),
            )
            _merge_slide_meta(conn, job_id, slide_json)
            if result.qc is not None:
                assessment = _record_qc(conn, done, result, qc or QcConfig(), now)
                summary["qc"]["baseline"] = assessment.to_json_dict()  # how the slide compared with its scanner
                conn.execute("UPDATE results SET summary = ? WHERE job_id = ?", (json.dumps(summary), job_id))
            payload = {
                "mitotic_count": hotspot.mitotic,
                "atypical_ratio": hotspot.atypical_ratio,
                "total_mitotic": totals.mitotic,
            }
            _append_event(conn, "job_done", done, now, payload)
        return done

    def qc_history(
        self, *, scanner: str | None = None, since: float | None = None, job_id: int | None = None
    ) -> list[QcRecord]:
        """Stored scan QC per slide, oldest first: for one scanner, since a time (unix s) or one job."""
        where, params = ["1 = 1"], []
        for clause, value in (("q.scanner = ?", scanner), ("q.created_at >= ?", since), ("q.job_id = ?", job_id)):
            if value is not None:
                where.append(clause)
                params.append(value)
        with self._read() as conn:
            rows = conn.execute(
                "SELECT q.job_id, q.scanner, q.verdict, q.measures, q.in_band, q.assessment, q.created_at, s.path "
                "FROM qc_history q JOIN jobs j ON j.job_id = q.job_id JOIN slides s ON s.slide_id = j.slide_id "
                f"WHERE {' AND '.join(where)} ORDER BY q.created_at, q.job_id",
                params,
            ).fetchall()
        return [QcRecord(int(j), str(sc), str(v), json.loads(m), bool(b), json.loads(a), float(t), str(p))
                for j, sc, v, m, b, a, t, p in rows]

    def fail_job(
        self, job_id: int, error: str, *, retry_at: float | None = None, retryable: bool | None = None
    ) -> Job:
        """Record a failed attempt: back to queued until `retry_at` ("job_retry"), or failed for good.

        `retryable` records whether the error was transient (True) or deterministic (False); a failed
        job's slide dropped again is queued again only after a transient failure.
        """
        now = self._clock()
        with self._write() as conn:
            job = _transition(conn, self.path, job_id, ("queued", "running"), "failed")
            if retry_at is None:
                failed = replace(job, state=JobState.FAILED, error=error, finished_at=now, retryable=retryable)
                new = _save(conn, failed)
                _append_event(conn, "job_failed", new, now,
                              {"error": error, "attempts": new.attempts, "retryable": retryable})
            else:
                new = _save(conn, replace(job, state=JobState.QUEUED, error=error, started_at=None, not_before=retry_at,
                                          retryable=retryable))
                payload = {"error": error, "attempts": new.attempts, "retry_at": retry_at}
                _append_event(conn, "job_retry", new, now, payload)
        return new

    def check_writable(self) -> None:
        """Write one page (a no-op update): raises sqlite3.Error while the store cannot be written,
        e.g. "database or disk is full"."""
        with self._write() as conn:
            conn.execute("UPDATE meta SET value = value WHERE key = 'application'")

    def requeue_job(self, job_id: int, reason: str) -> Job:
        """Put a running job back in the queue; the attempt does not count (it did not fail)."""
        now = self._clock()
        with self._write() as conn:
            return _requeue(conn, _transition(conn, self.path, job_id, ("running",), "re-queued"), reason, now)

    def cancel_job(self, job_id: int, *, cancelled_by: str | None = None) -> Job:
        """Cancel a queued or running job (stopping a running one is the caller's part)."""
        now = self._clock()
        with self._write() as conn:
            job = _transition(conn, self.path, job_id, ("queued", "running"), "cancelled")
            cancelled = _save(conn, replace(job, state=JobState.CANCELLED, finished_at=now, cancelled_by=cancelled_by))
            conn.execute("UPDATE jobs SET cancelled_by = ? WHERE job_id = ?", (cancelled_by, job_id))
            extra = {"cancelled_by": cancelled_by} if cancelled_by else None
            _append_event(conn, "job_cancelled", cancelled, now, extra)
        return cancelled

    def recover_running(self) -> list[Job]:
        """At start-up: every job left running by a crash goes back to the queue.

        The interrupted run counts as an attempt, so a slide that crashes the process every time
        (a reader library that segfaults on it) ends as failed after ``max_attempts`` instead of
        looping forever; a graceful ``requeue_job`` gives the attempt back.
        """
        now = self._clock()
        with self._write() as conn:
            rows = conn.execute(f"{_JOB_SELECT} WHERE j.state = 'running' ORDER BY j.job_id").fetchall()
            recovered = [_requeue(conn, _job_from_row(row), RESTART_REASON, now, count_attempt=True) for row in rows]
        if recovered:
            log.info("re-queued %d job(s) left running: %s", len(recovered), [j.job_id for j in recovered])
        return recovered

    def get_job(self, job_id: int) -> Job:
        with self._read() as conn:
            return _job_in(conn, self.path, job_id)

    def find_jobs_by_fingerprint(self, fingerprint: str) -> list[Job]:
        """Every job of slides with this fingerprint, oldest first."""
        with self._read() as conn:
            rows = conn.execute(f"{_JOB_SELECT} WHERE s.fingerprint = ? ORDER BY j.job_id", (fingerprint,)).fetchall()
        return [_job_from_row(row) for row in rows]

    def list_jobs(
        self,
        *,
        states: Sequence[str] = (),
        slide_path_contains: str = "",
        accession: str = "",
        after_job_id: int = 0,
        limit: int = 100,
        newest_first: bool = False,
    ) -> list[Job]:
        """One page of jobs ordered by id; the next page starts after the last id of this one."""
        _check_page(limit)
        clauses, params = _state_filter(states)
        if slide_path_contains:
            clauses.append("instr(s.path, ?) > 0")
            params.append(slide_path_contains)
        if accession:
            clauses.append("j.accession = ?")
            params.append(accession)
        if after_job_id > 0:
            clauses.append("j.job_id < ?" if newest_first else "j.job_id > ?")
            params.append(after_job_id)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        order = "DESC" if newest_first else "ASC"
        with self._read() as conn:
            rows = conn.execute(f"{_JOB_SELECT}{where} ORDER BY j.job_id {order} LIMIT ?", (*params, limit)).fetchall()
        return [_job_from_row(row) for row in rows]

    def queue_depth(self) -> int:
        with self._read() as conn:
            return int(_one(conn, "SELECT COUNT(*) FROM jobs WHERE state = 'queued'")[0])

    def counts_by_state(self) -> dict[str, int]:
        with self._read() as conn:
            rows = conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {state: 0 for state in JOB_STATES} | {state: int(n) for state, n in rows}

    def failure_counts(self) -> dict[str, int]:
        """Failed jobs by short reason: the error text's first clause (usually the exception class)."""
        with self._read() as conn:
            rows = conn.execute("SELECT error, COUNT(*) FROM jobs WHERE state = 'failed' GROUP BY error").fetchall()
        counts: dict[str, int] = {}
        for error, n in rows:
            reason = failure_reason(error)
            counts[reason] = counts.get(reason, 0) + int(n)
        return counts

    # --- results and detections ----------------------------------------------------------------

    def get_result(self, job_id: int) -> StoredResult:
        with self._read() as conn:
            row = _one(conn, f"{_RESULT_SELECT} WHERE r.job_id = ?", (job_id,))
            if row is None:
                raise _no_result(conn, self.path, job_id)
        return _stored_result(row)

    def get_result_by_fingerprint(self, fingerprint: str) -> StoredResult:
        """The result of the newest done job of a slide with this fingerprint."""
        with self._read() as conn:
            row = _one(conn, f"{_RESULT_SELECT} WHERE s.fingerprint = ? ORDER BY r.job_id DESC LIMIT 1", (fingerprint,))
        if row is None:
            raise ResultNotFoundError(
                f"no result for fingerprint {fingerprint!r} in {self.path}: no job of that slide is done yet;"
                " submit the slide or wait for its job"
            )
        return _stored_result(row)

    def iter_detections(
        self,
        job_id: int,
        *,
        classes: Sequence[str] = (),
        min_p_mitotic: float = 0.0,
        batch: int = DEFAULT_DETECTION_BATCH,
    ) -> Iterator[Figure]:
        """A done job's figures in stored order, read `batch` rows at a time (never all at once).

        `classes` from DETECTION_CLASSES (empty: all). Raises ResultNotFoundError at once when the
        job has no result.
        """
        wanted = tuple(classes)
        unknown = [c for c in wanted if c not in DETECTION_CLASSES]
        if unknown:
            raise ValueError(f"detection classes {unknown} unknown; use any of {DETECTION_CLASSES}")
        if batch < 1:
            raise ValueError(f"batch={batch} must be at least 1")
        with self._read() as conn:
            if _one(conn, "SELECT 1 FROM results WHERE job_id = ?", (job_id,)) is None:
                raise _no_result(conn, self.path, job_id)
        return self._detection_pages(job_id, wanted, float(min_p_mitotic), batch)

    def _detection_pages(
        self, job_id: int, classes: tuple[str, ...], min_p_mitotic: float, batch: int
    ) -> Iterator[Figure]:
        class_filter = f" AND class IN ({', '.join('?' * len(classes))})" if classes else ""
        sql = (
            "SELECT detection_id, figure FROM detections WHERE job_id = ? AND detection_id > ?"
            f"{class_filter} AND p_mitotic >= ? ORDER BY detection_id LIMIT ?"
        )
        last = 0
        while True:
            # A connection per page, never held across a yield: a client reading slowly blocks nothing.
            with self._read() as conn:
                rows = conn.execute(sql, (job_id, last, *classes, min_p_mitotic, batch)).fetchall()
            for _, figure in rows:
                yield Figure.from_json_dict(json.loads(figure))
            if len(rows) < batch:
                return
            last = rows[-1][0]

    def delete_exports_older_than(self, cutoff: float) -> list[StoredResult]:
        """Mark results created before `cutoff` as pruned and return them; the caller deletes their files.

        Results, detections and the export paths stay in the store.
        """
        now = self._clock()
        with self._write() as conn:
            rows = conn.execute(
                f"{_RESULT_SELECT} WHERE r.created_at < ? AND r.pruned_at IS NULL ORDER BY r.job_id", (cutoff,)
            ).fetchall()
            conn.execute("UPDATE results SET pruned_at = ? WHERE created_at < ? AND pruned_at IS NULL", (now, cutoff))
        return [replace(_stored_result(row), pruned_at=now) for row in rows]

    # --- events --------------------------------------------------------------------------------

    def add_review(
        self,
        job_id: int,
        *,
        reviewer: str,
        counts: Mapping[str, Any],
        automatic: Mapping[str, Any],
        changes: Sequence[Mapping[str, Any]],
        result_created_at: float,
    ) -> StoredReview:
        """Store a signed review and its "result_reviewed" event in one transaction.

        Raises ResultNotFoundError for a job with no stored result, and JobStateError when the result
        signed for (`result_created_at`) is not the job's stored result any more.
        """
        now = self._clock()
        with self._write() as conn:
            job = _job_in(conn, self.path, job_id)
            row = _one(conn, "SELECT created_at FROM results WHERE job_id = ?", (job_id,))
            if row is None:
                raise _no_result(conn, self.path, job_id)
            if abs(float(row[0]) - result_created_at) > 1e-6:
                raise JobStateError(
                    f"job {job_id}'s result changed while it was reviewed; reload the page and sign again"
                )
            cursor = conn.execute(
                "INSERT INTO reviews (job_id, result_created_at, reviewer, signed_at, counts, automatic, changes)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, result_created_at, reviewer, now, json.dumps(dict(counts)), json.dumps(dict(automatic)),
                 json.dumps([dict(c) for c in changes])),
            )
            review_id = int(cursor.lastrowid or 0)
            payload = {
                "review_id": review_id,
                "reviewer": reviewer,
                "mitotic_count": counts.get("mitotic"),
                "atypical_count": counts.get("atypical"),
                "normal_count": counts.get("normal"),
                "atypical_ratio": counts.get("atypical_ratio"),
                "automatic_mitotic_count": automatic.get("mitotic"),
                "changes": len(changes),
            }
            _append_event(conn, "result_reviewed", job, now, payload)
        return self.get_review(job_id)

    def set_review_exports(self, review_id: int, exports: Mapping[str, str | Path]) -> None:
        """Record where a review's export files (review.json, reviewed GeoJSON) were written."""
        exports_json = json.dumps({str(kind): str(Path(p).absolute()) for kind, p in exports.items()})
        with self._write() as conn:
            conn.execute("UPDATE reviews SET exports = ? WHERE review_id = ?", (exports_json, review_id))

    def get_review(self, job_id: int) -> StoredReview:
        """The newest signed review of a job; ResultNotFoundError when it has none."""
        reviews = self.list_reviews(job_id=job_id, limit=1)
        if not reviews:
            raise ResultNotFoundError(f"job {job_id} has no signed review in {self.path}")
        return reviews[0]

    def list_reviews(self, *, job_id: int | None = None, limit: int = MAX_PAGE) -> list[StoredReview]:
        """Signed reviews, newest first (all jobs, or one), each marked when a newer result replaced its job's."""
        _check_page(limit)
        where, params = ("WHERE v.job_id = ?", [job_id]) if job_id is not None else ("", [])
        sql = f"""SELECT v.review_id, v.job_id, v.reviewer, v.signed_at, v.counts, v.automatic, v.changes,
            v.result_created_at, v.exports,
            (SELECT MAX(j2.job_id) FROM jobs j2 JOIN slides s2 ON s2.slide_id = j2.slide_id
             WHERE j2.state = 'done' AND j2.job_id > v.job_id
               AND (s2.path = s.path OR (s.fingerprint IS NOT NULL AND s2.fingerprint = s.fingerprint)))
            FROM reviews v JOIN jobs j ON j.job_id = v.job_id JOIN slides s ON s.slide_id = j.slide_id
            {where} ORDER BY v.review_id DESC LIMIT ?"""
        with self._read() as conn:
            rows = conn.execute(sql, (*params, limit)).fetchall()
        return [
            StoredReview(
                review_id=r[0], job_id=r[1], reviewer=r[2], signed_at=r[3], counts=json.loads(r[4]),
                automatic=json.loads(r[5]), changes=json.loads(r[6]), result_created_at=r[7],
                exports=json.loads(r[8]), superseded_by=r[9],
            )
            for r in rows
        ]

    def hotspot_detections(self, result: StoredResult) -> list[tuple[int, str, Figure]]:
        """(detection_id, class, figure) of every candidate inside a result's hotspot circle: what a review judges."""
        spot = (result.summary.get("scores") or {}).get("hotspot") or {}
        cx, cy, radius = spot.get("center_x_um"), spot.get("center_y_um"), spot.get("radius_um")
        if cx is None or cy is None or not radius:
            return []
        mpp_x, mpp_y = result_mpp(result)
        near = self.detections_near(result.job_id, cx / mpp_x, cy / mpp_y, radius / min(mpp_x, mpp_y))
        return [(i, kind, f) for i, kind, f in near if math.hypot(f.x_um - cx, f.y_um - cy) <= radius * (1 + 1e-9)]

    def review_agreement(self) -> dict[str, Any]:
        """Agreement of the newest signed review of each job with the automatic result (metrics)."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT counts, automatic FROM reviews WHERE review_id IN (SELECT MAX(review_id) FROM reviews"
                " GROUP BY job_id)"
            ).fetchall()
        pairs = [(json.loads(r[0]), json.loads(r[1])) for r in rows]
        same = sum(1 for counts, auto in pairs if counts.get("mitotic") == auto.get("mitotic"))
        return {
            "reviews": len(pairs),
            "count_agreement": same / len(pairs) if pairs else None,
            "figures_agreed": sum(int(c.get("figures_agreed") or 0) for c, _ in pairs),
            "figures_judged": sum(int(c.get("figures_judged") or 0) for c, _ in pairs),
        }

    def get_detection(self, job_id: int, detection_id: int) -> tuple[str, Figure]:
        """One stored detection of a job: (class, figure); ResultNotFoundError when the job has no such row."""
        with self._read() as conn:
            row = _one(conn, "SELECT class, figure FROM detections WHERE job_id = ? AND detection_id = ?",
                       (job_id, detection_id))
        if row is None:
            raise ResultNotFoundError(f"job {job_id} has no detection {detection_id}")
        return str(row[0]), Figure.from_json_dict(json.loads(row[1]))

    def detections_near(
        self, job_id: int, x_px: float, y_px: float, radius_px: float
    ) -> list[tuple[int, str, Figure]]:
        """(detection_id, class, figure) of a job's detections whose centre lies in the square around a point."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT detection_id, class, figure FROM detections WHERE job_id = ? AND x_px BETWEEN ? AND ?"
                " AND y_px BETWEEN ? AND ? ORDER BY detection_id",
                (job_id, x_px - radius_px, x_px + radius_px, y_px - radius_px, y_px + radius_px),
            ).fetchall()
        return [(int(r[0]), str(r[1]), Figure.from_json_dict(json.loads(r[2]))) for r in rows]

    def events_after(self, sequence: int, limit: int = 1000) -> list[Event]:
        """Events with a sequence above `sequence`, oldest first."""
        _check_page(limit)
        with self._read() as conn:
            rows = conn.execute(f"{_EVENT_SELECT} WHERE sequence > ? ORDER BY sequence LIMIT ?", (sequence, limit))
            return [Event(seq, kind, job, json.loads(payload), at) for seq, kind, job, payload, at in rows.fetchall()]

    def last_sequence(self) -> int:
        with self._read() as conn:
            return int(_one(conn, "SELECT COALESCE(MAX(sequence), 0) FROM events")[0])

    def wait_for_events(self, after_sequence: int, timeout: float) -> bool:
        """Block until an event after `after_sequence` exists (True) or `timeout` s pass (False).

        Woken by every commit of this process; other processes' events are seen within EVENT_POLL_S.
        Returns False at once once the store is closed.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        # The check runs under the condition's lock, so a commit's notify cannot slip in between.
        with self._events_changed:
            while not self._closed:
                try:
                    if self.last_sequence() > after_sequence:
                        return True
                except StoreError:
                    return False  # closed by another thread meanwhile
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._events_changed.wait(min(remaining, EVENT_POLL_S))
        return False


# --- schema ----------------------------------------------------------------------------------------


def _connect(path: Path, *, reader: bool = False) -> sqlite3.Connection:
    # check_same_thread=False: pooled readers move between threads; each is used by one at a time.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")
        if reader:
            conn.execute("PRAGMA query_only = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _prepare(conn: sqlite3.Connection, path: Path, migrations: Sequence[Sequence[str]]) -> None:
    """Refuse a foreign or newer file untouched; else switch to WAL and migrate to the newest schema."""
    _check_identity(conn, path, len(migrations))
    conn.execute("PRAGMA journal_mode = WAL")
    _migrate(conn, path, migrations)


def _check_identity(conn: sqlite3.Connection, path: Path, known: int) -> int:
    version = int(_one(conn, "PRAGMA user_version")[0])
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    app = _one(conn, "SELECT value FROM meta WHERE key = 'application'") if "meta" in tables else None
    if version == 0 and not tables:
        return 0  # a new, empty file
    if app is None or app[0] != APPLICATION:
        raise StoreCorruptError(
            f"{path} is not a mitosis-edge store (an SQLite file with tables {sorted(tables)});"
            " move it away or set another [daemon] data_dir"
        )
    if version > known:
        raise StoreCorruptError(
            f"{path} has store schema version {version}, newer than version {known} that this mitosis-edge knows;"
            " upgrade mitosis-edge to use it (the file was left untouched)"
        )
    return version


_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


@contextmanager
def _busy_as_store_error(path: Path) -> Iterator[None]:
    """SQLite's "database is locked" (another process held the lock past BUSY_TIMEOUT_MS) as StoreBusyError,
    so callers tell it by class (the gRPC API answers UNAVAILABLE, retry); other SQLite errors pass as they are."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF not in _BUSY_CODES:  # extended codes keep the primary's low byte
            raise
        raise StoreBusyError(
            f"the job store {path} is busy: another process held its lock for over {BUSY_TIMEOUT_MS / 1000:g} s "
            f"({exc}); retry"
        ) from exc


def _open_error(path: Path, exc: sqlite3.Error) -> StoreError:
    if isinstance(exc, sqlite3.OperationalError):  # cannot open, locked, read-only, disk I/O
        return StoreError(
            f"cannot open the store {path}: {exc}; check that its folder is writable"
            " and that no other program keeps the file locked"
        )
    return StoreCorruptError(
        f"{path} is not a mitosis-edge store or is damaged ({exc}); move it away or set another [daemon] data_dir"
    )


def _migrate(conn: sqlite3.Connection, path: Path, migrations: Sequence[Sequence[str]]) -> None:
    target = len(migrations)
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Read again under the write lock: another process may have migrated meanwhile.
        start = _check_identity(conn, path, target)
        for version in range(start, target):
            for statement in migrations[version]:
                _run_step(conn, path, statement, version)
        if start < target:
            conn.execute(f"PRAGMA user_version = {target}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if start < target:
        log.info("store %s: schema version %d -> %d", path, start, target)


def _run_step(conn: sqlite3.Connection, path: Path, statement: str, version: int) -> None:
    try:
        conn.execute(statement)
    except sqlite3.Error as exc:
        first_line = statement.strip().splitlines()[0]
        raise StoreError(
            f"migrating {path} from schema version {version} to {version + 1} failed at {first_line!r}: {exc};"
            " the store was left unchanged; report this with the file"
        ) from exc


# --- rows ------------------------------------------------------------------------------------------


def _one(conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> Any:
    """The first row or None; fetchall ends the statement so no read snapshot stays open."""
    rows = conn.execute(sql, params).fetchall()
    return rows[0] if rows else None


def _job_from_row(row: Sequence[Any]) -> Job:
    return replace(Job(*row), labels=tuple(json.loads(row[-1] or "[]")))


def _job_in(conn: sqlite3.Connection, path: Path, job_id: int) -> Job:
    row = _one(conn, f"{_JOB_SELECT} WHERE j.job_id = ?", (job_id,))
    if row is None:
        raise JobNotFoundError(f"no job {job_id} in {path}; check the id (list_jobs shows the jobs)")
    return _job_from_row(row)


def _transition(conn: sqlite3.Connection, path: Path, job_id: int, allowed: tuple[str, ...], action: str) -> Job:
    job = _job_in(conn, path, job_id)
    if job.state not in allowed:
        raise JobStateError(f"job {job_id} is {job.state}; only {' or '.join(allowed)} jobs can be {action}")
    return job


def _save(conn: sqlite3.Connection, job: Job) -> Job:
    values = (job.state, job.attempts, job.error, job.started_at, job.finished_at, job.not_before, job.retryable,
              job.job_id)
    conn.execute(_JOB_UPDATE, values)
    return job


def _insert_job(
    conn: sqlite3.Connection,
    path: Path,
    slide_id: int,
    source: str,
    priority: int,
    mpp_override: float | None,
    bundle: str | None,
    now: float,
    *,
    case: tuple[str | None, tuple[str, ...]] = (None, ()),
) -> Job:
    accession, labels = case
    cursor = conn.execute(
        "INSERT INTO jobs (slide_id, state, source, priority, mpp_override, bundle, created_at, accession, labels)"
        " VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
        (slide_id, source, priority, mpp_override, bundle, now, accession, json.dumps(list(labels))),
    )
    job = _job_in(conn, path, int(cursor.lastrowid or 0))
    _append_event(conn, "job_queued", job, now, {"source": source})
    return job


def _requeue(conn: sqlite3.Connection, job: Job, reason: str, now: float, *, count_attempt: bool = False) -> Job:
    attempts = job.attempts if count_attempt else max(job.attempts - 1, 0)
    queued = _save(conn, replace(job, state=JobState.QUEUED, attempts=attempts, started_at=None))
    _append_event(conn, "job_requeued", queued, now, {"reason": reason})
    return queued


def _record_qc(
    conn: sqlite3.Connection, job: Job, result: SlideResult, config: QcConfig, now: float
) -> Assessment:
    qc = result.qc or {}
    scanner = str((result.slide.get("scanner") or {}).get("id") or UNKNOWN_SCANNER)
    measures = measures_of(qc, result.scores.mitotic_density_per_mm2)
    rows = conn.execute(
        "SELECT job_id, created_at, measures, in_band FROM qc_history WHERE scanner = ? "
        "ORDER BY created_at DESC, job_id DESC LIMIT ?",
        (scanner, QC_HISTORY_READ),
    ).fetchall()
    history = [HistoryPoint(int(j), float(t), json.loads(m), bool(b)) for j, t, m, b in reversed(rows)]
    assessment = assess(history, measures, config)
    verdict = str(qc.get("verdict") or "pass")
    conn.execute(
        "INSERT INTO qc_history (job_id, scanner, verdict, measures, in_band, assessment, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (job.job_id, scanner, verdict, json.dumps(measures), int(assessment.in_band),
         json.dumps(assessment.to_json_dict()), now),
    )
    if verdict != "pass":
        _append_event(conn, "qc_flagged", job, now, {
            "verdict": verdict, "reasons": list(qc.get("reasons") or []), "scanner": scanner,
            "out_of_focus_fraction": qc.get("out_of_focus_fraction"), "fold_fraction": qc.get("fold_fraction"),
            "pen_fraction": qc.get("pen_fraction"),
            "hotspot_out_of_focus_fraction": (qc.get("hotspot") or {}).get("out_of_focus_fraction"),
        })
    if assessment.drift:
        _append_event(conn, "drift", job, now, {"scanner": scanner, "message": assessment.message,
                                                "moved": assessment.moved, "run": assessment.run})
    return assessment


def _append_event(
    conn: sqlite3.Connection, kind: str, job: Job, now: float, extra: Mapping[str, Any] | None = None
) -> None:
    payload = {"job_id": job.job_id, "state": job.state, "slide_path": job.slide_path, **(extra or {})}
    if job.accession:
        payload["accession"] = job.accession
    conn.execute(
        "INSERT INTO events (type, job_id, payload, created_at) VALUES (?, ?, ?, ?)",
        (kind, job.job_id, json.dumps(payload), now),
    )


def _slide_id(conn: sqlite3.Connection, path: str, fingerprint: str | None, meta: str, now: float) -> int:
    """The slide row of this path and fingerprint, created or with `meta` merged in."""
    row = _one(conn, "SELECT slide_id, meta FROM slides WHERE path = ? AND fingerprint IS ?", (path, fingerprint))
    if row is None:
        cursor = conn.execute(
            "INSERT INTO slides (path, fingerprint, meta, created_at) VALUES (?, ?, ?, ?)",
            (path, fingerprint, meta, now),
        )
        return int(cursor.lastrowid or 0)
    merged = json.loads(row[1]) | json.loads(meta)
    conn.execute("UPDATE slides SET meta = ? WHERE slide_id = ?", (json.dumps(merged), row[0]))
    return int(row[0])


def _merge_slide_meta(conn: sqlite3.Connection, job_id: int, meta: str) -> None:
    row = _one(
        conn,
        "SELECT s.slide_id, s.meta FROM slides s JOIN jobs j ON j.slide_id = s.slide_id WHERE j.job_id = ?",
        (job_id,),
    )
    merged = json.loads(row[1]) | json.loads(meta)
    conn.execute("UPDATE slides SET meta = ? WHERE slide_id = ?", (json.dumps(merged), row[0]))


def result_mpp(result: StoredResult) -> tuple[float, float]:
    """The slide's level-0 (x, y) µm/px as the result recorded it."""
    slide = result.summary.get("slide") or {}
    mpp_x, mpp_y = slide.get("mpp_x"), slide.get("mpp_y")
    if isinstance(mpp_x, int | float) and isinstance(mpp_y, int | float) and mpp_x > 0 and mpp_y > 0:
        return float(mpp_x), float(mpp_y)
    return 0.25, 0.25  # the analysis mpp: a summary without the slide's (never written by this version)


def _detection_class(figure: Figure) -> str:
    return figure.detection_class.value


def _detection_row(job_id: int, figure: Figure) -> tuple[Any, ...]:
    figure_json = json.dumps(figure.to_json_dict())
    return (job_id, _detection_class(figure), figure.p_mitotic, figure.x_px, figure.y_px, figure_json)


def _stored_result(row: Sequence[Any]) -> StoredResult:
    job_id, path, fingerprint, summary, exports, detections, created_at, pruned_at = row
    return StoredResult(
        job_id, path, fingerprint, json.loads(summary), json.loads(exports), int(detections), created_at, pruned_at
    )


def _no_result(conn: sqlite3.Connection, path: Path, job_id: int) -> ResultNotFoundError:
    row = _one(conn, "SELECT state FROM jobs WHERE job_id = ?", (job_id,))
    if row is None:
        return ResultNotFoundError(f"no job {job_id} in {path}, so no result; check the id")
    return ResultNotFoundError(f"job {job_id} has no result: it is {row[0]}; results exist for done jobs only")


def _state_filter(states: Sequence[str]) -> tuple[list[str], list[Any]]:
    unknown = [s for s in states if s not in JOB_STATES]
    if unknown:
        raise ValueError(f"job states {unknown} unknown; use any of {JOB_STATES}")
    if not states:
        return [], []
    return [f"j.state IN ({', '.join('?' * len(states))})"], list(states)


def _check_source(source: str) -> None:
    if source not in JOB_SOURCES:
        raise ValueError(f"job source={source!r} must be one of {JOB_SOURCES}")


def _check_page(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit={limit} must be between 1 and {MAX_PAGE}")


def failure_reason(error: str | None) -> str:
    """A short, low-cardinality reason for an error text: its first clause (usually the exception
    class), numbers replaced by N.

    >>> failure_reason("CorruptSlideError: /scans/a.svs: truncated file")
    'CorruptSlideError'
    >>> failure_reason("slide did not settle within 3600 s")
    'slide did not settle within N s'
    """
    clause = (error or "").split(":", 1)[0].strip()
    return re.sub(r"\d+(\.\d+)?", "N", clause)[:FAILURE_REASON_CHARS] or "unknown"
