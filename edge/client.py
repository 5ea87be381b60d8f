"""Python client of the mitosis-edge gRPC API, for lab software and the `mitosis-edge client` command.

    >>> from edge.client import EdgeClient
    >>> with EdgeClient("scanner-pc:50051", ca="ca.pem", token="...") as edge:   # doctest: +SKIP
    ...     job = edge.submit("/scans/slide-7.svs", priority=5)
    ...     done = edge.wait_for_job(job["job_id"], timeout=3600)
    ...     print(edge.get_result(job["job_id"])["scores"]["hotspot"]["mitotic"])
    ...     for event in edge.watch_events(after_sequence=0):   # replays, then follows live; resumes by itself
    ...         print(event["sequence"], event["type"], event["job_id"])

Every method returns plain dicts (JSON-able, the same keys as the store and result.json), never
protobuf messages. Calls that fail with UNAVAILABLE are retried with exponential backoff; streams
reconnect and resume where they stopped.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from edge.errors import ConfigError, EdgeClientError, ServerUnavailableError
from edge.fileio import atomic_write
from edge.vocab import JOB_STATES, TERMINAL_JOB_STATES, JobState

try:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from edge._proto import edge_pb2 as pb
    from edge._proto import edge_pb2_grpc as pb_grpc
except ImportError as _exc:  # pragma: no cover - grpcio is a dependency
    raise ImportError(
        f"the mitosis-edge client needs grpcio and grpcio-health-checking ({_exc}); "
        "pip install grpcio grpcio-health-checking"
    ) from _exc

__all__ = [
    "JOB_STATES",
    "TERMINAL_EVENTS",
    "EdgeClient",
    "EdgeClientError",
    "EventStream",
    "ServerUnavailableError",
    "read_token_file",
]

log = logging.getLogger(__name__)

TERMINAL_STATES = TERMINAL_JOB_STATES
TERMINAL_EVENTS = ("job_done", "job_failed", "job_cancelled")
DETECTION_CLASSES = ("normal", "atypical", "uncertain", "non_mitotic")
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_RETRIES = 5
BACKOFF_S = 0.2  # first retry delay; doubled per retry, with jitter
MAX_BACKOFF_S = 5.0

# JobState.QUEUED <-> pb.JOB_STATE_QUEUED, ...: the proto's enum names are the vocabulary's, upper-cased.
_STATE_NAMES = {pb.JobState.Value(f"JOB_STATE_{state.name}"): str(state) for state in JobState}
_STATE_VALUES = {v: k for k, v in _STATE_NAMES.items()}
_CLASS_NAMES = {
    pb.DETECTION_CLASS_NORMAL: "normal",
    pb.DETECTION_CLASS_ATYPICAL: "atypical",
    pb.DETECTION_CLASS_UNCERTAIN: "uncertain",
    pb.DETECTION_CLASS_NON_MITOTIC: "non_mitotic",
}
_CLASS_VALUES = {v: k for k, v in _CLASS_NAMES.items()}


def read_token_file(path: str | Path) -> str:
    """The bearer token in a file: the first word of its first line that is not blank or a '#' comment.

    A line of the server's tokens file ("TOKEN ROLE NAME") works as is.
    """
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"token file {str(p)!r} cannot be read: {exc.strerror or exc}") from None
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            return words[0]
    raise ConfigError(f"token file {str(p)!r} holds no token")


def _read_bytes(what: str, value: str | Path | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} file {str(value)!r} cannot be read: {exc.strerror or exc}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _opt(msg: Any, name: str) -> Any:
    return getattr(msg, name) if msg.HasField(name) else None


# --- messages to dicts -------------------------------------------------------------------------


def job_dict(job: Any) -> dict[str, Any]:
    """A Job message as a dict with the store's keys (`edge.service.store.Job.to_json_dict`)."""
    return {
        "job_id": job.job_id,
        "state": _STATE_NAMES.get(job.state, "unknown"),
        "slide_path": job.slide_path,
        "fingerprint": job.fingerprint or None,
        "source": job.source,
        "priority": job.priority,
        "mpp_override": _opt(job, "mpp_override"),
        "bundle": job.bundle or None,
        "attempts": job.attempts,
        "error": job.error or None,
        "created_at": job.created_at,
        "started_at": _opt(job, "started_at"),
        "finished_at": _opt(job, "finished_at"),
        "not_before": _opt(job, "not_before"),
        "submitted_by": job.submitted_by or None,
        "cancelled_by": job.cancelled_by or None,
        "retryable": _opt(job, "retryable"),
        "accession": job.accession or None,
        "labels": list(job.labels),
    }


