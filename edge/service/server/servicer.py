"""The EdgeService RPC methods, the bearer-token interceptor in front of them, and how a failure becomes a
gRPC status with a message.

Reads go to the store; actions (submit, cancel, status) go to a `DaemonControl`. Streams (WatchEvents,
ListDetections, GetExport) hold a slot each, end with UNAVAILABLE when the server stops (clients resume),
and a WatchEvents stream's trailing metadata names the last sequence sent (``LAST_SEQUENCE_KEY``).
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn, Protocol, TypeVar

import grpc

from edge._proto import edge_pb2 as pb
from edge._proto import edge_pb2_grpc as pb_grpc
from edge.config import ServerConfig
from edge.errors import (
    ConfigError,
    JobNotFoundError,
    JobStateError,
    RequestRefused,
    ResultNotFoundError,
    SlideNotFoundError,
    SlideReadError,
    StoreBusyError,
    StoreError,
)
from edge.logsafe import untrusted
from edge.service.server.auth import Role, TokenTable, check_lengths, resolve_submit_path
from edge.service.server.convert import (
    PB_TO_CLASS,
    PB_TO_STATE,
    detection_to_pb,
    event_to_pb,
    job_to_pb,
    result_to_pb,
    review_to_pb,
    status_to_pb,
)
from edge.service.server.events import POLL_S, REPLAY_PAGE, EventBroadcaster, Subscriber
from edge.service.status import ServerStatus
from edge.service.store import Job, Store, StoredResult
from edge.vocab import LAST_SEQUENCE_KEY
from edge.wsi.slide import MAX_PLAUSIBLE_MPP, MIN_PLAUSIBLE_MPP

__all__ = ["SERVICE_NAME", "AuthInterceptor", "DaemonControl", "EdgeServicer", "RefusalLog", "export_file"]

log = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["EdgeService"].full_name  # "mitosis.edge.v1.EdgeService"
DEFAULT_PAGE_SIZE = 100
DETECTION_BATCH = 256  # detections per ListDetectionsResponse message
REQUEST_IDS_KEPT = 10_000  # SubmitSlide idempotency keys remembered
RESULTS_CACHED = 512  # GetResult replies kept in memory (a few kB each)
MAX_LABELS = 16
EXPORT_CHUNK = 1 << 20  # bytes per GetExportResponse
REFUSAL_LOG_INTERVAL_S = 60.0  # refused calls are summed up in one WARNING at most this often


class DaemonControl(Protocol):
    """What the server needs from the daemon (edge.service.daemon.Daemon); tests use a fake over a real Store."""

    @property
    def store(self) -> Store: ...

    def submit_slide(
        self,
        path: Path,
        *,
        priority: int,
        mpp_override: float | None,
        bundle: str | None,
        submitted_by: str | None,
        accession: str | None = None,
        labels: tuple[str, ...] = (),
    ) -> Job: ...

    def cancel_job(self, job_id: int, *, cancelled_by: str | None = None) -> Job: ...

    def server_status(self) -> ServerStatus: ...

    def is_ready(self) -> bool: ...



_F = TypeVar("_F", bound=Callable[..., Any])

_GRPC_CODES = {code.name: code for code in grpc.StatusCode}


def _code_for(exc: BaseException) -> tuple[str, str]:
    """The gRPC status (code name, message) for an exception raised while serving a call."""
    if isinstance(exc, RequestRefused):
        return exc.code, exc.message
    if isinstance(exc, JobNotFoundError | ResultNotFoundError | SlideNotFoundError):
        return "NOT_FOUND", str(exc)
    if isinstance(exc, JobStateError):
        return "FAILED_PRECONDITION", str(exc)
    if isinstance(exc, ConfigError | ValueError):
        return "INVALID_ARGUMENT", str(exc)
    if isinstance(exc, StoreBusyError):
        return "UNAVAILABLE", str(exc)
    if isinstance(exc, StoreError):
        return "UNAVAILABLE", f"the job store cannot answer: {exc}"
    # Anything else may carry server paths or file contents: the caller gets the kind, the log the details.
    return "INTERNAL", f"internal error ({type(exc).__name__}); the daemon's log has the details"


def _unary(method: _F) -> _F:
    """Map exceptions from a unary handler to gRPC statuses with a message; refusals go to the log too."""

    def wrapper(self: EdgeServicer, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            code, message = _code_for(exc)
            if code == "INTERNAL":
                log.exception("%s failed", method.__name__)
            elif isinstance(exc, RequestRefused):
                self.log_refusal(context, method.__name__, exc)
            failure = (code, message)
        context.abort(_GRPC_CODES[failure[0]], failure[1])

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper  # type: ignore[return-value]


def _positive_id(value: int, field: str = "job_id") -> int:
    if value <= 0:
        raise RequestRefused("INVALID_ARGUMENT", f"{field}={value} must be a positive job id (got an empty or bad id)")
    return value


class _Caller:
    """Who made a call: `name` is logged and stored with submits and cancels; `key` scopes request ids and
    stream slots (the token name; without tokens the certificate subject, else the client's address)."""

    __slots__ = ("key", "name", "role")

    def __init__(self, name: str, role: Role, key: str) -> None:
        self.name = name
        self.role = role
        self.key = key


def _cert_subject(context: grpc.ServicerContext) -> str:
    try:
        names = context.auth_context().get("x509_common_name") or ()
    except Exception:  # noqa: BLE001 - no TLS, or a fake context
        return ""
    return "CN=" + names[0].decode("utf-8", "replace") if names else ""


def _peer_host(context: grpc.ServicerContext) -> str:
    peer = str(context.peer() or "")
    return peer.rpartition(":")[0] or peer


class EdgeServicer(pb_grpc.EdgeServiceServicer):
    """The EdgeService methods. Streams end with UNAVAILABLE when the server stops (clients resume)."""

    def __init__(
        self,
        config: ServerConfig,
        control: DaemonControl,
        broadcaster: EventBroadcaster,
        roots: Sequence[str],
        *,
        started_at: float,
        tokens: TokenTable | None = None,
        refusals: RefusalLog | None = None,
        export_root: Path | None = None,
    ) -> None:
        self.config = config
        self.control = control
        self.store = control.store
        self.broadcaster = broadcaster
        self.roots = tuple(roots)
        self.started_at = started_at
        self.tokens = tokens
        self.refusals = refusals or RefusalLog()
        self.stopping = threading.Event()
        self.max_streams = config.max_streams
        self._streams_lock = threading.Lock()
        self._streams_by_caller: collections.Counter[str] = collections.Counter()
        # (caller key, request_id) -> (job id, what was asked); per caller, so one cannot hijack another's key
        self._request_ids: collections.OrderedDict[tuple[str, str], tuple[int, tuple[Any, ...]]] = (
            collections.OrderedDict()
        )
        self._submit_lock = threading.Lock()
        self._results: collections.OrderedDict[int, pb.GetResultResponse] = collections.OrderedDict()
        self._results_lock = threading.Lock()
        self.export_root = export_root

    # jobs

    def _caller(self, context: grpc.ServicerContext, method: str) -> _Caller:
        subject = _cert_subject(context)
        if self.tokens is None:
            if subject:
                return _Caller(subject, "admin", subject)
            return _Caller("anonymous", "admin", f"anonymous@{_peer_host(context)}")
        authorization = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                authorization = value if isinstance(value, str) else value.decode("utf-8", "replace")
        decision = self.tokens.check(authorization, f"/{SERVICE_NAME}/{method}")  # the interceptor let it in
        return _Caller(decision.caller, decision.role or "read", decision.caller)

    def log_refusal(self, context: grpc.ServicerContext, method: str, exc: RequestRefused) -> None:
        caller = self._caller(context, method)

        def line() -> str:
            detail = f" ({exc.detail})" if exc.detail else ""
            return f"refused {method} to {untrusted(caller.name)}: {exc.code}: {exc.message}{detail}"

        self.refusals.add((method, exc.code, caller.key), line)

    @_unary
    def SubmitSlide(
        self, request: pb.SubmitSlideRequest, context: grpc.ServicerContext
    ) -> pb.SubmitSlideResponse:
        caller = self._caller(context, "SubmitSlide")
        request_id = request.request_id
        check_lengths(slide_path=request.slide_path, bundle=request.bundle, request_id=request_id)
        mpp = request.mpp_override if request.HasField("mpp_override") else None
        if mpp is not None and not (math.isfinite(mpp) and MIN_PLAUSIBLE_MPP <= mpp <= MAX_PLAUSIBLE_MPP):
            raise RequestRefused(
                "INVALID_ARGUMENT",
                f"mpp_override={mpp:.6g} is not a plausible pixel size: give µm per level-0 pixel between "
                f"{MIN_PLAUSIBLE_MPP} and {MAX_PLAUSIBLE_MPP}, e.g. 0.25 for a 40x scan",
            )
        accession, labels = _case(request.accession, request.labels)
        path = resolve_submit_path(request.slide_path, self.roots)
        if self.stopping.is_set():
            raise RequestRefused("UNAVAILABLE", "the server is shutting down; submit again once it is back")
        asked = (str(path), request.priority, mpp, request.bundle, accession, labels)
        if not request_id:
            job = self._submit(path, request, mpp, caller, (accession, labels))
        else:
            key = (caller.key, request_id)
            with self._submit_lock:  # one submit per key at a time, so a retry cannot race its first try
                known = self._request_ids.get(key)
                if known is not None:
                    job_id, first = known
                    if first != asked:
                        raise RequestRefused(
                            "ALREADY_EXISTS",
                            f"request_id {untrusted(request_id, 40)} already created job {job_id} with other "
                            f"parameters ({_differences(first, asked)}); a new submit needs a new request_id",
                        )
                    return pb.SubmitSlideResponse(job=job_to_pb(self.store.get_job(job_id)))
                job = self._submit(path, request, mpp, caller, (accession, labels))
                self._request_ids[key] = (job.job_id, asked)
                while len(self._request_ids) > REQUEST_IDS_KEPT:
                    self._request_ids.popitem(last=False)
        log.info("job %d submitted over the API by %s: %s (priority %d%s%s)", job.job_id, untrusted(caller.name),
                 untrusted(path), job.priority, f", bundle {untrusted(request.bundle)}" if request.bundle else "",
                 f", accession {untrusted(job.accession)}" if job.accession else "")
        return pb.SubmitSlideResponse(job=job_to_pb(job))

    def _submit(
        self,
        path: Path,
        request: pb.SubmitSlideRequest,
        mpp: float | None,
        caller: _Caller,
        case: tuple[str | None, tuple[str, ...]],
    ) -> Job:
        try:
            return self.control.submit_slide(
                path, priority=request.priority, mpp_override=mpp, bundle=request.bundle or None,
                submitted_by=caller.name, accession=case[0], labels=case[1],
            )
        except SlideReadError as exc:
            raise RequestRefused(
                "FAILED_PRECONDITION",
                f"slide_path {untrusted(request.slide_path)} cannot be read by the server (permissions, or no "
                "slide file or DICOM folder there); the server log has the details",
                str(exc),
            ) from None

    @_unary
    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.GetJobResponse:
        job_id = _positive_id(request.job_id)
        return pb.GetJobResponse(job=job_to_pb(self._job(job_id)))

    def _job(self, job_id: int) -> Job:
        try:
            return self.store.get_job(job_id)
        except JobNotFoundError:
            raise RequestRefused("NOT_FOUND", f"no job {job_id}; list jobs to see the ids") from None

    @_unary
    def ListJobs(self, request: pb.ListJobsRequest, context: grpc.ServicerContext) -> pb.ListJobsResponse:
        page_size = request.page_size or DEFAULT_PAGE_SIZE
        if not 1 <= page_size <= self.config.max_page_size:
            raise RequestRefused(
                "INVALID_ARGUMENT",
                f"page_size={request.page_size} must be between 1 and {self.config.max_page_size} (0 = "
                f"{DEFAULT_PAGE_SIZE}); fetch further pages with next_page_token",
            )
        states = []
        for value in request.states:
            if value not in PB_TO_STATE:
                raise RequestRefused("INVALID_ARGUMENT", f"states contains {value}, not a job state (1-5)")
            states.append(PB_TO_STATE[value])
        check_lengths(
            slide_path_contains=request.slide_path_contains, page_token=request.page_token, accession=request.accession
        )
        filters = _filter_key(states, request.slide_path_contains, request.newest_first, request.accession)
        after = _decode_page_token(request.page_token, filters) if request.page_token else 0
        jobs = self.store.list_jobs(
            states=states,
            slide_path_contains=request.slide_path_contains,
            accession=request.accession,
            after_job_id=after,
            limit=page_size + 1,
            newest_first=request.newest_first,
        )
        page, more = jobs[:page_size], len(jobs) > page_size
        token = _encode_page_token(page[-1].job_id, filters) if more and page else ""
        return pb.ListJobsResponse(jobs=[job_to_pb(j) for j in page], next_page_token=token)

    @_unary
    def CancelJob(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> pb.CancelJobResponse:
        caller = self._caller(context, "CancelJob")
        job_id = _positive_id(request.job_id)
        owner = self._job(job_id).submitted_by
        if caller.role != "admin" and owner != caller.name:
            whose = f"by {untrusted(owner)}" if owner else "by the watcher"
            raise RequestRefused(
                "PERMISSION_DENIED",
                f"job {job_id} was submitted {whose}; a submit token cancels only its own jobs, cancelling "
                "another caller's needs a token with role admin",
            )
        try:
            job = self.control.cancel_job(job_id, cancelled_by=caller.name)
        except JobNotFoundError:
            raise RequestRefused("NOT_FOUND", f"no job {job_id}; list jobs to see the ids") from None
        log.info("job %d cancelled over the API by %s", job_id, untrusted(caller.name))
        return pb.CancelJobResponse(job=job_to_pb(job))

    # results

    @_unary
    def GetResult(self, request: pb.GetResultRequest, context: grpc.ServicerContext) -> pb.GetResultResponse:
        key = request.WhichOneof("key")
        if key == "job_id":
            job_id = _positive_id(request.job_id)
        elif key == "fingerprint":
            if not request.fingerprint.strip():
                raise RequestRefused("INVALID_ARGUMENT", "fingerprint is empty; give a job_id or a 'sha256:...' key")
            check_lengths(fingerprint=request.fingerprint)
            job_id = self.store.get_result_by_fingerprint(request.fingerprint).job_id
        else:
            raise RequestRefused("INVALID_ARGUMENT", "give job_id or fingerprint to find a result")
        return self._result(job_id)

    def _result(self, job_id: int) -> pb.GetResultResponse:
        # A stored result never changes, so its message is built once; lab software polls results often.
        with self._results_lock:
            cached = self._results.get(job_id)
            if cached is not None:
                self._results.move_to_end(job_id)
        if cached is not None:
            return self._with_review(cached, job_id)
        stored = self.store.get_result(job_id)
        reply = pb.GetResultResponse(result=result_to_pb(stored, self.store.get_job(job_id).accession))
        with self._results_lock:
            self._results[job_id] = reply
            while len(self._results) > RESULTS_CACHED:
                self._results.popitem(last=False)
        return self._with_review(reply, job_id)

    def _with_review(self, reply: pb.GetResultResponse, job_id: int) -> pb.GetResultResponse:
        """The cached result plus its newest signed review (a review may come any time after the result)."""
        reviews = self.store.list_reviews(job_id=job_id, limit=1)
        if not reviews:
            return reply
        answer = pb.GetResultResponse()
        answer.CopyFrom(reply)
        answer.result.review.CopyFrom(review_to_pb(reviews[0]))
        return answer

    def ListDetections(
        self, request: pb.ListDetectionsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ListDetectionsResponse]:
        try:
            job_id = _positive_id(request.job_id)
            classes = []
            for value in request.classes:
                if value not in PB_TO_CLASS:
                    raise RequestRefused("INVALID_ARGUMENT", f"classes contains {value}, not a detection class (1-4)")
                classes.append(PB_TO_CLASS[value])
            if not 0.0 <= request.min_p_mitotic <= 1.0:
                raise RequestRefused("INVALID_ARGUMENT", f"min_p_mitotic={request.min_p_mitotic} must be in [0, 1]")
            if request.offset < 0:
                raise RequestRefused("INVALID_ARGUMENT", f"offset={request.offset} must be 0 or more")
            self._job(job_id)
            figures = self.store.iter_detections(job_id, classes=classes, min_p_mitotic=request.min_p_mitotic)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a gRPC status with its message
            self._abort(context, exc)
        with self._stream_slot(context):
            batch: list[pb.Detection] = []
            skip = request.offset
            try:
                for figure in figures:
                    if skip:
                        skip -= 1
                        continue
                    batch.append(detection_to_pb(figure))
                    if len(batch) == DETECTION_BATCH:
                        if not context.is_active() or self.stopping.is_set():
                            break
                        yield pb.ListDetectionsResponse(detections=batch)
                        batch = []
            except Exception as exc:  # noqa: BLE001 - every failure becomes a gRPC status with its message
                self._abort(context, exc)
            if self.stopping.is_set():
                context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; resume with offset")
            if batch:
                yield pb.ListDetectionsResponse(detections=batch)

    # events

    def WatchEvents(
        self, request: pb.WatchEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchEventsResponse]:
        after = request.after_sequence
        if after < 0:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"after_sequence={after} must be 0 (everything) or the last sequence received",
            )
        try:
            newest = self.store.last_sequence()
        except Exception as exc:  # noqa: BLE001 - every failure becomes a gRPC status with its message
            self._abort(context, exc)
        if after > newest:
            context.abort(
                grpc.StatusCode.OUT_OF_RANGE,
                f"after_sequence={after} is beyond this server's newest event {newest}: was the store replaced? "
                f"resume with after_sequence={newest} (or 0 to replay everything)",
            )
        subscriber = Subscriber(self.config.subscriber_buffer, after, context)
        with self._stream_slot(context):
            try:
                yield from self._replay(subscriber)
                yield from self._live(subscriber)
            finally:
                self.broadcaster.forget(subscriber)

    def _replay(self, sub: Subscriber) -> Iterator[pb.WatchEventsResponse]:
        """Send stored events until the subscriber has everything the broadcaster dispatched; then register it."""
        while True:
            target = self.broadcaster.dispatched
            while sub.last_sent < target:
                self._check_stream(sub)
                try:
                    events = self.store.events_after(sub.last_sent, limit=min(REPLAY_PAGE, target - sub.last_sent))
                except Exception as exc:  # noqa: BLE001 - every failure becomes a gRPC status with its message
                    self._abort(sub.context, exc, sub.last_sent)
                if not events:
                    break
                for event in events:
                    yield pb.WatchEventsResponse(event=event_to_pb(event))
                    sub.last_sent = event.sequence
            if self.broadcaster.register(sub, sub.last_sent):
                return

    def _live(self, sub: Subscriber) -> Iterator[pb.WatchEventsResponse]:
        while True:
            self._check_stream(sub)
            if sub.overflowed.is_set():
                sub.context.set_trailing_metadata(((LAST_SEQUENCE_KEY, str(sub.last_sent)),))
                sub.context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this subscriber fell more than {self.config.subscriber_buffer} events behind; last sequence "
                    f"sent {sub.last_sent}; resume with after_sequence={sub.last_sent}",
                )
            try:
                event = sub.queue.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if event.sequence <= sub.last_sent:  # already replayed from the store
                continue
            if event.sequence > sub.last_sent + 1:  # never expected; filled from the store so nothing is lost
                log.warning("event gap after %d in a live stream; filling it from the store", sub.last_sent)
                gap = event.sequence - sub.last_sent - 1
                for missed in self.store.events_after(sub.last_sent, limit=min(REPLAY_PAGE, gap)):
                    yield pb.WatchEventsResponse(event=event_to_pb(missed))
                    sub.last_sent = missed.sequence
            yield pb.WatchEventsResponse(event=event_to_pb(event))
            sub.last_sent = event.sequence

    def _check_stream(self, sub: Subscriber) -> None:
        if self.stopping.is_set():
            sent = sub.last_sent
            sub.context.set_trailing_metadata(((LAST_SEQUENCE_KEY, str(sent)),))
            sub.context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the server is shutting down; last sequence sent {sent}; resume with after_sequence={sent}",
            )
        if not sub.context.is_active():  # cancelled by the client or past its deadline
            raise _StreamGone

    def _abort(self, context: grpc.ServicerContext, exc: BaseException, sent: int | None = None) -> NoReturn:
        code, message = _code_for(exc)
        if code == "INTERNAL":
            log.error("stream failed: %s", message, exc_info=exc)
        if sent is not None:
            context.set_trailing_metadata(((LAST_SEQUENCE_KEY, str(sent)),))
        context.abort(_GRPC_CODES[code], message)
        raise AssertionError("context.abort returns only by raising")

    def _stream_slot(self, context: grpc.ServicerContext) -> _StreamSlot:
        return _StreamSlot(self, context, self._caller(context, "WatchEvents"))  # both streams need role read

    def _take_stream(self, caller: _Caller) -> str:
        """Count one more stream for `caller`; '' when taken, else the refusal naming the limit hit."""
        with self._streams_lock:
            total = sum(self._streams_by_caller.values())
            if total >= self.max_streams:
                return (f"this server already serves {total} streams, its limit (server.max_streams); "
                        "retry later, or raise server.max_streams on the server")
            held = self._streams_by_caller[caller.key]
            if held >= self.config.max_streams_per_caller:
                return (f"caller {untrusted(caller.name, 60)} already holds {held} streams, the most one caller may "
                        "(server.max_streams_per_caller); close one of them or retry later")
            self._streams_by_caller[caller.key] += 1
            return ""

    def _give_stream(self, caller: _Caller) -> None:
        with self._streams_lock:
            self._streams_by_caller[caller.key] -= 1
            if self._streams_by_caller[caller.key] <= 0:
                del self._streams_by_caller[caller.key]

    # status

    @_unary
    def GetServerStatus(
        self, request: pb.GetServerStatusRequest, context: grpc.ServicerContext
    ) -> pb.GetServerStatusResponse:
        return status_to_pb(
            self.control.server_status(),
            ready=bool(self.control.is_ready()),
            jobs_by_state=self.store.counts_by_state(),
            last_sequence=self.store.last_sequence(),
            uptime_s=time.monotonic() - self.started_at,
        )

    # exports

    def GetExport(
        self, request: pb.GetExportRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GetExportResponse]:
        try:
            job_id = _positive_id(request.job_id)
            self._job(job_id)
            path = export_file(self.store.get_result(job_id), request.name, self.export_root)
            limit = self.config.max_export_mb * 2**20
            handle = _open_export(path, limit)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a gRPC status with its message
            self._abort(context, exc)
        with self._stream_slot(context), handle:
            size = os.fstat(handle.fileno()).st_size
            first = True
            while True:
                chunk = handle.read(EXPORT_CHUNK)
                if not chunk and not first:
                    break
                if not context.is_active() or self.stopping.is_set():
                    context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; fetch the file again")
                yield pb.GetExportResponse(file_name=path.name if first else "", size=size if first else 0, chunk=chunk)
                first = False
                if not chunk:
                    break
        log.info("job %d: sent export %s (%d bytes)", job_id, path.name, size)


