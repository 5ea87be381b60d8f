"""`mitosis-edge analyze`, `bench analyze` and `calibrate`: the pipeline from the command line.

Part of the command-line shell (it prints); the work happens in ``edge.analysis.pipeline``,
``edge.analysis.exports`` and ``edge.devtools.calibrate``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge.cli._common import config_from_args
from edge.vocab import BACKENDS, ExitCode


def register(sub: Any, bench_sub: Any) -> None:
    p = sub.add_parser("analyze", help="detect and classify mitotic figures on a slide; score and export it")
    p.add_argument("slide", help="slide file (or DICOM WSI folder)")
    _common(p)
    p.add_argument("--out", metavar="DIR", help="export folder (default: ./<slide name>.mitosis-edge)")
    p.add_argument("--json", action="store_true", help="print result.json's content instead of the summary")
    p.set_defaults(handler=cmd_analyze)

    b = bench_sub.add_parser("analyze", help="end-to-end throughput against read-only and detector-only")
    b.add_argument("slide", help="slide file (or DICOM WSI folder)")
    _common(b)
    b.add_argument("--detector-batches", type=int, default=8, help="batches held for detector-only (default 8)")
    b.add_argument("--detector-seconds", type=float, default=2.0,
                   help="detector-only runs the held batches again and again this long, before and after (default 2)")
    b.add_argument("--qc-runs", type=int, default=5,
                   help="analyses with and without scan QC, in turn, for QC's cost (default 5; the faster of each)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(handler=cmd_bench_analyze)

    c = sub.add_parser("calibrate", help="choose ensemble weights and the MF threshold on validation slides (F1)")
    c.add_argument("--bundle", metavar="DIR", help="bundle to calibrate (default: the demo bundle)")
    c.add_argument("--slide", action="append", default=[], help="a validation slide (repeat, paired with --truth)")
    c.add_argument("--truth", action="append", default=[], help="its truth: synth truth JSON or MIDOG++ COCO JSON")
    c.add_argument("--reviews", metavar="DATA_DIR", help="also use the pathologists' signed reviews in this daemon "
                   "data folder (or store file) as truth: confirmed and added figures true, rejected ones false")
    c.add_argument("--out", required=True, metavar="NEWDIR", help="folder for the new bundle version (must be new)")
    c.add_argument("--version", help="version of the new bundle (default: <version>+cal.<date>)")
    c.add_argument("--weight-step", type=float, default=0.05, help="ensemble weight grid step (default 0.05)")
    c.add_argument("--detector-up-to", type=float, default=0.6, metavar="P",
                   help="also search detector score thresholds from the bundle's up to P in steps of 0.05 "
                   "(default 0.6; 0 keeps the bundle's)")
    c.add_argument("--backend", choices=BACKENDS, help="inference backend")
    c.add_argument("--mpp", type=float, help="µm/px for slides that record none")
    c.add_argument("--json", action="store_true", help="print the calibration report as JSON")
    c.set_defaults(handler=cmd_calibrate)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", metavar="DIR", help="model bundle folder or name (default: the demo bundle)")
    p.add_argument("--backend", choices=BACKENDS, help="inference backend")
    p.add_argument("--mpp", type=float, help="µm/px to use when the slide records none (overrides the file)")
    p.add_argument("--reader", choices=("auto", "tiffslide", "openslide"),
                   help="library that opens the slide (default auto: by format)")
    p.add_argument("--threads", type=int, help="tile reader threads (default: one per core)")
    p.add_argument("--batch-size", type=int, help="tiles per detector batch (default 4)")
    p.add_argument("--intra-op-threads", type=int, help="ONNX Runtime threads per model (default: one per core)")


def progress_printer(label: str) -> Callable[[int, int], None]:
    """A callback (done, total) drawing a one-line bar labelled ``label`` on a terminal, silent otherwise."""
    bar = progress_bar()
    return lambda done, total: bar(label, done, total)


def progress_bar() -> Callable[[str, int, int], None]:
    """A (stage, done, total) callback drawing one line per stage on a terminal; silent otherwise."""
    if not sys.stderr.isatty():
        return lambda stage, done, total: None
    last: dict[str, int] = {}

    def show(stage: str, done: int, total: int) -> None:
        width = 30
        filled = int(width * done / total) if total else width
        if last.get(stage) == filled and done < total:
            return
        last[stage] = filled
        sys.stderr.write(f"\r{stage:9} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def default_out_dir(slide: str | Path) -> Path:
    return Path.cwd() / f"{Path(slide).name}.mitosis-edge"


def cmd_analyze(args: argparse.Namespace) -> int:
    from edge.analysis.pipeline import analyze_slide

    config = config_from_args(args)
    out = Path(args.out) if args.out else default_out_dir(args.slide)
    analysis = analyze_slide(args.slide, config, progress=progress_bar())
    paths = analysis.write_exports(out)
    if args.json:
        print(json.dumps(analysis.result.to_json_dict(), indent=2))
        return ExitCode.OK
    for line in summary_lines(analysis.result, analysis.tiles, analysis.times.total):
        print(line)
    print("exports    " + "\n           ".join(str(p) for p in paths.values()))
    return ExitCode.OK


def _ratio(value: float | None) -> str:
    return "undefined (no normal figures)" if value is None else f"{value:.2f}"


def summary_lines(result: Any, tiles: int, seconds: float) -> list[str]:
    """The one-screen summary of a slide result, led by its notice and plausibility flags (edge.analysis.caveats)."""
    from edge.analysis.caveats import caveat_lines

    s = result.scores
    info = result.slide
    hs = s.hotspot
    c = hs.counts
    t = s.totals
    density = "n/a" if s.mitotic_density_per_mm2 is None else f"{s.mitotic_density_per_mm2:.2f}"
    hint = s.mitotic_score_hint
    kind = " ".join(dict.fromkeys(str(v) for v in (info.get("format"), info.get("vendor")) if v))
    where = (
        f"at ({hs.hotspot.center_x_um / 1000:.2f}, {hs.hotspot.center_y_um / 1000:.2f}) mm"
        if c.mitotic
        else f"(none: {hs.null_reason or 'no mitotic figure found'})"
    )
    lines = [
        f"slide      {result.slide_path}",
        f"           {kind}, {info['width']} x {info['height']} px, {info['mpp_x']:.4g} µm/px",
        f"tissue     {s.tissue_area_mm2:.2f} mm², {tiles} tiles, {s.candidates} candidates",
        f"hotspot    mitotic count {c.mitotic} in {hs.hotspot.area_mm2:.2f} mm² {where}",
        f"           {c.atypical} atypical, {c.normal} normal, {c.uncertain} uncertain subtype; "
        f"atypical ratio (AMF/NMF) {_ratio(c.atypical_ratio)}",
        f"whole      {t.mitotic} mitotic figures: {t.atypical} atypical, {t.normal} normal, {t.uncertain} uncertain; "
        f"AMF/NMF {_ratio(t.atypical_ratio)}; {density} MF/mm² of tissue",
    ]
    if hint.score is not None:
        lines.append(f"hint       mitotic score {hint.score} ({hint.note})")
    if result.qc is not None:
        from edge.analysis.qc import summary_lines

        lines.extend(summary_lines(result.qc, (info.get("scanner") or {}).get("id")))
    backend = result.provenance.get("backend", "?")
    bundle = result.provenance.get("bundle", {})
    lines.append(
        f"time       {seconds:.1f} s ({tiles / max(seconds, 1e-9):.1f} tiles/s) on {backend}, "
        f"bundle {bundle.get('name')} {bundle.get('version')}"
    )
    summary = {"slide": info, "scores": s.to_json_dict(), "provenance": result.provenance}
    return caveat_lines(summary) + lines


def cmd_bench_analyze(args: argparse.Namespace) -> int:
    from edge.devtools.bench import bench_analyze, to_json

    config = config_from_args(args)
    result = to_json(bench_analyze(
        args.slide, config, detector_batches=args.detector_batches, detector_seconds=args.detector_seconds,
        qc_runs=args.qc_runs,
    ))
    if args.json:
        print(json.dumps(result, indent=2))
        return ExitCode.OK
    print(f"slide          {result['slide']}: {result['tiles']} tiles, {result['candidates']} candidates, "
          f"backend {result['backend']}")
    print(f"tile plan      {result['tile_layout']}: {format_plan_efficiency(result['tile_plan'])}")
    print(f"read only      {result['read_tiles_per_s']:.1f} tiles/s")
    print(f"detector only  {result['detector_tiles_per_s']:.1f} tiles/s")
    print(f"end to end     {result['end_to_end_tiles_per_s']:.1f} tiles/s")
    print(f"ratio          {result['ratio']:.2f} (end to end / slower of the two; target >= 0.8)")
    if result["qc_seconds"] is not None:
        print(f"scan QC        {result['qc_seconds']:.2f} s = {result['qc_share']:.1%} of end to end; without QC "
              f"{result['end_to_end_seconds_without_qc']:.1f} s against {result['end_to_end_seconds']:.1f} s "
              f"({result['qc_overhead']:+.1%}, median of {result['qc_runs']} {result['qc_overhead_median']:+.1%}; "
              "target <= 5%)")
    stages = ", ".join(f"{k} {v:.1f}" for k, v in result["stage_seconds"].items())
    print(f"stages (s)     {stages}")
    print(f"peak RSS       {result['peak_rss_mb']:.0f} MiB")
    return ExitCode.OK


def _reviewed_slides(path: Path, models: list[str]) -> list[Any]:
    from edge.devtools.calibrate import slides_from_reviews
    from edge.errors import ConfigError
    from edge.service.daemon import STORE_NAME
    from edge.service.store import Store

    store_path = path / STORE_NAME if path.is_dir() else path
    if not store_path.is_file():
        raise ConfigError(f"--reviews {path}: no store there; give the daemon's data folder (daemon.data_dir)")
    with Store.open(store_path) as store:
        slides = slides_from_reviews(store, models)
    print(f"{len(slides)} signed review(s) from {store_path}", file=sys.stderr)
    return slides
def format_plan_efficiency(e: dict[str, Any]) -> str:
    """One line on a plan's efficiency (``PlanEfficiency.to_json_dict()``)."""
    return (
        f"{e['tiles']} tiles ({e['tiles_vs_grid']:.2f}x the fixed grid's {e['grid_tiles']}), "
        f"tissue {e['tissue_mm2']:.2f} mm², covered {e['covered_mm2']:.2f} mm², read {e['read_mm2']:.2f} mm²: "
        f"{100 * e['tissue_fraction_of_read']:.0f}% of the read pixels are tissue"
    )


