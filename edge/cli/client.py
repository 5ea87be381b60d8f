"""`mitosis-edge client ...`: talk to a running daemon over its gRPC API.

Part of the command-line shell (it prints); the work happens in ``edge.client``. Human text by
default, JSON with ``--json``. Errors raise EdgeError subclasses that ``edge.cli.main`` prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

from edge.cli._common import usage_handler
from edge.errors import ConfigError
from edge.vocab import JOB_STATES, DetectionClass, ExitCode

DEFAULT_SERVER = "127.0.0.1:50051"
SERVER_ENV = "MITOSIS_EDGE_SERVER"
TOKEN_ENV = "MITOSIS_EDGE_TOKEN"
STATES = JOB_STATES
CLASSES = tuple(c.value for c in DetectionClass)  # plain strings: argparse quotes them in its errors


def add_client_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``client`` and its subcommands on the top-level parser's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "client",
        help="talk to a running mitosis-edge daemon over gRPC: status, submit, get, list, watch, detections, export",
        description="Talk to a running mitosis-edge daemon over its gRPC API.",
    )
    p.add_argument(
        "--server", metavar="HOST:PORT", default=None,
        help=f"daemon address (default ${SERVER_ENV} or {DEFAULT_SERVER})",
    )
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true", help="plain text, no TLS (a daemon on localhost)")
    tls.add_argument("--ca", metavar="FILE", help="CA certificate (PEM) that signed the server's certificate")
    p.add_argument("--cert", metavar="FILE", help="client certificate (PEM) for mutual TLS")
    p.add_argument("--key", metavar="FILE", help="client private key (PEM) for mutual TLS")
    p.add_argument(
        "--token-file", metavar="FILE",
        help=f"file whose first word is the bearer token (default: ${TOKEN_ENV}, else no token)",
    )
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds per call (default 10)")
    p.add_argument(
        "--retries", type=int, default=3, metavar="N",
        help="tries again N times, with backoff, while the server is unreachable (default 3)",
    )
    p.set_defaults(handler=usage_handler(p))
    sub = p.add_subparsers(title="client commands", metavar="WHAT")

    c = sub.add_parser("status", help="server version, backend, GPU, engines, queue depth, uptime")
    _json_flag(c)
    c.set_defaults(handler=cmd_status)

    c = sub.add_parser("submit", help="queue a slide (a path as the daemon sees it, under its allowed roots)")
    c.add_argument("slide", help="slide path on the daemon's machine")
    c.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    c.add_argument("--mpp", type=float, help="µm/px for a slide that records none")
    c.add_argument("--bundle", help="name of a model bundle the daemon allows (default: the daemon's)")
    c.add_argument("--accession", help="the case's accession number (default: from the path or the slide's barcode)")
    c.add_argument("--label", dest="labels", action="append", default=[], metavar="TEXT",
                   help="a free label for the job (repeatable)")
    c.add_argument("--wait", action="store_true", help="wait until the job ends and print its result")
    c.add_argument("--wait-timeout", type=float, metavar="S", help="give up waiting after S seconds")
    _json_flag(c)
    c.set_defaults(handler=cmd_submit)

    c = sub.add_parser("get", help="one job and, once done, its result with the scores")
    c.add_argument("job", type=int, nargs="?", help="job id")
    c.add_argument("--fingerprint", help="the newest result of the slide with this fingerprint instead")
    _json_flag(c)
    c.set_defaults(handler=cmd_get)

    c = sub.add_parser("list", help="jobs, oldest first")
    c.add_argument("--state", action="append", choices=STATES, help="only jobs in this state (repeatable)")
    c.add_argument("--contains", default="", metavar="TEXT", help="only slides whose path contains TEXT")
    c.add_argument("--accession", default="", help="only jobs of this accession number")
    c.add_argument("--newest-first", action="store_true", help="newest jobs first")
    c.add_argument("--limit", type=int, metavar="N", help="at most N jobs (default all)")
    _json_flag(c, "print a JSON array of jobs")
    c.set_defaults(handler=cmd_list)

    c = sub.add_parser("cancel", help="cancel a queued or running job")
    c.add_argument("job", type=int, help="job id")
    _json_flag(c)
    c.set_defaults(handler=cmd_cancel)

    c = sub.add_parser("watch", help="follow job events: the stored ones after --after, then live ones")
    c.add_argument("--after", type=int, default=None, metavar="SEQ",
                   help="replay events after this sequence (0 = all; default: only new events)")
    c.add_argument("--count", type=int, metavar="N", help="stop after N events")
    c.add_argument("--job", type=int, metavar="ID", help="only this job's events; stop when it ends")
    c.add_argument("--seconds", type=float, metavar="S", help="stop after S seconds")
    _json_flag(c, "one JSON object per line")
    c.set_defaults(handler=cmd_watch)

    c = sub.add_parser("detections", help="a done job's detections (classified candidates)")
    c.add_argument("job", type=int, help="job id")
    c.add_argument("--class", dest="classes", action="append", choices=CLASSES,
                   help="only this class (repeatable; default all)")
    c.add_argument("--min-p", type=float, default=0.0, metavar="P", help="only p_mitotic >= P")
    _json_flag(c, "print a JSON array")
    c.set_defaults(handler=cmd_detections)

    c = sub.add_parser("export", help="download a done job's export files (result.json, GeoJSON, CSV, overlay PNG)")
    c.add_argument("job", type=int, help="job id")
    c.add_argument("--out", metavar="DIR", help="folder to write into (default: ./<job>-<slide name>/)")
    c.add_argument("--name", dest="names", action="append", metavar="KIND",
                   help="only this export: result, geojson, midog, csv, overlay (repeatable; default all)")
    _json_flag(c, "print {kind: path} as JSON")
    c.set_defaults(handler=cmd_export)
    for command in sub.choices.values():
        command.set_defaults(handler=_with_hints(command.get_default("handler")))
    return p


def _json_flag(p: argparse.ArgumentParser, text: str = "print one JSON object") -> None:
    p.add_argument("--json", action="store_true", help=text)



def connect(args: argparse.Namespace) -> Any:
    """An EdgeClient from the common options."""
    from edge.client import EdgeClient, read_token_file

    server = args.server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER
    if (args.cert or args.key) and args.insecure:
        raise ConfigError("--cert/--key (mutual TLS) cannot be combined with --insecure")
    token = read_token_file(args.token_file) if args.token_file else os.environ.get(TOKEN_ENV) or None
    return EdgeClient(
        server, insecure=args.insecure, ca=args.ca, cert=args.cert, key=args.key, token=token, timeout=args.timeout,
        retries=args.retries,
    )


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _job_line(job: dict[str, Any]) -> str:
    error = f"  {job['error']}" if job.get("error") and job["state"] in ("failed", "queued") else ""
    who = job.get("submitted_by") or ("watcher" if job.get("source") == "watch" else "-")
    cancelled = f"  (cancelled by {job['cancelled_by']})" if job.get("cancelled_by") else ""
    case = f"  [{job['accession']}]" if job.get("accession") else ""
    labels = f"  ({', '.join(job['labels'])})" if job.get("labels") else ""
    return (f"{job['job_id']:>6}  {job['state']:<9}  {_when(job['created_at'])}  {who:<12}  "
            f"{job['slide_path']}{case}{labels}{error}{cancelled}")


def _ratio(value: float | None) -> str:
    return "undefined (no normal figure)" if value is None else f"{value:.2f}"


def result_lines(result: dict[str, Any]) -> list[str]:
    scores = result["scores"]
    spot, totals = scores["hotspot"], scores["totals"]
    hint = scores["mitotic_score_hint"]
    density = scores["mitotic_density_per_mm2"]
    lines = [f"NOTICE                 {result['notice']}"] if result.get("notice") else []
    lines += [f"flag {flag['code']:<18}{flag['message']}" for flag in result.get("flags") or ()]
    lines += [
        f"hotspot mitotic count  {spot['mitotic']} in {spot['area_mm2']:.2f} mm² "
        f"(atypical {spot['atypical']}, normal {spot['normal']}, uncertain {spot['uncertain']})"
        + (f"; no hotspot: {spot['null_reason']}" if spot.get("null_reason") else ""),
        f"atypical ratio         hotspot {_ratio(spot['atypical_ratio'])}, slide {_ratio(totals['atypical_ratio'])}",
        f"whole slide            {totals['mitotic']} mitotic figures of {scores['candidates']} candidates; "
        f"tissue {scores['tissue_area_mm2']:.2f} mm²"
        + (f"; {density:.2f} per mm²" if density is not None else ""),
        f"score hint             {hint['score'] if hint['score'] is not None else '-'} ({hint['note']})",
    ]
    bundle = (result.get("provenance") or {}).get("bundle") or {}
    if isinstance(bundle, dict) and bundle.get("name"):
        use = f"; intended use: {bundle['intended_use']}" if bundle.get("intended_use") else ""
        lines.append(f"bundle                 {bundle['name']} {bundle.get('version', '')}{use}")
    if result.get("qc"):
        from edge.analysis.qc import summary_lines

        lines.extend(summary_lines(result["qc"], (result.get("slide") or {}).get("scanner", {}).get("id")))
    review = result.get("review")
    if review:
        counts = review["counts"]
        lines.append(
            f"signed review          MC {counts['mitotic']} (atypical {counts['atypical']}, normal {counts['normal']}, "
            f"ratio {_ratio(counts['atypical_ratio'])}) by {review['reviewer']}, {_when(review['signed_at'])}"
            + ("" if review["current"] else f"; refers to this earlier result (job {review['superseded_by']} is newer)")
        )
    for kind, path in sorted({**result["exports"], **(review["exports"] if review else {})}.items()):
        lines.append(f"export {kind:<16}{path}")
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    with connect(args) as client:
        status = client.status()
    if args.json:
        _print_json(status)
        return ExitCode.OK
    why = status["engine_error"] or status["not_ready_reason"]
    ready = "ready" if status["ready"] else (f"NOT READY: {why}" if why else "NOT READY (engines loading)")
    print(f"server        {client.address}: mitosis-edge {status['version']}, {ready}")
    print(f"backend       {status['backend']}" + (f" on {status['gpu']}" if status["gpu"] else " (no GPU)"))
    print(f"bundle        {status['bundle']}")
    if status.get("intended_use"):
        print(f"intended use  {status['intended_use']}")
    for engine in status["engines"]:
        key = f"  cache key {engine['cache_key']}" if engine["cache_key"] else ""
        print(f"engine        {engine['role']}: {engine['name']}{key}")
    counts = ", ".join(f"{n} {state}" for state, n in sorted(status["jobs_by_state"].items()))
    print(f"queue         {status['queue_depth']} queued, {status['running']} running; jobs: {counts}")
    print(f"uptime        {status['uptime_s']:.0f} s; last event {status['last_sequence']}")
    for folder in status["watch_folders"]:
        print(f"watching      {folder}")
    for line in waiting_lines(status["waiting_slides"]):
        print(line)
    return ExitCode.OK


def cmd_submit(args: argparse.Namespace) -> int:
    with connect(args) as client:
        job = client.submit(
            args.slide, priority=args.priority, mpp_override=args.mpp, bundle=args.bundle, accession=args.accession,
            labels=args.labels,
        )
        if not args.wait:
            if args.json:
                _print_json(job)
            else:
                print(f"job {job['job_id']} queued: {job['slide_path']}")
            return ExitCode.OK
        if not args.json:
            print(f"job {job['job_id']} queued: {job['slide_path']}; waiting ...", flush=True)
        job = client.wait_for_job(job["job_id"], timeout=args.wait_timeout)
        return _print_job_and_result(client, job, args.json)


def cmd_get(args: argparse.Namespace) -> int:
    if (args.job is None) == (args.fingerprint is None):
        raise ConfigError("give a job id or --fingerprint (one of them)")
    with connect(args) as client:
        if args.fingerprint is not None:
            result = client.get_result(fingerprint=args.fingerprint)
            job = client.get_job(result["job_id"])
        else:
            job = client.get_job(args.job)
        return _print_job_and_result(client, job, args.json)


def _print_job_and_result(client: Any, job: dict[str, Any], as_json: bool) -> int:
    result = client.get_result(job["job_id"]) if job["state"] == "done" else None
    if as_json:
        # The result (scores, slide, provenance, exports) with the job's fields beside it.
        out: dict[str, Any] = {"job_id": job["job_id"], "state": job["state"], "slide_path": job["slide_path"]}
        out.update(result or {"scores": None})
        out["job"] = job
        _print_json(out)
    else:
        print(_job_line(job))
        if job["state"] == "failed" and job.get("error"):
            print(f"error: {job['error']}")
        for line in result_lines(result) if result else ():
            print(f"  {line}")
    return ExitCode.OK if job["state"] in ("done", "queued", "running") else ExitCode.ERROR


def cmd_list(args: argparse.Namespace) -> int:
    with connect(args) as client:
        jobs = client.list_jobs(
            states=args.state or (), slide_path_contains=args.contains, newest_first=args.newest_first,
            limit=args.limit, accession=args.accession,
        )
        status = client.status()
    if args.json:
        _print_json(jobs)
        return ExitCode.OK
    if not jobs:
        print("no jobs")
    for job in jobs:
        print(_job_line(job))
    for line in waiting_lines(status["waiting_slides"]):
        print(line)
    return ExitCode.OK


def waiting_lines(waiting: list[dict[str, Any]]) -> list[str]:
    """Slides the watcher sees but cannot open yet: not jobs yet, but a lab wants to see them at once."""
    return [
        f"waiting  {w['slide_path']}: {w['reason']} (fails in {w['fails_in_s']:.0f} s unless it opens)"
        for w in waiting
    ]


def cmd_cancel(args: argparse.Namespace) -> int:
    with connect(args) as client:
        job = client.cancel(args.job)
    if args.json:
        _print_json(job)
    else:
        print(f"job {job['job_id']} cancelled")
    return ExitCode.OK


def cmd_watch(args: argparse.Namespace) -> int:
    from edge.client import TERMINAL_EVENTS, EdgeClientError

    with connect(args) as client:
        after = args.after if args.after is not None else client.status()["last_sequence"]
        stream = client.watch_events(after, timeout=args.seconds)
        seen = 0
        try:
            for event in stream:
                if args.job is not None and event["job_id"] != args.job:
                    continue
                if args.json:
                    print(json.dumps(event), flush=True)
                else:
                    print(_event_line(event), flush=True)
                seen += 1
                if args.count is not None and seen >= args.count:
                    break
                if args.job is not None and event["type"] in TERMINAL_EVENTS:
                    break
        except EdgeClientError as exc:
            if exc.code != "DEADLINE_EXCEEDED" or args.seconds is None:
                raise
        finally:
            stream.cancel()
    return ExitCode.OK


def _event_line(event: dict[str, Any]) -> str:
    payload = event["payload"]
    extra = ""
    if event["type"] == "job_done":
        ratio = payload.get("atypical_ratio")
        extra = f"  hotspot mitotic count {payload.get('mitotic_count')}, atypical ratio {_ratio(ratio)}"
    elif event["type"] == "result_reviewed":
        ratio = payload.get("atypical_ratio")
        extra = (f"  reviewed hotspot mitotic count {payload.get('mitotic_count')} (automatic "
                 f"{payload.get('automatic_mitotic_count')}), atypical ratio {_ratio(ratio)}, "
                 f"by {payload.get('reviewer')}")
    elif event["type"] == "qc_flagged":
        extra = f"  {payload.get('verdict')}: {'; '.join(payload.get('reasons') or [])}"
    elif event["type"] == "drift":
        extra = f"  scanner {payload.get('scanner')}: {payload.get('message')}"
    elif payload.get("error"):
        extra = f"  {payload['error']}"
    return f"{event['sequence']:>8}  {_when(event['created_at'])}  {event['type']:<13}  job {event['job_id']}  " \
        f"{event['slide_path']}{extra}"


def cmd_detections(args: argparse.Namespace) -> int:
    with connect(args) as client:
        detections = client.detections(args.job, classes=args.classes or (), min_p_mitotic=args.min_p)
        if args.json:
            _print_json_array(detections)
            return ExitCode.OK
        print(f"{'x_px':>10} {'y_px':>10} {'p_mitotic':>9} {'p_atypical':>10}  class")
        for d in detections:
            p_atyp = "-" if d["p_atypical"] is None else f"{d['p_atypical']:.3f}"
            print(f"{d['x_px']:>10.1f} {d['y_px']:>10.1f} {d['p_mitotic']:>9.3f} {p_atyp:>10}  {d['class']}")
    return ExitCode.OK


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    with connect(args) as client:
        if args.out is None:
            job = client.get_job(args.job)
            from edge.analysis.exports import export_folder_name

            out = Path(export_folder_name(job["job_id"], job["slide_path"]))
        else:
            out = Path(args.out)
        written = client.export(args.job, out, args.names or ())
    if args.json:
        _print_json({kind: str(path) for kind, path in written.items()})
    else:
        for kind, path in written.items():
            print(f"{kind:<8} {path}")
    return ExitCode.OK


def _with_hints(handler: Any) -> Any:
    """Run a client command; a connection or auth failure gets a sentence saying which option fixes it."""

    def run(args: argparse.Namespace) -> int:
        from edge.client import EdgeClientError

        try:
            return int(handler(args))
        except EdgeClientError as exc:
            hint = connection_hint(exc.code, str(exc), args)
            if hint:
                raise type(exc)(exc.code, f"{exc.message}\n  {hint}", exc.address) from None
            raise

    return run


def connection_hint(code: str, message: str, args: argparse.Namespace) -> str:
    """What to pass when a call failed for TLS or a token: the server's side is probed, not guessed."""
    token = bool(args.token_file or os.environ.get(TOKEN_ENV))
    if code == "UNAUTHENTICATED" and not token:
        return f"this server needs a token: pass --token-file FILE (its first word is the token) or set ${TOKEN_ENV}"
    if code != "UNAVAILABLE":
        return ""
    server = args.server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER
    speaks_tls = _speaks_tls(server, min(args.timeout, 5.0))
    if speaks_tls is None:
        return ""  # nothing listens there: the message says so already
    if speaks_tls and args.insecure:
        return "the server uses TLS, but --insecure speaks plain text: drop --insecure and pass --ca FILE"
    if speaks_tls and not args.ca and "certificate" in message.lower():
        return "the server uses TLS with a certificate this machine does not trust: pass --ca FILE (its CA)"
    if speaks_tls and args.ca and "certificate" in message.lower():
        return f"the server's certificate is not signed by --ca {args.ca}, or not issued for {server}"
    if not speaks_tls and not args.insecure:
        return "the server speaks plain text (no TLS): pass --insecure"
    return ""


def _speaks_tls(address: str, timeout: float) -> bool | None:
    """True when a TLS handshake with the server works, False when it answers in plain text, None when unreachable."""
    import socket
    import ssl

    host, _, port = address.rpartition(":")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            try:
                with context.wrap_socket(sock, server_hostname=host.strip("[]") or None):
                    return True
            except (ssl.SSLError, ConnectionError, TimeoutError):
                return False
    except (OSError, ValueError):
        return None


def _print_json_array(items: Iterable[dict[str, Any]]) -> None:
    """A JSON array written item by item, so a slide with many detections never sits in memory at once."""
    out = sys.stdout
    out.write("[")
    count = 0
    for item in items:
        out.write(",\n " if count else "\n ")
        out.write(json.dumps(item))
        count += 1
    out.write("\n]\n" if count else "]\n")
