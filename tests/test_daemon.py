"""The scan-time daemon as a lab runs it: slides dropped into a watched folder become exactly one result each;
bad files fail with reasons while good ones go on; retries, cancel, a full disk, retention; SIGTERM and kill -9
of a real `mitosis-edge serve` process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.config import Config, load_config
from edge.engines.manifest import find_bundle
from edge.errors import EngineError, RequestRefused, SlideReadError, StoreError, StreamCancelled
from edge.service.daemon import Daemon
from edge.service.store import Store
from tests.conftest import SynthFactory, data_file
from tests.tiny_bundle import make_tiny_bundle

QUIET_S = 0.3


def daemon_config(tmp_path: Path, **settings: Any) -> Config:
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    overrides = {
        "watch.folders": [str(inbox)], "watch.quiet_period_s": QUIET_S, "watch.poll_interval_s": 0.2,
        "watch.settle_timeout_s": 3.0, "daemon.data_dir": str(tmp_path / "data"), "daemon.metrics_listen": "",
        "daemon.min_free_disk_mb": 0, "daemon.retry_backoff_s": 0.05, "server.listen": "127.0.0.1:0",
        "server.insecure": True, "stream.reader_threads": 2,
    }
    overrides.update(settings)
    return load_config(None, overrides)


@pytest.fixture
def start_daemon() -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(config: Config, **kwargs: Any) -> Daemon:
        daemon = Daemon(config, **kwargs).start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop(grace=0.0)


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def analysis_until_cancelled(started: threading.Event) -> Callable[..., Any]:
    """An analysis that signals it started, then runs until the daemon cancels it."""

    def analyze(path: Path, config: Config, engines: Any, cancel: threading.Event, progress: Any) -> Any:
        started.set()
        cancel.wait(30)
        raise StreamCancelled("cancelled")

    return analyze


def states(store: Store) -> dict[str, str]:
    return {Path(j.slide_path).name: j.state for j in store.list_jobs(limit=1000)}


def test_a_slide_dropped_into_the_inbox_becomes_one_result_with_exports(
    tmp_path: Path, synth_slide: SynthFactory, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon(daemon_config(tmp_path, **{"daemon.metrics_listen": "127.0.0.1:0"}))
    shutil.copy(synth_slide(width=2048, height=1536, seed=3), tmp_path / "inbox" / "a.tiff")
    wait_for(lambda: states(daemon.store).get("a.tiff") == "done", what="a.tiff done")
    job = daemon.store.list_jobs()[0]
    result = daemon.store.get_result(job.job_id)
    assert result.summary["scores"]["hotspot"] is not None
    for path in result.exports.values():
        assert Path(path).exists() and Path(path).parent == daemon.results_dir / f"{job.job_id}-a"
    scraped = urllib.request.urlopen(f"http://{daemon.metrics_address()}/metrics", timeout=5).read().decode()
    assert 'mitosis_edge_jobs{state="done"} 1.0' in scraped and "mitosis_edge_slides_done_total 1.0" in scraped
    assert "mitosis_edge_stage_seconds_bucket" in scraped and "mitosis_edge_queue_depth 0.0" in scraped


def test_the_same_slide_seen_again_under_another_name_is_not_processed_twice(
    tmp_path: Path, synth_slide: SynthFactory, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon(daemon_config(tmp_path))
    inbox = tmp_path / "inbox"
    shutil.copy(synth_slide(width=2048, height=1536, seed=3), inbox / "a.tiff")
    wait_for(lambda: states(daemon.store).get("a.tiff") == "done", what="a.tiff done")
    os.rename(inbox / "a.tiff", inbox / "renamed.tiff")
    (inbox / "renamed.tiff").touch()
    time.sleep(QUIET_S * 4)
    assert daemon.wait_idle(30)
    assert len(daemon.store.list_jobs()) == 1


def test_bad_files_fail_with_reasons_while_the_next_good_slide_completes(
    tmp_path: Path, synth_slide: SynthFactory, start_daemon: Callable[..., Daemon]
) -> None:
    good = synth_slide(width=2048, height=1536, seed=3)
    daemon = start_daemon(daemon_config(tmp_path))
    inbox = tmp_path / "inbox"
    (inbox / "zero.svs").write_bytes(b"")
    (inbox / "text.tiff").write_text("this is not a slide\n" * 100)
    data = good.read_bytes()
    (inbox / "truncated.tiff").write_bytes(data[: len(data) // 2])
    (inbox / "corrupt.tiff").write_bytes(data[:4096] + os.urandom(len(data) - 4096))
    shutil.copy(good, inbox / "good.tiff")
    names = ("zero.svs", "text.tiff", "truncated.tiff", "corrupt.tiff", "good.tiff")
    terminal = ("done", "failed")
    wait_for(lambda: all(states(daemon.store).get(n) in terminal for n in names), timeout=90, what="every file")
    jobs = {Path(j.slide_path).name: j for j in daemon.store.list_jobs(limit=100)}
    assert jobs["good.tiff"].state == "done"
    for name in names[:-1]:
        assert jobs[name].state == "failed" and jobs[name].error, name
    assert daemon.server is not None  # the daemon is still serving


def test_a_failing_slide_is_retried_with_backoff_then_failed_with_the_last_error(
    tmp_path: Path, synth_slide: SynthFactory, start_daemon: Callable[..., Daemon]
) -> None:
    attempts: list[float] = []

    def analyze(*args: Any) -> Any:
        attempts.append(time.monotonic())
        raise EngineError(f"engine fell over (attempt {len(attempts)})")

    config = daemon_config(tmp_path, **{"daemon.max_attempts": 3, "watch.folders": []})
    daemon = start_daemon(config, analyze=analyze)
    job = daemon.submit_slide(synth_slide(width=2048, height=1536, seed=3))
    wait_for(lambda: daemon.store.get_job(job.job_id).state == "failed", what="job failed")
    failed = daemon.store.get_job(job.job_id)
    assert failed.attempts == 3 and "attempt 3" in (failed.error or "")
    events = daemon.store.events_after(0)
    retries = [e for e in events if e.type == "job_retry"]
    waits = [e.payload["retry_at"] - e.created_at for e in retries]
    assert len(attempts) == 3 and len(retries) == 2 and events[-1].type == "job_failed"
    assert waits[0] == pytest.approx(0.05, abs=0.02) and waits[1] == pytest.approx(0.1, abs=0.02)  # the wait doubles


def test_a_full_disk_fails_the_job_cleanly(
    tmp_path: Path, synth_slide: SynthFactory, start_daemon: Callable[..., Daemon]
) -> None:
    config = daemon_config(tmp_path, **{"daemon.max_attempts": 1, "daemon.min_free_disk_mb": 10**9,
                                        "watch.folders": []})
    daemon = start_daemon(config)
    job = daemon.submit_slide(synth_slide(width=2048, height=1536, seed=3))
    wait_for(lambda: daemon.store.get_job(job.job_id).state == "failed", what="job failed")
    error = daemon.store.get_job(job.job_id).error or ""
    assert "MB free" in error and "daemon.min_free_disk_mb" in error
    assert list(daemon.results_dir.iterdir()) == []  # nothing half-written


def test_cancelling_a_running_slide_stops_it_and_stores_nothing(
    tmp_path: Path, synth_slide: SynthFactory, start_daemon: Callable[..., Daemon]
) -> None:
    started = threading.Event()
    analyze = analysis_until_cancelled(started)
    daemon = start_daemon(daemon_config(tmp_path, **{"watch.folders": []}), analyze=analyze)
    job = daemon.submit_slide(synth_slide(width=2048, height=1536, seed=3))
    assert started.wait(30)
    daemon.cancel_job(job.job_id)
    wait_for(lambda: daemon.store.get_job(job.job_id).state == "cancelled", what="cancelled")
    assert daemon.wait_idle(10)
    assert daemon.store.get_job(job.job_id).state == "cancelled"
    with pytest.raises(KeyError):
        daemon.store.get_result(job.job_id)


def test_stopping_out_of_grace_returns_the_running_slide_to_the_queue(
    tmp_path: Path, synth_slide: SynthFactory
) -> None:
    started = threading.Event()
    analyze = analysis_until_cancelled(started)
    daemon = Daemon(daemon_config(tmp_path, **{"watch.folders": []}), analyze=analyze).start()
    job = daemon.submit_slide(synth_slide(width=2048, height=1536, seed=3))
    assert started.wait(30)
    daemon.stop(grace=0.2)
    with Store.open(tmp_path / "data" / "edge.db") as store:
        again = store.get_job(job.job_id)
    assert again.state == "queued" and again.attempts == 0


def test_retention_removes_old_exports_but_keeps_the_results(
    tmp_path: Path, synth_slide: SynthFactory, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon(daemon_config(tmp_path, **{"watch.folders": []}))
    job = daemon.submit_slide(synth_slide(width=2048, height=1536, seed=3))
    wait_for(lambda: daemon.store.get_job(job.job_id).state == "done", what="done")
    folder = Path(daemon.store.get_result(job.job_id).exports["result"]).parent
    assert folder.is_dir()
    assert daemon.prune_exports(cutoff=time.time() + 1) == 1
    assert not folder.exists()
    assert daemon.store.get_result(job.job_id).summary["scores"]


def test_a_missing_watch_folder_is_refused_with_what_to_do(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, **{"watch.folders": [str(tmp_path / "nope")]})
    with pytest.raises(ValueError, match="does not exist"):
        Daemon(config)


# --- a real `mitosis-edge serve` process ---------------------------------------------------------


def serve(tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    exe = shutil.which("mitosis-edge")
    cmd = [exe] if exe else [sys.executable, "-m", "edge"]
    args = ["serve", "--watch", str(tmp_path / "inbox"), "--data", str(tmp_path / "data"),
            "--listen", "127.0.0.1:0", "--insecure", "--metrics", "", *extra]
    config = tmp_path / "edge.toml"
    config.write_text(f"[watch]\nquiet_period_s = {QUIET_S}\npoll_interval_s = 0.2\n[stream]\nreader_threads = 2\n"
                      "[daemon]\nmin_free_disk_mb = 0\n")
    (tmp_path / "inbox").mkdir(exist_ok=True)
    with (tmp_path / "serve.log").open("a") as log:
        return subprocess.Popen([*cmd, "--config", str(config), *args], stdout=log, stderr=log, text=True)


def jobs_in(tmp_path: Path) -> list[Any]:
    db = tmp_path / "data" / "edge.db"
    if not db.exists():
        return []
    with Store.open(db) as store:
        return store.list_jobs(limit=100)


def test_sigterm_stops_a_serving_daemon_gracefully(tmp_path: Path) -> None:
    process = serve(tmp_path)
    try:
        wait_for(lambda: "gRPC on 127.0.0.1:" in (tmp_path / "serve.log").read_text(), timeout=60, what="serving")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        process.wait()
    assert "mitosis-edge stopped" in (tmp_path / "serve.log").read_text()


def test_kill_9_during_a_slide_then_restart_gives_exactly_one_result(
    tmp_path: Path, synth_slide: SynthFactory
) -> None:
    slide = synth_slide(width=6144, height=6144, seed=11)
    process = serve(tmp_path)
    try:
        shutil.copy(slide, tmp_path / "inbox" / "slide.tiff")
        wait_for(lambda: any(j.state == "running" for j in jobs_in(tmp_path)), timeout=120, what="running")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
        process.wait()
    assert [j.state for j in jobs_in(tmp_path)] == ["running"]  # the crash left it running
    process = serve(tmp_path)
    try:
        wait_for(lambda: [j.state for j in jobs_in(tmp_path)] == ["done"], timeout=180, what="done after restart")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    with Store.open(tmp_path / "data" / "edge.db") as store:
        (job,) = store.list_jobs()
        assert store.get_result(job.job_id).job_id == job.job_id
        types = [e.type for e in store.events_after(0)]
    assert types.count("job_done") == 1 and "job_requeued" in types


def test_a_slide_that_stopped_the_daemon_too_often_ends_failed_instead_of_looping(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, **{"daemon.max_attempts": 2, "watch.folders": []})
    (tmp_path / "data").mkdir()
    with Store.open(tmp_path / "data" / "edge.db") as store:
        job, _ = store.add_job("/scans/crashes-the-reader.svs")
        store.claim_next_job()  # the first run: the process died, and recovery counts the attempt
        store.recover_running()
        store.claim_next_job()  # the second run died too
    daemon = Daemon(config)
    try:
        daemon.start()
        failed = daemon.store.get_job(job.job_id)
    finally:
        daemon.stop(grace=0.0)
    assert failed.state == "failed" and "stopped 2 times" in (failed.error or "")


def test_export_retention_runs_by_itself_when_configured(
    tmp_path: Path, synth_slide: SynthFactory, start_daemon: Callable[..., Daemon]
) -> None:
    first = start_daemon(daemon_config(tmp_path, **{"watch.folders": []}))
    job = first.submit_slide(synth_slide(width=2048, height=1536, seed=3))
    wait_for(lambda: first.store.get_job(job.job_id).state == "done", what="done")
    first.stop(grace=0.0)
    later = time.time() + 2 * 86400  # two days on: a one-day retention prunes at start
    start_daemon(daemon_config(tmp_path, **{"watch.folders": [], "daemon.export_retention_days": 1.0}),
                 clock=lambda: later)
    wait_for(lambda: not (tmp_path / "data" / "results" / str(job.job_id)).exists(), timeout=10, what="pruned")


def analysis_children() -> list[Any]:
    import multiprocessing

    return [p for p in multiprocessing.active_children() if p.name == "edge-analysis"]


def test_a_crash_in_the_analysis_process_fails_that_slide_and_the_daemon_goes_on(
    tmp_path: Path, synth_slide: SynthFactory, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon(daemon_config(tmp_path, **{"watch.folders": [], "daemon.max_attempts": 1}))
    big = daemon.submit_slide(synth_slide(width=6144, height=6144, seed=11))
    wait_for(lambda: daemon.store.get_job(big.job_id).state == "running", what="running")
    time.sleep(0.5)
    (child,) = analysis_children()
    os.kill(child.pid, signal.SIGKILL)  # as a reader library segfaulting on the slide would
    wait_for(lambda: daemon.store.get_job(big.job_id).state == "failed", what="failed")
    assert "analysis process died (signal 9" in (daemon.store.get_job(big.job_id).error or "")
    small = daemon.submit_slide(synth_slide(width=2048, height=1536, seed=3))
    wait_for(lambda: daemon.store.get_job(small.job_id).state == "done", what="the next slide done")


def test_cancelling_a_slide_ends_its_analysis_process(
    tmp_path: Path, synth_slide: SynthFactory, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon(daemon_config(tmp_path, **{"watch.folders": []}))
    job = daemon.submit_slide(synth_slide(width=6144, height=6144, seed=11))
    wait_for(lambda: daemon.store.get_job(job.job_id).state == "running", what="running")
    daemon.cancel_job(job.job_id)
    wait_for(lambda: not analysis_children(), timeout=10, what="the analysis process ended")
    assert daemon.store.get_job(job.job_id).state == "cancelled"
    assert not (daemon.results_dir / str(job.job_id)).exists()


def test_engines_that_cannot_load_keep_the_daemon_up_and_say_why_over_grpc(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    from edge.client import EdgeClient

    config = daemon_config(tmp_path, **{"watch.folders": [], "engines.bundle": str(tmp_path / "no-such-bundle")})
    daemon = start_daemon(config)
    wait_for(lambda: daemon.engine_error is not None, what="the engine error")
    with EdgeClient(daemon.server.address, insecure=True) as client:
        status = client.status()
        assert client.health() == "NOT_SERVING"
    assert status["ready"] is False and "no-such-bundle" in status["engine_error"]


def test_server_status_names_the_gpu_or_says_why_there_is_none() -> None:
    from edge.engines.probe import GpuDevice, GpuProbe
    from edge.service.daemon import _gpu_name

    h100 = GpuProbe(ok=True, devices=(GpuDevice(0, "NVIDIA H100 80GB HBM3", "9.0", 81559),))
    assert _gpu_name("tensorrt", h100) == "NVIDIA H100 80GB HBM3"
    assert _gpu_name("tensorrt", GpuProbe(ok=False, reason="no GPU: libcuda.so.1 not found")).startswith("no GPU")
    assert _gpu_name("onnxruntime") == ""


@pytest.mark.parametrize(("policy", "jobs"), [("skip", 1), ("reprocess", 2)])
def test_the_duplicate_policy_decides_whether_the_same_bytes_under_a_new_path_are_a_new_job(
    tmp_path: Path, policy: str, jobs: int
) -> None:
    from edge.wsi.fingerprint import Fingerprint

    daemon = Daemon(daemon_config(tmp_path, **{"watch.on_duplicate": policy}))
    try:
        fingerprint = Fingerprint(size=10, mtime_ns=0, head_tail_sha256="ab" * 32)
        for path in ("/scans/a.svs", "/scans/a.svs", "/scans/renamed.svs"):  # a restart's scan, then a copy
            daemon.on_slide_ready(Path(path), fingerprint)
        assert len(daemon.store.list_jobs()) == jobs
    finally:
        daemon.stop(grace=0.0)


def test_a_submitted_bundle_is_a_name_the_configuration_allows_never_a_path(tmp_path: Path) -> None:
    tiny = make_tiny_bundle(tmp_path / "bundles" / "tiny")
    daemon = Daemon(daemon_config(tmp_path, **{"engines.allowed_bundles": ["demo", str(tiny)]}))
    try:
        assert daemon.allowed_bundle("demo") == find_bundle("demo")
        assert daemon.allowed_bundle("tiny") == tiny
        refusals = [(str(tiny), "INVALID_ARGUMENT"), ("../tiny", "INVALID_ARGUMENT"), ("other", "PERMISSION_DENIED")]
        for name, code in refusals:
            with pytest.raises(RequestRefused) as info:
                daemon.allowed_bundle(name)
            assert info.value.code == code and "demo, tiny" in info.value.message
    finally:
        daemon.stop(grace=0.0)


# --- issue 11: a full disk, a lost store, FIFOs, unreadable files ---------------------------------


def health_status(daemon: Daemon) -> Any:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(daemon.server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@pytest.mark.parametrize("method", ["claim_next_job", "complete_job"])
def test_a_store_that_cannot_be_written_turns_health_not_serving_and_scoring_resumes_when_it_can(
    tmp_path: Path, synth_slide: SynthFactory, start_daemon: Callable[..., Daemon], method: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sqlite3

    config = daemon_config(tmp_path, **{"watch.folders": [], "daemon.isolation": "thread"})
    daemon = start_daemon(config)
    wait_for(daemon.is_ready, what="engines loaded")
    disk_full = threading.Event()
    disk_full.set()
    original = getattr(daemon.store, method)

    def full_disk(*args: Any, **kwargs: Any) -> Any:
        if disk_full.is_set():
            raise sqlite3.OperationalError("database or disk is full")
        return original(*args, **kwargs)

    monkeypatch.setattr(daemon.store, method, full_disk)
    monkeypatch.setattr(daemon.store, "check_writable", lambda: full_disk() if disk_full.is_set() else None)
    job = daemon.submit_slide(synth_slide(width=2048, height=1536, seed=3))
    wait_for(lambda: not daemon.is_ready(), what="not ready")
    assert "database or disk is full" in daemon.server_status()["not_ready_reason"]
    assert health_status(daemon) == "NOT_SERVING"
    assert daemon.store.get_job(job.job_id).state in ("queued", "running")
    with monkeypatch.context() as full_store:  # a submit meanwhile: refused with the reason (gRPC UNAVAILABLE)
        full_store.setattr(daemon.store, "add_job", full_disk)
        with pytest.raises(StoreError, match="cannot be written: database or disk is full; free space"):
            daemon.submit_slide(synth_slide(width=2048, height=1536, seed=3))
    disk_full.clear()  # the disk frees: no restart
    wait_for(lambda: daemon.store.get_job(job.job_id).state == "done", what="done after the disk freed")
    wait_for(daemon.is_ready, what="ready again")
    assert health_status(daemon) == "SERVING" and daemon.server_status()["not_ready_reason"] == ""
    assert all(t.is_alive() for t in daemon._threads if t.name.startswith("edge-worker"))


def test_a_deleted_store_is_a_fatal_error_with_the_reason(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon(daemon_config(tmp_path, **{"watch.folders": []}))
    for file in (tmp_path / "data").glob("edge.db*"):
        file.unlink()
    wait_for(lambda: daemon.fatal_error is not None, timeout=10, what="the fatal error")
    assert "was deleted" in (daemon.fatal_error or "") and "restore edge.db" in (daemon.fatal_error or "")
    assert not daemon.is_ready() and health_status(daemon) == "NOT_SERVING"


def test_a_new_store_beside_earlier_exports_refuses_to_start_and_says_how_to_recover(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, **{"watch.folders": []})
    export = tmp_path / "data" / "results" / "1"
    export.mkdir(parents=True)
    (export / "summary.json").write_text("{}")
    with pytest.raises(StoreError, match=r"is missing.*1 export folder.*Restore edge.db.*move .*results"):
        Daemon(config)
    assert not (tmp_path / "data" / "edge.db").exists()  # nothing created
    Store.open(tmp_path / "data" / "edge.db").close()  # an emptied store: the same refusal
    with pytest.raises(StoreError, match="holds no jobs"):
        Daemon(config)
    assert (export / "summary.json").read_text() == "{}"


def test_a_serving_daemon_whose_store_is_deleted_exits_1_and_does_not_start_again_over_its_exports(
    tmp_path: Path
) -> None:
    process = serve(tmp_path)
    log_file = tmp_path / "serve.log"
    try:
        wait_for(lambda: "gRPC on 127.0.0.1:" in log_file.read_text(), timeout=60, what="serving")
        (tmp_path / "data" / "results" / "7").mkdir()  # an earlier slide's exports
        for file in (tmp_path / "data").glob("edge.db*"):
            file.unlink()
        assert process.wait(timeout=30) == 1
    finally:
        process.kill()
        process.wait()
    assert "was deleted while the daemon ran" in log_file.read_text()
    process = serve(tmp_path)
    try:
        assert process.wait(timeout=60) == 1
    finally:
        process.kill()
        process.wait()
    assert "Restore edge.db" in log_file.read_text() and not (tmp_path / "data" / "edge.db").exists()


def test_a_fifo_submitted_over_the_api_is_refused_with_the_reason_and_hangs_nothing(
    tmp_path: Path, synth_slide: SynthFactory, start_daemon: Callable[..., Daemon]
) -> None:
    fifo = tmp_path / "x.dcm"
    os.mkfifo(fifo)
    daemon = start_daemon(daemon_config(tmp_path, **{"watch.folders": [], "daemon.isolation": "thread"}))
    with pytest.raises(SlideReadError, match=r"named pipe \(FIFO\), not a regular file"):
        daemon.submit_slide(fifo)  # refused at submit: it cannot be fingerprinted, and is never opened
    good = daemon.submit_slide(synth_slide(width=2048, height=1536, seed=3))
    wait_for(lambda: daemon.store.get_job(good.job_id).state == "done", what="the good slide after the FIFO")
    assert [job.job_id for job in daemon.store.list_jobs()] == [good.job_id]


def test_a_stable_unreadable_slide_is_visible_at_once_in_status_list_and_metrics(
    tmp_path: Path, start_daemon: Callable[..., Daemon], capsys: pytest.CaptureFixture[str]
) -> None:
    from edge.cli import main

    daemon = start_daemon(daemon_config(tmp_path, **{
        "watch.settle_timeout_s": 3600.0, "watch.unreadable_timeout_s": 300.0, "daemon.metrics_listen": "127.0.0.1:0",
    }))
    shutil.copy(data_file("wsi/broken.svs"), tmp_path / "inbox" / "broken.svs")
    wait_for(lambda: daemon.server_status()["waiting_slides"], timeout=20, what="the waiting slide")
    [waiting] = daemon.server_status()["waiting_slides"]
    assert waiting["slide_path"].endswith("broken.svs") and "no readable slide" in waiting["reason"]
    assert 200 < waiting["fails_in_s"] <= 300 + 1e-6
    assert main(["client", "--server", daemon.server.address, "--insecure", "list"]) == 0
    out = capsys.readouterr().out
    assert "waiting" in out and "broken.svs" in out and "fails in" in out
    daemon.check_health()
    scraped = urllib.request.urlopen(f"http://{daemon.metrics_address()}/metrics", timeout=5).read().decode()
    assert "mitosis_edge_slides_waiting 1.0" in scraped


def test_health_says_not_serving_when_no_worker_is_alive(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon(daemon_config(tmp_path, **{"watch.folders": [], "daemon.isolation": "thread"}))
    wait_for(daemon.is_ready, what="engines loaded")
    dead = threading.Thread(target=lambda: None, name="edge-worker-dead")
    dead.start()
    dead.join()
    threads = daemon._threads
    daemon._threads = [t for t in threads if not t.name.startswith("edge-worker")] + [dead]
    try:
        daemon.check_health()
        assert not daemon.is_ready() and "no worker thread is alive" in daemon.server_status()["not_ready_reason"]
        assert health_status(daemon) == "NOT_SERVING"
    finally:
        daemon._threads = threads


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 16 MB tmpfs to fill for real (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                                           check=False, capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_really_full_data_disk_turns_health_not_serving_and_scoring_resumes_once_it_frees(
    tmp_path: Path, small_filesystem: Path, synth_slide: SynthFactory, start_daemon: Callable[..., Daemon],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = daemon_config(tmp_path, **{"watch.folders": [], "daemon.isolation": "thread", "daemon.max_attempts": 10,
                                        "daemon.data_dir": str(small_filesystem / "data")})
    daemon = start_daemon(config)
    wait_for(daemon.is_ready, what="engines loaded")
    health: list[tuple[bool, str]] = []  # every health change, with the reason given at that moment
    set_serving = daemon.server.set_serving

    def record(serving: bool) -> None:
        health.append((serving, daemon.not_ready_reason()))
        set_serving(serving)

    monkeypatch.setattr(daemon.server, "set_serving", record)
    job = daemon.submit_slide(synth_slide(width=2048, height=1536, seed=3))
    wait_for(lambda: daemon.store.get_job(job.job_id).state == "running", what="running")
    filler = small_filesystem / "filler"
    with filler.open("wb") as fh, pytest.raises(OSError):  # fill the disk to the last byte
        while True:
            fh.write(b"\0" * 65536)
    wait_for(lambda: any(not serving for serving, _ in health), timeout=60, what="health NOT_SERVING")
    assert any("database or disk is full" in reason for serving, reason in health if not serving), health
    filler.unlink()
    wait_for(lambda: daemon.store.get_job(job.job_id).state == "done", timeout=60, what="done after the disk freed")
    wait_for(daemon.is_ready, what="ready again")
    assert health_status(daemon) == "SERVING"


def test_an_export_folder_left_by_an_earlier_store_is_set_aside_never_overwritten(
    tmp_path: Path, synth_slide: SynthFactory, start_daemon: Callable[..., Daemon]
) -> None:
    from edge.analysis.exports import export_folder_name

    daemon = start_daemon(daemon_config(tmp_path, **{"watch.folders": [], "daemon.isolation": "thread"}))
    slide = synth_slide(width=2048, height=1536, seed=3)
    name = export_folder_name(1, str(slide))  # what a lost store's job 1 of the same slide left behind
    stale = daemon.results_dir / name
    stale.mkdir()
    (stale / "result.json").write_text('{"from": "the earlier store"}')
    os.utime(stale, (time.time() - 86400, time.time() - 86400))
    job = daemon.submit_slide(slide)
    assert job.job_id == 1
    wait_for(lambda: daemon.store.get_job(job.job_id).state == "done", what="done")
    [aside] = daemon.results_dir.glob(f"{name}.earlier-store-*")
    assert (aside / "result.json").read_text() == '{"from": "the earlier store"}'
    assert "earlier store" not in (daemon.results_dir / name / "result.json").read_text()
