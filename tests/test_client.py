"""The Python client and `mitosis-edge client`: plain dicts, retries with backoff, streams that resume
by themselves (slow subscriber, server restart), TLS and token options, and the CLI's text and JSON."""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.cli.client import add_client_parser
from edge.client import EdgeClient, EdgeClientError, ServerUnavailableError, read_token_file
from edge.config import ServerConfig
from edge.errors import ConfigError
from edge.service.server import RunningServer, start_server
from edge.service.store import Store
from tests.conftest import SynthFactory
from tests.grpc_fakes import (
    READ_TOKEN,
    SUBMIT_TOKEN,
    FakeControl,
    insecure_config,
    process_next,
    slide_result,
    write_tokens,
)
from tests.tls_certs import TestCA


@pytest.fixture
def scans(tmp_path: Path) -> Path:
    root = tmp_path / "scans"
    root.mkdir()
    for name in ("a.svs", "b.svs"):
        (root / name).write_bytes(b"slide")
    return root


@pytest.fixture
def servers(store: Store, scans: Path) -> Iterator[Callable[..., RunningServer]]:
    started: list[RunningServer] = []

    def start(config: ServerConfig | None = None) -> RunningServer:
        running = start_server(config or insecure_config([scans]), FakeControl(store, watch_folders=[str(scans)]))
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop(0.5)


@pytest.fixture
def server(servers: Callable[..., RunningServer]) -> RunningServer:
    return servers()


@pytest.fixture
def clients() -> Iterator[Callable[..., EdgeClient]]:
    opened: list[EdgeClient] = []

    def connect(address: str, **kwargs: Any) -> EdgeClient:
        kwargs.setdefault("insecure", not any(k in kwargs for k in ("ca", "cert")))
        client = EdgeClient(address, **kwargs)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


@pytest.fixture
def client(server: RunningServer, clients: Callable[..., EdgeClient]) -> EdgeClient:
    return clients(server.address)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- calls return plain dicts --------------------------------------------------------------------


def test_every_call_returns_plain_dicts(client: EdgeClient, store: Store, scans: Path) -> None:
    assert client.health() == "SERVING"
    job = client.submit(scans / "a.svs", priority=2, mpp_override=0.5)
    assert job["state"] == "queued" and job["priority"] == 2 and job["mpp_override"] == 0.5
    assert job["slide_path"] == str(scans / "a.svs") and job["fingerprint"] is None and job["bundle"] is None
    assert job == store.get_job(job["job_id"]).to_json_dict()
    other = client.submit(str(scans / "b.svs"))
    assert client.get_job(job["job_id"]) == job
    assert [j["job_id"] for j in client.list_jobs(page_size=1)] == [job["job_id"], other["job_id"]]
    assert [j["job_id"] for j in client.list_jobs(newest_first=True, limit=1)] == [other["job_id"]]
    assert client.cancel(other["job_id"])["state"] == "cancelled"
    assert [j["job_id"] for j in client.list_jobs(states=["cancelled"])] == [other["job_id"]]

    process_next(store)
    result = client.get_result(job["job_id"])
    expected = slide_result(str(scans / "a.svs"))
    assert result["scores"] == expected.scores.to_json_dict()  # typed fields give result.json's numbers back
    assert result["slide"] == dict(expected.slide) and result["provenance"]["bundle"]["name"] == "demo"
    assert result["detections"] == 5 and set(result["exports"]) == {"result", "csv"}
    json.dumps(result)
    detections = list(client.detections(job["job_id"], classes=["normal", "atypical"], min_p_mitotic=0.9))
    assert [d["class"] for d in detections] == ["normal", "normal", "atypical"]
    assert detections[0] == {**expected.figures[0].to_json_dict(), "class": "normal"}

    status = client.status()
    assert status["ready"] and status["jobs_by_state"]["done"] == 1 and status["last_sequence"] == 5
    assert status["engines"][1]["cache_key"] == "sha256:abc"


