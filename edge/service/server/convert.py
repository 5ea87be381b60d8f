"""Store records to protobuf messages: jobs, results (scores, provenance, QC, reviews), detections,
events and the server status. The one place that knows both the store's shapes and the proto's.

Optional proto fields stay unset for a value that is missing or not finite (JSON has no NaN).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from edge._proto import edge_pb2 as pb
from edge.analysis.caveats import ResultFlag, diagnostic_notice, plausibility_flags
from edge.analysis.provenance import Provenance
from edge.analysis.scoring import Figure
from edge.service.status import ServerStatus
from edge.service.store import Event, Job, StoredResult, StoredReview
from edge.vocab import JobState

__all__ = [
    "CLASS_TO_PB",
    "PB_TO_CLASS",
    "PB_TO_STATE",
    "STATE_TO_PB",
    "detection_to_pb",
    "event_to_pb",
    "job_to_pb",
    "provenance_to_pb",
    "qc_to_pb",
    "result_to_pb",
    "review_to_pb",
    "scores_to_pb",
    "status_to_pb",
]

# JobState.QUEUED <-> pb.JOB_STATE_QUEUED, ...: the proto's enum names are the vocabulary's, upper-cased.
STATE_TO_PB: dict[str, pb.JobState] = {str(state): getattr(pb, f"JOB_STATE_{state.name}") for state in JobState}
PB_TO_STATE: dict[int, str] = {v: k for k, v in STATE_TO_PB.items()}
CLASS_TO_PB = {
    "normal": pb.DETECTION_CLASS_NORMAL,
    "atypical": pb.DETECTION_CLASS_ATYPICAL,
    "uncertain": pb.DETECTION_CLASS_UNCERTAIN,
    "non_mitotic": pb.DETECTION_CLASS_NON_MITOTIC,
}
PB_TO_CLASS = {v: k for k, v in CLASS_TO_PB.items()}


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def job_to_pb(job: Job) -> pb.Job:
    msg = pb.Job(
        job_id=job.job_id,
        state=STATE_TO_PB.get(job.state, pb.JOB_STATE_UNSPECIFIED),
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


def _counts_to_pb(data: Mapping[str, Any]) -> pb.SubtypeCounts:
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


def scores_to_pb(scores: Mapping[str, Any]) -> pb.Scores:
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


def result_to_pb(result: StoredResult, accession: str | None = None) -> pb.Result:
    summary = result.summary
    slide = summary.get("slide") or {}
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
        provenance=provenance_to_pb(summary.get("provenance")),
        exports={str(k): str(v) for k, v in result.exports.items()},
        detections=result.detections,
        created_at=result.created_at,
        summary_json=json.dumps(summary, sort_keys=True),
        notice=diagnostic_notice(summary),
        flags=[_flag_to_pb(flag) for flag in plausibility_flags(summary)],
        accession=accession or "",
        qc=qc_to_pb(summary.get("qc")),
    )


def provenance_to_pb(provenance: Mapping[str, Any] | None) -> pb.Provenance:
    """result.json's provenance object (any version of it, see `Provenance.from_json_dict`) -> Provenance;
    ``json`` carries the object as stored, every key included."""
    typed = Provenance.from_json_dict(provenance)
    return pb.Provenance(
        package_version=typed.package_version,
        bundle_name=typed.bundle.name,
        bundle_version=typed.bundle.version,
        backend=typed.backend,
        created_at=typed.created_at,
        json=json.dumps(dict(provenance or {}), sort_keys=True),
    )


def _flag_to_pb(flag: ResultFlag) -> pb.ResultFlag:
    msg = pb.ResultFlag(code=flag.code, message=flag.message)
    if flag.value is not None:
        msg.value = flag.value
    return msg


def qc_to_pb(qc: Mapping[str, Any] | None) -> pb.QcSummary | None:
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


def detection_to_pb(figure: Figure) -> pb.Detection:
    kind = CLASS_TO_PB[figure.detection_class]
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


def review_to_pb(review: StoredReview) -> pb.ReviewRecord:
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


def event_to_pb(event: Event) -> pb.Event:
    payload = event.payload
    msg = pb.Event(
        sequence=event.sequence,
        type=event.type,
        job_id=event.job_id or 0,
        state=STATE_TO_PB.get(str(payload.get("state", "")), pb.JOB_STATE_UNSPECIFIED),
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


def status_to_pb(
    status: ServerStatus, *, ready: bool, jobs_by_state: Mapping[str, int], last_sequence: int, uptime_s: float
) -> pb.GetServerStatusResponse:
    """The daemon's status plus what the server itself knows (readiness now, the store's counts and newest
    event, its own uptime for a status that lacks one)."""
    engines = [
        pb.Engine(name=str(e.get("name", "")), role=str(e.get("role", "")), cache_key=str(e.get("cache_key") or ""))
        for e in status.get("engines") or ()
    ]
    bundle: Any = status.get("bundle") or ""
    if isinstance(bundle, Mapping):  # a status of an early version named the bundle as an object
        bundle = f"{bundle.get('name', '')} {bundle.get('version', '')}".strip()
    return pb.GetServerStatusResponse(
        version=str(status.get("version") or ""),
        backend=str(status.get("backend") or ""),
        gpu=str(status.get("gpu") or ""),
        engines=engines,
        bundle=str(bundle),
        ready=ready,
        queue_depth=int(status.get("queue_depth", jobs_by_state.get(JobState.QUEUED, 0))),
        running=int(status.get("running", jobs_by_state.get(JobState.RUNNING, 0))),
        uptime_s=float(status.get("uptime_s", uptime_s)),
        watch_folders=[str(f) for f in status.get("watch_folders") or ()],
        jobs_by_state=dict(jobs_by_state),
        last_sequence=last_sequence,
        engine_error=str(status.get("engine_error") or ""),
        not_ready_reason=str(status.get("not_ready_reason") or ""),
        waiting_slides=[
            pb.DaemonWaitingSlide(slide_path=str(w["slide_path"]), reason=str(w["reason"]),
                                  waiting_s=float(w["waiting_s"]), fails_in_s=float(w["fails_in_s"]))
            for w in status.get("waiting_slides") or ()
        ],
        intended_use=str(status.get("intended_use") or ""),
    )
