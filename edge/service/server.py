"""The gRPC API for lab software: service `mitosis.edge.v1.EdgeService`, auth, health and reflection.

`start_server` returns a started, bound server (port 0 picks a free one). Reads go to the store;
actions (submit, cancel, status) go to a `DaemonControl`. One broadcaster thread follows the
store's event log and fans new events out to each WatchEvents subscriber's bounded queue; a
subscriber that falls behind by more than ``server.subscriber_buffer`` events is ended with
RESOURCE_EXHAUSTED (never slowing the pipeline or the others) and resumes from the store.
"""

from __future__ import annotations

import base64
import binascii
import collections
import datetime
import hashlib
import ipaddress
import json
import logging
import math
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

from edge.analysis.caveats import ResultFlag, diagnostic_notice, plausibility_flags
from edge.analysis.scoring import Figure
from edge.config import ServerConfig
from edge.errors import (
    ConfigError,
    JobNotFoundError,
    JobStateError,
    ResultNotFoundError,
    SlideNotFoundError,
    SlideReadError,
    StoreError,
)
from edge.logsafe import untrusted
from edge.service.auth import (
    RequestRefused,
    Role,
    TokenTable,
    check_lengths,
    load_tokens,
    resolve_submit_path,
)
from edge.service.store import Event, Job, Store, StoredResult, StoredReview
from edge.wsi.slide import MAX_PLAUSIBLE_MPP, MIN_PLAUSIBLE_MPP

try:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from edge._proto import edge_pb2 as pb
    from edge._proto import edge_pb2_grpc as pb_grpc
except ImportError as _exc:  # pragma: no cover - grpcio is a dependency
    raise ImportError(
        f"the gRPC server needs grpcio, grpcio-health-checking and grpcio-reflection ({_exc}); "
        "reinstall mitosis-edge: pip install mitosis-edge"
    ) from _exc

__all__ = [
    "LAST_SEQUENCE_KEY",
    "SERVICE_NAME",
    "DaemonControl",
    "EventBroadcaster",
    "RunningServer",
    "start_server",
]

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EdgeService"].full_name  # "mitosis.edge.v1.EdgeService"
LAST_SEQUENCE_KEY = "mitosis-edge-last-sequence"  # trailing metadata of an ended WatchEvents stream
DEFAULT_PAGE_SIZE = 100
REPLAY_PAGE = 500  # events read from the store per query while a subscriber catches up
DETECTION_BATCH = 256  # detections per ListDetectionsResponse message
POLL_S = 0.25  # how often blocked stream loops look at cancellation, overflow and shutdown
STALLED_CANCEL_S = 30.0  # an overflowed subscriber that reads nothing for this long is cancelled
REQUEST_IDS_KEPT = 10_000  # SubmitSlide idempotency keys remembered
RESULTS_CACHED = 512  # GetResult replies kept in memory (a few kB each)
MAX_LABELS = 16
EXPORT_CHUNK = 1 << 20  # bytes per GetExportResponse
CERT_WARN_DAYS = 30  # a server certificate expiring sooner is warned about at start
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

    def server_status(self) -> dict[str, Any]: ...

    def is_ready(self) -> bool: ...


# --- events ------------------------------------------------------------------------------------


class _Subscriber:
    """One WatchEvents stream's mailbox: the broadcaster puts, the stream's thread gets."""

    def __init__(self, buffer: int, after: int, context: Any) -> None:
        self.queue: queue.Queue[Event] = queue.Queue(maxsize=buffer)
        self.last_sent = after  # the sequence of the last event handed to grpc
        self.overflowed = threading.Event()
        self.overflowed_at = 0.0
        self.context = context  # the grpc ServicerContext; cancelled when it stalls after overflowing