def test_errors_carry_the_code_the_message_and_the_address(client: EdgeClient, server: RunningServer) -> None:
    with pytest.raises(EdgeClientError) as info:
        client.get_job(999)
    assert info.value.code == "NOT_FOUND" and "no job 999" in str(info.value) and server.address in str(info.value)
    with pytest.raises(EdgeClientError, match="INVALID_ARGUMENT"):
        client.get_job(0)
    with pytest.raises(ConfigError, match="unknown"):
        client.list_jobs(states=["finished"])
    with pytest.raises(ConfigError, match="exactly one"):
        client.get_result()


# --- retries ---------------------------------------------------------------------------------------


def test_an_unreachable_server_is_retried_with_backoff_then_named(clients: Callable[..., EdgeClient]) -> None:
    address = f"127.0.0.1:{free_port()}"
    client = clients(address, retries=3, timeout=2)
    started = time.monotonic()
    with pytest.raises(ServerUnavailableError) as info:
        client.status()
    assert f"cannot reach the mitosis-edge server at {address}" in str(info.value)
    assert time.monotonic() - started >= 0.1 + 0.2 + 0.4  # at least the jittered backoff (0.2, 0.4, 0.8) x 0.5


def test_a_call_succeeds_once_the_server_comes_up(
    clients: Callable[..., EdgeClient], store: Store, scans: Path
) -> None:
    port = free_port()
    client = clients(f"127.0.0.1:{port}", retries=10, timeout=2)
    holder: list[RunningServer] = []

    def start_later() -> None:
        time.sleep(0.5)
        holder.append(start_server(insecure_config([scans], listen=f"127.0.0.1:{port}"), FakeControl(store)))

    starter = threading.Thread(target=start_later)
    starter.start()
    try:
        assert client.status()["ready"]
    finally:
        starter.join()
        for running in holder:
            running.stop(0.5)


# --- streams that resume by themselves ------------------------------------------------------------


def test_watch_resumes_by_itself_after_falling_behind(
    servers: Callable[..., RunningServer], clients: Callable[..., EdgeClient], store: Store, scans: Path
) -> None:
    running = servers(insecure_config([scans], subscriber_buffer=5))
    small_window = [("grpc.http2.bdp_probe", 0), ("grpc.use_local_subchannel_pool", 1)]
    client = clients(running.address, channel_options=small_window)
    store.add_job("/scans/first.svs")
    stream = client.watch_events(0, timeout=30)
    received = [next(stream)["sequence"]]
    for i in range(200):  # written while this subscriber reads nothing
        store.add_job(f"/scans/{'x' * 3000}-{i}.svs", dedupe=False)
    for event in stream:
        received.append(event["sequence"])
        if event["sequence"] == 201:
            break
    stream.cancel()
    assert received == list(range(1, 202))  # nothing lost, nothing twice
    assert stream.reconnects >= 1 and stream.last_sequence == 201


def test_watch_resumes_by_itself_across_a_server_restart(
    clients: Callable[..., EdgeClient], store: Store, scans: Path
) -> None:
    port = free_port()
    config = insecure_config([scans], listen=f"127.0.0.1:{port}")
    running = start_server(config, FakeControl(store))
    client = clients(f"127.0.0.1:{port}", retries=20)
    received: list[int] = []
    stream = client.watch_events(0, timeout=30)

    def read() -> None:
        for event in stream:
            received.append(event["sequence"])
            if event["sequence"] == 6:
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(3):
            store.add_job(f"/scans/{i}.svs", dedupe=False)
        deadline = time.monotonic() + 5
        while len(received) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        running.stop(0.5)
        for i in range(3, 6):  # while the server is down
            store.add_job(f"/scans/{i}.svs", dedupe=False)
        running = start_server(config, FakeControl(store))
        reader.join(20)
    finally:
        stream.cancel()
        reader.join()
        running.stop(0.5)
    assert received == [1, 2, 3, 4, 5, 6] and stream.reconnects >= 1


