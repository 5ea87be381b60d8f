"""A real `mitosis-edge serve` with TLS and bearer tokens, and the attacks of issue 12 against it.

Used by tests/test_attacks.py (each attack once, with its documented answer) and by
tools/attack_loop.py (the quick attacks in a loop while the daemon's RSS and GetServerStatus
latency are sampled). Loopback only: the daemon listens on 127.0.0.1 and port 0.

Who holds which token in the box (the threat model of docs/deployment.md, "Security"):

    desk    admin   the lab's administrator desk: may cancel any job
    lis     submit  the LIS: submits slides, cancels its own jobs
    ris     submit  a second submitting system (another caller for request ids and cancels)
    viewer  read    a viewer: reads jobs, results and events
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from edge._proto import edge_pb2 as pb
from edge._proto import edge_pb2_grpc as pb_grpc
from tests.tls_certs import TestCA

TOKENS = {
    "desk": ("desk-admin-token-0123456789abcdef", "admin"),
    "lis": ("lis-submit-token-0123456789abcdef", "submit"),
    "ris": ("ris-submit-token-0123456789abcdef", "submit"),
    "viewer": ("viewer-read-token-0123456789abcdef", "read"),
}
SECRET = b"TOPSECRET: the token file of another service\n"
MAX_STREAMS = 8
MAX_STREAMS_PER_CALLER = 3
START_TIMEOUT_S = 90.0
SERVICE = "/mitosis.edge.v1.EdgeService"


@dataclass
class Answer:
    """What the server answered one call: the status code's name ("OK" on success), its message, the reply."""

    code: str
    details: str
    reply: Any = None


