"""The pathologist's review page (issue 19), served by `mitosis-edge serve` on [web] listen.

Server-rendered HTML from the stdlib's ThreadingHTTPServer; one small script and one style sheet
ship in the package (edge/service/web_assets). A bearer token (server.tokens_file) is exchanged once at the
login form for an HttpOnly, SameSite=Strict session cookie; tokens never appear in URLs or logs.
Every write (login, logout, sign) needs a same-origin Origin (or Referer) and the session's CSRF token.
Images are rendered from the slide of a job in the store, in memory: no request path reaches the file
system, and a read-only data directory is enough for viewing.
"""

from __future__ import annotations

import html
import io
import json
import logging
import re
import secrets
import select
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from edge.analysis.review import Change, agreement, parse_changes, reviewed_class, reviewed_counts
from edge.config import Config
from edge.errors import EdgeError, JobNotFoundError, JobStateError, ResultNotFoundError, ReviewError
from edge.logsafe import untrusted
from edge.service.server.auth import REVIEW_ROLES, Role, TokenTable, load_tokens
from edge.service.store import Job, Store, StoredResult, StoredReview, result_mpp
from edge.vocab import JOB_STATES, JobState

__all__ = ["WebApp", "start_web"]

log = logging.getLogger(__name__)

COOKIE = "mitosis_edge_session"
MAX_BODY = 1 << 20  # a review of 5000 decisions fits
IMAGE_CACHE = 64  # rendered fields and crops kept in memory
EVENT_WAIT_S = 15.0  # a job list's long poll of the event log waits this long for the next event
MAX_EVENT_WAITERS = 64  # long polls held at once; more are answered at once (the page polls again later)
CLASS_LABELS = {"normal": "mitotic, normal", "atypical": "mitotic, atypical", "uncertain": "mitotic, subtype uncertain",
                "non_mitotic": "rejected look-alike"}
GROUPS = ("normal", "atypical", "uncertain", "non_mitotic")
_JOB_PATH = re.compile(r"^/jobs/(\d{1,18})(?:/(field\.jpg|review|crops/(\d{1,18})\.png|exports/([a-z0-9_.-]{1,40})))?$")


@dataclass
class Session:
    name: str
    role: Role
    csrf: str
    expires: float


@dataclass(frozen=True)
class ReviewFigure:
    """A candidate in the hotspot as the page shows it."""

    detection_id: int
    kind: str
    x_px: float
    y_px: float
    p_mitotic: float
    p_atypical: float | None

    @property
    def doubt(self) -> float:
        """0 = as doubtful as can be (a probability at 0.5), 0.5 = sure."""
        margins = [abs(self.p_mitotic - 0.5)]
        if self.p_atypical is not None and self.kind != "non_mitotic":
            margins.append(abs(self.p_atypical - 0.5))
        return min(margins)