class EventBroadcaster:
    """Follows the store's event log in one thread and hands every new event to each subscriber.

    A subscriber's queue holds at most `buffer` events; when it is full the subscriber is dropped
    (marked overflowed) instead of anyone waiting for it. `register` admits a subscriber only once it
    has replayed from the store everything already dispatched, so nothing falls between replay and live.
    """

    def __init__(self, store: Store, *, on_tick: Callable[[], None] | None = None, poll_s: float = POLL_S) -> None:
        self._store = store
        self._on_tick = on_tick
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._subscribers: set[_Subscriber] = set()
        self._overflowed: list[_Subscriber] = []
        self._dispatched = store.last_sequence()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-grpc-events", daemon=True)

    @property
    def dispatched(self) -> int:
        """The sequence of the newest event handed to subscribers."""
        with self._lock:
            return self._dispatched

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def register(self, subscriber: _Subscriber, replayed_through: int) -> bool:
        """Add `subscriber` if it has seen every dispatched event (True); else it must replay more first."""
        with self._lock:
            if replayed_through < self._dispatched:
                return False
            self._subscribers.add(subscriber)
            return True

    def unregister(self, subscriber: _Subscriber) -> None:
        with self._lock:
            self._subscribers.discard(subscriber)

    def subscriber_count(self) -> int:
        with self._lock:
            return len(self._subscribers)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._on_tick is not None:
                    self._on_tick()
                if self._store.wait_for_events(self.dispatched, timeout=self._poll_s):
                    self._dispatch(self._store.events_after(self.dispatched, limit=REPLAY_PAGE))
                self._cancel_stalled()
            except StoreError as exc:  # the store was closed under us (shutdown): nothing more to send
                if not self._stop.is_set():
                    log.warning("event broadcaster stops: %s", exc)
                return
            except Exception:  # a bug must not end every subscriber's stream silently
                log.exception("event broadcaster failed; retrying in %.1f s", self._poll_s)
                self._stop.wait(self._poll_s)

    def _dispatch(self, events: Sequence[Event]) -> None:
        with self._lock:
            for event in events:
                for sub in list(self._subscribers):
                    try:
                        sub.queue.put_nowait(event)
                    except queue.Full:
                        self._subscribers.discard(sub)
                        sub.overflowed_at = time.monotonic()
                        sub.overflowed.set()
                        self._overflowed.append(sub)
                self._dispatched = event.sequence

    def _cancel_stalled(self) -> None:
        """A subscriber that overflowed while its client read nothing sits blocked in a send; free it."""
        with self._lock:
            stalled = [s for s in self._overflowed if time.monotonic() - s.overflowed_at > STALLED_CANCEL_S]
            self._overflowed = [s for s in self._overflowed if s not in stalled]
        for sub in stalled:
            if sub.context is not None and sub.context.is_active():
                log.info("cancelling a WatchEvents stream whose client has read nothing for %.0f s", STALLED_CANCEL_S)
                sub.context.cancel()

    def forget(self, subscriber: _Subscriber) -> None:
        with self._lock:
            self._subscribers.discard(subscriber)
            if subscriber in self._overflowed:
                self._overflowed.remove(subscriber)


# --- conversions ---------------------------------------------------------------------------------

_STATE_TO_PB = {
    "queued": pb.JOB_STATE_QUEUED,
    "running": pb.JOB_STATE_RUNNING,
    "done": pb.JOB_STATE_DONE,
    "failed": pb.JOB_STATE_FAILED,
    "cancelled": pb.JOB_STATE_CANCELLED,
}
_PB_TO_STATE = {v: k for k, v in _STATE_TO_PB.items()}
_CLASS_TO_PB = {
    "normal": pb.DETECTION_CLASS_NORMAL,
    "atypical": pb.DETECTION_CLASS_ATYPICAL,
    "uncertain": pb.DETECTION_CLASS_UNCERTAIN,
    "non_mitotic": pb.DETECTION_CLASS_NON_MITOTIC,
}
_PB_TO_CLASS = {v: k for k, v in _CLASS_TO_PB.items()}


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def job_to_pb(job: Job) -> Any:
    msg = pb.Job(
        job_id=job.job_id,
        state=_STATE_TO_PB.get(job.state, pb.JOB_STATE_UNSPECIFIED),
        slide_path=job.slide_path,
        fingerprint=job.fingerprint or "",
        source=job.source,
        priority=job.priority,
        bundle=job.bundle or "",
        attempts=job.attempts,
        error=job.error or "",
        created_at=job.created_at,
        submitted_by=job.submitted_by or "",
        cancelled_by=job.cancelled_by or "",
        accession=job.accession or "",
        labels=list(job.labels),
    )
    for name in ("mpp_override", "started_at", "finished_at", "not_before"):
        value = getattr(job, name)
        if value is not None:
            setattr(msg, name, float(value))
    if job.retryable is not None:
        msg.retryable = job.retryable
    return msg


