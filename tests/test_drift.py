"""Drift per scanner: the rolling baseline, the drift event on a synthetic sequence, qc_flagged, the metrics,
the new proto fields through the client, and `mitosis-edge qc report`."""

from __future__ import annotations

import dataclasses
import json
import shutil
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from edge._proto import edge_pb2 as pb
from edge._proto import edge_pb2_grpc as pb_grpc
from edge.analysis.drift import MEASURES_VERSION, HistoryPoint, assess
from edge.analysis.scoring import SlideResult
from edge.client import EdgeClient
from edge.config import QcConfig
from edge.devtools.synth.faults import shift_eosin
from edge.service.daemon import Daemon
from edge.service.metrics import DaemonMetrics
from edge.service.server import RunningServer, start_server
from edge.service.store import Store
from tests.conftest import SynthFactory
from tests.grpc_fakes import FakeControl, insecure_config, slide_result
from tests.test_cli import run_cli
from tests.test_daemon import daemon_config, start_daemon, states, wait_for  # noqa: F401 (start_daemon: a fixture)

H = np.array([0.62, 0.80, 0.30])
E = np.array([0.09, 0.90, 0.42])


def qc_section(eosin: np.ndarray, *, verdict: str = "pass", focus: float = 0.35) -> dict[str, Any]:
    reasons = [] if verdict == "pass" else ["the hotspot is 60% out of focus"]
    return {
        "verdict": verdict, "reasons": reasons, "out_of_focus_fraction": 0.0 if verdict == "pass" else 0.3,
        "fold_fraction": 0.0, "pen_fraction": 0.0, "saturated_fraction": 0.0, "focus_median": focus,
        "hotspot": {"out_of_focus_fraction": 0.0 if verdict == "pass" else 0.6, "fold_fraction": 0.0},
        "stains": {"hematoxylin": list(H / np.linalg.norm(H)), "eosin": list(eosin / np.linalg.norm(eosin))},
    }


def result_with_qc(path: str, qc: dict[str, Any], scanner: str = "aperio/GT450/SN1") -> SlideResult:
    base = slide_result(path)
    slide = {**base.slide, "scanner": {"vendor": "aperio", "model": "GT450", "serial": "SN1", "id": scanner}}
    return dataclasses.replace(base, slide=slide, qc=qc)


def complete(store: Store, path: str, qc: dict[str, Any], scanner: str = "aperio/GT450/SN1") -> int:
    job, _ = store.add_job(path)
    store.claim_next_job()
    store.complete_job(job.job_id, result_with_qc(path, qc, scanner), {"result": f"/out/{job.job_id}.json"},
                       QcConfig())
    return job.job_id


def run_sequence(store: Store, slides: int = 30, change_after: int = 20, shift: float = 8.0) -> list[int]:
    """Slides whose eosin vector jitters a little (as stain batches do) and turns by ``shift`` after slide 20;
    returns the slide numbers that raised drift."""
    rng = np.random.default_rng(5)
    for i in range(1, slides + 1):
        eosin = E * (1 + rng.normal(0, 0.03, 3))
        eosin = shift_eosin(H, eosin, shift if i > change_after else 0.0)
        complete(store, f"/scans/slide-{i:02d}.svs", qc_section(eosin))
    return [int(e.payload["slide_path"][-6:-4]) for e in store.events_after(0) if e.type == "drift"]


def test_a_stain_shift_raises_drift_within_five_slides_and_not_before(store: Store) -> None:
    drifts = run_sequence(store)
    assert len(drifts) == 1 and 20 < drifts[0] <= 25
    event = next(e for e in store.events_after(0) if e.type == "drift")
    assert event.payload["scanner"] == "aperio/GT450/SN1"
    assert "eosin vector moved" in event.payload["message"] and "baseline of" in event.payload["message"]
    outside = [int(r.slide_path[-6:-4]) for r in store.qc_history() if not r.in_band]
    assert outside and min(outside) == 21  # every shifted slide is outside; the baseline keeps the old stain


def test_no_drift_without_a_change_or_before_a_baseline(store: Store) -> None:
    assert run_sequence(store, slides=30, change_after=30) == []
    config = QcConfig()
    few = [HistoryPoint(i, i, {"eosin": list(E)}, True) for i in range(config.baseline_min_slides - 1)]
    assert assess(few, {"eosin": list(shift_eosin(H, E, 30))}, config).in_band  # too early to judge


def test_scanners_have_their_own_baselines(store: Store) -> None:
    for i in range(10):
        complete(store, f"/scans/a-{i}.svs", qc_section(E), scanner="aperio/GT450/SN1")
    shifted = shift_eosin(H, E, 10.0)
    for i in range(10):
        complete(store, f"/scans/b-{i}.svs", qc_section(shifted), scanner="hamamatsu/S360/SN9")
    assert all(r.in_band for r in store.qc_history())
    assert {r.scanner for r in store.qc_history(scanner="hamamatsu/S360/SN9")} == {"hamamatsu/S360/SN9"}


def test_an_upgrade_that_measures_differently_starts_the_baseline_again(store: Store) -> None:
    # Rows stored before this version carry no measures_version: their stain vectors came from another
    # estimate (CMU-1's eosin moved 7°), which is not the scanner drifting.
    old = [HistoryPoint(i, i, {"eosin": list(E), "focus": 0.3}, True) for i in range(20)]
    moved = {"eosin": list(shift_eosin(H, E, 8.0)), "focus": 0.3}
    assert not assess(old, moved, QcConfig()).in_band  # the same measures: outside the band
    upgraded = assess(old, {**moved, "measures_version": MEASURES_VERSION}, QcConfig())
    assert upgraded.in_band and upgraded.baseline_slides == 0 and not upgraded.drift
    for i in range(12):  # the first slides after the upgrade build the new baseline, and drift is judged again
        complete(store, f"/scans/new-{i}.svs", qc_section(E))
    assert all(r.in_band for r in store.qc_history())
    assert store.qc_history()[-1].measures["measures_version"] == MEASURES_VERSION