class WebApp:
    """What the handler needs: the store, the settings, the tokens and the logged-in sessions."""

    def __init__(self, config: Config, store: Store, results_dir: Path,
                 on_review: Callable[[StoredReview], None] | None = None) -> None:
        self.config = config
        self.store = store
        self.results_dir = results_dir
        self.tokens: TokenTable | None = load_tokens(config.server.tokens_file) if config.server.tokens_file else None
        self.sessions: dict[str, Session] = {}
        self.on_review = on_review
        self._lock = threading.Lock()
        self._images: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
        self._waiters = threading.BoundedSemaphore(MAX_EVENT_WAITERS)

    def events_after(self, sequence: int, gone: Callable[[], bool] = lambda: False) -> dict[str, Any]:
        """The job ids of events after `sequence` (a long poll: waits up to EVENT_WAIT_S for the first one,
        and stops waiting as soon as `gone()` says the browser closed the page)."""
        if sequence >= 0 and self._waiters.acquire(blocking=False):
            try:
                deadline = time.monotonic() + EVENT_WAIT_S
                while time.monotonic() < deadline and not gone():
                    if self.store.wait_for_events(sequence, min(0.5, deadline - time.monotonic())):
                        break
            finally:
                self._waiters.release()
        events = self.store.events_after(max(sequence, 0), limit=500) if sequence >= 0 else []
        last = events[-1].sequence if events else max(sequence, self.store.last_sequence() if sequence < 0 else 0)
        return {"last_sequence": last, "jobs": sorted({e.job_id for e in events if e.job_id is not None})}

    # --- sessions ------------------------------------------------------------------------------
    def login(self, token: str) -> tuple[str, Session] | None:
        if self.tokens is None:
            found: tuple[str, Role] | None = ("local user", "read")
        else:
            found = self.tokens.identify(token) if token.strip() else None
        if found is None:
            return None
        session = Session(found[0], found[1], secrets.token_urlsafe(24),
                          time.time() + self.config.web.session_hours * 3600)
        key = secrets.token_urlsafe(32)
        with self._lock:
            now = time.time()
            for old in [k for k, s in self.sessions.items() if s.expires < now]:
                del self.sessions[old]
            self.sessions[key] = session
        return key, session

    def session(self, key: str | None) -> Session | None:
        if not key:
            return None
        with self._lock:
            found = self.sessions.get(key)
            if found is not None and found.expires < time.time():
                del self.sessions[key]
                return None
            return found

    def logout(self, key: str) -> None:
        with self._lock:
            self.sessions.pop(key, None)

    # --- reading ---------------------------------------------------------------------------------
    def hotspot_figures(self, result: StoredResult) -> list[ReviewFigure]:
        return [ReviewFigure(i, kind, f.x_px, f.y_px, f.p_mitotic, f.p_atypical)
                for i, kind, f in self.store.hotspot_detections(result)]

    def field_box(self, result: StoredResult) -> tuple[float, float, float, float] | None:
        """The hotspot's bounding square in level-0 px (x0, y0, x1, y1), clipped to the slide."""
        spot = result.summary.get("scores", {}).get("hotspot") or {}
        cx, cy, radius = spot.get("center_x_um"), spot.get("center_y_um"), spot.get("radius_um")
        if cx is None or cy is None or not radius:
            return None
        mpp_x, mpp_y = result_mpp(result)
        width, height = _slide_size(result)
        x0, y0 = max(0.0, (cx - radius) / mpp_x), max(0.0, (cy - radius) / mpp_y)
        x1, y1 = (cx + radius) / mpp_x, (cy + radius) / mpp_y
        if width and height:
            x1, y1 = min(x1, float(width)), min(y1, float(height))
        return x0, y0, x1, y1

    def field_jpeg(self, result: StoredResult) -> bytes | None:
        box = self.field_box(result)
        if box is None:
            return None
        key = ("field", result.job_id, result.created_at)

        def render() -> bytes:
            from edge.wsi.slide import open_slide

            x0, y0, x1, y1 = box
            with open_slide(result.slide_path, self.config.slide) as slide:
                mpp_x, mpp_y = slide.info.level_mpp(0)
                scale = slide.read_scale(self.config.web.field_mpp)
                w = max(1, round((x1 - x0) * mpp_x / self.config.web.field_mpp))
                h = max(1, round((y1 - y0) * mpp_y / self.config.web.field_mpp))
                return _jpeg(slide.read_region(x0, y0, w, h, scale))

        return self._cached(key, render)

    def crop_png(self, result: StoredResult, detection_id: int) -> bytes:
        _, figure = self.store.get_detection(result.job_id, detection_id)
        key = ("crop", result.job_id, result.created_at, detection_id)

        def render() -> bytes:
            from edge.wsi.slide import open_slide

            size = self.config.web.crop_px
            with open_slide(result.slide_path, self.config.slide) as slide:
                mpp_x, mpp_y = slide.info.level_mpp(0)
                scale = slide.read_scale(0.25)
                half_x, half_y = size / 2 * 0.25 / mpp_x, size / 2 * 0.25 / mpp_y
                x0 = min(max(0.0, figure.x_px - half_x), max(0.0, slide.info.width - 2 * half_x))
                y0 = min(max(0.0, figure.y_px - half_y), max(0.0, slide.info.height - 2 * half_y))
                return _png(slide.read_region(x0, y0, size, size, scale))

        return self._cached(key, render)

    def _cached(self, key: tuple[Any, ...], render: Callable[[], bytes]) -> bytes:
        with self._lock:
            if key in self._images:
                self._images.move_to_end(key)
                return self._images[key]
        data = render()
        with self._lock:
            self._images[key] = data
            while len(self._images) > IMAGE_CACHE:
                self._images.popitem(last=False)
        return data

    # --- signing ---------------------------------------------------------------------------------
    def sign(self, job_id: int, reviewer: str, body: Mapping[str, Any]) -> StoredReview:
        result = self.store.get_result(job_id)
        figures = {f.detection_id: f.kind for f in self.hotspot_figures(result)}
        changes = parse_changes(body.get("changes"), figures)
        created = body.get("result_created_at")
        if not isinstance(created, int | float) or isinstance(created, bool):
            raise ReviewError("result_created_at (the result the page showed) is missing; reload the page")
        spot = result.summary.get("scores", {}).get("hotspot") or {}
        automatic = {k: spot.get(k) for k in ("mitotic", "atypical", "normal", "uncertain", "atypical_ratio")}
        counts = reviewed_counts(figures, changes)
        kept, judged = agreement(figures, changes)
        counts["figures_agreed"], counts["figures_judged"] = kept, judged
        review = self.store.add_review(
            job_id, reviewer=reviewer, counts=counts, automatic=automatic,
            changes=[c.to_json_dict() for c in changes], result_created_at=float(created),
        )
        exports = self._write_review_exports(result, review, figures, changes)
        if exports:
            self.store.set_review_exports(review.review_id, exports)
            review = self.store.get_review(job_id)
        log.info("job %d signed by %s: MC %s (automatic %s), %d decisions", job_id, untrusted(reviewer),
                 counts["mitotic"], automatic.get("mitotic"), len(changes))
        if self.on_review is not None:
            self.on_review(review)
        return review

    def _write_review_exports(self, result: StoredResult, review: StoredReview, figures: Mapping[int, str],
                              changes: list[Change]) -> dict[str, Path]:
        """review.json and review.geojson beside the job's exports; a failure is logged, the review stays stored."""
        from edge.analysis.exports import review_geojson_dict, write_json_file

        folder = _export_folder(result) or self.results_dir / str(result.job_id)
        decisions = {c.detection_id: c.decision for c in changes if c.detection_id is not None}
        points = [(i, reviewed_class(kind, decisions.get(i)), kind) for i, kind in figures.items()]
        located = {i: self.store.get_detection(result.job_id, i)[1] for i in figures}
        reviewed = [(located[i].x_px, located[i].y_px, new, old) for i, new, old in points]
        reviewed += [(float(c.x_px or 0), float(c.y_px or 0), str(c.subtype), "added") for c in changes
                     if c.decision == "add"]
        try:
            json_path = folder / "review.json"
            geo_path = folder / "review.geojson"
            write_json_file(json_path, {**review.to_json_dict(), "slide_path": result.slide_path})
            write_json_file(geo_path, review_geojson_dict(result.slide_path, review.review_id, reviewed))
        except OSError as exc:
            log.warning("job %d: the review is stored but its export files could not be written: %s",
                        result.job_id, exc)
            return {}
        return {"review_json": json_path, "review_geojson": geo_path}