def _counts_to_pb(data: Mapping[str, Any]) -> Any:
    msg = pb.SubtypeCounts(
        mitotic=int(data.get("mitotic", 0)),
        atypical=int(data.get("atypical", 0)),
        normal=int(data.get("normal", 0)),
        uncertain=int(data.get("uncertain", 0)),
    )
    ratio = _finite(data.get("atypical_ratio"))
    if ratio is not None:
        msg.atypical_ratio = ratio
    return msg


def _set_optional(msg: Any, data: Mapping[str, Any], *names: str) -> None:
    for name in names:
        value = _finite(data.get(name))
        if value is not None:
            setattr(msg, name, value)


def scores_to_pb(scores: Mapping[str, Any]) -> Any:
    """SlideScores.to_json_dict() -> Scores."""
    spot = scores.get("hotspot") or {}
    hotspot = pb.Hotspot(
        area_mm2=float(spot.get("area_mm2") or 0.0),
        radius_um=float(spot.get("radius_um") or 0.0),
        counts=_counts_to_pb(spot),
        null_reason=str(spot.get("null_reason") or ""),
    )
    _set_optional(hotspot, spot, "center_x_um", "center_y_um", "tissue_fraction")
    hint_data = scores.get("mitotic_score_hint") or {}
    hint = pb.MitoticScoreHint(
        count=int(hint_data.get("count", 0)),
        field_area_mm2=float(hint_data.get("field_area_mm2") or 0.0),
        cutoffs=[float(c) for c in hint_data.get("cutoffs") or ()],
        note=str(hint_data.get("note") or ""),
    )
    if hint_data.get("score") is not None:
        hint.score = int(hint_data["score"])
    msg = pb.Scores(
        mitotic_count=int(spot.get("mitotic", 0)),
        hotspot=hotspot,
        totals=_counts_to_pb(scores.get("totals") or {}),
        candidates=int(scores.get("candidates", 0)),
        tissue_area_mm2=float(scores.get("tissue_area_mm2") or 0.0),
        mitotic_score_hint=hint,
    )
    _set_optional(msg, scores, "mitotic_density_per_mm2")
    return msg


def result_to_pb(result: StoredResult, accession: str | None = None) -> Any:
    summary = result.summary
    slide = summary.get("slide") or {}
    provenance = summary.get("provenance") or {}
    bundle = provenance.get("bundle") or {}
    return pb.Result(
        job_id=result.job_id,
        slide_path=result.slide_path,
        fingerprint=result.fingerprint or "",
        scores=scores_to_pb(summary.get("scores") or {}),
        slide=pb.SlideInfo(
            width=int(slide.get("width") or 0),
            height=int(slide.get("height") or 0),
            mpp_x=float(slide.get("mpp_x") or 0.0),
            mpp_y=float(slide.get("mpp_y") or 0.0),
            format=str(slide.get("format") or ""),
            vendor=str(slide.get("vendor") or ""),
            scanner=str((slide.get("scanner") or {}).get("id") or ""),
        ),
        provenance=pb.Provenance(
            package_version=str(provenance.get("package_version") or ""),
            bundle_name=str(bundle.get("name") or "") if isinstance(bundle, Mapping) else str(bundle),
            bundle_version=str(bundle.get("version") or "") if isinstance(bundle, Mapping) else "",
            backend=str(provenance.get("backend") or ""),
            created_at=str(provenance.get("created_at") or ""),
            json=json.dumps(provenance, sort_keys=True),
        ),
        exports={str(k): str(v) for k, v in result.exports.items()},
        detections=result.detections,
        created_at=result.created_at,
        summary_json=json.dumps(summary, sort_keys=True),
        notice=diagnostic_notice(summary),
        flags=[_flag_to_pb(flag) for flag in plausibility_flags(summary)],
        accession=accession or "",
        qc=qc_to_pb(summary.get("qc")),
    )


def _flag_to_pb(flag: ResultFlag) -> Any:
    msg = pb.ResultFlag(code=flag.code, message=flag.message)
    if flag.value is not None:
        msg.value = flag.value
    return msg