def test_a_flagged_slide_raises_qc_flagged_before_job_done(store: Store) -> None:
    complete(store, "/scans/blurred.svs", qc_section(E, verdict="rescan"))
    events = [e for e in store.events_after(0) if e.type in ("qc_flagged", "job_done")]
    assert [e.type for e in events] == ["qc_flagged", "job_done"]
    assert events[0].payload["verdict"] == "rescan"
    assert events[0].payload["reasons"] == ["the hotspot is 60% out of focus"]
    assert events[0].payload["hotspot_out_of_focus_fraction"] == 0.6


def test_metrics_count_verdicts_and_drift(store: Store) -> None:
    metrics = DaemonMetrics()
    run_sequence(store)
    for record in store.qc_history():
        metrics.qc([record])
    assert metrics.registry.get_sample_value("mitosis_edge_qc_verdicts_total", {"verdict": "pass"}) == 30
    assert metrics.registry.get_sample_value(
        "mitosis_edge_qc_drift_total", {"scanner": "aperio/GT450/SN1", "measure": "eosin"}) == 1
    assert metrics.registry.get_sample_value("mitosis_edge_qc_out_of_focus_fraction_count") == 30


@pytest.fixture
def server(store: Store, tmp_path: Path) -> Iterator[RunningServer]:
    running = start_server(insecure_config([tmp_path]), FakeControl(store))
    yield running
    running.stop(0.5)


@pytest.fixture
def client(server: RunningServer) -> Iterator[EdgeClient]:
    with EdgeClient(server.address, insecure=True) as opened:
        yield opened


def test_qc_fields_reach_the_client(store: Store, client: EdgeClient, server: RunningServer) -> None:
    job_id = complete(store, "/scans/blurred.svs", qc_section(E, verdict="rescan"))
    result = client.get_result(job_id)
    assert result["qc"]["verdict"] == "rescan" and result["qc"]["reasons"] == ["the hotspot is 60% out of focus"]
    assert result["slide"]["scanner"]["id"] == "aperio/GT450/SN1"
    with grpc.insecure_channel(server.address) as channel:  # the typed fields, as other languages see them
        stub = pb_grpc.EdgeServiceStub(channel)
        raw = stub.GetResult(pb.GetResultRequest(job_id=job_id), timeout=5).result
        assert raw.qc.verdict == "rescan" and raw.qc.hotspot_out_of_focus_fraction == pytest.approx(0.6)
        assert raw.slide.scanner == "aperio/GT450/SN1" and len(raw.qc.eosin_od) == 3
        events = stub.WatchEvents(pb.WatchEventsRequest(after_sequence=0), timeout=5)
        flagged = next(r.event for r in events if r.event.type == "qc_flagged")
        events.cancel()
    assert flagged.qc_verdict == "rescan" and list(flagged.qc_reasons) == ["the hotspot is 60% out of focus"]
    assert flagged.scanner == "aperio/GT450/SN1"


def test_qc_report_draws_each_scanner_with_its_baseline(store: Store, tmp_path: Path) -> None:
    run_sequence(store)
    store.close()
    out = tmp_path / "report"
    result = run_cli("qc", "report", "--data", str(store.path.parent), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "scanner aperio/GT450/SN1: 30 slides" in result.stdout and "drift: eosin vector moved" in result.stdout
    report = json.loads((out / "qc_report.json").read_text())
    series = report["scanners"]["aperio/GT450/SN1"]["series"]
    assert len(series) == 30 and sum(r["drift"] for r in series) == 1
    with Image.open(out / "qc_aperio_GT450_SN1.png") as png:
        assert png.size[0] > 500
    missing = run_cli("qc", "report", "--data", str(store.path.parent), "--scanner", "nope", "--out", str(out))
    assert missing.returncode == 2 and "no scan QC for scanner 'nope'" in missing.stderr
    bad = run_cli("qc", "report", "--data", str(store.path.parent), "--since", "yesterday", "--out", str(out))
    assert bad.returncode == 2 and "--since='yesterday' is not a date" in bad.stderr


def test_qc_report_without_a_store_says_where_it_looked(tmp_path: Path) -> None:
    result = run_cli("qc", "report", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "no store at" in result.stderr



def test_the_daemon_flags_a_blurred_scan_and_counts_it(
    tmp_path: Path, synth_slide: SynthFactory, start_daemon: Callable[..., Daemon]  # noqa: F811 (the fixture)
) -> None:
    daemon = start_daemon(daemon_config(tmp_path, **{"daemon.metrics_listen": "127.0.0.1:0"}))
    shutil.copy(synth_slide(width=3072, height=3072, seed=7102, blur_hotspot=True), tmp_path / "inbox" / "b.tiff")
    wait_for(lambda: states(daemon.store).get("b.tiff") == "done", what="b.tiff done")
    events = [e for e in daemon.store.events_after(0) if e.type in ("qc_flagged", "job_done")]
    assert [e.type for e in events] == ["qc_flagged", "job_done"] and events[0].payload["verdict"] == "rescan"
    result = daemon.store.get_result(events[0].job_id)
    assert result.summary["qc"]["verdict"] == "rescan" and result.summary["qc"]["baseline"]["in_band"]
    scraped = urllib.request.urlopen(f"http://{daemon.metrics_address()}/metrics", timeout=5).read().decode()
    assert 'mitosis_edge_qc_verdicts_total{verdict="rescan"} 1.0' in scraped
    assert "mitosis_edge_qc_out_of_focus_fraction_bucket" in scraped