def _export_folder(result: StoredResult) -> Path | None:
    for path in result.exports.values():
        return Path(path).parent
    return None


def _slide_size(result: StoredResult) -> tuple[int, int]:
    slide = result.summary.get("slide") or {}
    return int(slide.get("width") or 0), int(slide.get("height") or 0)


def _png(rgb: np.ndarray) -> bytes:
    return _encode(rgb, "PNG")


def _jpeg(rgb: np.ndarray) -> bytes:
    """The hotspot field: about 3200 px square on a real slide, a few MB as PNG, a fraction as JPEG."""
    return _encode(rgb, "JPEG")


def _encode(rgb: np.ndarray, kind: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    options = {"quality": 88} if kind == "JPEG" else {}
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format=kind, **options)
    return buffer.getvalue()


def _asset(name: str) -> bytes:
    return resources.files("edge.service").joinpath("web_assets", name).read_bytes()


# --- HTML --------------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _when(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _page(title: str, body: str, session: Session | None) -> bytes:
    user = ""
    if session is not None:
        user = (f'<form method="post" action="/logout" class="who"><span>{_e(session.name)} ({_e(session.role)})'
                f'</span><input type="hidden" name="csrf" value="{_e(session.csrf)}">'
                '<button type="submit">Log out</button></form>')
    csrf = f'<meta name="csrf-token" content="{_e(session.csrf)}">' if session else ""
    return (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(title)} · mitosis-edge</title>{csrf}"
        '<link rel="stylesheet" href="/static/review.css"><script src="/static/review.js" defer></script>'
        f'</head><body><header><a href="/" class="home">mitosis-edge review</a>{user}</header>'
        f"<main>{body}</main></body></html>"
    ).encode()


def _hotspot_numbers(summary: Mapping[str, Any]) -> dict[str, Any]:
    return (summary.get("scores") or {}).get("hotspot") or {}