@dataclass
class Box:
    """A started daemon and the folders around it. ``scans`` is its allowed root, ``inbox`` its watch folder,
    ``outside`` holds what no caller may read."""

    root: Path
    process: subprocess.Popen[bytes]
    port: int
    ca: bytes
    _channel: grpc.Channel | None = field(default=None, repr=False)

    @property
    def scans(self) -> Path:
        return self.root / "scans"

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def outside(self) -> Path:
        return self.root / "outside"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "serve.log"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            credentials = grpc.ssl_channel_credentials(root_certificates=self.ca)
            self._channel = grpc.secure_channel(f"127.0.0.1:{self.port}", credentials)
        return self._channel

    def stub(self) -> Any:
        return pb_grpc.EdgeServiceStub(self.channel())

    def call(self, method: str, request: Any, who: str | None, timeout: float = 20.0) -> Answer:
        """Call one unary method as ``who`` (a name in TOKENS; None = no token)."""
        metadata = (("authorization", f"Bearer {TOKENS[who][0]}"),) if who else ()
        try:
            reply = getattr(self.stub(), method)(request, metadata=metadata, timeout=timeout)
        except grpc.RpcError as err:
            return Answer(err.code().name, err.details() or "")
        return Answer("OK", "", reply)

    def wait_for_job(self, job_id: int, states: Sequence[int], timeout: float = 120.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.call("GetJob", pb.GetJobRequest(job_id=job_id), "viewer").reply.job
            if job.state in states:
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not reach {states} in {timeout} s; log:\n{self.log_text()[-3000:]}")

    def rss_mb(self) -> float:
        """The daemon process's resident memory (the API, store and watcher live there)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self._channel is not None:
            self._channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def checkout_env() -> dict[str, str]:
    """The environment for a `mitosis-edge` subprocess that runs this checkout's code."""
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def mitosis_edge() -> list[str]:
    exe = shutil.which("mitosis-edge")
    return [exe] if exe else [sys.executable, "-m", "edge"]


def write_tls(root: Path, *, valid_days: float = 1.0, mismatched_key: bool = False) -> tuple[Path, Path, Path]:
    """(server certificate, its key, the CA) under ``root/tls``; optionally expired or with another key."""
    ca = TestCA(root / "tls")
    files = ca.issue("localhost", server=True, valid_days=valid_days)
    if mismatched_key:
        other = ca.issue("someone-else", server=True)
        return files.cert, other.key, files.ca
    return files.cert, files.key, files.ca


def write_config(root: Path, cert: Path, key: Path) -> Path:
    tokens = root / "tokens"
    tokens.write_text("".join(f"{token} {role} {name}\n" for name, (token, role) in TOKENS.items()))
    tokens.chmod(0o600)
    config = root / "edge.toml"
    config.write_text(
        "[watch]\nquiet_period_s = 0.3\npoll_interval_s = 0.2\nsettle_timeout_s = 3.0\n"
        "[stream]\nreader_threads = 2\n"
        "[daemon]\nmin_free_disk_mb = 0\nworkers = 1\nretry_backoff_s = 0.05\n"
        f"[server]\ntls_cert = '{cert}'\ntls_key = '{key}'\ntokens_file = '{tokens}'\n"
        f"allowed_roots = ['{root / 'scans'}']\nmax_streams = {MAX_STREAMS}\n"
        f"max_streams_per_caller = {MAX_STREAMS_PER_CALLER}\n"
    )
    return config


def serve_command(root: Path, config: Path) -> list[str]:
    return [*mitosis_edge(), "--config", str(config), "serve", "--watch", str(root / "inbox"),
            "--data", str(root / "data"), "--listen", "127.0.0.1:0", "--metrics", ""]


def start_box(root: Path) -> Box:
    """Start ``mitosis-edge serve`` over TLS with the four tokens; returns once the API answers."""
    for name in ("scans", "inbox", "outside"):
        (root / name).mkdir(parents=True, exist_ok=True)
    (root / "outside" / "secret.txt").write_bytes(SECRET)
    (root / "scans" / "probe.svs").write_bytes(b"not read: bundle attacks are refused before the slide")
    evil = root / "inbox" / "evil"  # a bundle an attacker wrote where the watcher looks
    evil.mkdir(exist_ok=True)
    (evil / "manifest.toml").write_text(f"[bundle]\nname = 'evil'\n[detector]\nfile = '{root / 'tokens'}'\n")
    cert, key, ca = write_tls(root)
    config = write_config(root, cert, key)
    with (root / "serve.log").open("ab") as log:
        process = subprocess.Popen(serve_command(root, config), stdout=log, stderr=log, cwd=root, env=checkout_env())
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        found = re.search(r"gRPC API on 127\.0\.0\.1:(\d+)", (root / "serve.log").read_text(errors="replace"))
        if found:
            return Box(root, process, int(found.group(1)), ca.read_bytes())
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"serve did not start:\n{(root / 'serve.log').read_text(errors='replace')[-3000:]}")


# --- what may never appear in an answer ------------------------------------------------------------------

_HEX64 = re.compile(r"[0-9a-f]{64}")


def leaks(box: Box, details: str, sent: Sequence[str] = ()) -> list[str]:
    """What in a refusal's message reveals more than the caller sent or a submitter is told anyway (the
    allowed root, as configured): server paths, file bytes, hashes, tracebacks. Empty when it leaks nothing."""
    text = details
    for value in (*sent, str(box.scans)):
        text = text.replace(value, "")
    found = []
    for secret in (str(box.data), str(box.outside), str(box.log_path), str(box.root / "tokens"), "TOPS",
                   "Traceback", SECRET.decode().strip()):
        if secret in text:
            found.append(secret)
    if str(box.root) in text:
        found.append(str(box.root))
    found += _HEX64.findall(text)
    return found


# --- the quick attacks (no slide is analysed): each with the code it must get ----------------------------


@dataclass(frozen=True)
class Attack:
    name: str
    expected: str  # the gRPC code's name
    run: Callable[[Box], Answer]
    sent: tuple[str, ...] = ()  # what the caller sent that may come back in the message

    def __call__(self, box: Box) -> Answer:
        return self.run(box)


