"""`mitosis-edge evaluate`: detection F1, subtyping and hotspot count against ground truth.

Part of the command-line shell (it prints); the work happens in ``edge.evaluate``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from edge.errors import ConfigError
from edge.evaluate import (
    DEFAULT_MATCH_RADIUS_UM,
    DEFAULT_TRUTH_MPP,
    EvaluationReport,
    evaluate,
    read_predictions,
    read_truth,
)

EXIT_OK = 0


def register(sub: Any) -> None:
    """Add the `evaluate` command to the top-level parser's subcommands."""
    p = sub.add_parser(
        "evaluate",
        help="compare predictions (result.json or midog.json) with truth (synthetic truth or MIDOG++ COCO JSON)",
    )
    p.add_argument("--pred", required=True, metavar="JSON", help="result.json or midog.json")
    p.add_argument("--truth", required=True, metavar="JSON", help="synthetic truth JSON or MIDOG++ COCO JSON")
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
    p.set_defaults(handler=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.hotspot_area is not None and not args.hotspot_area > 0:
        raise ConfigError(f"--hotspot-area={args.hotspot_area!r} must be a positive number of mm²")
    pred = read_predictions(args.pred)
    truth = read_truth(args.truth, image=args.image, truth_mpp=args.truth_mpp, image_hint=pred.image)
    report = evaluate([(pred, truth)], radius_um=args.radius_um, hotspot_area_mm2=args.hotspot_area)
    if args.json:
        data = {"pred": str(args.pred), "truth": str(args.truth), **report.to_json_dict()}
        print(json.dumps(data, indent=1, allow_nan=False))
    else:
        print(format_report(report))
    return EXIT_OK


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