def _qc_verdict(summary: Mapping[str, Any]) -> str:
    qc = summary.get("qc")
    if isinstance(qc, Mapping):
        return str(qc.get("verdict") or qc.get("status") or "")
    return str(qc or "")


def _intended_use(summary: Mapping[str, Any]) -> str:
    provenance = summary.get("provenance") or {}
    bundle = provenance.get("bundle")
    bundle = bundle if isinstance(bundle, Mapping) else {}
    return str(summary.get("intended_use") or provenance.get("intended_use") or bundle.get("intended_use") or
               "Research use: an assisted mitotic count that a pathologist checks and signs.")


def job_list_html(store: Store, query: Mapping[str, list[str]], session: Session) -> bytes:
    state = (query.get("state") or [""])[0]
    since, until = (query.get("since") or [""])[0], (query.get("until") or [""])[0]
    jobs = store.list_jobs(states=[state] if state in JOB_STATES else [], limit=500)
    lo, hi = _day(since, 0), _day(until, 86400)
    jobs = [j for j in jobs if (lo is None or j.created_at >= lo) and (hi is None or j.created_at < hi)]
    options = "".join(f'<option value="{s}"{" selected" if s == state else ""}>{s}</option>' for s in JOB_STATES)
    rows = "".join(_job_row(store, job) for job in jobs)
    body = (
        '<h1>Slides</h1><form class="filters" method="get" action="/">'
        f'<label>State <select name="state"><option value="">all</option>{options}</select></label>'
        f'<label>From <input type="date" name="since" value="{_e(since)}"></label>'
        f'<label>To <input type="date" name="until" value="{_e(until)}"></label>'
        '<button type="submit">Filter</button></form>'
        '<table id="jobs" data-live="1"><thead><tr><th>Job</th><th>Slide</th><th>Accession</th><th>State</th>'
        "<th>Hotspot MC</th><th>AMF / NMF</th><th>QC</th><th>Review</th><th>Created</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
        + ("" if jobs else '<p class="empty">No job matches these filters.</p>')
    )
    return _page("Slides", body, session)


def _day(text: str, offset: float) -> float | None:
    try:
        return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC).timestamp() + offset
    except ValueError:
        return None


def job_row_data(store: Store, job: Job) -> dict[str, Any]:
    data: dict[str, Any] = {"job_id": job.job_id, "state": job.state, "slide": Path(job.slide_path).name,
                            "accession": getattr(job, "accession", None) or "", "mc": "", "ratio": "", "qc": "",
                            "review": "", "created": _when(job.created_at)}
    if job.state == JobState.DONE:
        try:
            result = store.get_result(job.job_id)
        except ResultNotFoundError:
            return data
        spot = _hotspot_numbers(result.summary)
        data["mc"] = _num(spot.get("mitotic"))
        data["ratio"] = f"{_num(spot.get('atypical'))} / {_num(spot.get('normal'))}"
        data["qc"] = _qc_verdict(result.summary)
        try:
            review = store.get_review(job.job_id)
            data["review"] = f"signed, MC {review.counts.get('mitotic')}"
        except ResultNotFoundError:
            data["review"] = "to review"
    return data


def _job_row(store: Store, job: Job) -> str:
    d = job_row_data(store, job)
    link = f'<a href="/jobs/{job.job_id}">{_e(d["slide"])}</a>'
    return (
        f'<tr data-job="{job.job_id}"><td>{job.job_id}</td><td>{link}</td><td>{_e(d["accession"])}</td>'
        f'<td class="state state-{_e(job.state)}">{_e(job.state)}</td><td class="mc">{_e(d["mc"])}</td>'
        f'<td class="ratio">{_e(d["ratio"])}</td><td class="qc">{_e(d["qc"])}</td>'
        f'<td class="review">{_e(d["review"])}</td><td>{_e(d["created"])}</td></tr>'
    )


