"""The job store: schema and migrations, job states, atomic results, events, threads and kill -9."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.analysis.provenance import BundleProvenance, Provenance
from edge.analysis.scoring import Figure, SlideResult, score_slide
from edge.errors import JobNotFoundError, JobStateError, ResultNotFoundError, StoreCorruptError, StoreError
from edge.service import store as store_module
from edge.service.store import SCHEMA_VERSION, Store

ROOT = Path(__file__).resolve().parents[1]
MPP = 0.25


class Clock:
    """A settable wall clock, so ordering and back-off need no sleeping."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float = 1.0) -> float:
        self.now += seconds
        return self.now


def figure(x_px: float, subtype: str | None, *, mitotic: bool = True, p_mitotic: float = 0.92) -> Figure:
    return Figure(
        x_px=x_px,
        y_px=x_px / 2,
        x_um=x_px * MPP,
        y_um=x_px / 2 * MPP,
        width_px=50.0,
        height_px=50.0,
        detector_score=0.7,
        p_mitotic=p_mitotic if mitotic else 0.1,
        p_atypical=None if subtype is None else 0.5,
        is_mitotic=mitotic,
        subtype=subtype if mitotic else None,  # type: ignore[arg-type]
        scores={"mitotic:net": p_mitotic},
    )


FIGURES = (
    figure(4000, "normal"),
    figure(4100, "atypical"),
    figure(4200, "uncertain"),
    figure(4300, "atypical", p_mitotic=0.6),
    figure(4050, None, mitotic=False),
    figure(20000, None, mitotic=False),
)


def slide_result(figures: tuple[Figure, ...] = FIGURES, path: str = "/scans/a.svs") -> SlideResult:
    scores = score_slide(figures, tissue_area_mm2=12.5)
    slide = {"width": 40000, "height": 32000, "mpp_x": MPP, "mpp_y": MPP, "format": "tiff", "vendor": "generic"}
    provenance = Provenance(version="0.1.0", created_at="2026-01-01T00:00:00+00:00",
                            bundle=BundleProvenance("demo", "1"), backend="onnxruntime")
    return SlideResult(path, slide, scores, figures, provenance.to_json_dict())


EXPORTS = {"result": "/out/1/result.json", "csv": "/out/1/detections.csv"}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[Store]:
    with Store.open(tmp_path / "edge.db", clock=clock) as opened:
        yield opened


def running_job(store: Store, path: str = "/scans/a.svs", fingerprint: str | None = "sha256:a") -> int:
    job, _ = store.add_job(path, fingerprint=fingerprint)
    claimed = store.claim_next_job()
    assert claimed is not None and claimed.job_id == job.job_id
    return job.job_id