def test_wait_for_job_returns_when_the_job_ends(client: EdgeClient, store: Store, scans: Path) -> None:
    job = client.submit(scans / "a.svs")
    worker = threading.Timer(0.2, process_next, args=(store,))
    worker.start()
    try:
        finished = client.wait_for_job(job["job_id"], timeout=10)
    finally:
        worker.join()
    assert finished["state"] == "done" and client.wait_for_job(job["job_id"], timeout=1)["state"] == "done"
    other = client.submit(scans / "b.svs")
    with pytest.raises(EdgeClientError) as info:
        client.wait_for_job(other["job_id"], timeout=0.3)
    assert info.value.code == "DEADLINE_EXCEEDED"


# --- TLS and tokens --------------------------------------------------------------------------------


def test_mutual_tls_and_token_options(
    servers: Callable[..., RunningServer], clients: Callable[..., EdgeClient], tmp_path: Path, scans: Path
) -> None:
    ca = TestCA(tmp_path / "pki")
    server_files, client_files = ca.issue("localhost", server=True), ca.issue("lis", server=False)
    tokens = write_tokens(tmp_path / "tokens")
    running = servers(
        ServerConfig(
            listen="127.0.0.1:0", tls_cert=str(server_files.cert), tls_key=str(server_files.key),
            tls_client_ca=str(ca.ca_path), tokens_file=str(tokens), allowed_roots=(str(scans),),
        )
    )
    address = f"localhost:{running.port}"
    token_file = tmp_path / "client-token"
    token_file.write_text(f"# for the LIS\n{SUBMIT_TOKEN}\n")
    good = clients(address, ca=ca.ca_path, cert=client_files.cert, key=client_files.key,
                   token=read_token_file(token_file))
    assert good.submit(scans / "a.svs")["state"] == "queued"
    reader = clients(address, ca=ca.ca_path.read_bytes(), cert=client_files.cert, key=client_files.key,
                     token=READ_TOKEN)
    with pytest.raises(EdgeClientError) as info:
        reader.submit(scans / "a.svs")
    assert info.value.code == "PERMISSION_DENIED"
    no_cert = clients(address, ca=ca.ca_path, token=READ_TOKEN, retries=0)
    with pytest.raises(ServerUnavailableError):
        no_cert.status()


def test_client_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        EdgeClient("localhost")
    with pytest.raises(ConfigError, match="exclude each other"):
        EdgeClient("localhost:1", insecure=True, ca=b"x")
    with pytest.raises(ConfigError, match="both cert and key"):
        EdgeClient("localhost:1", cert=b"x")
    with pytest.raises(ConfigError, match="cannot be read"):
        EdgeClient("localhost:1", ca=tmp_path / "missing.pem")
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ConfigError, match="holds no token"):
        read_token_file(tmp_path / "empty")


# --- mitosis-edge client ---------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], address: str, *argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="mitosis-edge")
    add_client_parser(parser.add_subparsers())
    args = parser.parse_args(["client", "--server", address, "--insecure", *argv])
    code = args.handler(args)
    return code, capsys.readouterr().out