def qc_to_pb(qc: Mapping[str, Any] | None) -> Any:
    """The result's qc section as a QcSummary (None when the result has none: the field stays unset)."""
    if not qc:
        return None
    stains = qc.get("stains") or {}
    baseline = qc.get("baseline") or {}
    msg = pb.QcSummary(
        verdict=str(qc.get("verdict") or ""),
        reasons=[str(r) for r in qc.get("reasons") or []],
        out_of_focus_fraction=float(qc.get("out_of_focus_fraction") or 0.0),
        fold_fraction=float(qc.get("fold_fraction") or 0.0),
        pen_fraction=float(qc.get("pen_fraction") or 0.0),
        saturated_fraction=float(qc.get("saturated_fraction") or 0.0),
        hematoxylin_od=[float(v) for v in stains.get("hematoxylin") or []],
        eosin_od=[float(v) for v in stains.get("eosin") or []],
        drift=bool(baseline.get("drift")),
        outside_baseline=baseline.get("in_band") is False,
    )
    _set_optional(msg, qc, "focus_median")
    hotspot = qc.get("hotspot") or {}
    pairs = (("hotspot_out_of_focus_fraction", "out_of_focus_fraction"), ("hotspot_fold_fraction", "fold_fraction"))
    for name, key in pairs:
        value = _finite(hotspot.get(key))
        if value is not None:
            setattr(msg, name, value)
    sharp = (qc.get("sharp_hotspot") or {}).get("mitotic_count")
    if isinstance(sharp, int):
        msg.sharp_hotspot_mitotic_count = sharp
    return msg


def detection_to_pb(figure: Figure) -> Any:
    kind = _CLASS_TO_PB[figure.detection_class]
    msg = pb.Detection(
        x_px=figure.x_px,
        y_px=figure.y_px,
        x_um=figure.x_um,
        y_um=figure.y_um,
        width_px=figure.width_px,
        height_px=figure.height_px,
        detector_score=figure.detector_score,
        p_mitotic=figure.p_mitotic,
        is_mitotic=figure.is_mitotic,
        detection_class=kind,
        scores={str(k): float(v) for k, v in figure.scores.items()},
    )
    if figure.p_atypical is not None:
        msg.p_atypical = figure.p_atypical
    return msg


def review_to_pb(review: StoredReview) -> Any:
    counts = review.counts
    msg = pb.ReviewRecord(
        review_id=review.review_id,
        reviewer=review.reviewer,
        signed_at=review.signed_at,
        mitotic_count=int(counts.get("mitotic") or 0),
        atypical_count=int(counts.get("atypical") or 0),
        normal_count=int(counts.get("normal") or 0),
        uncertain_count=int(counts.get("uncertain") or 0),
        automatic_mitotic_count=int(review.automatic.get("mitotic") or 0),
        current=review.current,
        superseded_by_job_id=review.superseded_by or 0,
        changes_json=json.dumps(review.changes),
        exports={str(k): str(v) for k, v in review.exports.items()},
    )
    ratio = _finite(counts.get("atypical_ratio"))
    if ratio is not None:
        msg.atypical_ratio = ratio
    return msg


def event_to_pb(event: Event) -> Any:
    payload = event.payload
    msg = pb.Event(
        sequence=event.sequence,
        type=event.type,
        job_id=event.job_id or 0,
        state=_STATE_TO_PB.get(str(payload.get("state", "")), pb.JOB_STATE_UNSPECIFIED),
        slide_path=str(payload.get("slide_path") or ""),
        created_at=event.created_at,
        error=str(payload.get("error") or ""),
        attempts=int(payload.get("attempts") or 0),
        payload_json=json.dumps(payload, sort_keys=True),
        accession=str(payload.get("accession") or ""),
        qc_verdict=str(payload.get("verdict") or "") if event.type == "qc_flagged" else "",
        qc_reasons=[str(r) for r in payload.get("reasons") or []] if event.type == "qc_flagged" else [],
        scanner=str(payload.get("scanner") or ""),
        drift_message=str(payload.get("message") or "") if event.type == "drift" else "",
    )
    for name in ("mitotic_count", "total_mitotic"):
        if isinstance(payload.get(name), int) and not isinstance(payload.get(name), bool):
            setattr(msg, name, payload[name])
    ratio = _finite(payload.get("atypical_ratio"))
    if ratio is not None:
        msg.atypical_ratio = ratio
    return msg


