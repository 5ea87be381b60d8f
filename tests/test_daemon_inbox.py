"""Issue 11's inbox, end to end: one `mitosis-edge serve` with default settings (short timeouts only) gets
every hard input at once. Each bad one ends failed with its reason (or done: no mitoses, no tissue), both
good slides are done, nothing hangs, and SIGTERM exits 0 within the grace period."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge.service.store import Store
from tests.conftest import SynthFactory, data_file
from tests.test_analyze import blank_tiff
from tests.test_daemon import wait_for
from tests.tiff_bomb import write_bomb

GRACE_S = 10.0
CONFIG = f"""
[watch]
quiet_period_s = 0.5
poll_interval_s = 0.2
unreadable_timeout_s = 3.0
[stream]
reader_threads = 2
[daemon]
min_free_disk_mb = 0
retry_backoff_s = 0.1
shutdown_grace_s = {GRACE_S}
"""


def health(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_one_inbox_of_hard_slides_each_ends_with_its_outcome_and_sigterm_exits_0(
    tmp_path: Path, synth_slide: SynthFactory
) -> None:
    inbox, data, staging = tmp_path / "inbox", tmp_path / "data", tmp_path / "staging"
    for folder in (inbox, staging):
        folder.mkdir()
    good = [synth_slide(width=2048, height=1536, seed=s) for s in (3, 4)]
    shutil.copy(good[0], staging / "good-1.tiff")
    shutil.copy(good[1], staging / "good-2.tiff")
    shutil.copy(synth_slide(width=2048, height=2048, seed=5, mitoses=0, imposters=0), staging / "zero.tiff")
    blank_tiff(staging / "blank.tiff")
    shutil.copy(data_file("wsi/highdicom-sm-50px.dcm"), staging / "highdicom-sm-50px.dcm")
    shutil.copy(data_file("wsi/broken.svs"), staging / "broken.svs")
    svs = data_file("wsi/CMU-1-Small-Region.svs").read_bytes()
    (staging / "truncated.svs").write_bytes(svs[: len(svs) // 2])
    write_bomb(staging / "bomb.tiff")
    (tmp_path / "edge.toml").write_text(CONFIG)
    log_file = tmp_path / "serve.log"
    exe = shutil.which("mitosis-edge")
    cmd = [exe] if exe else [sys.executable, "-m", "edge"]
    with log_file.open("a") as log:
        process = subprocess.Popen(
            [*cmd, "--config", str(tmp_path / "edge.toml"), "serve", "--watch", str(inbox), "--data", str(data),
             "--listen", "127.0.0.1:0", "--insecure", "--metrics", ""], stdout=log, stderr=log, text=True,
        )
    started = time.monotonic()
    try:
        wait_for(lambda: "gRPC on 127.0.0.1:" in log_file.read_text(), timeout=60, what="serving")
        address = re.findall(r"gRPC on (127\.0\.0\.1:\d+)", log_file.read_text())[0]
        for file in staging.iterdir():  # everything lands at once, as a scanner's batch would
            os.replace(file, inbox / file.name)
        (inbox / "sub").mkdir()
        os.mkfifo(inbox / "sub" / "x.dcm")
        expected = {"good-1.tiff", "good-2.tiff", "zero.tiff", "blank.tiff", "highdicom-sm-50px.dcm",
                    "broken.svs", "truncated.svs", "bomb.tiff", "x.dcm"}

        def outcomes() -> dict[str, tuple[str, str]]:
            with Store.open(data / "edge.db") as store:
                jobs = store.list_jobs(limit=100)
            return {Path(j.slide_path).name: (j.state, j.error or "") for j in jobs if j.state in ("done", "failed")}

        wait_for(lambda: expected <= set(outcomes()), timeout=120, what="an outcome for every slide")
        seconds = time.monotonic() - started
        with Store.open(data / "edge.db") as store:
            paths = [Path(j.slide_path) for j in store.list_jobs(limit=100)]
        assert inbox not in paths and inbox / "sub" not in paths  # a watched folder is never a slide
        result = outcomes()
        for name in ("good-1.tiff", "good-2.tiff", "zero.tiff", "blank.tiff"):
            assert result[name][0] == "done", (name, result[name])
        assert result["highdicom-sm-50px.dcm"][0] == "done" or result["highdicom-sm-50px.dcm"][1]
        for name, reason in (("x.dcm", "named pipe (FIFO)"), ("broken.svs", "unreadable_timeout_s=3"),
                             ("truncated.svs", "truncated.svs"), ("bomb.tiff", "bomb.tiff")):
            assert result[name][0] == "failed" and reason in result[name][1], (name, result[name])
        assert len(paths) == len(expected)  # one job each: nothing retried into a second job
        assert health(address) == "SERVING"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=GRACE_S + 20) == 0
    finally:
        process.kill()
        process.wait()
    assert "mitosis-edge stopped" in log_file.read_text()
    print(f"inbox of {len(expected)} slides: every outcome after {seconds:.1f} s")