class _StreamGone(Exception):
    """The client went away (cancelled, deadline passed): end the stream quietly."""


class _StreamSlot:
    """Streams hold a thread each: at most `server.max_streams` at once (their threads come on top of the
    unary ones), and at most `server.max_streams_per_caller` per caller, so no caller locks out the others."""

    def __init__(self, servicer: EdgeServicer, context: grpc.ServicerContext, caller: _Caller) -> None:
        self._servicer = servicer
        self._context = context
        self._caller = caller
        self._held = False

    def __enter__(self) -> _StreamSlot:
        refusal = self._servicer._take_stream(self._caller)
        if refusal:
            self._servicer.refusals.add(("streams", self._caller.key), lambda: (
                f"refused a stream to {untrusted(self._caller.name)}: {refusal}"))
            self._context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        self._held = True
        self._context.send_initial_metadata(())  # the client's call.initial_metadata() returns: it holds a slot
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if self._held:
            self._servicer._give_stream(self._caller)
            self._held = False
        return exc_type is _StreamGone  # a vanished client ends the stream without an error


def _case(accession: str, labels: Sequence[str]) -> tuple[str | None, tuple[str, ...]]:
    """A submit's accession and labels, checked: printable, at most FIELD_LIMITS long (INVALID_ARGUMENT otherwise)."""
    accession = accession.strip()
    check_lengths(accession=accession)
    if accession and not accession.isprintable():
        raise RequestRefused("INVALID_ARGUMENT", f"accession {untrusted(accession, 40)} must be printable characters")
    if len(labels) > MAX_LABELS:
        raise RequestRefused("INVALID_ARGUMENT", f"{len(labels)} labels; at most {MAX_LABELS}")
    for label in labels:
        check_lengths(label=label)
        if not label.strip() or not label.isprintable():
            raise RequestRefused("INVALID_ARGUMENT", f"label {untrusted(label, 40)} must be printable, not empty")
    return accession or None, tuple(label.strip() for label in labels)


