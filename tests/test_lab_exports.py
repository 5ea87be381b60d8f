"""Results reach the lab: export files fetched over the API with the right permissions, case accession
numbers from the submit or the path, and the not-for-diagnosis notice and plausibility flags in GetResult."""

from __future__ import annotations

import json
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from edge.cli import main
from edge.client import EdgeClient, EdgeClientError
from edge.config import Config
from edge.service.daemon import Daemon
from tests import test_daemon
from tests.conftest import SynthFactory, data_file
from tests.test_daemon import daemon_config, states, wait_for

start_daemon = test_daemon.start_daemon  # the fixture, shared with the daemon's tests

PATTERN = r"(?P<accession>S\d{2}-\d{4})"


def client_of(daemon: Daemon) -> EdgeClient:
    assert daemon.server is not None
    return EdgeClient(daemon.server.address, insecure=True, retries=0)


def test_exports_are_group_readable_named_for_the_slide_and_fetched_through_the_client(
    tmp_path: Path, synth_slide: SynthFactory, start_daemon: Callable[..., Daemon], capsys: pytest.CaptureFixture[str]
) -> None:
    config = daemon_config(
        tmp_path, **{"watch.accession_pattern": PATTERN, "daemon.isolation": "thread", "daemon.export_mode": "0640"}
    )
    daemon = start_daemon(config)
    shutil.copy(synth_slide(width=2048, height=1536, seed=3), tmp_path / "inbox" / "S24-0042_HE.tiff")
    wait_for(lambda: states(daemon.store).get("S24-0042_HE.tiff") == "done", what="the slide done")
    (job,) = daemon.store.list_jobs()
    folder = daemon.results_dir / f"{job.job_id}-S24-0042_HE"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o640}

    with client_of(daemon) as client:
        assert [j["job_id"] for j in client.list_jobs(accession="S24-0042")] == [job.job_id]
        assert client.list_jobs(accession="S24-9999") == []
        result = client.get_result(job.job_id)
        assert result["accession"] == "S24-0042"
        assert "not for diagnosis" in result["notice"].lower()  # the demo bundle
        written = client.export(job.job_id, tmp_path / "ws")
    assert sorted(written) == sorted(result["exports"])
    for kind, path in written.items():
        assert path.read_bytes() == Path(result["exports"][kind]).read_bytes()

    assert main(["client", "--server", daemon.server.address, "--insecure", "export", str(job.job_id),
                 "--out", str(tmp_path / "cli"), "--name", "overlay"]) == 0
    assert (tmp_path / "cli" / "overlay.png").read_bytes() == Path(result["exports"]["overlay"]).read_bytes()
    assert "overlay" in capsys.readouterr().out
    assert main(["client", "--server", daemon.server.address, "--insecure", "get", str(job.job_id)]) == 0
    shown = capsys.readouterr().out
    assert "[S24-0042]" in shown and "NOTICE" in shown and "NOT for diagnosis" in shown
    assert "bundle                 demo" in shown and "flag " in shown
    assert main(["client", "--server", daemon.server.address, "--insecure", "status"]) == 0
    assert "intended use  demonstration and tests only" in capsys.readouterr().out