def raw(path: Path, sql: str) -> list[Any]:
    """Run one statement on the file with a plain connection, closed afterwards."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(sql).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


# --- schema ---------------------------------------------------------------------------------------


def test_a_store_is_created_from_nothing_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "new" / "folder" / "edge.db"
    with Store.open(path) as store:
        assert store.schema_version == SCHEMA_VERSION == len(store_module.MIGRATIONS)
        assert store.counts_by_state() == {"queued": 0, "running": 0, "done": 0, "failed": 0, "cancelled": 0}
        assert store.last_sequence() == 0 and store.events_after(0) == []
        assert raw(path, "PRAGMA journal_mode") == [("wal",)]
        assert raw(path, "SELECT value FROM meta WHERE key = 'application'") == [("mitosis-edge",)]


def test_reopening_keeps_jobs_results_and_events(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    with Store.open(path) as store:
        job_id = running_job(store)
        store.complete_job(job_id, slide_result(), EXPORTS)
        store.add_job("/scans/b.svs", fingerprint="sha256:b")
    with Store.open(path) as store:
        assert [j.state for j in store.list_jobs()] == ["done", "queued"]
        assert store.get_result(job_id).detections == len(FIGURES)
        assert [e.type for e in store.events_after(0)] == ["job_queued", "job_running", "job_done", "job_queued"]


def test_an_older_schema_is_migrated_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "edge.db"
    with Store.open(path) as store:
        store.add_job("/scans/a.svs", fingerprint="sha256:a")
    version_2 = ("ALTER TABLE jobs ADD COLUMN note TEXT", "UPDATE jobs SET note = 'migrated'")
    monkeypatch.setattr(store_module, "MIGRATIONS", (*store_module.MIGRATIONS, version_2))
    with Store.open(path) as store:
        assert store.schema_version == SCHEMA_VERSION + 1
        assert store.get_job(1).slide_path == "/scans/a.svs"
    assert raw(path, "SELECT note FROM jobs") == [("migrated",)]


def test_a_store_of_the_first_schema_gains_accession_and_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "edge.db"
    with monkeypatch.context() as patch:
        patch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:1])
        Store.open(path).close()
        raw(path, "INSERT INTO slides (path, created_at) VALUES ('/scans/old.svs', 0)")
        raw(path, "INSERT INTO jobs (slide_id, state, source, created_at) VALUES (1, 'queued', 'watch', 0)")
    with Store.open(path) as store:
        old = store.get_job(1)
        assert (old.accession, old.labels) == (None, ())
        new, _ = store.add_job("/scans/new.svs", accession="S24-0042", labels=["study-7", "HE"])
        assert (new.accession, new.labels) == ("S24-0042", ("study-7", "HE"))
        assert [j.job_id for j in store.list_jobs(accession="S24-0042")] == [new.job_id]
        assert store.events_after(0)[-1].payload["accession"] == "S24-0042"


def test_a_failing_migration_leaves_the_store_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "edge.db"
    Store.open(path).close()
    broken = ("ALTER TABLE jobs ADD COLUMN note TEXT", "UPDATE no_such_table SET x = 1")
    monkeypatch.setattr(store_module, "MIGRATIONS", (*store_module.MIGRATIONS, broken))
    failed = rf"from schema version {SCHEMA_VERSION} to {SCHEMA_VERSION + 1} failed .*no_such_table"
    with pytest.raises(StoreError, match=failed):
        Store.open(path)
    assert raw(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert "note" not in {row[1] for row in raw(path, "PRAGMA table_info(jobs)")}


def test_a_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    Store.open(path).close()
    newer = SCHEMA_VERSION + 5
    raw(path, f"PRAGMA user_version = {newer}")
    before = path.read_bytes()
    refused = rf"schema version {newer}, newer than version {SCHEMA_VERSION}.*upgrade mitosis-edge"
    with pytest.raises(StoreCorruptError, match=refused):
        Store.open(path)
    assert path.read_bytes() == before


def test_a_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    raw(path, "CREATE TABLE photos (id INTEGER)")
    with pytest.raises(StoreCorruptError, match=r"other\.db is not a mitosis-edge store.*photos"):
        Store.open(path)


def test_a_file_that_is_no_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    path.write_bytes(b"this is a text file, not SQLite" * 100)
    with pytest.raises(StoreCorruptError, match="is not a mitosis-edge store"):
        Store.open(path)


def test_a_path_that_cannot_be_opened_says_what_to_check(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"cannot open the store .*check that its folder is writable"):
        Store.open(tmp_path)  # a folder, not a file


# --- adding and claiming jobs ---------------------------------------------------------------------


def test_add_job_dedupes_by_fingerprint(store: Store) -> None:
    first, created = store.add_job("/scans/a.svs", fingerprint="sha256:a", slide_meta={"vendor": "aperio"})
    assert created and first.state == "queued" and first.attempts == 0
    again, created = store.add_job("/scans/renamed.svs", fingerprint="sha256:a")
    assert not created and again == first
    forced, created = store.add_job("/scans/renamed.svs", fingerprint="sha256:a", dedupe=False, source="submit")
    assert created and forced.job_id != first.job_id and forced.source == "submit"
    assert [j.job_id for j in store.find_jobs_by_fingerprint("sha256:a")] == [first.job_id, forced.job_id]
    assert store.add_job("/scans/a.svs")[1] and store.add_job("/scans/a.svs")[1]  # no fingerprint: no dedupe
    assert store.queue_depth() == 4


def test_a_failed_or_cancelled_fingerprint_counts_as_seen(store: Store) -> None:
    bad, _ = store.add_job("/scans/bad.svs", fingerprint="sha256:bad")
    store.fail_job(bad.job_id, "CorruptSlideError: truncated")
    assert store.add_job("/scans/bad.svs", fingerprint="sha256:bad") == (store.get_job(bad.job_id), False)


def test_a_slide_that_failed_before_queueing_is_recorded_as_failed(store: Store) -> None:
    failed = store.add_failed_job("/scans/growing.svs", "never settled: still growing after 600 s")
    assert failed.state == "failed" and failed.error == "never settled: still growing after 600 s"
    assert [e.type for e in store.events_after(0)] == ["job_queued", "job_failed"]
    assert store.claim_next_job() is None and store.failure_counts() == {"never settled": 1}


def test_add_job_rejects_an_unknown_source(store: Store) -> None:
    with pytest.raises(ValueError, match="source='scanner' must be one of"):
        store.add_job("/scans/a.svs", source="scanner")


def test_claim_takes_highest_priority_then_oldest_and_respects_not_before(store: Store, clock: Clock) -> None:
    old, _ = store.add_job("/scans/old.svs")
    clock.tick()
    new, _ = store.add_job("/scans/new.svs")
    clock.tick()
    urgent, _ = store.add_job("/scans/urgent.svs", source="submit", priority=5)
    clock.tick()
    claimed = store.claim_next_job()
    assert claimed is not None and claimed.job_id == urgent.job_id
    assert claimed.state == "running" and claimed.attempts == 1 and claimed.started_at == clock.now
    store.fail_job(urgent.job_id, "EngineError: out of memory", retry_at=clock.now + 60)
    assert [store.claim_next_job().job_id for _ in range(2)] == [old.job_id, new.job_id]  # type: ignore[union-attr]
    assert store.claim_next_job() is None  # the retry is not due yet
    later = store.claim_next_job(now=clock.now + 60)
    assert later is not None and later.job_id == urgent.job_id and later.attempts == 2


# --- completing, failing, cancelling --------------------------------------------------------------


def test_complete_writes_result_detections_and_done_event(store: Store) -> None:
    job_id = running_job(store)
    done = store.complete_job(job_id, slide_result(), EXPORTS)
    assert done.state == "done" and done.finished_at is not None
    stored = store.get_result(job_id)
    assert stored.slide_path == "/scans/a.svs" and stored.fingerprint == "sha256:a"
    assert stored.detections == len(FIGURES) and "figures" not in stored.summary
    assert stored.summary["scores"] == slide_result().scores.to_json_dict()
    assert stored.exports == EXPORTS
    assert list(store.iter_detections(job_id)) == list(FIGURES)
    event = store.events_after(0)[-1]
    assert event.type == "job_done" and event.job_id == job_id
    hotspot = slide_result().scores.hotspot.counts
    assert event.payload == {
        "job_id": job_id,
        "state": "done",
        "slide_path": "/scans/a.svs",
        "mitotic_count": hotspot.mitotic,
        "atypical_ratio": hotspot.atypical_ratio,
        "total_mitotic": 4,
    }
    assert store.get_result_by_fingerprint("sha256:a") == stored


def test_complete_is_all_or_nothing(store: Store) -> None:
    job_id = running_job(store)
    unserialisable = figure(9000, "normal")
    object.__setattr__(unserialisable, "scores", {"mitotic:net": object()})
    with pytest.raises(TypeError):
        store.complete_job(job_id, slide_result((*FIGURES, unserialisable)), EXPORTS)
    assert store.get_job(job_id).state == "running"
    with pytest.raises(ResultNotFoundError, match=f"job {job_id} has no result: it is running"):
        store.get_result(job_id)
    assert [e.type for e in store.events_after(0)] == ["job_queued", "job_running"]
    store.complete_job(job_id, slide_result(), EXPORTS)  # the same job completes cleanly afterwards
    assert store.get_result(job_id).detections == len(FIGURES)


def test_complete_is_refused_unless_the_job_is_running(store: Store) -> None:
    job_id = running_job(store)
    store.cancel_job(job_id)
    with pytest.raises(JobStateError, match=f"job {job_id} is cancelled; only running jobs can be completed"):
        store.complete_job(job_id, slide_result(), EXPORTS)
    with pytest.raises(ResultNotFoundError):
        store.get_result(job_id)
    other = running_job(store, "/scans/b.svs", "sha256:b")
    store.complete_job(other, slide_result(), EXPORTS)
    with pytest.raises(JobStateError, match="is done"):
        store.complete_job(other, slide_result(), EXPORTS)
    assert store.get_result(other).detections == len(FIGURES)


def test_fail_with_retry_requeues_with_not_before(store: Store, clock: Clock) -> None:
    job_id = running_job(store)
    retried = store.fail_job(job_id, "SlideReadError: /scans/a.svs: busy", retry_at=clock.now + 30)
    assert retried.state == "queued" and retried.not_before == clock.now + 30 and retried.attempts == 1
    assert retried.error == "SlideReadError: /scans/a.svs: busy" and retried.started_at is None
    event = store.events_after(0)[-1]
    assert event.type == "job_retry"
    assert event.payload["error"] == retried.error and event.payload["attempts"] == 1


def test_fail_without_retry_is_final(store: Store) -> None:
    job_id = running_job(store)
    failed = store.fail_job(job_id, "CorruptSlideError: /scans/a.svs: truncated")
    assert failed.state == "failed" and failed.finished_at is not None
    assert store.events_after(0)[-1].payload["attempts"] == 1
    with pytest.raises(JobStateError, match="is failed; only queued or running jobs can be failed"):
        store.fail_job(job_id, "again")
    store.fail_job(store.add_job("/scans/b.svs")[0].job_id, "never settled: still growing after 600 s")
    store.fail_job(store.add_job("/scans/c.svs")[0].job_id, "CorruptSlideError: /scans/c.svs: bad tile")
    assert store.failure_counts() == {"CorruptSlideError": 2, "never settled": 1}


def test_cancel_queued_and_running_jobs_only(store: Store) -> None:
    queued, _ = store.add_job("/scans/a.svs")
    assert store.cancel_job(queued.job_id).state == "cancelled"
    running = running_job(store, "/scans/b.svs", "sha256:b")
    assert store.cancel_job(running).state == "cancelled"
    with pytest.raises(JobStateError, match="is cancelled; only queued or running jobs can be cancelled"):
        store.cancel_job(running)
    with pytest.raises(JobNotFoundError, match="no job 99 in") as caught:
        store.cancel_job(99)
    assert isinstance(caught.value, KeyError) and str(caught.value).startswith("no job 99")


def test_requeue_gives_the_attempt_back_and_crash_recovery_counts_it(store: Store) -> None:
    first = running_job(store, "/scans/a.svs", "sha256:a")
    second = running_job(store, "/scans/b.svs", "sha256:b")
    requeued = store.requeue_job(first, "shutdown grace ran out")
    assert requeued.state == "queued" and requeued.attempts == 0
    assert store.events_after(0)[-1].payload["reason"] == "shutdown grace ran out"
    recovered = store.recover_running()
    assert [j.job_id for j in recovered] == [second] and recovered[0].attempts == 1
    assert store.counts_by_state()["queued"] == 2 and store.recover_running() == []
    with pytest.raises(JobStateError, match="only running jobs can be re-queued"):
        store.requeue_job(first, "again")


# --- reading ----------------------------------------------------------------------------------------


def test_list_jobs_filters_and_pages(store: Store) -> None:
    ids = [store.add_job(f"/scans/{name}.svs")[0].job_id for name in ("a1", "a2", "b1", "a3", "b2")]
    store.cancel_job(ids[1])
    assert [j.job_id for j in store.list_jobs(limit=2)] == ids[:2]
    assert [j.job_id for j in store.list_jobs(after_job_id=ids[1], limit=2)] == ids[2:4]
    assert [j.job_id for j in store.list_jobs(newest_first=True, after_job_id=ids[3])] == ids[2::-1]
    assert [j.slide_path for j in store.list_jobs(slide_path_contains="/a")] == [
        "/scans/a1.svs",
        "/scans/a2.svs",
        "/scans/a3.svs",
    ]
    assert [j.job_id for j in store.list_jobs(states=["cancelled"])] == [ids[1]]
    with pytest.raises(ValueError, match=r"job states \['paused'\] unknown"):
        store.list_jobs(states=["paused"])
    with pytest.raises(ValueError, match="limit=0 must be between 1 and"):
        store.list_jobs(limit=0)


def test_iter_detections_filters_by_class_and_probability_in_batches(store: Store) -> None:
    job_id = running_job(store)
    store.complete_job(job_id, slide_result(), EXPORTS)
    assert list(store.iter_detections(job_id, batch=2)) == list(FIGURES)
    atypical = list(store.iter_detections(job_id, classes=["atypical"], batch=1))
    assert [f.x_px for f in atypical] == [4100, 4300]
    assert [f.x_px for f in store.iter_detections(job_id, classes=["atypical"], min_p_mitotic=0.9)] == [4100]
    assert len(list(store.iter_detections(job_id, classes=["non_mitotic"]))) == 2
    assert [f.subtype for f in store.iter_detections(job_id, classes=["normal", "uncertain"])] == [
        "normal",
        "uncertain",
    ]
    with pytest.raises(ValueError, match=r"detection classes \['mitotic'\] unknown"):
        store.iter_detections(job_id, classes=["mitotic"])


def test_results_that_do_not_exist_say_why(store: Store) -> None:
    queued, _ = store.add_job("/scans/a.svs", fingerprint="sha256:a")
    with pytest.raises(ResultNotFoundError, match="it is queued; results exist for done jobs only"):
        store.iter_detections(queued.job_id)
    with pytest.raises(ResultNotFoundError, match=r"no job 42 in .*so no result"):
        store.get_result(42)
    with pytest.raises(ResultNotFoundError, match="no result for fingerprint 'sha256:a'"):
        store.get_result_by_fingerprint("sha256:a")


def test_old_exports_are_handed_out_once_for_pruning(store: Store, clock: Clock) -> None:
    old = running_job(store, "/scans/a.svs", "sha256:a")
    store.complete_job(old, slide_result(), EXPORTS)
    clock.tick(100)
    new = running_job(store, "/scans/b.svs", "sha256:b")
    store.complete_job(new, slide_result(), EXPORTS)
    pruned = store.delete_exports_older_than(clock.now - 50)
    assert [r.job_id for r in pruned] == [old] and pruned[0].exports == EXPORTS and pruned[0].pruned_at == clock.now
    assert store.delete_exports_older_than(clock.now - 50) == []
    assert store.get_result(old).pruned_at == clock.now and store.get_result(new).pruned_at is None


# --- events ---------------------------------------------------------------------------------------


def test_every_state_change_appends_one_event_in_sequence(store: Store) -> None:
    job_id = running_job(store)
    store.fail_job(job_id, "EngineError: boom", retry_at=0.0)
    store.claim_next_job()
    store.complete_job(job_id, slide_result(), EXPORTS)
    events = store.events_after(0)
    assert [e.sequence for e in events] == [1, 2, 3, 4, 5] and store.last_sequence() == 5
    assert [e.type for e in events] == ["job_queued", "job_running", "job_retry", "job_running", "job_done"]
    assert all({"job_id", "state", "slide_path"} <= e.payload.keys() for e in events)
    assert [e.sequence for e in store.events_after(2, limit=2)] == [3, 4]


def test_wait_for_events_wakes_when_another_thread_commits(store: Store) -> None:
    assert not store.wait_for_events(0, timeout=0.05)
    started = threading.Event()

    def add_later() -> None:
        started.wait(5)
        store.add_job("/scans/late.svs")

    thread = threading.Thread(target=add_later, name="store-test-writer")
    thread.start()
    try:
        started.set()
        assert store.wait_for_events(0, timeout=5.0)
    finally:
        thread.join(5)
    assert store.events_after(0)[0].payload["slide_path"] == "/scans/late.svs"
    assert store.wait_for_events(0, timeout=0) and not store.wait_for_events(1, timeout=0.01)


def test_a_closed_store_refuses_work_and_releases_waiters(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "edge.db")
    store.close()
    store.close()
    assert not store.wait_for_events(0, timeout=5.0)
    with pytest.raises(StoreError, match="is closed; open it again"):
        store.add_job("/scans/a.svs")
    with pytest.raises(StoreError, match="is closed"):
        store.get_job(1)


# --- threads and crashes ------------------------------------------------------------------------


def test_many_threads_adding_and_claiming_never_claim_a_job_twice(store: Store) -> None:
    adders, per_adder = 4, 50
    claimed: list[int] = []
    claimed_lock = threading.Lock()
    adding_done = threading.Event()

    def add(worker: int) -> None:
        for i in range(per_adder):
            store.add_job(f"/scans/{worker}-{i}.svs", fingerprint=f"sha256:{worker}-{i}")

    def claim() -> None:
        while True:
            job = store.claim_next_job()
            if job is None:
                if adding_done.is_set() and store.queue_depth() == 0:
                    return
                continue
            with claimed_lock:
                claimed.append(job.job_id)
            store.complete_job(job.job_id, slide_result(FIGURES[:1]), EXPORTS)

    add_threads = [threading.Thread(target=add, args=(w,), name=f"adder-{w}") for w in range(adders)]
    claim_threads = [threading.Thread(target=claim, name=f"claimer-{w}") for w in range(4)]
    for thread in add_threads + claim_threads:
        thread.start()
    for thread in add_threads:
        thread.join(30)
    adding_done.set()
    for thread in claim_threads:
        thread.join(30)
    assert len(claimed) == len(set(claimed)) == adders * per_adder
    assert store.counts_by_state()["done"] == adders * per_adder
    assert [e.sequence for e in store.events_after(0, limit=10_000)] == list(range(1, 3 * adders * per_adder + 1))


# The child adds and completes jobs, then dies by SIGKILL in the middle of writing a result's
# detections (a Figure that kills the process while it is being serialised) or, in "loop"
# mode, at a moment the parent picks while it keeps adding, claiming and completing.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from edge.analysis.scoring import Figure, SlideResult, score_slide
    from edge.service.store import Store

    class Killer(Figure):
        def to_json_dict(self):
            os.kill(os.getpid(), signal.SIGKILL)

    def figure(x, killer=False):
        cls = Killer if killer else Figure
        return cls(x, x, x / 4, x / 4, 50.0, 50.0, 0.7, 0.9, 0.5, True, "normal", {})

    def result(figures):
        return SlideResult("/s.svs", {}, score_slide(figures, tissue_area_mm2=1.0), tuple(figures), {})

    store = Store.open(sys.argv[1])
    mode = sys.argv[2]
    for i in range(100_000):
        job, _ = store.add_job(f"/scans/{i}.svs", fingerprint=f"sha256:{i}")
        print("added", job.job_id, flush=True)
        claimed = store.claim_next_job()
        figures = [figure(10.0 * k) for k in range(40)]
        if mode == "self" and i == 5:
            figures.insert(20, figure(1.0, killer=True))
        store.complete_job(claimed.job_id, result(figures), {"result": "/out/result.json"})
    """
)