def export_file(result: StoredResult, name: str, root: Path | None) -> Path:
    """The file of a job's export named by kind ("overlay") or file name ("overlay.png"); never a client's path.

    Only paths the store recorded for this job, and (when ``root`` is given) only under it.
    """
    if result.pruned_at is not None:
        raise RequestRefused(
            "NOT_FOUND", f"the exports of job {result.job_id} were deleted by daemon.export_retention_days"
        )
    by_name = {Path(p).name: Path(p) for p in result.exports.values()}
    path = (result.exports.get(name) and Path(result.exports[name])) or by_name.get(name)
    if path is None:
        known = ", ".join(sorted(result.exports)) or "none"
        raise RequestRefused(
            "NOT_FOUND", f"job {result.job_id} has no export {untrusted(name, 60)}; its exports: {known}"
        )
    if root is not None and not path.resolve().is_relative_to(root.resolve()):
        raise RequestRefused(
            "PERMISSION_DENIED", f"export {untrusted(name, 60)} of job {result.job_id} is outside the results folder"
        )
    return path


def _open_export(path: Path, limit: int) -> IO[bytes]:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise RequestRefused("NOT_FOUND", f"export file {path.name} is gone from the daemon's disk") from None
    except OSError as exc:
        raise RequestRefused("NOT_FOUND", f"export file {path.name} cannot be read: {exc.strerror or exc}") from None
    handle = os.fdopen(fd, "rb")
    size = os.fstat(fd).st_size
    if size > limit:
        handle.close()
        raise RequestRefused(
            "RESOURCE_EXHAUSTED",
            f"export {path.name} has {size / 2**20:.1f} MB, more than server.max_export_mb={limit // 2**20}; "
            "raise it on the server or copy the file from the daemon's disk",
        )
    return handle


