"""`mitosis-edge serve` (the scan-time daemon) and `mitosis-edge demo` (a daemon, a scanner copy and a result)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edge.cli._common import config_from_args
from edge.cli.analysis import progress_printer
from edge.errors import EdgeError
from edge.vocab import BACKENDS, ExitCode

DEMO_QUIET_PERIOD_S = 2.0  # the demo's stability gate: short, so the demo is quick; a lab's default is 10 s
DEMO_COPY_SECONDS = 3.0  # the demo copies its slide into the inbox in chunks over this long
DEMO_TIMEOUT_S = 600.0


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the scan-time daemon: watch folders, analyse each new slide, serve gRPC")
    p.add_argument("--watch", action="append", metavar="DIR", help="folder to watch (repeat; adds to watch.folders)")
    p.add_argument("--watch-polling", action="append", metavar="DIR",
                   help="folder on a network share, watched by polling (repeat)")
    p.add_argument("--data", metavar="DIR", help="store and exports (daemon.data_dir)")
    p.add_argument("--listen", metavar="HOST:PORT", help="gRPC address (server.listen, default 127.0.0.1:50051)")
    p.add_argument("--bundle", metavar="DIR", help="model bundle folder or name (default: the demo bundle)")
    p.add_argument("--backend", choices=BACKENDS, help="inference backend")
    p.add_argument("--insecure", dest="server_insecure", action="store_const", const=True,
                   help="serve gRPC in plain text, without TLS (keep it on localhost)")
    p.add_argument("--workers", type=int, help="slides analysed at once (daemon.workers, default 1)")
    p.add_argument("--metrics", metavar="HOST:PORT", help="Prometheus /metrics address; '' turns it off")
    p.add_argument("--web", metavar="HOST:PORT", help="the pathologists' review page (web.listen); '' turns it off")
    p.add_argument("--check", action="store_true",
                   help="check everything serve needs (TLS, tokens, folders, bundle, ports, disk), list every "
                        "problem and exit: 0 when all is well, 2 otherwise")
    p.set_defaults(handler=cmd_serve, daemon_logging=True)

    p = sub.add_parser("demo", help="the quick-start demo: a daemon picks up a generated slide and reports its result")
    p.add_argument("--size", type=int, default=12288, help="synthetic slide side in px (default 12288)")
    p.add_argument("--seed", type=int, default=2026, help="seed of the synthetic slide (default 2026)")
    p.add_argument("--keep", metavar="DIR",
                   help="work in DIR and keep the slide, its truth, the store and the exports there "
                        "(default: a temporary folder, removed at the end)")
    p.add_argument("--bundle", metavar="DIR", help="model bundle folder or name (default: the demo bundle)")
    p.add_argument("--backend", choices=BACKENDS, help="inference backend")
    p.add_argument("--threads", type=int, help="tile reader threads (default: one per core)")
    p.set_defaults(handler=cmd_demo)


def register_bench(bench_sub: Any) -> None:
    b = bench_sub.add_parser("daemon", help="drop many slides into a daemon at once: exactly once, pickup, memory")
    b.add_argument("--slides", type=int, help="slides dropped at once (default 200; with --latency 20)")
    b.add_argument("--size", type=int, default=1536, help="side of each synthetic slide in px (default 1536)")
    b.add_argument("--quiet-period", type=float, help="watch.quiet_period_s for the run (default 1; with --latency "
                   "the config's, 10 s)")
    b.add_argument("--latency", action="store_true", help="time to result instead: slides written one by one like a "
                   "scanner (chunks, then close); last byte to job start and to result per slide, against analyze")
    b.add_argument("--observer", choices=("auto", "native", "polling"), help="watch.observer for the run")
    b.add_argument("--bundle", metavar="DIR", help="model bundle folder or name (default: the demo bundle)")
    b.add_argument("--backend", choices=BACKENDS, help="inference backend")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(handler=cmd_bench_daemon)


def cmd_bench_daemon(args: argparse.Namespace) -> int:
    from edge.devtools.bench import bench_daemon, to_json

    if args.latency:
        return _bench_daemon_latency(args)
    config = config_from_args(args)
    if args.observer:
        config = config.with_overrides({"watch.observer": args.observer})
    quiet = 1.0 if args.quiet_period is None else args.quiet_period
    slides = 200 if args.slides is None else args.slides
    result = to_json(bench_daemon(config, slides=slides, size=args.size, quiet_period_s=quiet))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        pickup = result["pickup_after_quiet_s"]
        print(f"slides         {result['slides']} dropped at once: {result['done']} done, {result['failed']} failed, "
              f"{result['slides_with_several_jobs']} processed more than once")
        print(f"throughput     {result['slides_per_hour']:.0f} slides/h ({result['wall_seconds']:.0f} s)")
        print(f"pickup         job created {pickup['first']:.2f} s (first) / {pickup['median']:.2f} s (median) / "
              f"{pickup['max']:.2f} s (last) after the quiet period ended")
        print(f"memory         RSS (daemon and its analysis processes) {result['rss_mb_after_quarter']:.0f} MiB "
              f"after a quarter, {result['rss_mb_at_end']:.0f} MiB at the end")
    ok = result["finished_in_time"] and result["slides_with_one_job"] == result["slides"]
    return ExitCode.OK if ok else ExitCode.ERROR


def _bench_daemon_latency(args: argparse.Namespace) -> int:
    from edge.devtools.bench import bench_daemon_latency, to_json

    slides = 20 if args.slides is None else args.slides
    result = to_json(bench_daemon_latency(config_from_args(args), slides=slides, size=args.size,
                                          quiet_period_s=args.quiet_period, observer=args.observer))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"slides         {result['slides']} written one by one ({result['size_px']} px), {result['done']} done; "
              f"{result['observer']} observer, quiet_period_s {result['quiet_period_s']:g}, "
              f"close_settle_s {result['close_settle_s']:g}")
        print("slide                 last byte to: queued   start  result (s)")
        for r in result["per_slide"]:
            cells = " ".join(f"{r[k]:7.2f}" if r.get(k) is not None else "      -"
                             for k in ("to_queued_s", "to_start_s", "to_result_s"))
            print(f"{r['slide']:<28} {cells}  {r['state']}")
        print(f"median         start {result['median_to_start_s']:.2f} s, result {result['median_to_result_s']:.2f} s "
              f"after the last byte; analyze {result['analyze_seconds']:.2f} s "
              "(analysis and exports, same engines, this run)")
    return ExitCode.OK if result["done"] == result["slides"] else ExitCode.ERROR


def serve_config(args: argparse.Namespace) -> Any:
    """The config file plus the serve flags (watch folders add to the file's)."""
    config = config_from_args(args)
    overrides: dict[str, Any] = {}
    if args.watch:
        overrides["watch.folders"] = [*config.watch.folders, *args.watch]
    if args.watch_polling:
        overrides["watch.polling_folders"] = [*config.watch.polling_folders, *args.watch_polling]
    if args.metrics is not None:
        overrides["daemon.metrics_listen"] = args.metrics
    if args.web is not None:
        overrides["web.listen"] = args.web
    return config.with_overrides(overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from edge.service.daemon import Daemon

    config = serve_config(args)
    if args.check:
        return _check(config)
    if not config.watch.all_folders:
        print("mitosis-edge serve: no watch folder: slides come only from SubmitSlide over gRPC "
              "(add --watch DIR or watch.folders)", file=sys.stderr)
    return Daemon(config).run()


def _check(config: Any) -> int:
    from edge.service.preflight import preflight

    checks = preflight(config)
    for check in checks:
        print(f"{'ok  ' if check.ok else 'FAIL'}  {check.name:<24} {check.detail}")
    problems = sum(not c.ok for c in checks)
    if problems:
        print(f"{problems} problem(s): fix them, then run serve --check again", file=sys.stderr)
        return ExitCode.USAGE
    print("serve would start with this configuration")
    return ExitCode.OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Start a daemon on a temporary inbox, copy a generated slide in as a scanner would, and report its result."""
    from edge.client import EdgeClient
    from edge.devtools.synth import SynthParams, default_truth_path, generate_slide
    from edge.engines import load_bundle
    from edge.service.daemon import Daemon

    config = config_from_args(args)
    bundle = load_bundle(config.engines.bundle)  # a broken bundle fails before minutes of work
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mitosis-edge-demo-"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        inbox, scans = folder / "inbox", folder / "scanner"
        for f in (inbox, scans):
            f.mkdir(exist_ok=True)
        slide_path = scans / "demo-slide.tiff"
        truth_path = default_truth_path(slide_path)
        print(f"1/4 generating a {args.size} x {args.size} px synthetic slide (seed {args.seed}) ...")
        truth = generate_slide(slide_path, SynthParams(width=args.size, height=args.size, seed=args.seed), truth_path,
                               progress=progress_printer("synth"))
        print(f"    planted: {json.dumps(truth.counts())}; true hotspot {truth.hotspot.mitotic_count} mitotic figures")
        config = config.with_overrides({
            "watch.folders": [str(inbox)], "watch.polling_folders": [], "watch.quiet_period_s": DEMO_QUIET_PERIOD_S,
            "watch.poll_interval_s": 0.5, "daemon.data_dir": str(folder / "data"), "daemon.metrics_listen": "",
            "daemon.min_free_disk_mb": 0, "server.listen": "127.0.0.1:0", "server.insecure": True,
            "server.tls_cert": "", "server.tls_key": "", "server.tls_client_ca": "", "server.tokens_file": "",
        })
        print(f"2/4 starting a daemon: bundle {bundle.name} {bundle.version} on {config.engines.backend}, "
              f"watching {inbox}")
        with Daemon(config) as daemon, EdgeClient(daemon.grpc_address(), insecure=True) as client:
            job = _copy_and_wait(client, slide_path, inbox / slide_path.name)
            if job["state"] != "done":
                print(f"mitosis-edge demo: the daemon's job ended {job['state']}: {job.get('error', '')}",
                      file=sys.stderr)
                return ExitCode.ERROR
            result = client.get_result(job["job_id"])
            _print_result(job, result, truth_path, folder)
    finally:
        if not args.keep:  # everything is generated again in seconds
            shutil.rmtree(folder, ignore_errors=True)
    if not args.keep:
        print("(the demo's temporary folder was removed; pass --keep DIR to keep the slide, store and exports)")
    return ExitCode.OK


def _copy_and_wait(client: Any, source: Path, target: Path) -> dict[str, Any]:
    """Copy ``source`` into the inbox in chunks over a few seconds, then follow the daemon's events over gRPC."""
    from edge.client import TERMINAL_EVENTS

    after = client.status()["last_sequence"]
    events = client.watch_events(after, timeout=DEMO_TIMEOUT_S)
    try:
        size = source.stat().st_size
        chunks = 12
        print(f"3/4 copying the slide into the inbox in {chunks} chunks over {DEMO_COPY_SECONDS:.0f} s, as a scanner "
              f"writes it; the daemon waits until it has been quiet for {DEMO_QUIET_PERIOD_S:.0f} s")
        with source.open("rb") as src, target.open("wb") as dst:
            for _ in range(chunks):
                dst.write(src.read(-(-size // chunks)))
                dst.flush()
                time.sleep(DEMO_COPY_SECONDS / chunks)
        copied = time.monotonic()
        job_id = None
        bar = progress_printer("analyse")
        for event in events:
            if job_id is None and event["type"] == "job_queued" and Path(event["slide_path"]) == target:
                job_id = event["job_id"]
                print(f"    job {job_id} queued {time.monotonic() - copied:.1f} s after the copy ended")
                bar(0, 1)
            elif job_id is not None and event["job_id"] == job_id and event["type"] in TERMINAL_EVENTS:
                bar(1, 1)
                return dict(client.get_job(job_id))
    finally:
        events.cancel()
    raise EdgeError(f"the daemon did not finish {target} within {DEMO_TIMEOUT_S:.0f} s")


def _print_result(job: dict[str, Any], result: dict[str, Any], truth_path: Path, folder: Path) -> None:
    from edge.analysis.scoring import SlideResult
    from edge.cli.analysis import summary_lines
    from edge.devtools.evaluate import evaluate_image, read_predictions, read_truth

    exports = result["exports"]
    stored = SlideResult.from_json_dict(json.loads(Path(exports["result"]).read_text(encoding="utf-8")))
    seconds = float(stored.provenance.get("timings_s", {}).get("total", 0.0))
    print(f"    job {job['job_id']} done; result over gRPC: hotspot mitotic count "
          f"{result['scores']['hotspot']['mitotic']}, atypical ratio {result['scores']['hotspot']['atypical_ratio']}")
    for line in summary_lines(stored, int(stored.slide.get("tiles", 0)), seconds):
        print(f"    {line}")
    print("4/4 scoring the detections against the planted truth (MIDOG protocol, 7.5 µm) ...")
    report = evaluate_image(read_predictions(exports["result"]), read_truth(truth_path))
    f1 = "n/a" if report.f1 is None else f"{report.f1:.3f}"
    print(f"    F1 {f1} (TP {report.tp}, FP {report.fp}, FN {report.fn}); hotspot mitotic count "
          f"{report.hotspot_count_pred} found vs {report.hotspot_count_true} planted")
    names = ", ".join(sorted(Path(p).name for p in exports.values()))
    print(f"exports    {Path(exports['result']).parent}: {names}")
    print(f"store      {folder / 'data' / 'edge.db'}")