def slide_html(app: WebApp, job: Job, session: Session) -> bytes:
    title = Path(job.slide_path).name
    accession = getattr(job, "accession", None)  # issue 15's case number, where the store has it
    head = (f'<h1>{_e(title)}</h1><p class="meta">Job {job.job_id} · state <b>{_e(job.state)}</b>'
            f'{" · accession " + _e(accession) if accession else ""}'
            f' · created {_e(_when(job.created_at))}</p>')
    try:
        result = app.store.get_result(job.job_id)
    except ResultNotFoundError:
        why = f" ({_e(job.error)})" if job.error else ""
        return _page(title, head + f'<p class="empty">No result yet: the job is {_e(job.state)}{why}.</p>', session)
    spot = _hotspot_numbers(result.summary)
    totals = (result.summary.get("scores") or {}).get("totals") or {}
    try:
        review: StoredReview | None = app.store.get_review(job.job_id)
    except ResultNotFoundError:
        review = None
    figures = app.hotspot_figures(result)
    box = app.field_box(result)
    qc = _qc_verdict(result.summary)
    numbers = (
        '<section class="numbers"><h2>Automatic result</h2><dl>'
        f'<dt>Hotspot mitotic count</dt><dd id="auto-mc">{_num(spot.get("mitotic"))}</dd>'
        f'<dt>AMF / NMF</dt><dd>{_num(spot.get("atypical"))} / {_num(spot.get("normal"))}'
        f' (uncertain {_num(spot.get("uncertain"))})</dd>'
        f'<dt>AMF/NMF ratio</dt><dd>{_num(spot.get("atypical_ratio"))}</dd>'
        f'<dt>Hotspot area</dt><dd>{_num(spot.get("area_mm2"))} mm²</dd>'
        f'<dt>Whole slide MF</dt><dd>{_num(totals.get("mitotic"))}</dd>'
        + (f"<dt>Scan QC</dt><dd>{_e(qc)}</dd>" if qc else "")
        + f'</dl><p class="intended">{_e(_intended_use(result.summary))}</p></section>'
    )
    signed = ""
    if review is not None:
        stale = ("" if review.current else
                 f' <b class="stale">Refers to an earlier result: the slide was analysed again as job '
                 f'<a href="/jobs/{review.superseded_by}">{review.superseded_by}</a>.</b>')
        signed = (f'<section class="signed" id="signed"><h2>Signed review</h2><p>MC <b>{review.counts.get("mitotic")}'
                  f'</b>, AMF {review.counts.get("atypical")}, NMF {review.counts.get("normal")}, ratio '
                  f'{_num(review.counts.get("atypical_ratio"))} · {_e(review.reviewer)}, {_e(_when(review.signed_at))}'
                  f' · {len(review.changes)} changes{stale}</p></section>')
    exports = "".join(f'<li><a href="/jobs/{job.job_id}/exports/{_e(kind)}">{_e(kind)}</a></li>'
                      for kind in sorted({**result.exports, **(review.exports if review else {})}))
    links = f'<section><h2>Exports</h2><ul class="exports">{exports}</ul></section>'
    if "overlay" in result.exports:
        links += (f'<section><h2>Overlay</h2><a href="/jobs/{job.job_id}/exports/overlay">'
                  f'<img class="overlay" src="/jobs/{job.job_id}/exports/overlay" alt="the whole slide with the '
                  'detections and the hotspot"></a></section>')
    can_sign = session.role in REVIEW_ROLES
    field = '<p class="empty">No hotspot: no mitotic figure was found.</p>'
    if box is not None:
        x0, y0, x1, y1 = box
        markers = "".join(
            f'<button class="marker m-{f.kind}" data-id="{f.detection_id}" title="{_e(CLASS_LABELS[f.kind])}" '
            f'data-left="{(f.x_px - x0) / (x1 - x0) * 100:.3f}" data-top="{(f.y_px - y0) / (y1 - y0) * 100:.3f}"'
            ' tabindex="-1"></button>'
            for f in figures
        )
        field = (f'<div id="field" data-x0="{x0:.2f}" data-y0="{y0:.2f}" data-x1="{x1:.2f}" data-y1="{y1:.2f}">'
                 f'<img src="/jobs/{job.job_id}/field.jpg" alt="hotspot field at about '
                 f'{app.config.web.field_mpp} µm/px">{markers}</div>'
                 '<p class="hint">Click on the field to add a missed figure (normal; press <kbd>a</kbd> for atypical).'
                 "</p>")
    gallery = "".join(_gallery_group(job.job_id, kind, [f for f in figures if f.kind == kind]) for kind in GROUPS)
    keys = ("<p class=\"keys\"><kbd>j</kbd>/<kbd>k</kbd> next/previous · <kbd>c</kbd> confirm · <kbd>r</kbd> reject"
            " · <kbd>n</kbd> normal · <kbd>a</kbd> atypical · <kbd>u</kbd> undo · <kbd>Delete</kbd> remove an added"
            " figure</p>")
    sign = (
        '<section class="review"><h2>Your review</h2>'
        f'<p id="tally">MC <b id="rev-mc">{_num(spot.get("mitotic"))}</b>, AMF <b id="rev-amf">'
        f'{_num(spot.get("atypical"))}</b>, NMF <b id="rev-nmf">{_num(spot.get("normal"))}</b>, ratio '
        f'<b id="rev-ratio">{_num(spot.get("atypical_ratio"))}</b> · <span id="changes">0</span> changes</p>'
        + (f'<button id="sign" data-job="{job.job_id}" data-created="{result.created_at!r}">Sign as '
           f'{_e(session.name)}</button>' if can_sign else
           f'<p class="readonly">You are logged in with role {_e(session.role)}: you can view; signing needs a '
           'token with role review.</p>')
        + '<p id="status" role="status"></p></section>'
    )
    body = (head + signed + '<div class="columns"><div class="left">' + numbers + sign + links
            + '</div><div class="right"><h2>Hotspot field</h2>' + field + "</div></div>"
            + f'<h2>Candidates in the hotspot ({len(figures)}), doubtful first</h2>' + keys
            + f'<div id="gallery">{gallery}</div>')
    return _page(title, body, session)