def _differences(first: tuple[Any, ...], second: tuple[Any, ...]) -> str:
    """Which SubmitSlide parameters differ between two submits with one request_id (values untrusted, shortened)."""
    names = ("slide_path", "priority", "mpp_override", "bundle", "accession", "labels")
    pairs = zip(names, first, second, strict=True)
    return ", ".join(f"{name} {untrusted(a, 60)} then {untrusted(b, 60)}" for name, a, b in pairs if a != b)


def _filter_key(states: Sequence[str], contains: str, newest_first: bool, accession: str = "") -> str:
    text = json.dumps([sorted(states), contains, newest_first, *([accession] if accession else [])])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _encode_page_token(after_job_id: int, filters: str) -> str:
    return base64.urlsafe_b64encode(f"{after_job_id}:{filters}".encode()).decode().rstrip("=")


def _decode_page_token(token: str, filters: str) -> int:
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        after, _, key = text.partition(":")
        value = int(after)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise RequestRefused("INVALID_ARGUMENT", "page_token is not one this server gave out; start from ''") from None
    if key != filters or value < 1:
        raise RequestRefused(
            "INVALID_ARGUMENT", "page_token belongs to a request with other filters or order; start from ''"
        )
    return value



# --- the token check in front of every call ------------------------------------------------------


