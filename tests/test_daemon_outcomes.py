"""The daemon's outcome for each slide that is hard to score (issue 11): slides without mitoses or tissue are
done with a null hotspot; a bomb fails at once and a slow slide at the time limit; deterministic failures are
not retried, transient ones are; a slide re-dropped after a transient failure is queued again."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge.client import job_dict
from edge.errors import CorruptSlideError, EngineError, TileDecodeError
from edge.service import worker
from edge.service.daemon import Daemon, _analyze_slide
from edge.service.server.convert import job_to_pb
from edge.service.store import Store
from edge.wsi.fingerprint import fingerprint_slide
from tests.conftest import SynthFactory
from tests.test_analyze import blank_tiff
from tests.test_daemon import QUIET_S, daemon_config, start_daemon, states, wait_for  # noqa: F401 - start_daemon: a fixture
from tests.tiff_bomb import write_bomb


def test_slides_without_mitoses_or_tissue_are_done_with_a_null_hotspot_and_every_export(
    tmp_path: Path, synth_slide: SynthFactory, start_daemon: Callable[..., Daemon]  # noqa: F811
) -> None:
    daemon = start_daemon(daemon_config(tmp_path, **{"watch.folders": [], "daemon.max_attempts": 3}))
    empty = daemon.submit_slide(synth_slide(width=2048, height=2048, seed=5, mitoses=0, imposters=0))
    blank = daemon.submit_slide(blank_tiff(tmp_path / "blank.tiff"))
    for job, reason in ((empty, "no mitotic figure found"), (blank, "no tissue found")):
        wait_for(lambda j=job: daemon.store.get_job(j.job_id).state in ("done", "failed"), what=f"job {job.job_id}")
        done = daemon.store.get_job(job.job_id)
        assert done.state == "done" and done.attempts == 1, done.error
        result = daemon.store.get_result(job.job_id)
        hotspot = result.summary["scores"]["hotspot"]
        assert hotspot["mitotic"] == 0 and hotspot["center_x_um"] is None and reason in hotspot["null_reason"]
        assert set(result.exports) >= {"result", "geojson", "midog", "csv", "overlay"}, result.exports
        assert all(Path(p).exists() for p in result.exports.values())


# --- retryable or deterministic (issue 11, bug 8) ---------------------------------------------------


@pytest.mark.parametrize("error", [
    TileDecodeError("/scans/a.svs", "tile 17 at level 0 failed to decode: JPEG data truncated"),
    ValueError("need at least one array to concatenate"),  # a bug fails the same way each time
])
def test_a_deterministic_failure_is_not_retried_and_its_reason_says_so(
    error: Exception, tmp_path: Path, synth_slide: SynthFactory, start_daemon: Callable[..., Daemon]  # noqa: F811
) -> None:
    calls: list[int] = []

    def analyze(*args: Any) -> Any:
        calls.append(1)
        raise error

    daemon = start_daemon(daemon_config(tmp_path, **{"watch.folders": [], "daemon.max_attempts": 3}), analyze=analyze)
    job = daemon.submit_slide(synth_slide(width=2048, height=1536, seed=3))
    wait_for(lambda: daemon.store.get_job(job.job_id).state == "failed", what="job failed")
    failed = daemon.store.get_job(job.job_id)
    assert len(calls) == 1 and failed.attempts == 1 and failed.retryable is False
    assert str(error) in (failed.error or "") and "deterministic error: not retried" in (failed.error or "")
    assert job_dict(job_to_pb(failed))["retryable"] is False  # what `client list --json` shows
    assert [e.type for e in daemon.store.events_after(0)].count("job_retry") == 0


def test_a_transient_failure_is_retried_and_its_reason_says_so(
    tmp_path: Path, synth_slide: SynthFactory, start_daemon: Callable[..., Daemon]  # noqa: F811
) -> None:
    def analyze(*args: Any) -> Any:
        raise EngineError("CUDA out of memory")

    daemon = start_daemon(daemon_config(tmp_path, **{"watch.folders": [], "daemon.max_attempts": 2}), analyze=analyze)
    job = daemon.submit_slide(synth_slide(width=2048, height=1536, seed=3))
    wait_for(lambda: daemon.store.get_job(job.job_id).state == "failed", what="job failed")
    failed = daemon.store.get_job(job.job_id)
    assert failed.attempts == 2 and failed.retryable is True
    assert "transient error: gave up after 2 attempt(s)" in (failed.error or "")
    (retry,) = [e for e in daemon.store.events_after(0) if e.type == "job_retry"]
    assert "transient error: retry 2 of 2" in retry.payload["error"]


def test_a_read_error_because_the_slide_was_overwritten_meanwhile_is_transient(
    tmp_path: Path, synth_slide: SynthFactory, start_daemon: Callable[..., Daemon]  # noqa: F811
) -> None:
    slide = tmp_path / "a.tiff"
    shutil.copy(synth_slide(width=2048, height=1536, seed=3), slide)
    calls: list[int] = []

    def analyze(path: Path, *args: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:  # the scanner rewrites the file while it is read
            path.write_bytes(synth_slide(width=2048, height=1536, seed=4).read_bytes())
        raise CorruptSlideError(path, "tile 3 failed to decode")

    daemon = start_daemon(daemon_config(tmp_path, **{"watch.folders": [], "daemon.max_attempts": 3}), analyze=analyze)
    job = daemon.submit_slide(slide)
    wait_for(lambda: daemon.store.get_job(job.job_id).state == "failed", what="job failed")
    events = daemon.store.events_after(0)
    (retry,) = [e for e in events if e.type == "job_retry"]
    reason = retry.payload["error"]
    assert "SlideChangedError" in reason and "files changed while it was analysed" in reason
    # The retry opens the slide again and finds other bytes than were queued (the open-time check of the
    # API boundary): it is not analysed, and the job ends failed saying to submit the new content again.
    assert len(calls) == 1
    error = daemon.store.get_job(job.job_id).error or ""
    assert "content changed after the job was queued" in error and "deterministic error" in error


# --- plausibility and the per-slide time limit (issue 11, bug 5) ------------------------------------


def test_a_bomb_in_the_inbox_fails_at_once_and_the_next_slide_is_scored(
    tmp_path: Path, synth_slide: SynthFactory, start_daemon: Callable[..., Daemon]  # noqa: F811
) -> None:
    daemon = start_daemon(daemon_config(tmp_path))
    inbox = tmp_path / "inbox"
    write_bomb(inbox / "bomb.tiff")
    shutil.copy(synth_slide(width=2048, height=1536, seed=3), inbox / "good.tiff")
    wait_for(lambda: all(states(daemon.store).get(n) in ("done", "failed") for n in ("bomb.tiff", "good.tiff")),
             timeout=60, what="both slides")
    jobs = {Path(j.slide_path).name: j for j in daemon.store.list_jobs()}
    assert jobs["good.tiff"].state == "done"
    bomb = jobs["bomb.tiff"]
    assert bomb.state == "failed" and bomb.attempts <= 1  # refused when opened: by the watcher or the worker
    assert "40000 megapixels), more than slide.max_level0_megapixels" in (bomb.error or "")


@pytest.mark.parametrize("derived", [False, True])
def test_a_slide_past_its_time_limit_fails_with_the_reason_and_the_worker_moves_on(
    derived: bool, tmp_path: Path, synth_slide: SynthFactory, start_daemon: Callable[..., Daemon],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if derived:  # once planned, 0.001 s per tile and nothing to finish: far less than its 42 tiles take
        monkeypatch.setattr(worker, "FINISH_SECONDS", 0.0)
        settings = {"daemon.max_slide_seconds": 0.0, "daemon.seconds_per_tile": 0.001}
    else:
        settings = {"daemon.max_slide_seconds": 1.0}
    daemon = start_daemon(daemon_config(tmp_path, **{"watch.folders": [], "daemon.max_attempts": 3, **settings}))
    slow = daemon.submit_slide(synth_slide(width=6144, height=6144, seed=11))
    wait_for(lambda: daemon.store.get_job(slow.job_id).state == "failed", timeout=60, what="the slow slide failed")
    failed = daemon.store.get_job(slow.job_id)
    assert failed.attempts == 1 and "SlideTimeLimitError" in (failed.error or "")
    expected = r"derived from its \d+ planned tiles" if derived else r"daemon\.max_slide_seconds"
    assert re.search(expected, failed.error or "")
    assert "deterministic error: not retried" in (failed.error or "")
    if not derived:
        daemon.config = daemon_config(tmp_path, **{"watch.folders": []})  # no limit for the next one
        good = daemon.submit_slide(synth_slide(width=2048, height=1536, seed=3))
        wait_for(lambda: daemon.store.get_job(good.job_id).state == "done", timeout=60, what="the next slide done")


def test_an_in_process_analysis_is_held_to_the_time_limit_too(
    tmp_path: Path, synth_slide: SynthFactory, start_daemon: Callable[..., Daemon]  # noqa: F811
) -> None:
    def analyze(path: Path, config: Any, engines: Any, cancel: Any, progress: Any) -> Any:
        progress("detect", 0, 10)
        while True:  # a reader stuck in a slow slide: only the time limit ends it
            time.sleep(0.05)
            progress("detect", 1, 10)

    config = daemon_config(tmp_path, **{"watch.folders": [], "daemon.max_slide_seconds": 0.3})
    daemon = start_daemon(config, analyze=analyze)
    job = daemon.submit_slide(synth_slide(width=2048, height=1536, seed=3))
    wait_for(lambda: daemon.store.get_job(job.job_id).state == "failed", timeout=20, what="job failed")
    assert "past its time limit of 0.3 s" in (daemon.store.get_job(job.job_id).error or "")


# --- dropped again after a failure (issue 11, bug 9) ------------------------------------------------


@pytest.mark.parametrize(("first_error", "queued_again"), [
    (EngineError("CUDA error: an illegal memory access was encountered"), True),  # transient
    (TileDecodeError("a.tiff", "tile 3 at level 0 failed to decode"), False),  # deterministic
])
def test_a_slide_dropped_again_is_queued_again_only_after_a_transient_failure(
    first_error: Exception, queued_again: bool, tmp_path: Path, synth_slide: SynthFactory,
    start_daemon: Callable[..., Daemon],  # noqa: F811
) -> None:
    calls: list[Path] = []

    def analyze(path: Path, *args: Any) -> Any:
        calls.append(path)
        if len(calls) == 1:
            raise first_error
        return _analyze_slide(path, *args)

    daemon = start_daemon(daemon_config(tmp_path, **{"daemon.max_attempts": 1}), analyze=analyze)
    source, inbox = synth_slide(width=2048, height=1536, seed=3), tmp_path / "inbox"
    shutil.copy(source, inbox / "a.tiff")
    wait_for(lambda: states(daemon.store).get("a.tiff") == "failed", what="the first job failed")
    (inbox / "a.tiff").unlink()
    shutil.copy(source, inbox / "a.tiff")  # the same bytes dropped again
    if queued_again:
        wait_for(lambda: [j.state for j in daemon.store.list_jobs()] == ["failed", "done"], what="queued again")
    else:
        time.sleep(QUIET_S * 6)
        assert daemon.wait_idle(30)
        assert [j.state for j in daemon.store.list_jobs()] == ["failed"]


def test_slides_seen_by_a_version_without_middle_samples_are_not_analysed_again_after_the_upgrade(
    tmp_path: Path, synth_slide: SynthFactory, start_daemon: Callable[..., Daemon]  # noqa: F811
) -> None:
    slide = tmp_path / "inbox" / "a.tiff"
    slide.parent.mkdir()
    shutil.copy(synth_slide(width=6144, height=6144, seed=11), slide)  # over 2 MiB: it has a middle
    fingerprint = fingerprint_slide(slide)
    assert fingerprint.legacy_key != fingerprint.key
    with Store.open(tmp_path / "data" / "edge.db") as store:  # what the earlier version stored
        job, _ = store.add_job(str(slide), fingerprint=fingerprint.legacy_key)
        store.cancel_job(job.job_id)
    daemon = start_daemon(daemon_config(tmp_path))  # scan_on_start looks at a.tiff again
    time.sleep(QUIET_S * 6)
    assert daemon.wait_idle(30)
    assert [j.job_id for j in daemon.store.list_jobs()] == [job.job_id]