def test_export_names_are_only_the_jobs_own_files_and_size_is_limited(
    tmp_path: Path, synth_slide: SynthFactory, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon(
        daemon_config(tmp_path, **{"watch.folders": [], "daemon.isolation": "thread", "server.max_export_mb": 1,
                                   "server.allowed_roots": [str(tmp_path)]})
    )
    slide = tmp_path / "slide.tiff"
    shutil.copy(synth_slide(width=2048, height=1536, seed=3), slide)
    first = daemon.submit_slide(slide)
    second = daemon.submit_slide(slide)
    wait_for(lambda: all(daemon.store.get_job(j.job_id).state == "done" for j in (first, second)), what="done")
    other = Path(daemon.store.get_result(second.job_id).exports["csv"])
    with client_of(daemon) as client:
        for name in (str(other), f"../{other.parent.name}/detections.csv", "/etc/passwd", "edge.db", ""):
            with pytest.raises(EdgeClientError) as refused:
                client.fetch_export(first.job_id, name, tmp_path / "out")
            assert refused.value.code == "NOT_FOUND" and "its exports: csv, geojson" in refused.value.message
        with pytest.raises(EdgeClientError, match="no job 99"):
            client.fetch_export(99, "result", tmp_path / "out")
        big = Path(daemon.store.get_result(first.job_id).exports["csv"])
        big.write_bytes(b"x" * (2 * 2**20))
        with pytest.raises(EdgeClientError, match=r"more than server.max_export_mb=1") as too_big:
            client.fetch_export(first.job_id, "detections.csv", tmp_path / "out")
        assert too_big.value.code == "RESOURCE_EXHAUSTED"
        assert client.fetch_export(first.job_id, "result.json", tmp_path / "out").name == "result.json"
    assert not (tmp_path / "out" / "detections.csv").exists()


def test_a_submitted_accession_and_labels_are_stored_listed_and_on_every_event(
    tmp_path: Path, synth_slide: SynthFactory, start_daemon: Callable[..., Daemon]
) -> None:
    def analyze(*args: object) -> None:
        raise ValueError("not analysed in this test")

    daemon = start_daemon(
        daemon_config(tmp_path, **{"watch.folders": [], "server.allowed_roots": [str(tmp_path)],
                                   "watch.accession_pattern": PATTERN}),
        analyze=analyze,
    )
    slide = tmp_path / "S24-0001.tiff"
    shutil.copy(synth_slide(width=2048, height=1536, seed=3), slide)
    with client_of(daemon) as client:
        given = client.submit(slide, accession="H26-777", labels=["study-7", "PHH3"])
        from_path = client.submit(slide)
        assert (given["accession"], given["labels"]) == ("H26-777", ["study-7", "PHH3"])
        assert from_path["accession"] == "S24-0001"
        assert [j["job_id"] for j in client.list_jobs(accession="H26-777")] == [given["job_id"]]
        events = client.watch_events(0, reconnect=False, timeout=5.0)
        by_job: dict[int, set[str | None]] = {}
        try:
            for event in events:
                by_job.setdefault(event["job_id"], set()).add(event["accession"])
                if event["job_id"] == from_path["job_id"] and event["type"] == "job_failed":
                    break
        finally:
            events.cancel()
        assert by_job == {given["job_id"]: {"H26-777"}, from_path["job_id"]: {"S24-0001"}}
        with pytest.raises(EdgeClientError, match="at most 64") as refused:
            client.submit(slide, accession="A" * 65)
        assert refused.value.code == "INVALID_ARGUMENT"
        with pytest.raises(EdgeClientError, match="printable"):
            client.submit(slide, labels=["bad\nlabel"])


def test_a_daemon_job_without_mpp_says_how_to_submit_it_with_one(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon(daemon_config(tmp_path, **{"watch.folders": [], "daemon.isolation": "thread"}))
    slide = tmp_path / "no-mpp.svs"
    shutil.copy(data_file("wsi/tcga-cr-7395-01a-01-ts1.svs"), slide)
    job = daemon.submit_slide(slide)
    wait_for(lambda: daemon.store.get_job(job.job_id).state == "failed", what="the job failed")
    error = daemon.store.get_job(job.job_id).error or ""
    assert f"mitosis-edge client submit {slide} --mpp" in error and "watch.folder_mpp" in error
    assert "pass --mpp" not in error  # analyze's flag means nothing to a daemon user


def test_the_demo_bundle_on_the_real_cmu_slide_is_flagged_not_just_scored(tmp_path: Path) -> None:
    slide = data_file("wsi/CMU-1-Small-Region.svs")
    assert main(["analyze", str(slide), "--out", str(tmp_path), "--threads", "2"]) == 0
    data = json.loads((tmp_path / "result.json").read_text(encoding="utf-8"))
    assert list(data)[:3] == ["schema", "notice", "flags"] and "NOT for diagnosis" in data["notice"]
    flags = {f["code"]: f for f in data["flags"]}
    assert flags["upsampled"]["value"] == pytest.approx(0.499 / 0.25, rel=0.01)
    assert flags["field_larger_than_tissue"]["value"] < 2.0
    assert 0.0 < flags["hotspot_outside_slide"]["value"] < 1.0
    geojson = json.loads((tmp_path / "detections.geojson").read_text(encoding="utf-8"))
    for feature in geojson["features"]:
        if feature["geometry"]["type"] == "Polygon":
            ring = feature["geometry"]["coordinates"][0]
            assert min(min(x, y) for x, y in ring) >= 0.0
            assert max(x for x, _ in ring) <= 2220 and max(y for _, y in ring) <= 2967


def test_a_folder_mpp_rule_gives_watched_slides_of_an_mpp_less_scanner_their_pixel_size(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    seen: list[float | None] = []

    def analyze(path: Path, config: Config, *rest: object) -> None:
        seen.append(config.slide.mpp_override)
        raise ValueError("not analysed in this test")

    old_scanner = tmp_path / "inbox" / "old-20x"
    old_scanner.mkdir(parents=True)
    config = daemon_config(tmp_path, **{"watch.folder_mpp": [f"{old_scanner}=0.5"], "daemon.max_attempts": 1})
    daemon = start_daemon(config, analyze=analyze)
    shutil.copy(data_file("wsi/tcga-cr-7395-01a-01-ts1.svs"), old_scanner / "no-mpp.svs")
    wait_for(lambda: states(daemon.store).get("no-mpp.svs") == "failed", what="the slide tried")
    (job,) = daemon.store.list_jobs()
    assert job.mpp_override == 0.5 and seen == [0.5]


def test_folder_mpp_rules_are_checked_and_the_most_specific_wins() -> None:
    from edge.config import WatchConfig
    from edge.errors import ConfigError

    watch = WatchConfig(folder_mpp=("/scans=0.25", "/scans/old=0.5"))
    assert watch.mpp_for(Path("/scans/old/a.svs")) == 0.5 and watch.mpp_for(Path("/scans/b.svs")) == 0.25
    assert watch.mpp_for(Path("/elsewhere/c.svs")) is None
    for bad in ("scans=0.5", "/scans=fast", "/scans=0", "/scans"):
        with pytest.raises(ConfigError, match="FOLDER=MPP"):
            WatchConfig(folder_mpp=(bad,)).validate()
