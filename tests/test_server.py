"""The gRPC server: every RPC through a real server on port 0, auth, TLS and mutual TLS, allowed roots,
status codes for malformed requests, health and reflection, event streams that lose nothing."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from edge._proto import edge_pb2 as pb
from edge._proto import edge_pb2_grpc as pb_grpc
from edge.config import ServerConfig
from edge.errors import ConfigError
from edge.service.server import LAST_SEQUENCE_KEY, SERVICE_NAME, RunningServer, start_server
from edge.service.server.auth import RequestRefused, parse_tokens, required_role, resolve_submit_path
from edge.service.store import Store
from tests.grpc_fakes import (
    READ_TOKEN,
    SUBMIT_TOKEN,
    FakeControl,
    figures,
    insecure_config,
    process_next,
    slide_result,
    write_tokens,
)
from tests.tls_certs import TestCA

Maker = Callable[..., RunningServer]


@pytest.fixture
def scans(tmp_path: Path) -> Path:
    root = tmp_path / "scans"
    (root / "case-1").mkdir(parents=True)
    for name in ("a.svs", "b.svs", "case-1/c.tiff"):
        (root / name).write_bytes(b"not really a slide")
    return root


@pytest.fixture
def control(store: Store, scans: Path) -> FakeControl:
    return FakeControl(store, watch_folders=[str(scans)])


@pytest.fixture
def make_server(control: FakeControl, scans: Path) -> Iterator[Maker]:
    """start(config=None, control=None, **kwargs) -> a server; all are stopped after the test."""
    started: list[RunningServer] = []

    def start(config: ServerConfig | None = None, ctl: Any = None, **kwargs: Any) -> RunningServer:
        running = start_server(config or insecure_config([scans]), ctl or control, **kwargs)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop(0.5)


@pytest.fixture
def channels() -> Iterator[Callable[..., grpc.Channel]]:
    opened: list[grpc.Channel] = []

    def open_channel(address: str, credentials: Any = None, options: Any = None) -> grpc.Channel:
        channel = (
            grpc.secure_channel(address, credentials, options=options)
            if credentials is not None
            else grpc.insecure_channel(address, options=options)
        )
        opened.append(channel)
        return channel

    yield open_channel
    for channel in opened:
        channel.close()


@pytest.fixture
def server(make_server: Maker) -> RunningServer:
    return make_server()


@pytest.fixture
def stub(server: RunningServer, channels: Callable[..., grpc.Channel]) -> pb_grpc.EdgeServiceStub:
    return pb_grpc.EdgeServiceStub(channels(server.address))


def rpc_error(call: Callable[..., Any], *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    return info.value


def collect_events(stub: pb_grpc.EdgeServiceStub, after: int, count: int, **kwargs: Any) -> list[int]:
    call = stub.WatchEvents(pb.WatchEventsRequest(after_sequence=after), **kwargs)
    sequences = []
    try:
        for reply in call:
            sequences.append(reply.event.sequence)
            if len(sequences) == count:
                break
    finally:
        call.cancel()
    return sequences


# --- start-up and configuration ------------------------------------------------------------------


def test_refuses_to_start_without_tls_or_an_explicit_insecure(control: FakeControl) -> None:
    with pytest.raises(ConfigError, match=r"server\.tls_cert.*server\.insecure = true"):
        start_server(ServerConfig(listen="127.0.0.1:0"), control)


def test_refuses_a_port_in_use_and_names_the_setting(server: RunningServer, control: FakeControl) -> None:
    with pytest.raises(ConfigError, match=r"server\.listen='127\.0\.0\.1:\d+'"):
        start_server(insecure_config(listen=server.address), control)


def test_missing_tls_files_and_bad_tokens_files_name_the_setting(tmp_path: Path, control: FakeControl) -> None:
    config = ServerConfig(listen="127.0.0.1:0", tls_cert=str(tmp_path / "no.pem"), tls_key=str(tmp_path / "no.key"))
    with pytest.raises(ConfigError, match=r"server\.tls_cert="):
        start_server(config, control)
    with pytest.raises(ConfigError, match=r"server\.tokens_file="):
        start_server(insecure_config(tokens_file=str(tmp_path / "missing")), control)
    bad = tmp_path / "tokens"
    bad.write_text("short read\nabcdefghijklmnopqrstuvwxyz owner\n")
    with pytest.raises(ConfigError, match=r"line 1: token of 5 characters.*line 2: role 'owner'"):
        start_server(insecure_config(tokens_file=str(bad)), control)


def test_insecure_on_a_network_address_warns(make_server: Maker, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edge.service.server"):
        running = make_server(insecure_config(listen="0.0.0.0:0"))
    assert running.port > 0
    assert any("without TLS" in r.getMessage() for r in caplog.records)


def test_default_listen_address_is_loopback() -> None:
    assert ServerConfig().listen.startswith("127.0.0.1:")


# --- every RPC -----------------------------------------------------------------------------------


def test_submit_get_list_cancel(stub: pb_grpc.EdgeServiceStub, scans: Path, control: FakeControl) -> None:
    reply = stub.SubmitSlide(pb.SubmitSlideRequest(slide_path=str(scans / "a.svs"), priority=5, mpp_override=0.25))
    job = reply.job
    assert job.job_id > 0 and job.state == pb.JOB_STATE_QUEUED and job.priority == 5 and job.source == "submit"
    assert job.mpp_override == 0.25 and not job.HasField("started_at")
    assert control.submitted == [scans / "a.svs"]
    second = stub.SubmitSlide(pb.SubmitSlideRequest(slide_path=str(scans / "case-1" / "c.tiff"))).job

    got = stub.GetJob(pb.GetJobRequest(job_id=job.job_id)).job
    assert got == job
    listed = stub.ListJobs(pb.ListJobsRequest()).jobs
    assert [j.job_id for j in listed] == [job.job_id, second.job_id]
    newest = stub.ListJobs(pb.ListJobsRequest(newest_first=True, page_size=1))
    assert [j.job_id for j in newest.jobs] == [second.job_id] and newest.next_page_token
    rest = stub.ListJobs(pb.ListJobsRequest(newest_first=True, page_size=1, page_token=newest.next_page_token))
    assert [j.job_id for j in rest.jobs] == [job.job_id] and not rest.next_page_token
    assert [j.job_id for j in stub.ListJobs(pb.ListJobsRequest(slide_path_contains="case-1")).jobs] == [second.job_id]

    cancelled = stub.CancelJob(pb.CancelJobRequest(job_id=second.job_id)).job
    assert cancelled.state == pb.JOB_STATE_CANCELLED and cancelled.HasField("finished_at")
    only = stub.ListJobs(pb.ListJobsRequest(states=[pb.JOB_STATE_CANCELLED])).jobs
    assert [j.job_id for j in only] == [second.job_id]
    err = rpc_error(stub.CancelJob, pb.CancelJobRequest(job_id=second.job_id))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "cancelled" in err.details()


def test_list_jobs_pages_through_everything(stub: pb_grpc.EdgeServiceStub, store: Store) -> None:
    ids = [store.add_job(f"/scans/{i}.svs", dedupe=False)[0].job_id for i in range(7)]
    seen, token = [], ""
    while True:
        reply = stub.ListJobs(pb.ListJobsRequest(page_size=3, page_token=token))
        seen += [j.job_id for j in reply.jobs]
        token = reply.next_page_token
        if not token:
            break
    assert seen == ids


def test_get_result_by_job_and_by_fingerprint(stub: pb_grpc.EdgeServiceStub, store: Store) -> None:
    job, _ = store.add_job("/scans/a.svs", fingerprint="sha256:aa")
    process_next(store)
    expected = slide_result("/scans/a.svs").scores
    for request in (pb.GetResultRequest(job_id=job.job_id), pb.GetResultRequest(fingerprint="sha256:aa")):
        result = stub.GetResult(request).result
        assert result.job_id == job.job_id and result.fingerprint == "sha256:aa"
        scores = result.scores
        assert scores.mitotic_count == expected.hotspot.counts.mitotic == scores.hotspot.counts.mitotic == 4
        assert scores.hotspot.counts.atypical == 1 and scores.hotspot.counts.normal == 2
        assert scores.hotspot.counts.atypical_ratio == pytest.approx(0.5)
        assert scores.totals.uncertain == 1 and scores.candidates == 5
        assert scores.mitotic_density_per_mm2 == pytest.approx(1.0) and scores.tissue_area_mm2 == 4.0
        assert not scores.hotspot.HasField("tissue_fraction")
        assert scores.mitotic_score_hint.HasField("score") and len(scores.mitotic_score_hint.cutoffs) == 2
        assert result.slide.width == 4000 and result.slide.mpp_x == 0.25
        assert result.provenance.bundle_name == "demo" and result.provenance.backend == "onnxruntime"
        assert result.provenance.package_version == "0.1.0" and result.provenance.bundle_version == "1.0.0"
        assert set(result.exports) == {"result", "csv"} and result.detections == 5
        import json

        assert json.loads(result.summary_json)["scores"] == expected.to_json_dict()


def test_get_result_of_an_unfinished_or_unknown_job_is_not_found(stub: pb_grpc.EdgeServiceStub, store: Store) -> None:
    job, _ = store.add_job("/scans/a.svs")
    err = rpc_error(stub.GetResult, pb.GetResultRequest(job_id=job.job_id))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "queued" in err.details()
    err = rpc_error(stub.GetResult, pb.GetResultRequest(job_id=999))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "999" in err.details()
    err = rpc_error(stub.GetResult, pb.GetResultRequest(fingerprint="sha256:none"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error(stub.GetJob, pb.GetJobRequest(job_id=999)).code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error(stub.CancelJob, pb.CancelJobRequest(job_id=999)).code() == grpc.StatusCode.NOT_FOUND


def test_list_detections_filters_by_class_and_probability(stub: pb_grpc.EdgeServiceStub, store: Store) -> None:
    many = figures() * 120  # 600 detections: more than one batch
    job, _ = store.add_job("/scans/a.svs")
    process_next(store, figs=many)

    def detections(**kwargs: Any) -> list[Any]:
        replies = stub.ListDetections(pb.ListDetectionsRequest(job_id=job.job_id, **kwargs))
        return [d for reply in replies for d in reply.detections]

    everything = detections()
    assert len(everything) == 600
    assert [d.x_px for d in everything[:5]] == [f.x_px for f in figures()]
    first = everything[0]
    assert first.detection_class == pb.DETECTION_CLASS_NORMAL and first.p_atypical == pytest.approx(0.02)
    assert dict(first.scores) == {"mitotic:m": pytest.approx(0.95)}
    assert not everything[4].HasField("p_atypical") and everything[4].detection_class == pb.DETECTION_CLASS_NON_MITOTIC
    atypical = detections(classes=[pb.DETECTION_CLASS_ATYPICAL])
    assert len(atypical) == 120 and {d.detection_class for d in atypical} == {pb.DETECTION_CLASS_ATYPICAL}
    assert len(detections(min_p_mitotic=0.92)) == 240  # 0.95 and 0.97
    assert len(detections(offset=590)) == 10
    err = rpc_error(stub.ListDetections, pb.ListDetectionsRequest(job_id=job.job_id, min_p_mitotic=1.5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "min_p_mitotic" in err.details()
    queued, _ = store.add_job("/scans/b.svs")
    err = rpc_error(stub.ListDetections, pb.ListDetectionsRequest(job_id=queued.job_id))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_server_status(stub: pb_grpc.EdgeServiceStub, store: Store, scans: Path) -> None:
    store.add_job("/scans/a.svs")
    status = stub.GetServerStatus(pb.GetServerStatusRequest())
    assert status.version == "0.1.0" and status.backend == "onnxruntime" and status.gpu == ""
    assert [(e.name, e.role, e.cache_key) for e in status.engines][1] == ("densenet", "mitotic", "sha256:abc")
    assert status.ready and status.queue_depth == 1 and status.running == 0 and status.uptime_s >= 0
    assert list(status.watch_folders) == [str(scans)] and status.bundle == "demo 1.0.0"
    assert dict(status.jobs_by_state)["queued"] == 1 and status.last_sequence == 1


def test_submit_with_the_same_request_id_queues_once(stub: pb_grpc.EdgeServiceStub, scans: Path) -> None:
    request = pb.SubmitSlideRequest(slide_path=str(scans / "a.svs"), request_id="retry-me")
    first, again = stub.SubmitSlide(request).job, stub.SubmitSlide(request).job
    assert first.job_id == again.job_id
    assert stub.SubmitSlide(pb.SubmitSlideRequest(slide_path=str(scans / "a.svs"))).job.job_id != first.job_id


# --- allowed roots -------------------------------------------------------------------------------


def test_submit_refuses_paths_outside_the_roots(stub: pb_grpc.EdgeServiceStub, scans: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.svs"
    secret.write_bytes(b"x")
    (scans / "escape.svs").symlink_to(secret)
    (scans / "linked-dir").symlink_to(tmp_path, target_is_directory=True)
    for path in (
        str(scans / ".." / "secret.svs"),
        str(scans / "escape.svs"),
        str(scans / "linked-dir" / "secret.svs"),
        "/etc/passwd",
        str(tmp_path / "scans-sibling" / "x.svs"),  # a prefix of the root's name is not inside it
    ):
        err = rpc_error(stub.SubmitSlide, pb.SubmitSlideRequest(slide_path=path))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, path
        assert "outside the allowed roots" in err.details()
    cases = {
        "": (grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        "scans/a.svs": (grpc.StatusCode.INVALID_ARGUMENT, "relative"),
        str(scans / "missing.svs"): (grpc.StatusCode.NOT_FOUND, "does not exist"),
        str(scans) + "/a.svs\x00.txt": (grpc.StatusCode.INVALID_ARGUMENT, "NUL"),
    }
    for path, (code, words) in cases.items():
        err = rpc_error(stub.SubmitSlide, pb.SubmitSlideRequest(slide_path=path))
        assert err.code() == code and words in err.details(), path


def test_a_symlink_inside_the_roots_that_stays_inside_is_accepted(
    stub: pb_grpc.EdgeServiceStub, scans: Path, control: FakeControl
) -> None:
    (scans / "alias.svs").symlink_to(scans / "case-1" / "c.tiff")
    job = stub.SubmitSlide(pb.SubmitSlideRequest(slide_path=str(scans / "case-1" / ".." / "alias.svs"))).job
    assert job.slide_path == str((scans / "case-1" / "c.tiff").resolve())  # the resolved path is queued


def test_roots_default_to_the_watch_folders_and_none_means_no_submits(
    make_server: Maker, channels: Callable[..., grpc.Channel], scans: Path
) -> None:
    running = make_server(insecure_config(), watch_folders=[str(scans)])
    stub = pb_grpc.EdgeServiceStub(channels(running.address))
    assert stub.SubmitSlide(pb.SubmitSlideRequest(slide_path=str(scans / "a.svs"))).job.job_id
    bare = make_server(insecure_config())
    err = rpc_error(pb_grpc.EdgeServiceStub(channels(bare.address)).SubmitSlide,
                    pb.SubmitSlideRequest(slide_path=str(scans / "a.svs")))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "server.allowed_roots" in err.details()


def test_resolve_submit_path_resolves_roots_given_through_symlinks(tmp_path: Path, scans: Path) -> None:
    link = tmp_path / "scans-link"
    link.symlink_to(scans, target_is_directory=True)
    assert resolve_submit_path(str(scans / "a.svs"), [link]) == (scans / "a.svs").resolve()
    with pytest.raises(RequestRefused) as info:
        resolve_submit_path(str(link / ".." / ".." / "etc" / "passwd"), [link])
    assert info.value.code == "PERMISSION_DENIED"


# --- malformed requests -------------------------------------------------------------------------


def test_malformed_requests_are_invalid_argument_with_a_reason(stub: pb_grpc.EdgeServiceStub, scans: Path) -> None:
    cases: list[tuple[Any, Any, str]] = [
        (stub.GetJob, pb.GetJobRequest(), "job_id=0"),
        (stub.GetJob, pb.GetJobRequest(job_id=-3), "job_id=-3"),
        (stub.CancelJob, pb.CancelJobRequest(), "job_id=0"),
        (stub.GetResult, pb.GetResultRequest(), "job_id or fingerprint"),
        (stub.GetResult, pb.GetResultRequest(fingerprint=" "), "fingerprint is empty"),
        (stub.ListJobs, pb.ListJobsRequest(page_size=1_000_000), "between 1 and 1000"),
        (stub.ListJobs, pb.ListJobsRequest(page_size=-1), "page_size=-1"),
        (stub.ListJobs, pb.ListJobsRequest(page_token="garbage!"), "page_token"),
        (stub.ListJobs, pb.ListJobsRequest(states=[pb.JOB_STATE_UNSPECIFIED]), "not a job state"),
        (stub.ListDetections, pb.ListDetectionsRequest(job_id=0), "job_id=0"),
        (stub.ListDetections, pb.ListDetectionsRequest(job_id=1, offset=-1), "offset=-1"),
        (stub.WatchEvents, pb.WatchEventsRequest(after_sequence=-1), "after_sequence=-1"),
        (stub.SubmitSlide, pb.SubmitSlideRequest(slide_path=str(scans / "a.svs"), mpp_override=-0.25), "mpp_override"),
        (stub.SubmitSlide, pb.SubmitSlideRequest(slide_path=str(scans / "a.svs"), request_id="x" * 200), "request_id"),
    ]
    for method, request, words in cases:
        err = rpc_error(method, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, err.details())
        assert words in err.details()


def test_a_page_token_of_other_filters_is_refused(stub: pb_grpc.EdgeServiceStub, store: Store) -> None:
    for i in range(3):
        store.add_job(f"/scans/{i}.svs", dedupe=False)
    token = stub.ListJobs(pb.ListJobsRequest(page_size=1)).next_page_token
    err = rpc_error(stub.ListJobs, pb.ListJobsRequest(page_size=1, page_token=token, newest_first=True))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "other filters" in err.details()


def test_watch_after_the_newest_event_is_out_of_range(stub: pb_grpc.EdgeServiceStub) -> None:
    err = rpc_error(stub.WatchEvents, pb.WatchEventsRequest(after_sequence=50))
    assert err.code() == grpc.StatusCode.OUT_OF_RANGE and "after_sequence=0" in err.details()


def test_messages_over_the_size_limit_are_refused(
    make_server: Maker, channels: Callable[..., grpc.Channel], scans: Path
) -> None:
    running = make_server(insecure_config([scans], max_message_mb=1))
    stub = pb_grpc.EdgeServiceStub(channels(running.address))
    err = rpc_error(stub.SubmitSlide, pb.SubmitSlideRequest(slide_path="/" + "x" * (2 * 1024 * 1024)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# --- auth ----------------------------------------------------------------------------------------


@pytest.fixture
def auth_stub(
    make_server: Maker, channels: Callable[..., grpc.Channel], scans: Path, tmp_path: Path
) -> pb_grpc.EdgeServiceStub:
    tokens = write_tokens(tmp_path / "tokens")
    running = make_server(insecure_config([scans], tokens_file=str(tokens)))
    return pb_grpc.EdgeServiceStub(channels(running.address))


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def test_calls_without_a_token_or_with_a_wrong_one_are_unauthenticated(auth_stub: pb_grpc.EdgeServiceStub) -> None:
    err = rpc_error(auth_stub.GetServerStatus, pb.GetServerStatusRequest())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "missing bearer token" in err.details()
    err = rpc_error(auth_stub.GetServerStatus, pb.GetServerStatusRequest(), metadata=bearer("x" * 30))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "unknown bearer token" in err.details()
    err = rpc_error(auth_stub.ListJobs, pb.ListJobsRequest(), metadata=(("authorization", f"Basic {READ_TOKEN}"),))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    err = rpc_error(auth_stub.WatchEvents, pb.WatchEventsRequest())  # streams too
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_read_only_token_reads_but_cannot_submit_or_cancel(auth_stub: pb_grpc.EdgeServiceStub, scans: Path) -> None:
    assert auth_stub.GetServerStatus(pb.GetServerStatusRequest(), metadata=bearer(READ_TOKEN)).ready
    err = rpc_error(
        auth_stub.SubmitSlide, pb.SubmitSlideRequest(slide_path=str(scans / "a.svs")), metadata=bearer(READ_TOKEN)
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "'viewer' has role read" in err.details()
    job = auth_stub.SubmitSlide(
        pb.SubmitSlideRequest(slide_path=str(scans / "a.svs")), metadata=bearer(SUBMIT_TOKEN)
    ).job
    err = rpc_error(auth_stub.CancelJob, pb.CancelJobRequest(job_id=job.job_id), metadata=bearer(READ_TOKEN))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert auth_stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), metadata=bearer(SUBMIT_TOKEN)).job.state == (
        pb.JOB_STATE_CANCELLED
    )
    assert collect_events(auth_stub, 0, 2, metadata=bearer(READ_TOKEN)) == [1, 2]


def test_health_and_reflection_need_no_token(
    make_server: Maker, channels: Callable[..., grpc.Channel], scans: Path, tmp_path: Path
) -> None:
    running = make_server(insecure_config([scans], tokens_file=str(write_tokens(tmp_path / "tokens"))))
    channel = channels(running.address)
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    services = list_services(channel)
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= set(services)


def list_services(channel: grpc.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    return [s.name for reply in replies for s in reply.list_services_response.service]


def test_reflection_describes_the_service_for_grpcurl(
    server: RunningServer, channels: Callable[..., grpc.Channel]
) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channels(server.address))
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)
    reply = next(iter(stub.ServerReflectionInfo(iter([request]))))
    assert reply.file_descriptor_response.file_descriptor_proto  # the .proto, serialized


def test_token_table_roles_and_method_classes() -> None:
    table = parse_tokens(f"{READ_TOKEN} read viewer\n{SUBMIT_TOKEN} submit\n")
    submit = "/mitosis.edge.v1.EdgeService/SubmitSlide"
    assert table.check(f"Bearer {SUBMIT_TOKEN}", submit).allowed
    assert table.check(f"bearer {READ_TOKEN}", "/mitosis.edge.v1.EdgeService/GetJob").caller == "viewer"
    assert table.check(f"Bearer {READ_TOKEN}", submit).code == "PERMISSION_DENIED"
    assert table.check(None, "/grpc.health.v1.Health/Check").allowed
    assert required_role("/mitosis.edge.v1.EdgeService/CancelJob") == "submit"
    assert required_role("/mitosis.edge.v1.EdgeService/Unknown") == "read"
    with pytest.raises(ConfigError, match="twice"):
        parse_tokens(f"{READ_TOKEN} read\n{READ_TOKEN} submit\n")
    with pytest.raises(ConfigError, match="no token"):
        parse_tokens("# nothing\n")


# --- TLS -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("pki")
    ca = TestCA(folder / "ca")
    other = TestCA(folder / "other", name="another CA")
    return {
        "server": ca.issue("localhost", server=True),
        "client": ca.issue("lab-client", server=False),
        "stranger": other.issue("stranger", server=False),
        "ca": ca.ca_path,
    }


def tls_credentials(ca: Path, client: Any = None) -> Any:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )


def status_over(channel: grpc.Channel) -> Any:
    return pb_grpc.EdgeServiceStub(channel).GetServerStatus(pb.GetServerStatusRequest(), timeout=5)


def test_tls(make_server: Maker, channels: Callable[..., grpc.Channel], pki: dict[str, Any], scans: Path) -> None:
    files = pki["server"]
    config = ServerConfig(listen="localhost:0", tls_cert=str(files.cert), tls_key=str(files.key))
    running = make_server(config)
    assert status_over(channels(f"localhost:{running.port}", tls_credentials(pki["ca"]))).ready
    plain = channels(f"localhost:{running.port}")
    assert rpc_error(status_over, plain).code() == grpc.StatusCode.UNAVAILABLE
    untrusted = channels(f"localhost:{running.port}", grpc.ssl_channel_credentials())  # system CAs only
    assert rpc_error(status_over, untrusted).code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls(make_server: Maker, channels: Callable[..., grpc.Channel], pki: dict[str, Any]) -> None:
    files = pki["server"]
    config = ServerConfig(
        listen="127.0.0.1:0", tls_cert=str(files.cert), tls_key=str(files.key), tls_client_ca=str(pki["ca"])
    )
    running = make_server(config)
    address = f"127.0.0.1:{running.port}"
    assert status_over(channels(address, tls_credentials(pki["ca"], pki["client"]))).ready
    for client in (None, pki["stranger"]):
        err = rpc_error(status_over, channels(address, tls_credentials(pki["ca"], client)))
        assert err.code() == grpc.StatusCode.UNAVAILABLE


# --- health ----------------------------------------------------------------------------------------


def test_health_is_not_serving_while_engines_load(make_server: Maker, channels: Callable[..., grpc.Channel],
                                                  store: Store, scans: Path) -> None:
    loading = FakeControl(store, ready=False)
    running = make_server(insecure_config([scans]), loading)
    health = health_pb2_grpc.HealthStub(channels(running.address))

    def status() -> Any:
        return health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status

    assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
    loading.ready = True
    deadline = time.monotonic() + 5
    while status() != health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status() == health_pb2.HealthCheckResponse.SERVING
    running.set_serving(False)
    assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING


# --- event streams -------------------------------------------------------------------------------


def test_watch_replays_then_follows_live_without_gaps_or_duplicates(
    server: RunningServer, stub: pb_grpc.EdgeServiceStub, store: Store
) -> None:
    for i in range(30):
        store.add_job(f"/scans/before-{i}.svs", dedupe=False)
    stop = threading.Event()

    def produce() -> None:
        for i in range(60):
            if stop.is_set():
                return
            store.add_job(f"/scans/live-{i}.svs", dedupe=False)
            time.sleep(0.002)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        got = collect_events(stub, 10, 80, timeout=20)  # connects while events are being written
    finally:
        stop.set()
        producer.join()
    assert got == list(range(11, 91))


def test_events_carry_the_job_fields(stub: pb_grpc.EdgeServiceStub, store: Store) -> None:
    store.add_job("/scans/a.svs")
    process_next(store)
    job, _ = store.add_job("/scans/b.svs")
    process_next(store, fail=True)
    call = stub.WatchEvents(pb.WatchEventsRequest(after_sequence=0))
    events = []
    for reply in call:
        events.append(reply.event)
        if len(events) == 6:
            break
    call.cancel()
    assert [e.type for e in events] == ["job_queued", "job_running", "job_done", "job_queued", "job_running",
                                       "job_failed"]
    done, failed = events[2], events[5]
    assert done.state == pb.JOB_STATE_DONE and done.mitotic_count == 4 and done.total_mitotic == 4
    assert done.atypical_ratio == pytest.approx(0.5) and done.slide_path == "/scans/a.svs"
    assert failed.job_id == job.job_id and failed.state == pb.JOB_STATE_FAILED
    assert "CorruptSlideError" in failed.error and failed.attempts == 1 and '"error"' in failed.payload_json


def test_a_slow_subscriber_is_ended_and_resumes_without_loss_while_others_keep_up(
    make_server: Maker, channels: Callable[..., grpc.Channel], store: Store, scans: Path
) -> None:
    # A buffer of 50: the fast subscriber must ride out a pause of the process (a garbage collection of a
    # large heap stalls every thread for tens of milliseconds) while 300 events are written in a burst.
    running = make_server(insecure_config([scans], subscriber_buffer=50))
    # A connection of its own whose flow-control window stays small (no BDP probing), so a client
    # that stops reading stops the server's sends after a few events instead of a few megabytes.
    small_window = [("grpc.http2.bdp_probe", 0), ("grpc.use_local_subchannel_pool", 1)]
    stub = pb_grpc.EdgeServiceStub(channels(running.address, options=small_window))
    fast_stub = pb_grpc.EdgeServiceStub(channels(running.address))
    store.add_job("/scans/first.svs")
    slow = stub.WatchEvents(pb.WatchEventsRequest(after_sequence=0), timeout=30)
    assert next(slow).event.sequence == 1  # now registered for live events; then it stops reading
    fast: list[int] = []
    fast_done = threading.Event()

    def read_fast() -> None:
        call = fast_stub.WatchEvents(pb.WatchEventsRequest(after_sequence=0), timeout=30)
        for reply in call:
            fast.append(reply.event.sequence)
            if reply.event.sequence == 301:
                break
        call.cancel()
        fast_done.set()

    reader = threading.Thread(target=read_fast)
    reader.start()
    long_path = "/scans/" + "x" * 3000  # big events fill the transport's window quickly
    for i in range(300):
        store.add_job(f"{long_path}-{i}.svs", dedupe=False)
    assert fast_done.wait(20)
    reader.join()
    assert fast == list(range(1, 302))  # the fast subscriber got everything, in order

    received = [1]
    with pytest.raises(grpc.RpcError) as info:
        for reply in slow:
            received.append(reply.event.sequence)
    err = info.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "resume with after_sequence=" in err.details()
    trailing = dict(err.trailing_metadata() or ())
    assert int(trailing[LAST_SEQUENCE_KEY]) == received[-1]
    assert received == list(range(1, received[-1] + 1)) and received[-1] < 301
    rest = collect_events(stub, received[-1], 301 - received[-1], timeout=20)
    assert received + rest == list(range(1, 302))


def test_resume_after_a_server_restart_loses_nothing(
    tmp_path: Path, scans: Path, channels: Callable[..., grpc.Channel]
) -> None:
    path = tmp_path / "restart" / "edge.db"
    with Store.open(path) as store:
        running = start_server(insecure_config([scans]), FakeControl(store))
        try:
            stub = pb_grpc.EdgeServiceStub(channels(running.address))
            for i in range(5):
                store.add_job(f"/scans/{i}.svs", dedupe=False)
            seen = collect_events(stub, 0, 3, timeout=10)
        finally:
            running.stop(0.5)
        for i in range(5, 8):  # written while no server runs
            store.add_job(f"/scans/{i}.svs", dedupe=False)
    with Store.open(path) as store:
        running = start_server(insecure_config([scans]), FakeControl(store))
        try:
            stub = pb_grpc.EdgeServiceStub(channels(running.address))
            seen += collect_events(stub, seen[-1], 5, timeout=10)
        finally:
            running.stop(0.5)
    assert seen == list(range(1, 9))


def test_stop_ends_streams_with_unavailable_and_the_last_sequence(
    make_server: Maker, channels: Callable[..., grpc.Channel], store: Store
) -> None:
    running = make_server()
    store.add_job("/scans/a.svs")
    call = pb_grpc.EdgeServiceStub(channels(running.address)).WatchEvents(pb.WatchEventsRequest(), timeout=10)
    assert next(call).event.sequence == 1
    started = time.monotonic()
    running.stop(2.0)
    assert time.monotonic() - started < 2.0
    err = rpc_error(lambda: list(call))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(err.trailing_metadata() or ()).get(LAST_SEQUENCE_KEY) == "1"


def test_deadlines_end_streams_and_free_their_slot(
    make_server: Maker, channels: Callable[..., grpc.Channel], scans: Path
) -> None:
    running = make_server(insecure_config([scans], max_workers=4, max_streams=2))
    stub = pb_grpc.EdgeServiceStub(channels(running.address))
    err = rpc_error(lambda: list(stub.WatchEvents(pb.WatchEventsRequest(), timeout=0.3)))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    calls = [stub.WatchEvents(pb.WatchEventsRequest(), timeout=10) for _ in range(2)]
    deadline = time.monotonic() + 5
    while running.subscribers < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert running.subscribers == 2
    err = rpc_error(lambda: list(stub.WatchEvents(pb.WatchEventsRequest(), timeout=5)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "server.max_streams" in err.details()
    assert stub.GetServerStatus(pb.GetServerStatusRequest(), timeout=5).ready  # unary calls still served
    for call in calls:
        call.cancel()
    deadline = time.monotonic() + 5
    while running.subscribers and time.monotonic() < deadline:
        time.sleep(0.02)
    assert running.subscribers == 0


def test_unexpected_errors_are_internal_with_a_message(
    make_server: Maker, channels: Callable[..., grpc.Channel], store: Store, scans: Path
) -> None:
    class Broken(FakeControl):
        def server_status(self) -> dict[str, Any]:
            raise RuntimeError("engine table unreadable")

    running = make_server(insecure_config([scans]), Broken(store))
    err = rpc_error(pb_grpc.EdgeServiceStub(channels(running.address)).GetServerStatus, pb.GetServerStatusRequest())
    assert err.code() == grpc.StatusCode.INTERNAL and "RuntimeError" in err.details()
    assert "engine table unreadable" not in err.details()  # the details stay in the daemon's log


def test_config_roundtrip_through_replace_keeps_validation() -> None:
    with pytest.raises(ConfigError):
        replace(ServerConfig(), max_page_size=0).validate()
    assert os.path.isabs(str(Path(__file__).resolve()))


def test_a_certificate_close_to_expiry_is_warned_about_at_start(
    tmp_path: Path, control: FakeControl, caplog: pytest.LogCaptureFixture
) -> None:
    files = TestCA(tmp_path).issue("localhost", server=True, valid_days=10)
    config = ServerConfig(listen="127.0.0.1:0", tls_cert=str(files.cert), tls_key=str(files.key))
    with caplog.at_level(logging.WARNING, logger="edge.service.server"):
        start_server(config, control).stop()
    assert re.search(r"the server certificate .* expires on .* UTC, in [89] day\(s\): renew it", caplog.text)


def test_a_busy_store_is_unavailable_with_the_reason(
    make_server: Maker, channels: Callable[..., grpc.Channel], scans: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sqlite3

    from edge.service import store as store_module

    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", 200)
    with Store.open(tmp_path / "busy" / "edge.db") as busy_store:
        server = make_server(ctl=FakeControl(busy_store, watch_folders=[str(scans)]))
        stub = pb_grpc.EdgeServiceStub(channels(server.address))
        holder = sqlite3.connect(busy_store.path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # e.g. `mitosis-edge daemon retry` in another process
        try:
            err = rpc_error(stub.SubmitSlide, pb.SubmitSlideRequest(slide_path=str(scans / "a.svs")))
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert "is busy: another process held its lock" in err.details() and "retry" in err.details()
        assert stub.SubmitSlide(pb.SubmitSlideRequest(slide_path=str(scans / "a.svs"))).job.job_id == 1
        server.stop(0.5)


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        ({"package": "mitosis-edge", "version": "1.4.0", "bundle": {"name": "demo", "version": "2"},
          "backend": "tensorrt", "created_at": "2026-05-01T10:00:00+00:00"},
         ("1.4.0", "demo", "2", "tensorrt", "2026-05-01T10:00:00+00:00")),  # what result.json holds
        ({"package_version": "0.9.0", "bundle": {"name": "demo"}, "backend": "onnxruntime"},
         ("0.9.0", "demo", "", "onnxruntime", "")),  # the shape docs/results.md once showed
        ({"version": "0.8.0", "bundle": "demo"}, ("0.8.0", "demo", "", "", "")),  # an early row: bundle by name
        (None, ("", "", "", "", "")),
    ],
)
def test_provenance_of_any_stored_result_reaches_its_typed_fields(stored: Any, expected: tuple[str, ...]) -> None:
    import json

    from edge.service.server.convert import provenance_to_pb

    msg = provenance_to_pb(stored)
    assert (msg.package_version, msg.bundle_name, msg.bundle_version, msg.backend, msg.created_at) == expected
    assert json.loads(msg.json) == (stored or {})