# --- the service -------------------------------------------------------------------------------

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
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return "UNAVAILABLE", f"the job store is busy ({exc}); retry"
    if isinstance(exc, StoreError):
        return "UNAVAILABLE", f"the job store cannot answer: {exc}"
    # Anything else may carry server paths or file contents: the caller gets the kind, the log the details.
    return "INTERNAL", f"internal error ({type(exc).__name__}); the daemon's log has the details"


def _unary(method: _F) -> _F:
    """Map exceptions from a unary handler to gRPC statuses with a message; refusals go to the log too."""

    def wrapper(self: EdgeServicer, request: Any, context: Any) -> Any:
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


def _cert_subject(context: Any) -> str:
    try:
        names = context.auth_context().get("x509_common_name") or ()
    except Exception:  # noqa: BLE001 - no TLS, or a fake context
        return ""
    return "CN=" + names[0].decode("utf-8", "replace") if names else ""


def _peer_host(context: Any) -> str:
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
        refusals: _RefusalLog | None = None,
        export_root: Path | None = None,
    ) -> None:
        self.config = config
        self.control = control
        self.store = control.store
        self.broadcaster = broadcaster
        self.roots = tuple(roots)
        self.started_at = started_at
        self.tokens = tokens
        self.refusals = refusals or _RefusalLog()
        self.stopping = threading.Event()
        self.max_streams = config.max_streams
        self._streams_lock = threading.Lock()
        self._streams_by_caller: collections.Counter[str] = collections.Counter()
        # (caller key, request_id) -> (job id, what was asked); per caller, so one cannot hijack another's key
        self._request_ids: collections.OrderedDict[tuple[str, str], tuple[int, tuple[Any, ...]]] = (
            collections.OrderedDict()
        )
        self._submit_lock = threading.Lock()
        self._results: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._results_lock = threading.Lock()
        self.export_root = export_root

    # jobs

    def _caller(self, context: Any, method: str) -> _Caller:
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

    def log_refusal(self, context: Any, method: str, exc: RequestRefused) -> None:
        caller = self._caller(context, method)

        def line() -> str:
            detail = f" ({exc.detail})" if exc.detail else ""
            return f"refused {method} to {untrusted(caller.name)}: {exc.code}: {exc.message}{detail}"

        self.refusals.add((method, exc.code, caller.key), line)

    @_unary
    def SubmitSlide(self, request: Any, context: Any) -> Any:
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
        self, path: Path, request: Any, mpp: float | None, caller: _Caller, case: tuple[str | None, tuple[str, ...]]
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
    def GetJob(self, request: Any, context: Any) -> Any:
        job_id = _positive_id(request.job_id)
        return pb.GetJobResponse(job=job_to_pb(self._job(job_id)))

    def _job(self, job_id: int) -> Job:
        try:
            return self.store.get_job(job_id)
        except JobNotFoundError:
            raise RequestRefused("NOT_FOUND", f"no job {job_id}; list jobs to see the ids") from None

    @_unary
    def ListJobs(self, request: Any, context: Any) -> Any:
        page_size = request.page_size or DEFAULT_PAGE_SIZE
        if not 1 <= page_size <= self.config.max_page_size:
            raise RequestRefused(
                "INVALID_ARGUMENT",
                f"page_size={request.page_size} must be between 1 and {self.config.max_page_size} (0 = "
                f"{DEFAULT_PAGE_SIZE}); fetch further pages with next_page_token",
            )
        states = []
        for value in request.states:
            if value not in _PB_TO_STATE:
                raise RequestRefused("INVALID_ARGUMENT", f"states contains {value}, not a job state (1-5)")
            states.append(_PB_TO_STATE[value])
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
    def CancelJob(self, request: Any, context: Any) -> Any:
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
    def GetResult(self, request: Any, context: Any) -> Any:
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

    def _result(self, job_id: int) -> Any:
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

    def _with_review(self, reply: Any, job_id: int) -> Any:
        """The cached result plus its newest signed review (a review may come any time after the result)."""
        reviews = self.store.list_reviews(job_id=job_id, limit=1)
        if not reviews:
            return reply
        answer = pb.GetResultResponse()
        answer.CopyFrom(reply)
        answer.result.review.CopyFrom(review_to_pb(reviews[0]))
        return answer

    def ListDetections(self, request: Any, context: Any) -> Iterator[Any]:
        try:
            job_id = _positive_id(request.job_id)
            classes = []
            for value in request.classes:
                if value not in _PB_TO_CLASS:
                    raise RequestRefused("INVALID_ARGUMENT", f"classes contains {value}, not a detection class (1-4)")
                classes.append(_PB_TO_CLASS[value])
            if not 0.0 <= request.min_p_mitotic <= 1.0:
                raise RequestRefused("INVALID_ARGUMENT", f"min_p_mitotic={request.min_p_mitotic} must be in [0, 1]")
            if request.offset < 0:
                raise RequestRefused("INVALID_ARGUMENT", f"offset={request.offset} must be 0 or more")
            self._job(job_id)
            figures = self.store.iter_detections(job_id, classes=classes, min_p_mitotic=request.min_p_mitotic)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a gRPC status with its message
            self._abort(context, exc)
        with self._stream_slot(context):
            batch: list[Any] = []
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

    def WatchEvents(self, request: Any, context: Any) -> Iterator[Any]:
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
        subscriber = _Subscriber(self.config.subscriber_buffer, after, context)
        with self._stream_slot(context):
            try:
                yield from self._replay(subscriber)
                yield from self._live(subscriber)
            finally:
                self.broadcaster.forget(subscriber)

    def _replay(self, sub: _Subscriber) -> Iterator[Any]:
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

    def _live(self, sub: _Subscriber) -> Iterator[Any]:
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

    def _check_stream(self, sub: _Subscriber) -> None:
        if self.stopping.is_set():
            sent = sub.last_sent
            sub.context.set_trailing_metadata(((LAST_SEQUENCE_KEY, str(sent)),))
            sub.context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the server is shutting down; last sequence sent {sent}; resume with after_sequence={sent}",
            )
        if not sub.context.is_active():  # cancelled by the client or past its deadline
            raise _StreamGone

    def _abort(self, context: Any, exc: BaseException, sent: int | None = None) -> NoReturn:
        code, message = _code_for(exc)
        if code == "INTERNAL":
            log.error("stream failed: %s", message, exc_info=exc)
        if sent is not None:
            context.set_trailing_metadata(((LAST_SEQUENCE_KEY, str(sent)),))
        context.abort(_GRPC_CODES[code], message)
        raise AssertionError("context.abort returns only by raising")

    def _stream_slot(self, context: Any) -> _StreamSlot:
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
    def GetServerStatus(self, request: Any, context: Any) -> Any:
        status = self.control.server_status()
        counts = self.store.counts_by_state()
        engines = [
            pb.Engine(name=str(e.get("name", "")), role=str(e.get("role", "")), cache_key=str(e.get("cache_key") or ""))
            for e in status.get("engines") or ()
        ]
        bundle = status.get("bundle") or ""
        if isinstance(bundle, Mapping):
            bundle = f"{bundle.get('name', '')} {bundle.get('version', '')}".strip()
        return pb.GetServerStatusResponse(
            version=str(status.get("version") or ""),
            backend=str(status.get("backend") or ""),
            gpu=str(status.get("gpu") or ""),
            engines=engines,
            bundle=str(bundle),
            ready=bool(self.control.is_ready()),
            queue_depth=int(status.get("queue_depth", counts.get("queued", 0))),
            running=int(status.get("running", counts.get("running", 0))),
            uptime_s=float(status.get("uptime_s", time.monotonic() - self.started_at)),
            watch_folders=[str(f) for f in status.get("watch_folders") or ()],
            jobs_by_state=counts,
            last_sequence=self.store.last_sequence(),
            engine_error=str(status.get("engine_error") or ""),
            not_ready_reason=str(status.get("not_ready_reason") or ""),
            waiting_slides=[
                pb.DaemonWaitingSlide(slide_path=str(w["slide_path"]), reason=str(w["reason"]),
                                      waiting_s=float(w["waiting_s"]), fails_in_s=float(w["fails_in_s"]))
                for w in status.get("waiting_slides") or ()
            ],
            intended_use=str(status.get("intended_use") or ""),
        )

    # exports

    def GetExport(self, request: Any, context: Any) -> Iterator[Any]:
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

    def __init__(self, servicer: EdgeServicer, context: Any, caller: _Caller) -> None:
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

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
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