class RefusalLog:
    """Refusals in the server log: per kind of refusal (who, which method, which code) at most one line every
    REFUSAL_LOG_INTERVAL_S, which also counts the ones left out. A client refused in a loop (junk without a
    token, a guessed path, a stream flood) cannot flood the log, and still shows up in it."""

    def __init__(self, interval_s: float = REFUSAL_LOG_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._kinds: collections.OrderedDict[Any, tuple[float, int]] = collections.OrderedDict()

    def add(self, kind: Any, line: Callable[[], str]) -> None:
        now = time.monotonic()
        with self._lock:
            last, left_out = self._kinds.get(kind, (-math.inf, 0))
            if now - last < self._interval_s:
                self._kinds[kind] = (last, left_out + 1)
                return
            self._kinds[kind] = (now, 0)
            self._kinds.move_to_end(kind)
            while len(self._kinds) > REQUEST_IDS_KEPT:  # bounded, whoever calls
                self._kinds.popitem(last=False)
        more = f" (and {left_out} more like it in the last {self._interval_s:.0f} s)" if left_out else ""
        log.warning("%s%s", line(), more)


def _ignore_body(data: bytes) -> bytes:
    """The body of a refused call is never parsed: junk from an unauthenticated client costs nothing."""
    return data


class AuthInterceptor(grpc.ServerInterceptor):  # type: ignore[misc, unused-ignore]  # grpc ships no types
    """Bearer-token check before every call: UNAUTHENTICATED or PERMISSION_DENIED with the reason."""

    def __init__(self, tokens: TokenTable, refusals: RefusalLog) -> None:
        self._tokens = tokens
        self._refusals = refusals

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED
            return None
        authorization = None
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                authorization = value if isinstance(value, str) else value.decode("utf-8", "replace")
        decision = self._tokens.check(authorization, details.method)
        if decision.allowed:
            return handler
        code = _GRPC_CODES[decision.code]
        message = decision.message
        refusals, method = self._refusals, details.method

        def deny(request: Any, context: Any) -> Any:
            if code == grpc.StatusCode.UNAUTHENTICATED:
                refusals.add("unauthenticated", lambda: (
                    f"refused a call without a valid token: {untrusted(method, 80)} from "
                    f"{untrusted(context.peer(), 80)}: {message}"))
            else:
                refusals.add((method, decision.code, decision.caller), lambda: (
                    f"refused {untrusted(method, 80)} to {untrusted(decision.caller)}: {message}"))
            context.abort(code, message)

        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                deny, request_deserializer=_ignore_body, response_serializer=handler.response_serializer
            )
        return grpc.unary_unary_rpc_method_handler(
            deny, request_deserializer=_ignore_body, response_serializer=handler.response_serializer
        )