def _counts_dict(counts: Any) -> dict[str, Any]:
    return {
        "mitotic": counts.mitotic,
        "atypical": counts.atypical,
        "normal": counts.normal,
        "uncertain": counts.uncertain,
        "atypical_ratio": _opt(counts, "atypical_ratio"),
    }


def scores_dict(scores: Any) -> dict[str, Any]:
    """A Scores message as the "scores" object of result.json (docs/results.md)."""
    spot = scores.hotspot
    hint = scores.mitotic_score_hint
    return {
        "hotspot": {
            "area_mm2": spot.area_mm2,
            "radius_um": spot.radius_um,
            "center_x_um": _opt(spot, "center_x_um"),
            "center_y_um": _opt(spot, "center_y_um"),
            **_counts_dict(spot.counts),
            "tissue_fraction": _opt(spot, "tissue_fraction"),
            "null_reason": spot.null_reason or None,
        },
        "totals": _counts_dict(scores.totals),
        "candidates": scores.candidates,
        "tissue_area_mm2": scores.tissue_area_mm2,
        "mitotic_density_per_mm2": _opt(scores, "mitotic_density_per_mm2"),
        "mitotic_score_hint": {
            "score": _opt(hint, "score"),
            "count": hint.count,
            "field_area_mm2": hint.field_area_mm2,
            "cutoffs": list(hint.cutoffs),
            "note": hint.note,
        },
    }


def result_dict(result: Any) -> dict[str, Any]:
    """A Result message as a dict: result.json's slide_path, slide, scores and provenance, plus the job
    id, fingerprint, export paths and number of detections."""
    summary: dict[str, Any] = json.loads(result.summary_json) if result.summary_json else {}
    slide = result.slide
    flags = [
        {"code": f.code, "message": f.message, "value": _opt(f, "value")} for f in result.flags
    ]
    return {
        "job_id": result.job_id,
        "accession": result.accession or None,
        **({"notice": result.notice} if result.notice else {}),
        "flags": flags,
        "slide_path": result.slide_path,
        "fingerprint": result.fingerprint or None,
        "slide": summary.get("slide")
        or {
            "width": slide.width,
            "height": slide.height,
            "mpp_x": slide.mpp_x,
            "mpp_y": slide.mpp_y,
            "format": slide.format,
            "vendor": slide.vendor,
        },
        "scores": scores_dict(result.scores),
        "provenance": summary.get("provenance")
        or (json.loads(result.provenance.json) if result.provenance.json else {}),
        "exports": dict(result.exports),
        "detections": result.detections,
        "created_at": result.created_at,
        "qc": summary.get("qc") or (qc_dict(result.qc) if result.HasField("qc") else None),
        "review": review_dict(result.review) if result.HasField("review") else None,
    }


def review_dict(review: Any) -> dict[str, Any]:
    """A ReviewRecord as a dict with the store's keys (`edge.service.store.StoredReview.to_json_dict`)."""
    return {
        "review_id": review.review_id,
        "reviewer": review.reviewer,
        "signed_at": review.signed_at,
        "counts": {
            "mitotic": review.mitotic_count,
            "atypical": review.atypical_count,
            "normal": review.normal_count,
            "uncertain": review.uncertain_count,
            "atypical_ratio": review.atypical_ratio if review.HasField("atypical_ratio") else None,
        },
        "automatic_mitotic_count": review.automatic_mitotic_count,
        "current": review.current,
        "superseded_by": review.superseded_by_job_id or None,
        "changes": json.loads(review.changes_json) if review.changes_json else [],
        "exports": dict(review.exports),
    }