def _gallery_group(job_id: int, kind: str, figures: list[ReviewFigure]) -> str:
    items = "".join(
        f'<figure class="fig c-{f.kind}" tabindex="0" data-id="{f.detection_id}" data-class="{f.kind}">'
        f'<img src="/jobs/{job_id}/crops/{f.detection_id}.png" alt="candidate {f.detection_id}" loading="lazy">'
        f'<figcaption>p(MF) {f.p_mitotic:.2f}'
        + (f" · p(AMF) {f.p_atypical:.2f}" if f.p_atypical is not None else "")
        + '<span class="decision"></span></figcaption></figure>'
        for f in sorted(figures, key=lambda f: (f.doubt, f.detection_id))
    )
    return (f'<section class="group g-{kind}"><h3>{_e(CLASS_LABELS[kind])} ({len(figures)})</h3>'
            f'<div class="figs">{items or "<p class=empty>none</p>"}</div></section>')


def login_html(message: str = "") -> bytes:
    error = f'<p class="error" role="alert">{_e(message)}</p>' if message else ""
    body = ('<h1>Log in</h1><form method="post" action="/login" class="login">'
            '<label>Access token <input type="password" name="token" autocomplete="off" autofocus></label>'
            f'<button type="submit">Log in</button></form>{error}'
            '<p class="hint">Use the token your lab administrator gave you (role read to view, review to sign).</p>')
    return _page("Log in", body, None)