def _submit(who: str | None, **fields: Any) -> Callable[[Box], Answer]:
    """SubmitSlide as ``who``; "{scans}" in slide_path stands for the box's allowed root."""

    def run(box: Box) -> Answer:
        path = str(fields.get("slide_path", "")).replace("{scans}", str(box.scans))
        return box.call("SubmitSlide", pb.SubmitSlideRequest(**{**fields, "slide_path": path}), who)

    return run


def _bad_token(box: Box) -> Answer:
    try:
        box.stub().GetServerStatus(
            pb.GetServerStatusRequest(), metadata=(("authorization", "Bearer guessed-token-0000"),), timeout=10
        )
    except grpc.RpcError as err:
        return Answer(err.code().name, err.details() or "")
    return Answer("OK", "")


def _junk_body(box: Box) -> Answer:
    call = box.channel().unary_unary(f"{SERVICE}/SubmitSlide")  # bytes in, bytes out: no serializer
    try:
        call(b"\xff\xfe junk \x00" * 64, timeout=10)
    except grpc.RpcError as err:
        return Answer(err.code().name, err.details() or "")
    return Answer("OK", "")


_FLOOD_LOCK = threading.Lock()  # the loop's threads take turns: one viewer flood at a time


def _stream_flood(box: Box) -> Answer:
    """The viewer token opens one stream more than one caller may hold; the answer to the last is returned."""
    metadata = (("authorization", f"Bearer {TOKENS['viewer'][0]}"),)
    with _FLOOD_LOCK:
        calls: list[Any] = []
        try:
            for _ in range(MAX_STREAMS_PER_CALLER + 1):
                calls.append(box.stub().WatchEvents(pb.WatchEventsRequest(), metadata=metadata, timeout=20))
                calls[-1].initial_metadata()  # sent once the stream holds its slot, or when it is refused
                time.sleep(0.02)
                if calls[-1].done():  # refused early: the last flood's streams were still being released
                    break
            extra = calls[-1]
            deadline = time.monotonic() + 2.0
            while not extra.done() and time.monotonic() < deadline:
                time.sleep(0.01)
            if not extra.done():  # admitted: the limit did not hold
                return Answer("OK", "")
            return Answer(extra.code().name, extra.details() or "")
        finally:
            for call in calls:
                call.cancel()


QUICK_ATTACKS: tuple[Attack, ...] = (
    Attack("submit a file outside the roots", "PERMISSION_DENIED", _submit("lis", slide_path="/etc/passwd"),
           ("/etc/passwd",)),
    Attack("submit /proc/self/fd/1 (the daemon's log)", "PERMISSION_DENIED",
           _submit("lis", slide_path="/proc/self/fd/1"), ("/proc/self/fd/1",)),
    Attack("submit /proc/self/cwd", "PERMISSION_DENIED", _submit("lis", slide_path="/proc/self/cwd/x.svs"),
           ("/proc/self/cwd/x.svs",)),
    Attack("bundle given as a path", "INVALID_ARGUMENT", _submit("lis", slide_path="{scans}/probe.svs", bundle="/etc")),
    Attack("bundle written into the inbox", "PERMISSION_DENIED",
           _submit("lis", slide_path="{scans}/probe.svs", bundle="evil")),
    Attack("bundle of 1 MB", "INVALID_ARGUMENT", _submit("lis", slide_path="/x.svs", bundle="b" * 1_000_000)),
    Attack("path with a 300-character name", "INVALID_ARGUMENT", _submit("lis", slide_path="/" + "n" * 300)),
    Attack("mpp_override 5e-324", "INVALID_ARGUMENT", _submit("lis", slide_path="/x.svs", mpp_override=5e-324)),
    Attack("read token submits", "PERMISSION_DENIED", _submit("viewer", slide_path="/etc/passwd")),
    Attack("unknown token", "UNAUTHENTICATED", _bad_token),
    Attack("junk body without a token", "UNAUTHENTICATED", _junk_body),
    Attack("fingerprint of 1 MB", "INVALID_ARGUMENT", lambda box: box.call(
        "GetResult", pb.GetResultRequest(fingerprint="f" * 1_000_000), "viewer")),
    Attack("one stream more than a caller may hold", "RESOURCE_EXHAUSTED", _stream_flood),
)