def qc_dict(qc: Any) -> dict[str, Any]:
    """A QcSummary message as a dict in the result.json qc section's names (for servers that send no summary)."""
    return {
        "verdict": qc.verdict,
        "reasons": list(qc.reasons),
        "out_of_focus_fraction": qc.out_of_focus_fraction,
        "fold_fraction": qc.fold_fraction,
        "pen_fraction": qc.pen_fraction,
        "saturated_fraction": qc.saturated_fraction,
        "focus_median": _opt(qc, "focus_median"),
        "hotspot": {"out_of_focus_fraction": _opt(qc, "hotspot_out_of_focus_fraction"),
                    "fold_fraction": _opt(qc, "hotspot_fold_fraction")},
        "stains": {"hematoxylin": list(qc.hematoxylin_od), "eosin": list(qc.eosin_od)} if qc.eosin_od else None,
        "baseline": {"drift": qc.drift, "in_band": not qc.outside_baseline},
    }


def detection_dict(detection: Any) -> dict[str, Any]:
    """A Detection message as result.json's figure object, plus its "class"."""
    kind = _CLASS_NAMES.get(detection.detection_class, "unknown")
    return {
        "x_px": detection.x_px,
        "y_px": detection.y_px,
        "x_um": detection.x_um,
        "y_um": detection.y_um,
        "width_px": detection.width_px,
        "height_px": detection.height_px,
        "detector_score": detection.detector_score,
        "p_mitotic": detection.p_mitotic,
        "p_atypical": _opt(detection, "p_atypical"),
        "is_mitotic": detection.is_mitotic,
        "subtype": kind if kind in ("normal", "atypical", "uncertain") else None,
        "class": kind,
        "scores": dict(detection.scores),
    }


def event_dict(event: Any) -> dict[str, Any]:
    """An Event message as a dict with the store's keys (`edge.service.store.Event.to_json_dict`) plus the state."""
    return {
        "sequence": event.sequence,
        "type": event.type,
        "job_id": event.job_id or None,
        "state": _STATE_NAMES.get(event.state),
        "slide_path": event.slide_path,
        "payload": json.loads(event.payload_json) if event.payload_json else {},
        "created_at": event.created_at,
        "accession": event.accession or None,
    }


def status_dict(status: Any) -> dict[str, Any]:
    return {
        "version": status.version,
        "backend": status.backend,
        "gpu": status.gpu,
        "engines": [{"name": e.name, "role": e.role, "cache_key": e.cache_key} for e in status.engines],
        "bundle": status.bundle,
        "ready": status.ready,
        "queue_depth": status.queue_depth,
        "running": status.running,
        "uptime_s": status.uptime_s,
        "watch_folders": list(status.watch_folders),
        "jobs_by_state": dict(status.jobs_by_state),
        "last_sequence": status.last_sequence,
        "engine_error": status.engine_error,
        "not_ready_reason": status.not_ready_reason,
        "waiting_slides": [
            {"slide_path": w.slide_path, "reason": w.reason, "waiting_s": w.waiting_s, "fails_in_s": w.fails_in_s}
            for w in status.waiting_slides
        ],
        "intended_use": status.intended_use,
    }


# --- the client ------------------------------------------------------------------------------


