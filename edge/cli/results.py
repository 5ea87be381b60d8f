"""`mitosis-edge evaluate`: detection F1, subtyping and hotspot count against ground truth.

Part of the command-line shell (it prints); the work happens in ``edge.devtools.evaluate``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from edge.devtools.evaluate import (
    DEFAULT_MATCH_RADIUS_UM,
    DEFAULT_TRUTH_MPP,
    EvaluationReport,
    evaluate,
    read_predictions,
    read_truth,
)
from edge.errors import ConfigError
from edge.vocab import ExitCode


def register(sub: Any) -> None:
    """Add the `evaluate` command to the top-level parser's subcommands."""
    p = sub.add_parser(
        "evaluate",
        help="compare predictions (result.json or midog.json) with truth (synthetic truth or MIDOG++ COCO JSON)",
    )
    p.add_argument("--pred", required=True, action="append", metavar="JSON",
                   help="result.json or midog.json; with --report repeatable, and folders of result.json files")
    p.add_argument("--truth", required=True, action="append", metavar="JSON",
                   help="synthetic truth JSON or MIDOG++ COCO JSON; with --report repeatable, and folders")
    p.add_argument("--image", metavar="ID", help="COCO image id or file name (needed when the file has several)")
    p.add_argument(
        "--truth-mpp",
        type=float,
        default=DEFAULT_TRUTH_MPP,
        help=f"µm/px of the COCO truth boxes (default {DEFAULT_TRUTH_MPP})",
    )
    p.add_argument(
        "--radius-um",
        type=float,
        default=DEFAULT_MATCH_RADIUS_UM,
        help=f"match radius in µm (default {DEFAULT_MATCH_RADIUS_UM}, as MIDOG)",
    )
    p.add_argument(
        "--hotspot-area",
        type=float,
        default=None,
        metavar="MM2",
        help="hotspot field area in mm² (default: the prediction's, else 2)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--report", metavar="DIR",
                   help="many images: F1 over the MF threshold and PR curves per group, scatter plots at three "
                   "thresholds, report.html and report.json in DIR")
    p.add_argument("--groups", metavar="CSV",
                   help="image -> group table for --report (first column the image; MIDOG++'s "
                   "datasets_xvalidation.csv works as it is)")
    p.add_argument("--group-by", action="append", default=[], metavar="COLUMN",
                   help="group columns of --groups (default: Tumor and Scanner when present, else every other column)")
    p.add_argument("--threshold", type=float,
                   help="the calibrated MF threshold for --report (default: the bundle's, read from the results)")
    p.set_defaults(handler=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.hotspot_area is not None and not args.hotspot_area > 0:
        raise ConfigError(f"--hotspot-area={args.hotspot_area!r} must be a positive number of mm²")
    if args.report:
        return _report(args)
    if len(args.pred) != 1 or len(args.truth) != 1:
        raise ConfigError(f"give one --pred and one --truth ({len(args.pred)} and {len(args.truth)} given); "
                          "for many images use --report DIR")
    pred = read_predictions(args.pred[0])
    truth = read_truth(args.truth[0], image=args.image, truth_mpp=args.truth_mpp, image_hint=pred.image)
    report = evaluate([(pred, truth)], radius_um=args.radius_um, hotspot_area_mm2=args.hotspot_area)
    if args.json:
        data = {"pred": str(args.pred[0]), "truth": str(args.truth[0]), **report.to_json_dict()}
        print(json.dumps(data, indent=1, allow_nan=False))
    else:
        print(format_report(report))
    return ExitCode.OK


def _report(args: argparse.Namespace) -> int:
    from edge.devtools.evaluate_report import collect_images, read_groups, write_report

    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise ConfigError(f"--threshold {args.threshold!r} must be a probability between 0 and 1")
    images, unmatched = collect_images(args.pred, args.truth, truth_mpp=args.truth_mpp)
    dims = read_groups(args.groups, images, args.group_by) if args.groups else []
    data = write_report(images, args.report, threshold=args.threshold, dims=dims, unmatched=unmatched,
                        radius_um=args.radius_um)
    if args.json:
        print(json.dumps(data, indent=1, allow_nan=False))
        return ExitCode.OK
    print(f"images      {data['images']} with truth ({len(unmatched)} results without truth left out); "
          f"calibrated threshold {data['calibrated_threshold']:g}")
    for dim, members in data["groups"].items():
        for name, c in members.items():
            print(f"{dim + ': ' + name:<40} F1 {_num(c['f1_at_chosen'])} at the calibrated threshold, best "
                  f"{_num(c['best_f1'])} at {c['best_threshold']:g}, PR-AUC {_num(c['pr_auc'])} ({c['images']} images)")
    print(f"report      {args.report}/report.html (and report.md, report.json, " + ", ".join(data["figures"]) + ")")
    return ExitCode.OK


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_report(report: EvaluationReport) -> str:
    """A short human-readable table of the report."""
    names = ", ".join(i.image or "?" for i in report.images)
    sub = report.subtyping
    error = report.hotspot_count_pred - report.hotspot_count_true
    lines = [
        f"image            {names}",
        f"match radius     {report.radius_um:g} µm",
        f"TP / FP / FN     {report.tp} / {report.fp} / {report.fn}",
        f"F1               {_num(report.f1)}",
        f"precision        {_num(report.precision)}",
        f"recall           {_num(report.recall)}",
        f"hotspot count    predicted {report.hotspot_count_pred}, true {report.hotspot_count_true} "
        f"(error {error:+d}; {report.hotspot_area_mm2:g} mm²)",
    ]
    if sub.matched_with_subtype:
        lines += [
            f"AMF sensitivity  {_num(sub.sensitivity)} ({sub.atypical_correct}/{sub.atypical_total})",
            f"NMF specificity  {_num(sub.specificity)} ({sub.normal_correct}/{sub.normal_total})",
            f"balanced acc.    {_num(sub.balanced_accuracy)}",
            f"uncertain        {sub.uncertain} of {sub.matched_with_subtype} matched figures with a true subtype",
        ]
    return "\n".join(lines)