# --- the loop ---------------------------------------------------------------------------------------------


def _p99(values: Sequence[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else (values[0] if values else float("nan"))


def attack_loop(box: Box, seconds: float, *, threads: int = 3, warmup_s: float = 3.0) -> dict[str, Any]:
    """Run QUICK_ATTACKS round-robin from ``threads`` threads for ``seconds`` while one thread times
    GetServerStatus (viewer token) every 50 ms and the daemon's RSS is sampled every 0.5 s.
    Returns figures for the first and the last third of the run (after ``warmup_s``)."""
    stop = threading.Event()
    wrong: list[str] = []
    counts = [0] * threads
    latencies: list[tuple[float, float]] = []
    rss: list[tuple[float, float]] = []
    lock = threading.Lock()

    def attacker(index: int) -> None:
        i = index
        while not stop.is_set():
            attack = QUICK_ATTACKS[i % len(QUICK_ATTACKS)]
            answer = attack(box)
            leaked = leaks(box, answer.details, attack.sent)
            if answer.code != attack.expected or leaked:
                with lock:
                    wrong.append(f"{attack.name}: {answer.code} {answer.details[:200]!r} leaks {leaked}")
            counts[index] += 1
            i += 1

    def status() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            box.call("GetServerStatus", pb.GetServerStatusRequest(), "viewer", timeout=10)
            latencies.append((time.monotonic(), time.perf_counter() - t0))
            stop.wait(0.05)

    workers = [threading.Thread(target=attacker, args=(i,), daemon=True) for i in range(threads)]
    workers.append(threading.Thread(target=status, daemon=True))
    start = time.monotonic()
    for t in workers:
        t.start()
    while time.monotonic() - start < seconds:
        rss.append((time.monotonic(), box.rss_mb()))
        time.sleep(0.5)
    stop.set()
    for t in workers:
        t.join(30)
    begin = start + min(warmup_s, seconds / 3)
    third = (start + seconds - begin) / 3

    def window(samples: list[tuple[float, float]], lo: float, hi: float) -> list[float]:
        return [v for t, v in samples if lo <= t < hi]

    first = (begin, begin + third)
    last = (start + seconds - third, start + seconds + 1)
    return {
        "seconds": seconds,
        "attacks": sum(counts),
        "wrong_answers": wrong[:20],
        "wrong_count": len(wrong),
        "rss_mb_first": statistics.median(window(rss, *first) or [float("nan")]),
        "rss_mb_last": statistics.median(window(rss, *last) or [float("nan")]),
        "rss_mb_max": max(v for _, v in rss),
        "status_calls": len(latencies),
        "status_p99_ms_first": 1000 * _p99(window(latencies, *first)),
        "status_p99_ms_last": 1000 * _p99(window(latencies, *last)),
    }


def flat(report: dict[str, Any]) -> list[str]:
    """Why the loop's figures are not flat (empty when they are): RSS grew by more than 10% + 20 MB, or
    GetServerStatus p99 in the last third exceeds twice the first third's (and 50 ms)."""
    problems = []
    if report["rss_mb_last"] > report["rss_mb_first"] * 1.10 + 20:
        problems.append(f"RSS grew from {report['rss_mb_first']:.0f} to {report['rss_mb_last']:.0f} MB")
    if report["status_p99_ms_last"] > max(2 * report["status_p99_ms_first"], 50.0):
        problems.append(f"GetServerStatus p99 grew from {report['status_p99_ms_first']:.1f} to "
                        f"{report['status_p99_ms_last']:.1f} ms")
    return problems