@pytest.mark.parametrize("mode", ["self", "loop"])
def test_kill_9_loses_no_job_and_never_half_writes_a_result(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "edge.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    with child:
        added: list[int] = []
        assert child.stdout is not None
        for line in child.stdout:
            added.append(int(line.split()[1]))
            if mode == "loop" and len(added) == 12:
                child.send_signal(signal.SIGKILL)
        child.wait(30)
        assert child.stderr is not None
        assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()
    with Store.open(path) as store:
        recovered = store.recover_running()
        jobs = store.list_jobs(limit=10_000)
        assert added and {j.job_id for j in jobs} >= set(added)  # no job lost
        assert all(j.state in ("done", "queued") for j in jobs)
        done = [j for j in jobs if j.state == "done"]
        for job in done:  # every done job has its whole result, and only done jobs have one
            assert sum(1 for _ in store.iter_detections(job.job_id)) == store.get_result(job.job_id).detections == 40
        assert raw(path, "SELECT COUNT(*), COUNT(DISTINCT job_id) FROM results") == [(len(done), len(done))]
        assert raw(path, "SELECT COUNT(*) FROM detections") == [(40 * len(done),)]
        if mode == "self":
            assert [j.job_id for j in recovered] == [6] and len(done) == 5
        assert raw(path, "PRAGMA integrity_check") == [("ok",)]


def test_submitter_and_canceller_are_stored_with_the_job(tmp_path: Path) -> None:
    with Store.open(tmp_path / "edge.db") as store:
        job, _ = store.add_job("/scans/a.svs", fingerprint="sha256:a", source="submit", submitted_by="lis")
        watched, _ = store.add_job("/scans/b.svs", fingerprint="sha256:b")
        assert store.get_job(job.job_id).submitted_by == "lis" and watched.submitted_by is None
        cancelled = store.cancel_job(job.job_id, cancelled_by="admin-desk")
        assert cancelled.cancelled_by == "admin-desk" == store.get_job(job.job_id).cancelled_by
        assert store.events_after(0)[-1].payload["cancelled_by"] == "admin-desk"


def test_a_signed_review_is_kept_beside_the_result_and_marked_once_the_slide_is_analysed_again(store: Store) -> None:
    job_id = running_job(store)
    store.complete_job(job_id, slide_result(), EXPORTS)
    result = store.get_result(job_id)
    in_hotspot = store.hotspot_detections(result)
    assert {kind for _, kind, _ in in_hotspot} >= {"normal", "atypical"}
    counts = {"mitotic": 3, "atypical": 1, "normal": 2, "uncertain": 0, "atypical_ratio": 0.5}
    with pytest.raises(JobStateError, match="result changed while it was reviewed"):
        store.add_review(job_id, reviewer="dr-a", counts=counts, automatic={}, changes=[],
                         result_created_at=result.created_at - 10)
    review = store.add_review(job_id, reviewer="dr-a", counts=counts, automatic={"mitotic": 4},
                              changes=[{"decision": "reject", "detection_id": in_hotspot[0][0]}],
                              result_created_at=result.created_at)
    assert review.current and review.counts == counts and store.get_result(job_id).summary == result.summary
    event = store.events_after(0)[-1]
    assert event.type == "result_reviewed" and event.payload["mitotic_count"] == 3
    assert event.payload["reviewer"] == "dr-a" and event.payload["automatic_mitotic_count"] == 4
    rerun, _ = store.add_job("/scans/a.svs", fingerprint="sha256:a", source="submit", dedupe=False)  # analysed again
    again = rerun.job_id
    assert store.claim_next_job() is not None
    store.complete_job(again, slide_result(), EXPORTS)
    kept = store.get_review(job_id)
    assert kept.review_id == review.review_id and not kept.current and kept.superseded_by == again
    assert store.review_agreement()["reviews"] == 1 and store.review_agreement()["count_agreement"] == 0.0
    with pytest.raises(ResultNotFoundError, match="no signed review"):
        store.get_review(again)


def test_a_review_of_a_job_without_a_result_is_refused(store: Store) -> None:
    job_id = running_job(store)
    with pytest.raises(ResultNotFoundError):
        store.add_review(job_id, reviewer="dr-a", counts={}, automatic={}, changes=[], result_created_at=0.0)
    assert store.list_reviews() == []


# --- the job-state vocabulary and a busy store ----------------------------------------------------------


def test_the_jobs_table_check_lists_exactly_the_job_states(tmp_path: Path) -> None:
    import re

    from edge.vocab import JOB_STATES, JobState

    with Store.open(tmp_path / "edge.db") as store, sqlite3.connect(store.path) as conn:
        (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").fetchone()
    match = re.search(r"CHECK \(state IN \(([^)]*)\)\)", sql)
    assert match is not None, sql
    in_check = [word.strip().strip("'") for word in match.group(1).split(",")]
    assert in_check == list(JOB_STATES) == [str(s) for s in JobState]
    with Store.open(tmp_path / "edge.db") as store:
        job, _ = store.add_job("/scans/a.svs")
        assert job.state is JobState.QUEUED and job.to_json_dict()["state"] == "queued"
        assert type(job.to_json_dict()["state"]) is str  # JSON and the CLI see plain text


def test_a_store_locked_by_another_process_raises_store_busy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge.errors import StoreBusyError

    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", 200)
    with Store.open(tmp_path / "edge.db") as store:
        holder = sqlite3.connect(store.path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process's writer holds the lock
        try:
            with pytest.raises(StoreBusyError, match=r"busy: another process held its lock for over 0\.2 s") as info:
                store.add_job("/scans/a.svs")
            assert info.value.retryable and isinstance(info.value, StoreError)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert store.add_job("/scans/a.svs")[1]  # the lock is gone: the same call succeeds