def test_cli_submit_get_list_cancel(
    server: RunningServer, store: Store, scans: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run_cli(capsys, server.address, "submit", str(scans / "a.svs"), "--json")
    job = json.loads(out)
    assert code == 0 and job["state"] == "queued"
    code, out = run_cli(capsys, server.address, "get", str(job["job_id"]), "--json")
    assert json.loads(out)["scores"] is None and json.loads(out)["state"] == "queued"
    process_next(store)
    code, out = run_cli(capsys, server.address, "get", str(job["job_id"]), "--json")
    got = json.loads(out)
    assert got["state"] == "done" and got["scores"]["hotspot"]["mitotic"] == 4 and got["exports"]["result"]
    code, out = run_cli(capsys, server.address, "get", str(job["job_id"]))
    assert "hotspot mitotic count  4" in out and "atypical ratio" in out

    run_cli(capsys, server.address, "submit", str(scans / "b.svs"))
    code, out = run_cli(capsys, server.address, "list", "--json")
    jobs = json.loads(out)
    assert [(j["job_id"], j["state"]) for j in jobs] == [(1, "done"), (2, "queued")]
    assert all({"job_id", "state", "slide_path"} <= set(j) for j in jobs)
    code, out = run_cli(capsys, server.address, "cancel", "2")
    assert "job 2 cancelled" in out
    code, out = run_cli(capsys, server.address, "list", "--state", "cancelled")
    assert "cancelled" in out and str(scans / "b.svs") in out


def test_cli_status_watch_and_detections(
    server: RunningServer, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    store.add_job("/scans/a.svs")
    process_next(store)
    code, out = run_cli(capsys, server.address, "status")
    assert code == 0 and "mitosis-edge 0.1.0, ready" in out and "cache key sha256:abc" in out
    assert json.loads(run_cli(capsys, server.address, "status", "--json")[1])["queue_depth"] == 0
    code, out = run_cli(capsys, server.address, "watch", "--after", "0", "--count", "3", "--json")
    assert [json.loads(line)["type"] for line in out.splitlines()] == ["job_queued", "job_running", "job_done"]
    code, out = run_cli(capsys, server.address, "watch", "--after", "1", "--job", "1")
    assert "job_done" in out and "hotspot mitotic count 4" in out
    code, out = run_cli(capsys, server.address, "detections", "1", "--class", "atypical", "--json")
    assert [d["class"] for d in json.loads(out)] == ["atypical"]
    code, out = run_cli(capsys, server.address, "detections", "1", "--min-p", "0.99", "--json")
    assert json.loads(out) == []
    code, out = run_cli(capsys, server.address, "watch", "--seconds", "0.3")
    assert code == 0 and out == ""


def test_cli_errors_say_what_and_where(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(EdgeClientError, match="no job 42"):
        run_cli(capsys, server.address, "get", "42")
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnavailableError, match=address):
        run_cli(capsys, address, "--retries", "0", "status")
    with pytest.raises(ConfigError, match="job id or --fingerprint"):
        run_cli(capsys, server.address, "get")


def test_a_result_without_a_hotspot_says_why_over_grpc_and_in_the_cli() -> None:
    from edge.analysis.scoring import score_slide
    from edge.cli.client import result_lines
    from edge.client import scores_dict
    from edge.service.server.convert import scores_to_pb

    scores = scores_dict(scores_to_pb(score_slide([], tissue_area_mm2=0.0).to_json_dict()))
    assert scores["hotspot"]["null_reason"] == "no tissue found on the slide"
    assert "no hotspot: no tissue found on the slide" in result_lines({"scores": scores, "exports": {}})[0]


# --- what the client says when TLS or the token is wrong -------------------------------------------


def client_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run `mitosis-edge client ARGV` in a subprocess (as a user would) and return its stderr; it must fail."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("MITOSIS_EDGE_TOKEN", None)
    done = subprocess.run(
        [sys.executable, "-m", "edge", "client", "--retries", "0", "--timeout", "3", *argv, "status"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )
    assert done.returncode == 1 and done.stdout == ""
    return done.stderr


def test_connection_errors_say_which_option_fixes_them(
    servers: Callable[..., RunningServer], tmp_path: Path, scans: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = TestCA(tmp_path / "pki")
    files = ca.issue("localhost", server=True)
    tls = servers(ServerConfig(listen="127.0.0.1:0", tls_cert=str(files.cert), tls_key=str(files.key),
                               tokens_file=str(write_tokens(tmp_path / "tokens")), allowed_roots=(str(scans),)))
    plain = servers()
    tls_address = f"localhost:{tls.port}"

    without_ca = client_error(capsys, "--server", tls_address)
    assert "the server uses TLS with a certificate this machine does not trust: pass --ca FILE" in without_ca
    insecure = client_error(capsys, "--server", tls_address, "--insecure")
    assert "the server uses TLS, but --insecure speaks plain text: drop --insecure and pass --ca FILE" in insecure
    no_token = client_error(capsys, "--server", tls_address, "--ca", str(ca.ca_path))
    assert "UNAUTHENTICATED" in no_token and "pass --token-file FILE" in no_token
    tls_to_plain = client_error(capsys, "--server", plain.address, "--ca", str(ca.ca_path))
    assert "the server speaks plain text (no TLS): pass --insecure" in tls_to_plain
    for stderr in (without_ca, insecure, no_token, tls_to_plain):
        assert all(line.startswith(("mitosis-edge: error:", "  ")) for line in stderr.splitlines()), stderr


# --- a real analysis, field for field ----------------------------------------------------------------


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def test_a_real_analysis_reaches_the_client_field_for_field(
    store: Store, scans: Path, clients: Callable[..., EdgeClient], synth_slide: SynthFactory
) -> None:
    """analyze_slide (demo bundle) -> the store -> result_to_pb -> the client: every field the client
    returns is the pipeline's, provenance included, so a key one side spells differently shows up here."""
    import grpc

    from edge import __version__
    from edge._proto import edge_pb2 as pb
    from edge._proto import edge_pb2_grpc as pb_grpc
    from edge.analysis.caveats import diagnostic_notice, plausibility_flags
    from edge.analysis.pipeline import analyze_slide
    from edge.analysis.provenance import Provenance
    from edge.config import Config

    slide = synth_slide(width=3072, height=2048, seed=11, mitoses=6, imposters=4)
    expected = analyze_slide(slide, Config()).result
    job, _ = store.add_job(str(slide), fingerprint="sha256:real", accession="S26-0042")
    running = store.claim_next_job()
    assert running is not None and running.job_id == job.job_id
    exports = {"result": str(store.path.parent / "results" / "result.json")}
    store.complete_job(job.job_id, expected, exports, Config().qc)

    running_server = start_server(insecure_config([scans]), FakeControl(store, watch_folders=[str(scans)]))
    try:
        client = clients(running_server.address)
        result = client.get_result(job.job_id)
        summary = {"slide": expected.slide, "provenance": expected.provenance, "scores": expected.scores.to_json_dict()}
        flags = [{"code": f.code, "message": f.message, "value": f.value} for f in plausibility_flags(_json(summary))]
        notice = diagnostic_notice(_json(summary))
        assert result == {
            "job_id": job.job_id,
            "accession": "S26-0042",
            **({"notice": notice} if notice else {}),
            "flags": flags,
            "slide_path": expected.slide_path,
            "fingerprint": "sha256:real",
            "slide": _json(expected.slide),
            "scores": _json(expected.scores.to_json_dict()),
            "provenance": _json(expected.provenance),
            "exports": {"result": str(Path(exports["result"]).absolute())},
            "detections": len(expected.figures),
            "created_at": result["created_at"],
            "qc": {**_json(expected.qc), "baseline": result["qc"]["baseline"]},  # the store adds the drift check
            "review": None,
        }
        assert result["qc"]["baseline"]["in_band"] is True
        assert len(expected.figures) > 0
        figures = list(client.detections(job.job_id))
        assert [{k: v for k, v in f.items() if k != "class"} for f in figures] == [
            _json(f.to_json_dict()) for f in expected.figures
        ]

        # The typed Provenance message: every field from the pipeline's own provenance.
        typed = Provenance.from_json_dict(expected.provenance)
        with grpc.insecure_channel(running_server.address) as channel:
            reply = pb_grpc.EdgeServiceStub(channel).GetResult(pb.GetResultRequest(job_id=job.job_id))
        provenance = reply.result.provenance
        assert provenance.package_version == __version__ == typed.package_version
        assert (provenance.bundle_name, provenance.bundle_version) == ("demo", typed.bundle.version) != ("demo", "")
        assert provenance.backend == "onnxruntime" == expected.provenance["backend"]
        assert provenance.created_at == expected.provenance["created_at"] != ""
        assert json.loads(provenance.json) == _json(expected.provenance)
        assert typed.to_json_dict() == expected.provenance  # result.json's keys, unchanged
    finally:
        running_server.stop(0.5)