def cmd_calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from edge.analysis.pipeline import analyze_slide
    from edge.devtools.calibrate import CachedSlide, detector_threshold_grid, grid_search, write_calibrated_bundle
    from edge.devtools.evaluate import read_truth
    from edge.engines import load_bundle, open_engines
    from edge.errors import ConfigError

    if len(args.slide) != len(args.truth):
        raise ConfigError(f"give one --truth per --slide: {len(args.slide)} slides, {len(args.truth)} truths")
    if not args.slide and not args.reviews:
        raise ConfigError("give validation slides (--slide with --truth), signed reviews (--reviews DATA_DIR), or both")
    config = config_from_args(args)
    bundle = load_bundle(config.engines.bundle)
    # only members with an MF head are weighed (an atypical-only member never gets MF weight); each is run,
    # weight 0 or not, so that the search can give it weight
    voters = [c for c in bundle.classifiers if c.mitotic is not None]
    models = [c.name for c in voters]
    every_head = dataclasses.replace(
        bundle, classifiers=tuple(dataclasses.replace(c, weight=1.0) if c in voters else c for c in bundle.classifiers)
    )
    cached = []
    with open_engines(every_head, config.engines, detector_batch=config.stream.batch_size) as engines:
        for slide, truth_path in zip(args.slide, args.truth, strict=True):
            truth = read_truth(truth_path)  # read first: a bad truth file fails before minutes of inference
            print(f"inference on {slide} ...", file=sys.stderr)
            figures = analyze_slide(slide, config, engines=engines, progress=progress_bar()).result.figures
            cached.append(
                CachedSlide(
                    name=str(slide),
                    points_um=np.array([[f.x_um, f.y_um] for f in figures]).reshape(-1, 2),
                    p_mitotic={m: np.array([f.scores[f"mitotic:{m}"] for f in figures]) for m in models},
                    truth_um=truth.points_um,
                    detector_score=np.array([f.detector_score for f in figures]),
                )
            )
    if args.reviews:
        cached += _reviewed_slides(Path(args.reviews), models)
    own = bundle.detector.score_threshold
    detector_thresholds = detector_threshold_grid(own, highest=args.detector_up_to) if args.detector_up_to > own else []
    calibration = grid_search(cached, models, weight_step=args.weight_step, detector_thresholds=detector_thresholds)
    new = write_calibrated_bundle(bundle, calibration, args.out, version=args.version)
    if args.json:
        print(json.dumps(calibration.to_json_dict(), indent=2))
        return ExitCode.OK
    best = calibration.best
    weights = ", ".join(f"{m} {w:g}" for m, w in zip(calibration.models, best.weights, strict=True))
    print(f"best of {len(calibration.grid)} grid points on {len(cached)} slide(s): F1 {best.score:.3f} "
          f"(TP {best.tp}, FP {best.fp}, FN {best.fn})")
    print(f"weights    {weights}")
    print(f"threshold  mitotic_threshold = {best.threshold:g}")
    if best.detector_threshold is not None:
        print(f"detector   score_threshold = {best.detector_threshold:g} ({best.candidates} candidates to classify, "
              f"{sum(len(c.points_um) for c in cached)} at the bundle's {own:g})")
    print(f"wrote      bundle {new.name} {new.version} to {new.path} (report: {new.path / 'calibration.json'})")
    return ExitCode.OK