class EdgeClient:
    """A connection to one mitosis-edge server.

    TLS by default (the system's CAs, or `ca`); `cert` and `key` add a client certificate for
    mutual TLS; `insecure=True` speaks plain text (a daemon on localhost). `token` is sent as
    ``authorization: Bearer <token>``. `timeout` bounds each unary call; `retries` is how often a
    call that failed with UNAVAILABLE is tried again (exponential backoff from 0.2 s to 5 s).
    `ca`, `cert` and `key` are file paths or PEM bytes; `server_name` overrides the name checked
    against the server's certificate; `channel_options` are extra grpc channel arguments.
    """

    def __init__(
        self,
        address: str,
        *,
        insecure: bool = False,
        ca: str | Path | bytes | None = None,
        cert: str | Path | bytes | None = None,
        key: str | Path | bytes | None = None,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        max_message_mb: int = 16,
        server_name: str | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if not address or ":" not in address:
            raise ConfigError(f"server address {address!r} must be HOST:PORT, e.g. 127.0.0.1:50051")
        if insecure and (ca or cert or key):
            raise ConfigError("insecure (plain text) and TLS files (ca, cert, key) exclude each other; choose one")
        if bool(cert) != bool(key):
            raise ConfigError("a client certificate needs both cert and key")
        if retries < 0 or timeout <= 0:
            raise ConfigError(f"retries={retries} must be >= 0 and timeout={timeout} > 0")
        self.address = address
        self.timeout = float(timeout)
        self.retries = int(retries)
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        size = max_message_mb * 1024 * 1024
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            ("grpc.enable_retries", 0),  # this class retries, with backoff it controls
        ]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        options.extend(channel_options)
        if insecure:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read_bytes("CA", ca),
                private_key=_read_bytes("client key", key),
                certificate_chain=_read_bytes("client certificate", cert),
            )
            self._channel = grpc.secure_channel(address, credentials, options=options)
        self._stub = pb_grpc.EdgeServiceStub(self._channel)  # type: ignore[no-untyped-call, unused-ignore]
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._closed = threading.Event()

    def close(self) -> None:
        """Close the channel; open streams end."""
        self._closed.set()
        self._channel.close()

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EdgeClient({self.address!r})"

    # --- plumbing

    def error(self, exc: grpc.RpcError) -> EdgeClientError:
        """The EdgeClientError for a failed call, with the server's message and address."""
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = (exc.details() if hasattr(exc, "details") else "") or str(code)
        if code == grpc.StatusCode.UNAVAILABLE:
            return ServerUnavailableError(
                code.name, f"cannot reach the mitosis-edge server at {self.address}: {details}", self.address
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            details = f"no answer within the deadline ({details})"
        return EdgeClientError(code.name, details, self.address)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (1, 2, ...): exponential, with jitter."""
        delay = min(MAX_BACKOFF_S, BACKOFF_S * 2.0 ** (attempt - 1))
        return delay * (0.5 + random.random() / 2)

    def _call(self, method: str, request: Any, *, timeout: float | None = None) -> Any:
        stub_method = getattr(self._stub, method)
        attempt = 0
        while True:
            try:
                return stub_method(request, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries or self._closed.is_set():
                    raise self.error(exc) from None
                attempt += 1
                delay = self.backoff(attempt)
                log.info("%s: %s unavailable (%s); retry %d in %.1f s", method, self.address, exc.details(), attempt,
                         delay)
                if self._closed.wait(delay):
                    raise self.error(exc) from None

    # --- calls

    def health(self, service: str = "") -> str:
        """The standard health status: "SERVING", "NOT_SERVING" (engines loading, stopping), ..."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self.error(exc) from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def status(self) -> dict[str, Any]:
        """Version, backend, GPU, engines, queue depth, uptime, ... (GetServerStatus)."""
        return status_dict(self._call("GetServerStatus", pb.GetServerStatusRequest()))

    def submit(
        self,
        slide_path: str | Path,
        *,
        priority: int = 0,
        mpp_override: float | None = None,
        bundle: str | None = None,
        accession: str | None = None,
        labels: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Queue a slide (a path as the daemon sees it, under its allowed roots). Returns the job.

        Retries reuse one request id, so a retried submit never queues the slide twice.
        """
        request = pb.SubmitSlideRequest(
            slide_path=str(slide_path), priority=priority, bundle=bundle or "", request_id=uuid.uuid4().hex,
            accession=accession or "", labels=list(labels),
        )
        if mpp_override is not None:
            request.mpp_override = mpp_override
        return job_dict(self._call("SubmitSlide", request).job)

    def get_job(self, job_id: int) -> dict[str, Any]:
        return job_dict(self._call("GetJob", pb.GetJobRequest(job_id=job_id)).job)

    def cancel(self, job_id: int) -> dict[str, Any]:
        """Cancel a queued or running job; returns it (cancelled)."""
        return job_dict(self._call("CancelJob", pb.CancelJobRequest(job_id=job_id)).job)

    def iter_jobs(
        self,
        *,
        states: Sequence[str] = (),
        slide_path_contains: str = "",
        newest_first: bool = False,
        page_size: int = 100,
        accession: str = "",
    ) -> Iterator[dict[str, Any]]:
        """Every job matching the filters, fetched a page at a time."""
        unknown = [s for s in states if s not in _STATE_VALUES]
        if unknown:
            raise ConfigError(f"job states {unknown} unknown; use any of {', '.join(JOB_STATES)}")
        token = ""
        while True:
            request = pb.ListJobsRequest(
                states=[_STATE_VALUES[s] for s in states],
                slide_path_contains=slide_path_contains,
                page_size=page_size,
                page_token=token,
                newest_first=newest_first,
                accession=accession,
            )
            reply = self._call("ListJobs", request)
            for job in reply.jobs:
                yield job_dict(job)
            token = reply.next_page_token
            if not token:
                return

    def list_jobs(
        self,
        *,
        states: Sequence[str] = (),
        slide_path_contains: str = "",
        newest_first: bool = False,
        limit: int | None = None,
        page_size: int = 100,
        accession: str = "",
    ) -> list[dict[str, Any]]:
        """Jobs matching the filters (all of them, or the first `limit`)."""
        jobs: list[dict[str, Any]] = []
        if limit is not None and limit <= 0:
            return jobs
        size = min(page_size, limit) if limit else page_size
        for job in self.iter_jobs(
            states=states, slide_path_contains=slide_path_contains, newest_first=newest_first, page_size=size,
            accession=accession,
        ):
            jobs.append(job)
            if limit is not None and len(jobs) >= limit:
                break
        return jobs

    def get_result(self, job_id: int | None = None, *, fingerprint: str | None = None) -> dict[str, Any]:
        """The scores, provenance and export paths of a done job (or of a slide fingerprint's newest result)."""
        if (job_id is None) == (fingerprint is None):
            raise ConfigError("give exactly one of job_id or fingerprint")
        request = pb.GetResultRequest(job_id=job_id) if job_id is not None else pb.GetResultRequest(
            fingerprint=fingerprint
        )
        return result_dict(self._call("GetResult", request).result)

    def detections(
        self, job_id: int, *, classes: Sequence[str] = (), min_p_mitotic: float = 0.0
    ) -> Iterator[dict[str, Any]]:
        """A done job's detections (classified candidates) in detection order; resumes a broken stream."""
        unknown = [c for c in classes if c not in _CLASS_VALUES]
        if unknown:
            raise ConfigError(f"detection classes {unknown} unknown; use any of {', '.join(DETECTION_CLASSES)}")
        received = 0
        attempt = 0
        while True:
            request = pb.ListDetectionsRequest(
                job_id=job_id, classes=[_CLASS_VALUES[c] for c in classes], min_p_mitotic=min_p_mitotic,
                offset=received,
            )
            call = self._stub.ListDetections(request, metadata=self._metadata)
            try:
                for reply in call:
                    for detection in reply.detections:
                        received += 1
                        yield detection_dict(detection)
                    attempt = 0
                return
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries or self._closed.is_set():
                    raise self.error(exc) from None
                attempt += 1
                if self._closed.wait(self.backoff(attempt)):
                    raise self.error(exc) from None
            finally:
                call.cancel()

    def fetch_export(self, job_id: int, name: str, out_dir: str | Path) -> Path:
        """Download one export file of a done job (kind "overlay" or file name "overlay.png") into `out_dir`.

        Written atomically under the name the server sends; returns its path. The whole file
        arrives within `timeout` per MiB, or the call fails and nothing is written.
        """
        call = self._stub.GetExport(
            pb.GetExportRequest(job_id=job_id, name=name), metadata=self._metadata, timeout=self.timeout * 10
        )
        parts: list[bytes] = []
        file_name, size = "", 0
        try:
            for reply in call:
                if reply.file_name:
                    file_name, size = reply.file_name, reply.size
                parts.append(reply.chunk)
        except grpc.RpcError as exc:
            raise self.error(exc) from None
        data = b"".join(parts)
        if not file_name or Path(file_name).name != file_name or file_name in (".", ".."):
            raise EdgeClientError(
                "DATA_LOSS", f"the server sent export {name!r} without a plain file name", self.address
            )
        if len(data) != size:
            raise EdgeClientError(
                "DATA_LOSS", f"export {file_name}: received {len(data)} of {size} bytes; fetch it again", self.address
            )
        target = Path(out_dir) / file_name
        atomic_write(target, data)
        target.chmod(0o644 & ~_umask())
        return target

    def export(self, job_id: int, out_dir: str | Path, names: Sequence[str] = ()) -> dict[str, Path]:
        """Download a done job's export files (all, or those of `names`) into `out_dir`; kind -> path."""
        exports = self.get_result(job_id)["exports"]
        wanted = list(names) or sorted(exports)
        return {name: self.fetch_export(job_id, name, out_dir) for name in wanted}

    def watch_events(
        self, after_sequence: int = 0, *, reconnect: bool = True, timeout: float | None = None
    ) -> EventStream:
        """Every event after `after_sequence` (0: all stored), then live ones, as dicts; see `EventStream`."""
        if after_sequence < 0:
            raise ConfigError(f"after_sequence={after_sequence} must be 0 or more")
        return EventStream(self, after_sequence, reconnect=reconnect, timeout=timeout)

    def wait_for_job(self, job_id: int, timeout: float | None = None) -> dict[str, Any]:
        """Block until the job is done, failed or cancelled; return it. Raises EdgeClientError
        (DEADLINE_EXCEEDED) after `timeout` seconds."""
        after = self.status()["last_sequence"]
        job = self.get_job(job_id)
        if job["state"] in TERMINAL_STATES:
            return job
        stream = self.watch_events(after, timeout=timeout)
        try:
            for event in stream:
                if event["job_id"] == job_id and event["type"] in TERMINAL_EVENTS:
                    return self.get_job(job_id)
        finally:
            stream.cancel()
        raise EdgeClientError("CANCELLED", f"the event stream ended before job {job_id} finished", self.address)

    # used by EventStream
    def _watch_call(self, after: int, timeout: float | None) -> Any:
        return self._stub.WatchEvents(
            pb.WatchEventsRequest(after_sequence=after), metadata=self._metadata, timeout=timeout
        )


class EventStream:
    """An iterator over events (dicts) that reconnects by itself.

    When the server ends the stream with UNAVAILABLE (it stopped, or the network broke) or
    RESOURCE_EXHAUSTED (this subscriber fell behind), the stream reconnects with
    ``after_sequence`` = the last sequence received, so no event is lost or repeated. It gives up
    after the client's `retries` consecutive failed attempts. `cancel` (from any thread) ends it;
    `timeout` (seconds, overall) ends it with EdgeClientError DEADLINE_EXCEEDED.
    """

    def __init__(self, client: EdgeClient, after_sequence: int, *, reconnect: bool, timeout: float | None) -> None:
        self.last_sequence = after_sequence
        self.reconnects = 0  # times the stream was resumed
        self._client = client
        self._reconnect = reconnect
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._call: Any = None
        self._events = self._run()

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._events)

    def cancel(self) -> None:
        """End the stream; a thread blocked waiting for the next event returns (StopIteration)."""
        self._cancelled.set()
        with self._lock:
            if self._call is not None:
                self._call.cancel()

    def _remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return self._deadline - time.monotonic()

    def _run(self) -> Iterator[dict[str, Any]]:
        client = self._client
        failures = 0
        while not self._cancelled.is_set():
            remaining = self._remaining()
            if remaining is not None and remaining <= 0:
                raise EdgeClientError("DEADLINE_EXCEEDED", "the event stream reached its timeout", client.address)
            call = client._watch_call(self.last_sequence, remaining)
            with self._lock:
                self._call = call
            if self._cancelled.is_set():
                call.cancel()
            try:
                for reply in call:
                    event = event_dict(reply.event)
                    if event["sequence"] <= self.last_sequence:  # never expected: the server resumes exactly
                        continue
                    self.last_sequence = event["sequence"]
                    failures = 0
                    yield event
                # The server never ends a stream with OK by itself; reconnect as after a drop.
                code = grpc.StatusCode.UNAVAILABLE
                error: grpc.RpcError | None = None
            except grpc.RpcError as exc:
                code, error = exc.code(), exc
            finally:
                call.cancel()
                with self._lock:
                    self._call = None
            if self._cancelled.is_set() or client._closed.is_set():
                return
            retryable = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
            if not (self._reconnect and retryable and failures < client.retries):
                if error is None:
                    return
                raise client.error(error) from None
            failures += 1
            self.reconnects += 1
            delay = client.backoff(failures)
            log.info(
                "event stream from %s ended (%s); resuming after sequence %d in %.1f s",
                client.address, code.name, self.last_sequence, delay,
            )
            if self._cancelled.wait(delay):
                return