# --- HTTP ----------------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    server_version = "mitosis-edge-web"
    timeout = 60  # an idle or slow connection is closed, its thread freed
    app: WebApp  # set on the subclass made by start_web

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):  # the TLS handshake here, in this connection's thread:
            self.connection.do_handshake()  # a client that never finishes it cannot stall the accept loop

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("web %s %s", self.address_string(), untrusted(format % args))

    # -- plumbing
    def _send(self, status: int, body: bytes, content_type: str = "text/html; charset=utf-8",
              headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        sent = {
            "Content-Type": content_type,
            "Content-Length": str(len(body)),
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
            "Referrer-Policy": "same-origin",
            "Content-Security-Policy": "default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; "
                                       "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
            **(headers or {}),
        }
        for name, value in sent.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: HTTPStatus, message: str, session: Session | None = None) -> None:
        if self.path.startswith("/api/") or (self.command == "POST" and "json" in (self.headers.get("Accept") or "")):
            self._send(status, json.dumps({"error": message}).encode(), "application/json")
            return
        body = f"<h1>{status.value} {_e(status.phrase)}</h1><p>{_e(message)}</p>"
        self._send(status, _page(status.phrase, body, session))

    def _cookie(self) -> str | None:
        raw = self.headers.get("Cookie")
        if not raw:
            return None
        cookie: SimpleCookie = SimpleCookie()
        try:
            cookie.load(raw)
        except Exception:  # noqa: BLE001 - a malformed cookie header is no session
            return None
        morsel = cookie.get(COOKIE)
        return morsel.value if morsel else None

    def _identity(self) -> Session | None:
        session = self.app.session(self._cookie())
        if session is not None:
            return session
        subject = _certificate_subject(self.connection)
        if subject:
            role: Role = "review" if subject in self.app.config.web.review_subjects else "read"
            return Session(subject, role, "", float("inf"))
        return None

    def _client_gone(self) -> bool:
        """Whether the browser closed this connection (a long poll of a page it left)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            if isinstance(self.connection, ssl.SSLSocket):
                return True  # TLS cannot peek; a browser sends nothing more on a long poll but its close
            return bool(self.connection.recv(1, socket.MSG_PEEK) == b"")
        except (OSError, ValueError):
            return True

    def _same_origin(self) -> bool:
        host = self.headers.get("Host") or ""
        origin = self.headers.get("Origin") or self.headers.get("Referer")
        if not origin or origin == "null":
            return False
        return urlsplit(origin).netloc == host

    def _body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ReviewError("the Content-Length header is not a number") from None
        if length > MAX_BODY:
            raise ReviewError(f"the request body of {length} bytes is more than {MAX_BODY}")
        return self.rfile.read(length) if length > 0 else b""

    # -- GET
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def _answer(self, handle: Callable[[], None]) -> None:
        """Run a GET or POST handler; every failure becomes a status with its reason, never a traceback."""
        try:
            handle()
        except (BrokenPipeError, ConnectionResetError):  # the browser left (a long poll of a closed page)
            self.close_connection = True
        except (JobNotFoundError, ResultNotFoundError) as exc:
            self._error(HTTPStatus.NOT_FOUND, str(exc), self._identity())
        except ReviewError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
        except JobStateError as exc:
            self._error(HTTPStatus.CONFLICT, str(exc))
        except EdgeError as exc:
            log.warning("web: %s %s: %s", self.command, untrusted(self.path), exc)
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, f"not possible now: {exc}")
        except Exception:
            log.exception("web: error on %s %s", self.command, untrusted(self.path))
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; the server's log has the details")

    def _get(self) -> None:
        url = urlsplit(self.path)
        if url.path in ("/static/review.css", "/static/review.js"):
            kind = "text/css" if url.path.endswith(".css") else "text/javascript"
            self._send(200, _asset(url.path.rsplit("/", 1)[1]), f"{kind}; charset=utf-8")
            return
        if url.path == "/login":
            self._send(200, login_html())
            return
        session = self._identity()
        if session is None:
            self._send(303, b"", headers={"Location": "/login"})
            return
        if url.path == "/":
            self._send(200, job_list_html(self.app.store, parse_qs(url.query), session))
            return
        if url.path == "/api/events":  # the job list follows the event log: ?after=N (-1: the current end)
            after = (parse_qs(url.query).get("after") or ["-1"])[0]
            if not re.fullmatch(r"-1|\d{1,18}", after):
                raise ReviewError("after must be a sequence number, or -1 for the newest")
            answer = self.app.events_after(int(after), self._client_gone)
            self._send(200, json.dumps(answer).encode(), "application/json")
            return
        if url.path == "/api/jobs":
            query = parse_qs(url.query)
            state = (query.get("state") or [""])[0]
            jobs = self.app.store.list_jobs(states=[state] if state in JOB_STATES else [], limit=500)
            rows = [job_row_data(self.app.store, j) for j in jobs]
            self._send(200, json.dumps({"jobs": rows}).encode(), "application/json")
            return
        match = _JOB_PATH.match(url.path)
        if match is None:
            self._error(HTTPStatus.NOT_FOUND, f"no page at {url.path[:200]}", session)
            return
        job = self.app.store.get_job(int(match.group(1)))
        part = match.group(2)
        if part is None:
            self._send(200, slide_html(self.app, job, session))
            return
        result = self.app.store.get_result(job.job_id)
        if part == "field.jpg":
            png = self.app.field_jpeg(result)
            if png is None:
                raise ResultNotFoundError(f"job {job.job_id} has no hotspot")
            self._send(200, png, "image/jpeg", {"Cache-Control": "private, max-age=600"})
        elif match.group(3):
            self._send(200, self.app.crop_png(result, int(match.group(3))), "image/png")
        elif match.group(4):
            self._export(result, match.group(4))
        else:
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, "sign with POST", session)

    def _export(self, result: StoredResult, kind: str) -> None:
        paths = dict(result.exports)
        try:
            paths.update(self.app.store.get_review(result.job_id).exports)
        except ResultNotFoundError:
            pass
        if kind not in paths:  # only paths the store holds: the URL names a kind, never a file
            raise ResultNotFoundError(f"job {result.job_id} has no export {kind!r}; it has {', '.join(sorted(paths))}")
        path = Path(paths[kind])
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ResultNotFoundError(f"export {kind!r} of job {result.job_id} is no longer on disk ({exc.strerror})"
                                      ) from None
        kinds = {".json": "application/json", ".geojson": "application/geo+json", ".png": "image/png",
                 ".csv": "text/csv; charset=utf-8"}
        disposition = "inline" if path.suffix == ".png" else "attachment"  # the overlay shows on the page
        self._send(200, data, kinds.get(path.suffix, "application/octet-stream"),
                   {"Content-Disposition": f'{disposition}; filename="{path.name}"'})

    # -- POST
    def _post(self) -> None:
        url = urlsplit(self.path)
        if not self._same_origin():
            log.warning("web: cross-site POST %s refused (Origin %s)", untrusted(url.path),
                        untrusted(self.headers.get("Origin") or self.headers.get("Referer") or "none"))
            self._error(HTTPStatus.FORBIDDEN, "cross-site request refused: writes must come from this page")
            return
        body = self._body()
        if url.path == "/login":
            token = (parse_qs(body.decode("utf-8", "replace")).get("token") or [""])[0]
            found = self.app.login(token)
            if found is None:
                self._send(401, login_html("Unknown token. Check the token and try again."))
                return
            key, new = found
            log.info("web: %s logged in (role %s)", untrusted(new.name), new.role)
            secure = "; Secure" if self.app.config.server.tls else ""
            cookie = f"{COOKIE}={key}; HttpOnly; SameSite=Strict; Path=/{secure}"
            self._send(303, b"", headers={"Location": "/", "Set-Cookie": cookie})
            return
        session = self._identity()
        if session is None:
            self._error(HTTPStatus.UNAUTHORIZED, "log in first")
            return
        form = parse_qs(body.decode("utf-8", "replace")) if url.path == "/logout" else {}
        sent = self.headers.get("X-CSRF-Token") or (form.get("csrf") or [""])[0]
        # a client-certificate session has no cookie and no CSRF token: a forged request has nothing to ride on
        if session.csrf and not secrets.compare_digest(sent.encode(), session.csrf.encode()):
            self._error(HTTPStatus.FORBIDDEN, "missing or wrong CSRF token: reload the page and try again")
            return
        if url.path == "/logout":
            self.app.logout(self._cookie() or "")
            self._send(303, b"", headers={"Location": "/login",
                                          "Set-Cookie": f"{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"})
            return
        match = _JOB_PATH.match(url.path)
        if match is None or match.group(2) != "review":
            self._error(HTTPStatus.NOT_FOUND, f"no form at {url.path[:200]}")
            return
        if session.role not in REVIEW_ROLES:
            self._error(HTTPStatus.FORBIDDEN, f"{session.name} has role {session.role}; signing needs role review")
            return
        try:
            payload = json.loads(self._body_text(body))
        except ValueError:
            raise ReviewError("the review must be a JSON object") from None
        if not isinstance(payload, dict):
            raise ReviewError("the review must be a JSON object")
        review = self.app.sign(int(match.group(1)), session.name, payload)
        self._send(200, json.dumps(review.to_json_dict()).encode(), "application/json")

    @staticmethod
    def _body_text(body: bytes) -> str:
        return body.decode("utf-8")


def _certificate_subject(connection: Any) -> str:
    if not isinstance(connection, ssl.SSLSocket):
        return ""
    cert = connection.getpeercert()
    if not cert:
        return ""
    for rdn in cert.get("subject", ()):
        for key, value in rdn:  # type: ignore[str-unpack]
            if key == "commonName":
                return str(value)
    return ""


def start_web(config: Config, store: Store, results_dir: Path,
              on_review: Callable[[StoredReview], None] | None = None) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Serve the review page on config.web.listen in a thread; returns the server (stop with .shutdown())."""
    app = WebApp(config, store, results_dir, on_review)
    handler = type("ReviewHandler", (_Handler,), {"app": app})
    host, _, port = config.web.listen.rpartition(":")
    httpd = ThreadingHTTPServer((host.strip("[]"), int(port)), handler)
    httpd.daemon_threads = True
    if config.server.tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(config.server.tls_cert, config.server.tls_key)
        if config.server.tls_client_ca:
            context.load_verify_locations(config.server.tls_client_ca)
            context.verify_mode = ssl.CERT_OPTIONAL  # a certificate or a token login
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    thread = threading.Thread(target=httpd.serve_forever, name="review-page", daemon=True)
    thread.start()
    scheme = "https" if config.server.tls else "http"
    log.info("review page on %s://%s:%d", scheme, *httpd.server_address[:2])
    return httpd, thread
