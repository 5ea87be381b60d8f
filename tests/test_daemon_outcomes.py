"""The daemon's outcome for each slide that is hard to score (issue 11): slides without mitoses or tissue are
done with a null hotspot; a bomb fails at once and a slow slide at the time limit; deterministic failures are
not retried, transient ones are; a slide re-dropped after a transient failure is queued again."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edge.daemon import Daemon
from tests.conftest import SynthFactory
from tests.test_analyze import blank_tiff
from tests.test_daemon import daemon_config, start_daemon, wait_for  # noqa: F401 - start_daemon is a fixture


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