def _open_export(path: Path, limit: int) -> Any:
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


# --- interceptor, server -------------------------------------------------------------------------


class _RefusalLog:
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


class _AuthInterceptor(grpc.ServerInterceptor):
    """Bearer-token check before every call: UNAUTHENTICATED or PERMISSION_DENIED with the reason."""

    def __init__(self, tokens: TokenTable, refusals: _RefusalLog) -> None:
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


class RunningServer:
    """A started gRPC server. `stop` ends streams (UNAVAILABLE, clients resume) and joins every thread."""

    def __init__(
        self,
        server: Any,
        executor: ThreadPoolExecutor,
        servicer: EdgeServicer,
        health_servicer: Any,
        broadcaster: EventBroadcaster,
        host: str,
        port: int,
    ) -> None:
        self._server = server
        self._executor = executor
        self._servicer = servicer
        self._health = health_servicer
        self._broadcaster = broadcaster
        self._serving_override: bool | None = None
        self._serving: bool | None = None
        self._stopped = False
        self._lock = threading.Lock()
        self.host = host
        self.port = port

    @property
    def address(self) -> str:
        """HOST:PORT a client connects to (IPv6 hosts in brackets)."""
        host = self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"

    @property
    def subscribers(self) -> int:
        """WatchEvents streams receiving live events now."""
        return self._broadcaster.subscriber_count()

    def set_serving(self, serving: bool) -> None:
        """Force the health status (SERVING / NOT_SERVING); until called it follows control.is_ready()."""
        with self._lock:
            self._serving_override = serving
        self._apply_health(serving)

    def _follow_readiness(self) -> None:
        with self._lock:
            override = self._serving_override
        serving = override if override is not None else bool(self._servicer.control.is_ready())
        self._apply_health(serving)

    def _apply_health(self, serving: bool) -> None:
        with self._lock:
            if self._stopped or serving == self._serving:
                return
            self._serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            self._health.set(service, status)
        log.info("gRPC health: %s", "SERVING" if serving else "NOT_SERVING (not ready, or stopping)")

    def stop(self, grace: float = 5.0) -> None:
        """Stop taking calls, end streams, wait up to `grace` s for unary calls, join every thread. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._health.enter_graceful_shutdown()
        self._servicer.stopping.set()
        self._server.stop(grace).wait()
        self._broadcaster.stop()
        self._executor.shutdown(wait=True)
        log.info("gRPC server on %s stopped", self.address)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    config: ServerConfig,
    control: DaemonControl,
    *,
    watch_folders: Sequence[str] = (),
    export_root: Path | None = None,
) -> RunningServer:
    """Start the gRPC API on ``config.listen``. Raises ConfigError naming the setting when it cannot.

    TLS when ``tls_cert``/``tls_key`` are set (mutual TLS with ``tls_client_ca``); plain text only
    with ``insecure = true``. SubmitSlide accepts paths under ``allowed_roots`` (default: the watch folders).
    """
    config.validate()
    if not config.tls and not config.insecure:
        raise ConfigError(
            "the gRPC server needs TLS or an explicit choice of plain text: set server.tls_cert and "
            "server.tls_key (plus server.tls_client_ca for mutual TLS), or server.insecure = true (serve --insecure)"
        )
    credentials = _server_credentials(config) if config.tls else None
    tokens = load_tokens(config.tokens_file) if config.tokens_file else None
    host = config.listen.rpartition(":")[0]
    bare_host = host.strip("[]")
    if config.insecure and not _is_loopback(bare_host):
        log.warning(
            "gRPC API on %s without TLS: tokens and results cross the network in plain text; "
            "set server.tls_cert/tls_key or listen on 127.0.0.1", config.listen
        )
    if tokens is None:  # on loopback only this machine's users can call: worth a note, not a warning
        log.log(
            logging.INFO if _is_loopback(bare_host) else logging.WARNING,
            "gRPC API without tokens (server.tokens_file unset): every caller%s may submit and cancel",
            " on this machine" if _is_loopback(bare_host) else "",
        )
    roots = tuple(config.allowed_roots) or tuple(str(f) for f in watch_folders)
    size = config.max_message_mb * 1024 * 1024
    options = [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.so_reuseport", 0),  # a second daemon on the same port must fail, not share it
    ]
    # Streams have threads of their own on top of max_workers, so unary calls always find one.
    refusals = _RefusalLog()
    executor = ThreadPoolExecutor(max_workers=config.max_workers + config.max_streams, thread_name_prefix="edge-grpc")
    server = grpc.server(
        executor,
        interceptors=[_AuthInterceptor(tokens, refusals)] if tokens is not None else [],
        options=options,
        maximum_concurrent_rpcs=config.max_workers * 4 + config.max_streams,
    )
    broadcaster_holder: list[RunningServer] = []
    broadcaster = EventBroadcaster(
        control.store, on_tick=lambda: broadcaster_holder[0]._follow_readiness() if broadcaster_holder else None
    )
    servicer = EdgeServicer(
        config, control, broadcaster, roots, started_at=time.monotonic(), tokens=tokens, refusals=refusals,
        export_root=export_root,
    )
    pb_grpc.add_EdgeServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        if credentials is not None:
            port = server.add_secure_port(config.listen, credentials)
        else:
            port = server.add_insecure_port(config.listen)
    except RuntimeError as exc:
        port = 0
        reason = str(exc)
    else:
        reason = "is the port in use, or the host not an address of this machine?"
    if not port:
        server.stop(None)
        executor.shutdown(wait=True)
        raise ConfigError(f"cannot listen on server.listen={config.listen!r}: {reason}")
    running = RunningServer(server, executor, servicer, health_servicer, broadcaster, bare_host, port)
    running._follow_readiness()
    broadcaster_holder.append(running)
    server.start()
    broadcaster.start()
    log.info(
        "gRPC API on %s (%s, %s); SubmitSlide roots: %s",
        running.address,
        "mutual TLS" if config.tls_client_ca else "TLS" if config.tls else "plain text",
        f"{len(tokens)} token(s)" if tokens is not None else "no tokens",
        ", ".join(roots) or "none",
    )
    return running


def _server_credentials(config: ServerConfig) -> Any:
    cert = _read_pem("server.tls_cert", config.tls_cert)
    key = _read_pem("server.tls_key", config.tls_key)
    check_certificate(config, cert, key)
    client_ca = _read_pem("server.tls_client_ca", config.tls_client_ca) if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def check_certificate(
    config: ServerConfig, cert_pem: bytes, key_pem: bytes, *, now: datetime.datetime | None = None
) -> None:
    """Refuse (ConfigError) a server certificate that has expired, is not valid yet, or does not match its key;
    warn when it expires within CERT_WARN_DAYS. Clients refuse such a certificate anyway: say so at start, by name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError as exc:
        raise ConfigError(f"server.tls_cert={config.tls_cert!r} holds no readable certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"server.tls_key={config.tls_key!r} is not a readable private key without a passphrase ({exc})"
        ) from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise ConfigError(
            f"server.tls_key={config.tls_key!r} does not belong to the certificate server.tls_cert={config.tls_cert!r} "
            "(their public keys differ); give the key the certificate was issued for"
        )
    moment = now or datetime.datetime.now(datetime.UTC)
    expires = cert.not_valid_after_utc
    if expires <= moment:
        raise ConfigError(
            f"server.tls_cert={config.tls_cert!r} expired on {expires:%Y-%m-%d %H:%M} UTC; clients refuse an expired "
            "certificate: renew it (same key or a new one), then start the daemon again"
        )
    if cert.not_valid_before_utc > moment:
        raise ConfigError(
            f"server.tls_cert={config.tls_cert!r} is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; "
            "check this machine's clock (timedatectl) or the certificate"
        )
    if expires - moment < datetime.timedelta(days=CERT_WARN_DAYS):
        log.warning("the server certificate %s expires on %s UTC, in %d day(s): renew it before then, or clients "
                    "will refuse to connect", config.tls_cert, f"{expires:%Y-%m-%d %H:%M}", (expires - moment).days)


def _read_pem(setting: str, path: str) -> bytes:
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}={path!r} cannot be read: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{setting}={path!r} is not a PEM file (no '-----BEGIN' line)")
    return data


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
