"""The `mitosis-edge` command. The only module that prints; it sets up logging through `edge.logs`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge import __version__
from edge.cli import analysis as cli_analysis
from edge.cli import client as cli_client
from edge.cli import cohort as cli_cohort
from edge.cli import daemon as cli_daemon
from edge.cli import engines as cli_engines
from edge.cli import qc as cli_qc
from edge.cli import results as cli_results
from edge.cli._common import config_from_args
from edge.config import load_config
from edge.errors import ConfigError, EdgeError
from edge.logs import configure as configure_logs
from edge.vocab import ExitCode

log = logging.getLogger("edge.cli")



def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args, config_file=getattr(args, "config", None))
    if not hasattr(args, "handler"):
        parser.print_help()
        return ExitCode.USAGE
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"mitosis-edge: configuration error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except EdgeError as exc:
        print(f"mitosis-edge: error: {exc}", file=sys.stderr)
        return ExitCode.ERROR
    except KeyboardInterrupt:
        print("mitosis-edge: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except BrokenPipeError:  # `... | head`: the reader has gone; stop quietly like a Unix tool
        _silence_stdout()
        return ExitCode.BROKEN_PIPE


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail on the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mitosis-edge",
        description="Scan-time mitotic-figure detection: hotspot mitotic count and atypical ratio "
        "for whole-slide images.",
    )
    parser.add_argument("--version", action="version", version=f"mitosis-edge {__version__}")
    _global_options(parser, default=None)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = sub.add_parser("info", help="print a slide's metadata: vendor, levels, mpp, objective, associated images")
    p.add_argument("slide", help="slide file (or DICOM WSI folder)")
    _slide_options(p, stream=False)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--tiles", action="store_true", help="also find the tissue and plan the tiles")
    p.set_defaults(handler=cmd_info)

    p = sub.add_parser("synth", help="write a synthetic H&E-like slide with planted mitotic figures and its truth")
    p.add_argument("out", help="output TIFF path")
    p.add_argument("--width", type=int, required=True, help="level-0 width in px")
    p.add_argument("--height", type=int, required=True, help="level-0 height in px")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same slide (default 0)")
    p.add_argument("--mpp", type=float, default=0.25, help="µm/px recorded in the file (default 0.25)")
    p.add_argument("--mitoses", type=int, help="mitotic figures to plant (default: from the tissue area)")
    p.add_argument("--imposters", type=int, help="mitosis look-alikes to plant (default: as many as mitoses)")
    p.add_argument("--atypical-fraction", type=float, default=0.3,
                   help="share of planted mitoses that are atypical (default 0.3)")
    p.add_argument("--cluster-fraction", type=float, default=0.6, help="share of mitoses in dense clusters")
    p.add_argument("--tissue-fraction", type=float, default=0.55,
                   help="share of the slide covered by tissue (default 0.55)")
    p.add_argument("--stain-jitter", type=float, default=0.08,
                   help="random variation of the H&E stain colours, 0 = none (default 0.08)")
    p.add_argument("--blur", type=float, default=0.0, help="gaussian blur sigma in px")
    p.add_argument("--noise", type=float, default=3.0, help="noise sigma in grey levels")
    p.add_argument("--tile-size", type=int, default=256, help="stored TIFF tile side in px (default 256)")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality")
    p.add_argument("--format", choices=("tiff", "ome"), default="tiff",
                   help="tiff: pyramidal TIFF with resolution tags; ome: OME-TIFF with OME-XML (default tiff)")
    p.add_argument("--hotspot-area", type=float, default=2.0, help="hotspot field area in mm² for the truth")
    p.add_argument("--truth", help="truth JSON path (default: OUT with .truth.json)")
    f = p.add_argument_group("scan faults, recorded in the truth JSON under \"faults\"")
    f.add_argument("--blur-regions", type=int, default=0, help="out-of-focus discs (sigma 1-2.5 µm) on tissue")
    f.add_argument("--blur-hotspot", action="store_true", help="also blur the planted hotspot")
    f.add_argument("--folds", type=int, default=0, help="tissue folds (darker doubled bands)")
    f.add_argument("--pen-strokes", type=int, default=0, help="marker pen strokes (green, blue, black)")
    f.add_argument("--stain-shift", type=float, default=0.0, help="degrees the eosin vector turns (a stainer change)")
    p.set_defaults(handler=cmd_synth)

    p = sub.add_parser("bench", help="benchmarks")
    bench_sub = p.add_subparsers(title="benchmarks", metavar="WHAT")
    b = bench_sub.add_parser("read", help="tile stream throughput against the decode floor")
    b.add_argument("slide", help="slide file (or DICOM WSI folder)")
    _slide_options(b)
    b.add_argument("--repeats", type=int, default=2, help="best of N (default 2)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(handler=cmd_bench_read)
    cli_engines.register(sub, bench_sub)
    cli_analysis.register(sub, bench_sub)
    cli_results.register(sub)
    cli_cohort.register(sub)
    cli_qc.register(sub)
    cli_daemon.register_bench(bench_sub)
    cli_cohort.register_bench(bench_sub)

    cli_daemon.register(sub)
    cli_client.add_client_parser(sub)
    for command in _subcommands(parser):
        _global_options(command, default=argparse.SUPPRESS)  # `serve --config x.toml` works too
    return parser


def _global_options(p: argparse.ArgumentParser, default: Any) -> None:
    """--config, -v and --log-format; after a subcommand too (``default`` SUPPRESS keeps the value given before it)."""
    p.add_argument("--config", metavar="TOML", default=default, help="settings file (every setting has a default)")
    p.add_argument("-v", "--verbose", action="count", default=0 if default is None else default,
                   help="more log output (-vv for debug)")
    p.add_argument("--log-format", choices=("text", "json"), default=default,
                   help="log line format (default: text; serve: daemon.log_format)")


def _subcommands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = []
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            for command in dict.fromkeys(action.choices.values()):
                found += [command, *_subcommands(command)]
    return found


def _slide_options(p: argparse.ArgumentParser, *, stream: bool = True) -> None:
    p.add_argument("--mpp", type=float, help="µm/px to use when the slide records none (overrides the file)")
    p.add_argument("--reader", choices=("auto", "tiffslide", "openslide"), help="library that opens the slide")
    p.add_argument("--region-reader", choices=("auto", "tiles", "pyvips", "library"), help="how pixels are read")
    p.add_argument("--target-mpp", type=float, help="µm/px tiles are read at (default 0.25)")
    if stream:  # only commands that stream tiles use them
        p.add_argument("--threads", type=int, help="tile reader threads (default: one per core)")
        p.add_argument("--batch-size", type=int, help="tiles per batch")


# --- commands ------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    from edge.analysis.pipeline import scale_problem
    from edge.wsi.slide import open_slide
    from edge.wsi.stream import plan_slide

    config = config_from_args(args)
    with open_slide(args.slide, config.slide) as slide:
        info = slide.info
        data: dict[str, Any] = info.to_json_dict()
        if info.mpp_x is not None:
            data["level_mpp"] = [list(info.level_mpp(i)) for i in range(len(info.levels))]
            scale = slide.read_scale()
            refusal = scale_problem(info.level_mpp(0), scale.target_mpp)
            data["read"] = {
                "target_mpp": scale.target_mpp,
                "level": scale.level,
                "output_mpp": [scale.mpp_x, scale.mpp_y],
                "resampled": scale.resampled,
                "upsampled": scale.upsampled,
                "upsampling": round(min(info.level_mpp(0)) / scale.target_mpp, 3) if scale.upsampled else None,
                "analyzable": refusal is None,
                "refusal": refusal,
            }
        if args.tiles:
            sp = plan_slide(slide, config)
            data["tissue_area_mm2"] = sp.tissue_area_mm2
            data["tiles"] = len(sp.plan)
            data["tile_grid"] = [sp.plan.columns, sp.plan.rows]
            data["tile_layout"] = sp.plan.layout
            data["tile_plan"] = sp.efficiency.to_json_dict()
    if args.json:
        print(json.dumps(data, indent=2))
        return ExitCode.OK
    print(_format_info(data))
    return ExitCode.OK


def _format_info(d: dict[str, Any]) -> str:
    lines = [
        f"slide        {d['path']}",
        f"format       {d['format']} (vendor {d['vendor']}), opened with {d['reader']}, "
        f"pixels via {d['region_reader']}",
        f"dimensions   {d['width']} x {d['height']} px",
    ]
    if d["mpp_x"] is None:
        lines.append("mpp          MISSING: the slide records no pixel size; pass --mpp or set [slide] mpp_override")
    else:
        lines.append(f"mpp          {d['mpp_x']:.4f} x {d['mpp_y']:.4f} µm/px (from {d['mpp_source']})")
    obj = d["objective_power"]
    lines.append(f"objective    {obj:g}x" if obj else "objective    not recorded")
    lines.append("levels       #  width x height   downsample  tile       µm/px")
    level_mpp = d.get("level_mpp")
    for lv in d["levels"]:
        tile = f"{lv['tile_width']}x{lv['tile_height']}" if lv["tile_width"] else "-"
        mpp = f"{level_mpp[lv['index']][0]:.4f}" if level_mpp else "-"
        size = f"{lv['width']:>6} x {lv['height']:<8}"
        lines.append(f"             {lv['index']:<2} {size} {lv['downsample']:>9.3f}  {tile:<10} {mpp}")
    lines.append(f"associated   {', '.join(d['associated_images']) or 'none'}")
    if "read" in d:
        r = d["read"]
        how = (
            f"upsampled {r['upsampling']:.2f}x (the slide is coarser than the target; results are flagged)"
            if r["upsampled"]
            else ("resampled" if r["resampled"] else "read as stored")
        )
        if r["refusal"]:
            lines.append(f"analysis     REFUSED: {r['refusal']}")
        else:
            lines.append(f"reading at   {r['target_mpp']} µm/px from level {r['level']}: {how}")
    if "tiles" in d:
        lines.append(
            f"tissue       {d['tissue_area_mm2']:.2f} mm², {d['tiles']} tiles "
            f"(grid {d['tile_grid'][0]} x {d['tile_grid'][1]})"
        )
        lines.append(f"tile plan    {d['tile_layout']}: {cli_analysis.format_plan_efficiency(d['tile_plan'])}")
    for note in d["notes"]:
        lines.append(f"note         {note}")
    return "\n".join(lines)


def cmd_synth(args: argparse.Namespace) -> int:
    from edge.devtools.synth import default_truth_path, generate_slide

    try:
        params = _synth_params(args)
        params.validate()
    except ConfigError as exc:  # a bad flag of this command, not a problem of the configuration file
        print(f"mitosis-edge synth: bad option: {exc} (see mitosis-edge synth --help)", file=sys.stderr)
        return ExitCode.USAGE
    truth_path = Path(args.truth) if args.truth else default_truth_path(args.out)
    t0 = time.perf_counter()
    truth = generate_slide(args.out, params, truth_path, progress=cli_analysis.progress_printer("synth"))
    elapsed = time.perf_counter() - t0
    print(f"wrote {args.out} ({args.width} x {args.height} px at {args.mpp} µm/px) in {elapsed:.1f} s")
    print(f"truth {truth_path}: {json.dumps(truth.counts())}, hotspot {truth.hotspot.mitotic_count} mitotic figures")
    return ExitCode.OK


def _synth_params(args: argparse.Namespace) -> Any:
    from edge.devtools.synth import SynthParams

    return SynthParams(
        width=args.width,
        height=args.height,
        seed=args.seed,
        mpp=args.mpp,
        mitoses=args.mitoses,
        atypical_fraction=args.atypical_fraction,
        imposters=args.imposters,
        cluster_fraction=args.cluster_fraction,
        tissue_fraction=args.tissue_fraction,
        stain_jitter=args.stain_jitter,
        blur_sigma=args.blur,
        noise_sigma=args.noise,
        tile_size=args.tile_size,
        jpeg_quality=args.quality,
        fmt=args.format,
        hotspot_area_mm2=args.hotspot_area,
        blur_regions=args.blur_regions,
        blur_hotspot=args.blur_hotspot,
        folds=args.folds,
        pen_strokes=args.pen_strokes,
        stain_shift=args.stain_shift,
    )


def cmd_bench_read(args: argparse.Namespace) -> int:
    from edge.devtools.bench import bench_read, to_json

    result = to_json(bench_read(args.slide, config_from_args(args), repeats=args.repeats))
    if args.json:
        print(json.dumps(result, indent=2))
        return ExitCode.OK
    print(
        f"slide         {result['slide']}: {result['tiles']} tiles of {result['tile_size']} px, "
        f"reader {result['region_reader']}, {result['threads']} threads"
    )
    print(f"tile stream   {result['stream_tiles_per_s']:.1f} tiles/s  {result['stream_mp_per_s']:.0f} MP/s")
    if result["ratio"] is not None:
        print(
            f"decode floor  {result['floor_tiles_per_s']:.1f} tiles/s  {result['floor_mp_per_s']:.0f} MP/s  "
            f"({result['floor_stored_tiles']} stored tiles)"
        )
        print(f"ratio         {result['ratio']:.2f} (stream / floor, target >= 0.8)")
    else:
        print(f"decode floor  n/a: {result['floor_note']}")
    print(f"peak RSS      {result['peak_rss_mb']:.0f} MiB")
    return ExitCode.OK


# --- logging -------------------------------------------------------------------------------------


def _configure_logging(args: argparse.Namespace, config_file: str | None) -> None:
    """WARNING by default (-v INFO, -vv DEBUG); a daemon logs INFO by default, in daemon.log_format."""
    verbose = args.verbose
    fmt = args.log_format
    if getattr(args, "daemon_logging", False):
        verbose = max(verbose, 1)
        if fmt is None:
            try:
                fmt = load_config(config_file).daemon.log_format
            except ConfigError:
                fmt = "text"  # the command itself reports the bad config
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    configure_logs(level, "json" if fmt == "json" else "text")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
