"""Issue 12 as an attack script: a submit or read token holder against a real `mitosis-edge serve` with TLS
and tokens (tests/attack_box.py). Each attack is refused with the documented code and a message that
leaks nothing; docs/deployment.md ("Security") has the same table."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge._proto import edge_pb2 as pb
from tests.attack_box import (
    QUICK_ATTACKS,
    SECRET,
    Attack,
    Box,
    attack_loop,
    checkout_env,
    flat,
    leaks,
    mitosis_edge,
    serve_command,
    start_box,
    write_config,
    write_tls,
)
from tests.conftest import SynthFactory

DONE, FAILED, CANCELLED, RUNNING, QUEUED = (pb.JOB_STATE_DONE, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED,
                                            pb.JOB_STATE_RUNNING, pb.JOB_STATE_QUEUED)


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    started = start_box(tmp_path_factory.mktemp("box"))
    try:
        yield started
    finally:
        started.stop()


def copy(slide: Path, to: Path) -> Path:
    to.write_bytes(slide.read_bytes())
    return to


def submit(box: Box, who: str, path: Path | str, **fields: object) -> pb.Job:
    answer = box.call("SubmitSlide", pb.SubmitSlideRequest(slide_path=str(path), **fields), who)
    assert answer.code == "OK", answer.details
    return answer.reply.job


def refused(box: Box, answer: object, code: str, *sent: str) -> str:
    assert answer.code == code, f"{answer.code}: {answer.details}"  # type: ignore[attr-defined]
    details: str = answer.details  # type: ignore[attr-defined]
    assert not leaks(box, details, sent), f"{details!r} leaks {leaks(box, details, sent)}"
    return details


# --- 1: a symlink swapped in after submit is refused when the slide is opened -----------------------------


def test_a_slide_swapped_after_submit_is_checked_again_when_opened(box: Box, synth_slide: SynthFactory) -> None:
    # A slide big enough to keep the only worker busy while the swaps happen; it is cancelled right after.
    blocker = submit(box, "lis", copy(synth_slide(width=6144, height=6144, seed=21), box.scans / "blocker.tiff"))
    box.wait_for_job(blocker.job_id, [RUNNING], timeout=120)  # the only worker is busy: what follows queues
    victim = copy(synth_slide(width=2048, height=1536, seed=22), box.scans / "victim.tiff")
    swapped = copy(synth_slide(width=2048, height=1536, seed=23), box.scans / "swapped.tiff")
    to_link, to_other = submit(box, "lis", victim), submit(box, "lis", swapped)
    link = box.scans / "victim.link"
    link.symlink_to(box.outside / "secret.txt")
    os.replace(link, victim)  # victim.tiff -> /outside/secret.txt
    os.replace(copy(synth_slide(width=2048, height=1536, seed=24), box.scans / "other.tmp"), swapped)
    held = box.call("GetJob", pb.GetJobRequest(job_id=blocker.job_id), "lis").reply.job
    assert held.state == RUNNING, "the blocker finished before the swaps: the test needs a bigger blocker slide"
    box.call("CancelJob", pb.CancelJobRequest(job_id=blocker.job_id), "lis")
    outside = box.wait_for_job(to_link.job_id, [FAILED, DONE])
    changed = box.wait_for_job(to_other.job_id, [FAILED, DONE])
    assert outside.state == FAILED and "leads outside the allowed roots now" in outside.error
    assert changed.state == FAILED and "content changed after the job was queued" in changed.error
    for job in (outside, changed):
        assert not leaks(box, job.error, [str(box.scans)]) and "TOPS" not in job.error
    assert re.search(r"leads outside the allowed roots now \(to '.*/outside/secret.txt'\)", box.log_text())


# --- 2: the watcher follows symlinks only into allowed roots ---------------------------------------------


def test_the_watcher_does_not_follow_a_symlink_out_of_the_inbox(box: Box, synth_slide: SynthFactory) -> None:
    target = copy(synth_slide(width=2048, height=1536, seed=22), box.outside / "slide.tiff")
    (box.inbox / "link.tiff").symlink_to(target)
    deadline = time.monotonic() + 30
    jobs: list[pb.Job] = []
    while not jobs and time.monotonic() < deadline:
        request = pb.ListJobsRequest(slide_path_contains="link.tiff")
        jobs = list(box.call("ListJobs", request, "viewer").reply.jobs)
        time.sleep(0.2)
    [job] = jobs
    assert job.state == FAILED and job.source == "watch" and "watch.symlink_roots" in job.error
    assert not leaks(box, job.error, [str(box.inbox / "link.tiff")])


# --- 3, 4, 5, 8, 10: refused at once, leaking nothing ----------------------------------------------------


@pytest.mark.parametrize("attack", QUICK_ATTACKS, ids=[a.name for a in QUICK_ATTACKS])
def test_each_quick_attack_is_refused_with_its_code_and_leaks_nothing(box: Box, attack: Attack) -> None:
    answer = attack(box)
    details = refused(box, answer, attack.expected, *attack.sent)
    assert len(details) < 600


def test_refusals_name_the_problem_in_the_callers_terms(box: Box) -> None:
    details = QUICK_ATTACKS[1](box).details
    assert details.startswith("slide_path '/proc/self/fd/1' is outside the allowed roots")
    flood = next(a for a in QUICK_ATTACKS if a.expected == "RESOURCE_EXHAUSTED")
    assert "server.max_streams_per_caller" in flood(box).details
    bundle = box.call("SubmitSlide", pb.SubmitSlideRequest(slide_path=str(box.scans / "probe.svs"), bundle="evil"),
                      "lis").details
    assert "not one this server allows; choose one of: demo" in bundle
    huge = box.call("SubmitSlide", pb.SubmitSlideRequest(slide_path="/x", bundle="b" * 15_000_000), "lis")
    assert huge.code == "INVALID_ARGUMENT" and huge.details == "bundle has 15000000 characters; at most 64 are accepted"
    assert max(len(line) for line in box.log_text().splitlines()) < 2000  # nothing echoed whole into the log
    assert re.search(r"refused SubmitSlide to 'lis': PERMISSION_DENIED: slide_path '/.*' is outside "
                     r"the allowed roots .* \(it resolves to '/.*'\)", box.log_text())  # the details: log only


@pytest.mark.parametrize("mpp", [1e-300, 5e-324, -0.25, float("nan"), 1e6])
def test_an_implausible_mpp_override_is_refused_at_submit(box: Box, mpp: float) -> None:
    answer = box.call("SubmitSlide", pb.SubmitSlideRequest(slide_path=str(box.scans / "probe.svs"),
                                                           mpp_override=mpp), "lis")
    assert "between 0.01 and 100.0" in refused(box, answer, "INVALID_ARGUMENT")


def test_junk_without_a_token_gives_one_warning_line_and_no_traceback(box: Box) -> None:
    junk = next(a for a in QUICK_ATTACKS if a.name.startswith("junk"))
    before = box.log_text()
    for _ in range(30):
        assert junk(box).code == "UNAUTHENTICATED"
    time.sleep(0.5)
    new = box.log_text()[len(before):]
    assert "Traceback" not in new and "ERROR" not in new
    assert new.count("without a valid token") <= 1  # at most one line a minute, counting the calls


# --- 6: file names cannot forge log lines ------------------------------------------------------------------


def test_a_file_name_with_a_newline_cannot_forge_a_log_line(box: Box) -> None:
    forged = "2026-11-29 10:00:00,000 ERROR edge.service.daemon: job 1 done: hotspot mitotic count 0"
    (box.inbox / f"evil\n{forged}.tiff").write_bytes(b"II*\x00 not really a slide")
    deadline = time.monotonic() + 30
    while "evil\\n2026" not in box.log_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    text = box.log_text()
    assert "evil\\n2026-11-29 10:00:00,000 ERROR" in text
    assert not any(line.startswith(forged) for line in text.splitlines())


# --- 7 and 9: request ids per caller; who cancels what, stored and logged ----------------------------------


def test_request_ids_are_per_caller_and_a_reuse_with_other_parameters_names_the_job(
    box: Box, synth_slide: SynthFactory
) -> None:
    a = copy(synth_slide(width=2048, height=1536, seed=22), box.scans / "rid-a.tiff")
    b = copy(synth_slide(width=2048, height=1536, seed=23), box.scans / "rid-b.tiff")
    first = submit(box, "lis", a, request_id="order-1", priority=-5)
    assert submit(box, "lis", a, request_id="order-1", priority=-5).job_id == first.job_id  # a retry
    other = box.call("SubmitSlide", pb.SubmitSlideRequest(slide_path=str(b), request_id="order-1", priority=-5), "lis")
    details = refused(box, other, "ALREADY_EXISTS", str(a), str(b))
    assert f"already created job {first.job_id}" in details and "slide_path" in details
    theirs = submit(box, "ris", a, request_id="order-1", priority=-5)  # another caller's key space
    assert theirs.job_id != first.job_id
    for job in (first, theirs):
        box.call("CancelJob", pb.CancelJobRequest(job_id=job.job_id), "desk")


def test_only_the_submitter_or_an_admin_cancels_and_both_are_recorded(box: Box, synth_slide: SynthFactory) -> None:
    slide = copy(synth_slide(width=2048, height=1536, seed=22), box.scans / "cancel.tiff")
    jobs = [submit(box, "lis", slide, priority=-9) for _ in range(3)]
    assert {j.submitted_by for j in jobs} == {"lis"}
    answer = box.call("CancelJob", pb.CancelJobRequest(job_id=jobs[0].job_id), "ris")
    details = refused(box, answer, "PERMISSION_DENIED")
    assert details == (f"job {jobs[0].job_id} was submitted by 'lis'; a submit token cancels only its own jobs, "
                       "cancelling another caller's needs a token with role admin")
    watched = box.call("ListJobs", pb.ListJobsRequest(slide_path_contains="link.tiff"), "viewer").reply.jobs
    if watched:
        answer = box.call("CancelJob", pb.CancelJobRequest(job_id=watched[0].job_id), "lis")
        assert "submitted by the watcher" in refused(box, answer, "PERMISSION_DENIED")
    own = box.call("CancelJob", pb.CancelJobRequest(job_id=jobs[0].job_id), "lis").reply.job
    by_admin = box.call("CancelJob", pb.CancelJobRequest(job_id=jobs[1].job_id), "desk").reply.job
    assert (own.state, own.cancelled_by) == (CANCELLED, "lis")
    assert (by_admin.state, by_admin.submitted_by, by_admin.cancelled_by) == (CANCELLED, "lis", "desk")
    box.call("CancelJob", pb.CancelJobRequest(job_id=jobs[2].job_id), "desk")
    log = box.log_text()
    assert f"job {jobs[0].job_id} submitted over the API by 'lis'" in log
    assert f"job {jobs[1].job_id} cancelled over the API by 'desk'" in log
    assert f"refused CancelJob to 'ris': PERMISSION_DENIED: job {jobs[0].job_id} was submitted by 'lis'" in log
    token, ca = box.root / "lis.token", box.root / "tls" / "ca.pem"
    token.write_text("lis-submit-token-0123456789abcdef\n")
    ca.write_bytes(box.ca)
    listed = subprocess.run(
        [*mitosis_edge(), "client", "--server", f"127.0.0.1:{box.port}", "--ca", str(ca), "--token-file", str(token),
         "list", "--contains", "cancel.tiff"],
        capture_output=True, text=True, timeout=60, check=False, env=checkout_env(),
    )
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"cancelled\s.*\slis\s+/.*cancel\.tiff\s+\(cancelled by desk\)", listed.stdout), listed.stdout




# --- 10: the server certificate is checked at start ---------------------------------------------------------


@pytest.mark.parametrize(("problem", "message"), [
    ({"valid_days": -2}, r"server\.tls_cert=.* expired on 20\d\d-\d\d-\d\d .*renew it"),
    ({"mismatched_key": True}, r"server\.tls_key=.* does not belong to the certificate server\.tls_cert="),
])
def test_an_expired_or_mismatched_certificate_stops_the_start_with_its_name(
    tmp_path: Path, problem: dict[str, object], message: str
) -> None:
    cert, key, _ = write_tls(tmp_path, **problem)  # type: ignore[arg-type]
    (tmp_path / "inbox").mkdir()
    command = serve_command(tmp_path, write_config(tmp_path, cert, key))
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, env=checkout_env())
    assert result.returncode == 2 and re.search(message, result.stderr), result.stderr
    assert "Failed to bind" not in result.stderr


# --- the loop: RSS and GetServerStatus p99 stay flat -----------------------------------------------------


@pytest.mark.slow
def test_a_short_attack_loop_keeps_rss_and_status_latency_flat(box: Box) -> None:
    report = attack_loop(box, seconds=6.0, warmup_s=1.0)
    assert report["wrong_count"] == 0, report["wrong_answers"]
    assert report["attacks"] > 20 and report["status_calls"] > 20
    assert not flat(report), report
    assert SECRET.decode().strip() not in box.log_text()
