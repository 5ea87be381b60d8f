"""`mitosis-edge cohort run` and `cohort survival`: an archive scored on Ray, then the survival analysis.

Part of the command-line shell (it prints); the work happens in ``edge.study.cohort`` and ``edge.study.survival``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from edge.cli._common import config_from_args, usage_handler
from edge.errors import ConfigError
from edge.vocab import BACKENDS, ExitCode


def register_bench(bench_sub: Any) -> None:
    b = bench_sub.add_parser("cohort", help="cohort run on Ray against the same slides analysed one after another")
    b.add_argument("--slides", type=int, default=40, help="slides, 3 of them hostile (default 40)")
    b.add_argument("--sizes", default="2048,3072,4096", help="sides of the synthetic slides in px, cycled")
    b.add_argument("--cpus-per-slide", type=float, default=1.0, help="CPUs per Ray worker (default 1)")
    b.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: Ray on this machine)")
    b.add_argument("--bundle", metavar="DIR", help="model bundle folder or name (default: the demo bundle)")
    b.add_argument("--backend", choices=BACKENDS, help="inference backend")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(handler=cmd_bench_cohort)


def cmd_bench_cohort(args: argparse.Namespace) -> int:
    import json

    from edge.devtools.bench import bench_cohort, to_json

    try:
        sizes = tuple(int(v) for v in args.sizes.split(","))
    except ValueError:
        raise ConfigError(f"--sizes {args.sizes!r}: give sides in px separated by commas, e.g. 2048,3072") from None
    result = to_json(bench_cohort(config_from_args(args), slides=args.slides, sizes=sizes,
                                  cpus_per_slide=args.cpus_per_slide, ray_address=args.ray_address))
    if args.json:
        print(json.dumps(result, indent=2))
        return ExitCode.OK
    print(f"slides       {result['slides']} ({result['hostile']} hostile), sizes {result['sizes_px']} px")
    before, after = result["sequential_before_after_s"]
    print(f"sequential   {result['sequential_s']:.1f} s in one warm process, mean of {before:.1f} s before and "
          f"{after:.1f} s after the cohort run ({result['sequential_failed']} failed)")
    print(f"cohort run   {result['cohort_s']:.1f} s on {result['workers']} Ray workers, Ray's start included")
    print(f"ratio        {result['ratio']} (sequential / cohort; target >= 0.85); "
          f"{result['ratio_without_ray_start']} without Ray's start ({result['ray_start_s']:.1f} s)")
    print(f"exactly once {result['good_done_exactly_once']}; hostile failed: {len(result['hostile_failed'])}")
    for name, reason in result["hostile_failed"].items():
        print(f"             {name}: {reason}")
    for worker, (first, last, peak) in result["worker_rss_mb"].items():
        print(f"worker RSS   {worker}: {first:.0f} MiB after its first slide, {last:.0f} MiB after its last "
              f"(peak {peak:.0f})")
    print(f"re-run       {result['rerun_analysed']} analysed, {result['rerun_skipped']} skipped")
    return ExitCode.OK


def register(sub: Any) -> None:
    p = sub.add_parser("cohort", help="cohort studies: score an archive of slides on Ray, survival analysis")
    cohort = p.add_subparsers(title="cohort commands", metavar="WHAT")

    r = cohort.add_parser("run", help="analyse every slide of a folder or CSV on Ray; resumable, one row per slide")
    r.add_argument("--slides", required=True, metavar="LIST",
                   help="a folder of slides (recursive) or a CSV with slide_path and optional case_id, mpp, ...")
    r.add_argument("--out", required=True, metavar="DIR", help="results folder: slides.csv and slides/<id>/ exports")
    r.add_argument("--bundle", metavar="DIR", help="model bundle folder or name (default: the demo bundle)")
    r.add_argument("--backend", choices=BACKENDS, help="inference backend")
    r.add_argument("--ray-address", metavar="ADDR",
                   help="join this Ray cluster (default: $RAY_ADDRESS, else Ray started on this machine)")
    r.add_argument("--cpus-per-slide", type=float, default=None,
                   help="CPUs each worker reserves (default 1 on CPU backends, 2 with a GPU)")
    r.add_argument("--gpus-per-slide", type=float, default=None,
                   help="GPUs each worker reserves (default 0 on onnxruntime, 1 on GPU backends)")
    r.add_argument("--max-workers", type=int, default=0, help="at most this many workers (default: as many as fit)")
    r.add_argument("--retry-failed", action="store_true", help="run again the slides that failed before")
    r.add_argument("--mpp", type=float, help="µm/px for slides that record none (a CSV's mpp column wins)")
    r.set_defaults(handler=cmd_cohort_run)

    s = cohort.add_parser("survival", help="survival by hotspot MC and AMF/NMF ratio: cutoffs, Cox, KM plots, report")
    s.add_argument("--results", required=True, metavar="DIR", help="a cohort run's folder (its slides.csv)")
    s.add_argument("--clinical", required=True, metavar="CSV",
                   help="clinical table (TCGA CDR columns work as they are)")
    s.add_argument("--out", required=True, metavar="REPORT_DIR", help="report folder")
    s.add_argument("--endpoint", default="OS", help="TCGA CDR endpoint: OS, PFI, DSS or DFI (default OS)")
    s.add_argument("--id-col", help="case id column (default bcr_patient_barcode, else case_id)")
    s.add_argument("--time-col", help="time-to-event column in days (default: <endpoint>.time)")
    s.add_argument("--event-col", help="event column, 1 = event, 0 = censored (default: <endpoint>)")
    s.add_argument("--per-case", choices=("max", "mean", "first"), default="max",
                   help="several slides of a case: the worst (max, default), the mean or the first")
    s.add_argument("--horizon-years", type=float, default=10.0,
                   help="censor at this follow-up (default 10, as the paper)")
    s.add_argument("--min-group", default="10%", help="smallest group for a searched cutoff: a share (10%%) or a count")
    s.add_argument("--cutoff", action="append", default=[], metavar="VAR=VALUE",
                   help="a pre-specified cutoff, e.g. mc=11 (repeatable; variables mc, hotspot_ratio, slide_ratio, "
                   "density; default: the breast mitotic-score cutoffs rescaled to the hotspot area)")
    s.set_defaults(handler=cmd_cohort_survival)

    p.set_defaults(handler=usage_handler(p))


def _progress_printer() -> Any:
    tty = sys.stderr.isatty()

    def show(done: int, failed: int, total: int, eta: float | None) -> None:
        finished = done + failed
        eta_text = "ETA --" if eta is None else f"ETA {int(eta // 60)}:{int(eta % 60):02d}"
        if tty:
            width = 30
            filled = int(width * finished / total) if total else width
            sys.stderr.write(f"\rcohort [{'#' * filled}{'.' * (width - filled)}] {finished}/{total} "
                             f"done {done} failed {failed} {eta_text} ")
            if finished >= total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(f"cohort {finished}/{total}: done {done}, failed {failed}, {eta_text}\n")
        sys.stderr.flush()

    return show


def cmd_cohort_run(args: argparse.Namespace) -> int:
    from edge.study.cohort import list_slides, run_cohort

    config = config_from_args(args)
    gpu = config.engines.backend != "onnxruntime"
    cpus = args.cpus_per_slide if args.cpus_per_slide is not None else (2.0 if gpu else 1.0)
    gpus = args.gpus_per_slide if args.gpus_per_slide is not None else (1.0 if gpu else 0.0)
    if cpus < 0 or gpus < 0:
        raise ConfigError(f"--cpus-per-slide {cpus:g} and --gpus-per-slide {gpus:g} must not be negative")
    slides = list_slides(args.slides)
    print(f"cohort: {len(slides)} slides from {args.slides}; results in {Path(args.out) / 'slides.csv'}",
          file=sys.stderr)
    summary = run_cohort(slides, args.out, config, ray_address=args.ray_address, cpus_per_slide=cpus,
                         gpus_per_slide=gpus, max_workers=args.max_workers, retry_failed=args.retry_failed,
                         progress=_progress_printer())
    print(f"slides      {summary.total}: {summary.done} analysed now, {summary.skipped_done} done before (skipped), "
          f"{summary.failed} failed now, {summary.skipped_failed} failed before (--retry-failed runs them)")
    if summary.workers:
        nodes = ", ".join(f"{node} {n}" for node, n in sorted(summary.nodes.items()))
        print(f"workers     {summary.workers} on {len(summary.nodes)} node(s): slides per node {nodes}; "
              f"{summary.retried} retried after a worker died")
    if summary.rss_mb:
        rss = ", ".join(f"{w} {v[0]:.0f}->{v[-1]:.0f} (peak {summary.peak_rss_mb[w][-1]:.0f})"
                        for w, v in sorted(summary.rss_mb.items()))
        print(f"RSS         MiB per worker after its first slide -> after its last: {rss}")
    print(f"time        {summary.seconds:.1f} s")
    print(f"results     {Path(args.out) / 'slides.csv'}")
    for path, reason in summary.failures:
        print(f"failed      {path}: {reason}")
    if summary.failed_total:
        print(f"mitosis-edge: {summary.failed_total} slide(s) failed; see the reasons above and in slides.csv",
              file=sys.stderr)
        return ExitCode.ERROR
    return ExitCode.OK


def cmd_cohort_survival(args: argparse.Namespace) -> int:
    from edge.study.survival import parse_cutoffs, run_survival

    data = run_survival(args.results, args.clinical, args.out, endpoint=args.endpoint, id_col=args.id_col,
                        time_col=args.time_col, event_col=args.event_col, per_case=args.per_case,
                        horizon_years=args.horizon_years, min_group=args.min_group,
                        cutoffs=parse_cutoffs(args.cutoff))
    print(f"cases         {data['cases']} ({data['events']} events) from {data['slides']} slides; "
          f"{data['endpoint']} censored at {data['horizon_years']:g} years")
    for v in data["variables"]:
        best = v["best"]
        if best is None:
            print(f"{v['key']:<14}no cutoff could be tested ({v['cases']} cases with a value)")
            continue
        hr = "n/a" if best["hazard_ratio"] is None else (
            f"{best['hazard_ratio']:.2f} ({best['ci_low']:.2f}-{best['ci_high']:.2f})")
        print(f"{v['key']:<14}cutoff {best['cutoff']:g}: HR {hr}, Cox p {_p(best['cox_p'])}, "
              f"log-rank p {_p(best['logrank_p'])}, corrected p {_p(v['corrected_p'])} "
              f"(n {best['n_low']}/{best['n_high']})")
    for reason, items in data["unmatched"].items():
        if items:
            print(f"left out      {reason}: {len(items)} (listed in the report)")
    print(f"report        {Path(args.out) / 'report.html'} (and report.md, survival.json, km_*.png/svg)")
    return ExitCode.OK


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"
