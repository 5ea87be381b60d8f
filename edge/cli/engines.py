"""`mitosis-edge engines ...` and `mitosis-edge bench engine`: bundles, parity checks, wrapping, TensorRT builds.

Part of the command-line shell (it prints); the work happens in ``edge.engines``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from edge.cli._common import config_from_args
from edge.errors import ConfigError
from edge.vocab import BACKENDS, HARDWARE_COMPAT, PRECISIONS, QUANTIZE_TARGETS, ExitCode


def register(sub: Any, bench_sub: Any) -> None:
    """Add the engines commands to the top-level parser's subcommands, and ``bench engine``."""
    p = sub.add_parser(
        "engines", help="model bundles: list, check, verify a backend, wrap a model, build TensorRT plans"
    )
    eng = p.add_subparsers(title="engine commands", metavar="WHAT")

    e = eng.add_parser("list", help="bundles, their models, cached TensorRT plans and whether each fits this machine")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--plan-cache", metavar="DIR", help="TensorRT plan folder (default: engines.plan_cache)")
    e.set_defaults(handler=cmd_list)

    e = eng.add_parser(
        "check",
        help="check a bundle's manifest against its ONNX files and a probe run of each model; list every problem",
    )
    _bundle_option(e)
    e.add_argument(
        "--no-probe", action="store_true", help="skip the probe run (each model once on a zero and a synthetic image)"
    )
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(handler=cmd_check)

    e = eng.add_parser("verify", help="run the same inputs through ONNX Runtime (CPU) and a backend; compare")
    _bundle_option(e)
    e.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="backend to check against ONNX Runtime on the CPU (default: engines.backend)",
    )
    e.add_argument("--atol", type=float, default=None, help="absolute tolerance (default 1e-3; 2e-2 for fp16/int8)")
    e.add_argument("--rtol", type=float, default=None, help="relative tolerance (default 1e-3; 2e-2 for fp16/int8)")
    e.add_argument("--random", type=int, default=2, metavar="N", help="random batches per model (default 2)")
    e.add_argument(
        "--tiles",
        type=int,
        default=4,
        metavar="N",
        help="tiles from a synthetic slide (default 4; 0 = random inputs only)",
    )
    e.add_argument(
        "--reference",
        metavar="BUNDLE",
        help="compare with another bundle's models on ONNX Runtime (CPU), e.g. an INT8 bundle with its FP32 source;"
        " output errors are then reported, detection agreement (and F1 with --slide) decide",
    )
    e.add_argument("--slide", action="append", default=[], metavar="SLIDE",
                   help="with --reference: a slide with truth to compare F1 on (repeat for more)")
    e.add_argument("--truth", action="append", default=[], metavar="JSON",
                   help="truth of each --slide, in order (default: SLIDE's .truth.json from `mitosis-edge synth`)")
    e.add_argument("--max-f1-drop", type=float, default=0.01, help="largest F1 loss that passes (default 0.01)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    _trt_options(e, build=False)
    e.set_defaults(handler=cmd_verify)

    e = eng.add_parser(
        "quantize", help="static INT8 (QDQ) copy of a bundle, calibrated on tiles and crops of your slides"
    )
    _bundle_option(e)
    e.add_argument("--calibration-slide", action="append", required=True, metavar="SLIDE",
                   help="a slide like those the lab scans (repeat; 2-5 slides of different cases are typical)")
    e.add_argument("--out", required=True, metavar="NEWDIR", help="folder for the new bundle (must be new or empty)")
    e.add_argument("--tiles", type=int, default=32, help="calibration tiles over all slides (default 32)")
    e.add_argument("--crops", type=int, default=256, help="calibration crops per classifier (default 256)")
    e.add_argument("--version", help="the new bundle's version (default: <version>+int8.<UTC time>)")
    e.add_argument(
        "--target",
        choices=QUANTIZE_TARGETS,
        default="onnxruntime",
        help="onnxruntime (default): uint8 activations, fastest on a CPU; tensorrt: symmetric int8 activations"
        " for `engines build --precision int8`",
    )
    e.set_defaults(handler=cmd_quantize)

    e = eng.add_parser("wrap", help="prepend uint8 NHWC RGB preprocessing to a float-input ONNX model")
    e.add_argument("source", help="the float-input ONNX file")
    _bundle_option(e, required=True)
    e.add_argument("--model", required=True, help="'detector' or a classifier name from the manifest")
    e.add_argument("--out", help="where to write (default: the model's file in the manifest)")
    e.set_defaults(handler=cmd_wrap)

    e = eng.add_parser("build", help="build TensorRT plans for every model of a bundle (on the GPU box)")
    _bundle_option(e)
    _trt_options(e, build=True)
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(handler=cmd_build)

    b = bench_sub.add_parser("engine", help="engine throughput and overhead against a bare ONNX Runtime loop")
    _bundle_option(b)
    b.add_argument("--backend", choices=BACKENDS, help="inference backend")
    b.add_argument("--batches", type=int, default=8, help="batches per loop (default 8)")
    b.add_argument("--repeats", type=int, default=3, help="best of N, loops interleaved (default 3)")
    b.add_argument("--batch-size", type=int, help="tiles per detector batch (default stream.batch_size)")
    b.add_argument("--intra-op-threads", type=int, help="ONNX Runtime threads per model (default: one per core)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(handler=cmd_bench_engine)


def _bundle_option(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--bundle",
        required=required,
        metavar="DIR",
        help="bundle folder or installed bundle name (default: engines.bundle, else the demo bundle)",
    )


def _trt_options(p: argparse.ArgumentParser, build: bool) -> None:
    p.add_argument("--precision", choices=PRECISIONS, help="TensorRT precision (default fp16)")
    p.add_argument("--max-batch", type=int, help="profile maximum batch (default: detector 8, classifiers 64)")
    p.add_argument("--plan-cache", metavar="DIR", help="TensorRT plan folder (default ~/.cache/mitosis-edge/plans)")
    if build:
        p.add_argument("--workspace-gb", type=float, help="builder workspace in GB (default 4)")
        p.add_argument("--timing-cache", metavar="PATH", help="timing cache file, reused across builds")
        p.add_argument(
            "--hardware-compat",
            choices=HARDWARE_COMPAT,
            default="none",
            help="ampere+: one plan for every Ampere-or-newer GPU (a little slower)",
        )
        p.add_argument(
            "--version-compatible",
            action="store_true",
            help="a plan later TensorRT versions (and the lean runtime) can load",
        )


def cmd_check(args: argparse.Namespace) -> int:
    from edge.engines import load_bundle
    from edge.engines.check import probe_bundle_on_cpu
    from edge.errors import ManifestError

    config = config_from_args(args)
    bundle = load_bundle(config.engines.bundle)  # raises ManifestError listing every problem
    probe = None if args.no_probe else probe_bundle_on_cpu(bundle, config.engines.intra_op_threads)
    if args.json:
        summary = _bundle_summary(bundle)
        summary["ensemble"] = bundle.ensemble_roles()
        summary["probe"] = probe.to_json_dict() if probe else None
        print(json.dumps(summary, indent=2))
    else:
        for line in (probe.warnings + [f"note: {n}" for n in probe.notes]) if probe else []:
            print(line if line.startswith("note: ") else f"warning: {line}")
    if probe and probe.problems:
        raise ManifestError(bundle.manifest_path, probe.problems)
    if not args.json:
        checked = "manifest, graphs and a probe run" if probe else "manifest and graphs (no probe run)"
        print(f"{bundle.manifest_path}: bundle {bundle.name} {bundle.version} is consistent ({checked})")
        for line in _model_lines(bundle):
            print(line)
    return ExitCode.OK


def _bundle_summary(bundle: Any) -> dict[str, Any]:
    return {
        "name": bundle.name,
        "version": bundle.version,
        "path": str(bundle.path),
        "intended_use": bundle.intended_use,
        "manifest_sha256": bundle.manifest_sha256,
        "models": [
            {
                "name": m.name,
                "role": m.role,
                "file": m.path.name,
                "sha256": m.sha256,
                "input": m.input_spec.describe(),
                "mpp": m.mpp,
                "outputs": list(m.output_names),
            }
            for m in bundle.models
        ],
    }


def _model_lines(bundle: Any) -> list[str]:
    voters = {c.name: c.weight for c in bundle.mitotic_voters}
    subtypers = {c.name for c in bundle.atypical_classifiers}

    def use(name: str) -> str:
        roles = ([f"MF voter (weight {voters[name]:g})"] if name in voters else []) + (
            ["subtyper"] if name in subtypers else []
        )
        return ", ".join(roles) or "not run"

    return [
        f"  {m.role:10} {m.name:14} {m.path.name:24} {m.input_spec.describe():32} at {m.mpp} µm/px"
        + ("" if m.role == "detector" else f"  {use(m.name)}")
        for m in bundle.models
    ]


def cmd_list(args: argparse.Namespace) -> int:
    from edge.engines.build import machine_info
    from edge.engines.manifest import duplicate_bundles, list_bundles, load_bundle
    from edge.engines.plans import list_plans, plan_matches_machine
    from edge.errors import EngineError

    config = config_from_args(args)
    bundles: list[dict[str, Any]] = []
    loaded = []
    for folder in list_bundles(every_copy=True):
        try:
            bundle = load_bundle(folder)
            loaded.append(bundle)
            bundles.append({**_bundle_summary(bundle), "problems": []})
        except EngineError as exc:
            bundles.append(
                {
                    "name": folder.name,
                    "path": str(folder),
                    "models": [],
                    "problems": getattr(exc, "problems", [str(exc)]),
                }
            )
    duplicates = duplicate_bundles(loaded)
    for entry in bundles:
        if (problem := duplicates.get(Path(entry["path"]))) is not None:
            entry["problems"] = [problem]
    machine, why_not = machine_info()
    plans = []
    for sidecar in list_plans(config.engines.plan_cache_dir):
        fits, reason = plan_matches_machine(sidecar, machine) if machine else (False, why_not)
        plans.append({**sidecar, "matches_machine": fits, "reason": reason})
    result = {
        "bundles": bundles,
        "plan_cache": str(config.engines.plan_cache_dir),
        "plans": plans,
        "machine": dataclasses.asdict(machine) if machine else None,
        "machine_note": why_not,
    }
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return ExitCode.ERROR if duplicates else ExitCode.OK
    if not bundles:
        print("no bundles found")
    for b in bundles:
        if b["problems"]:
            print(f"{b['name']}  ({b['path']})  NOT USABLE:")
            for problem in b["problems"]:
                print(f"  - {problem}")
            continue
        print(f"{b['name']} {b['version']}  ({b['path']})")
        for m in b["models"]:
            print(f"  {m['role']:10} {m['name']:14} {m['file']:24} {m['input']}")
    print(f"TensorRT plans in {result['plan_cache']}: {len(plans) or 'none'}")
    for plan in plans:
        mark = "fits this machine" if plan["matches_machine"] else f"does not fit: {plan['reason']}"
        print(
            f"  {plan.get('bundle')}/{plan.get('model')} {plan.get('precision')} "
            f"TensorRT {plan.get('tensorrt_version')} on {plan.get('gpu_name')}: {mark}"
        )
    if machine is None:
        print(f"this machine: {why_not}")
    return ExitCode.ERROR if duplicates else ExitCode.OK


def cmd_verify(args: argparse.Namespace) -> int:
    from edge.config import EnginesConfig
    from edge.devtools.verify import (
        AGREE_RADIUS_PX,
        DEFAULT_ATOL,
        DEFAULT_RTOL,
        FP16_TOLERANCE,
        INT8_MIN_DETECTION_AGREEMENT,
        f1_on_slides,
        verify_bundle,
    )
    from edge.engines import load_bundle, open_engines

    config = config_from_args(args)
    bundle = load_bundle(config.engines.bundle)
    reference_bundle = load_bundle(args.reference) if args.reference else bundle
    if args.slide and not args.reference:
        raise ConfigError("--slide needs --reference: F1 is compared between two bundles")
    slides = _slides_with_truth(args.slide, args.truth)
    _same_models(bundle, reference_bundle)
    low = bool(args.reference) or (config.engines.backend == "tensorrt" and config.engines.precision != "fp32")
    atol = args.atol if args.atol is not None else (FP16_TOLERANCE if low else DEFAULT_ATOL)
    rtol = args.rtol if args.rtol is not None else (FP16_TOLERANCE if low else DEFAULT_RTOL)
    reference_config = EnginesConfig(intra_op_threads=config.engines.intra_op_threads)
    with (
        open_engines(reference_bundle, reference_config) as reference,
        open_engines(bundle, config.engines) as candidate,
    ):
        # INT8 against FP32: the same figure, not the same float, so detections agree within the merge radius
        detector = reference_bundle.detector
        radius = detector.merge_radius_um / detector.mpp if args.reference else AGREE_RADIUS_PX
        report = verify_bundle(
            reference_bundle, reference, candidate, atol=atol, rtol=rtol, random_count=args.random,
            slide_tiles=args.tiles, agree_radius_px=radius,
        )
        if args.reference:
            report.bundle = f"{bundle.name} {bundle.version}"
            report.reference = f"{reference_bundle.name} {reference_bundle.version} on onnxruntime (CPU)"
            report.judge_outputs = args.atol is not None or args.rtol is not None
            report.min_agreement = INT8_MIN_DETECTION_AGREEMENT
            report.max_f1_drop = args.max_f1_drop
            if slides:
                print(f"analyzing {len(slides)} slide(s) with both bundles ...", file=sys.stderr)
                report.f1 = f1_on_slides(reference, candidate, slides, config)
    if args.json:
        print(json.dumps(report.to_json_dict(), indent=2))
    else:
        judged = "" if report.judge_outputs else " (reported, not judged)"
        print(f"bundle {report.bundle}: {report.backend} against {report.reference}, atol {atol:g}, rtol {rtol:g}"
              f"{judged}")
        print(f"  {'model':14} {'output':12} {'inputs':7} {'max abs err':>12} {'max rel err':>12}  result")
        for o in report.outputs:
            mark = ("ok" if o.passed else "ABOVE TOLERANCE") if report.judge_outputs else "-"
            print(f"  {o.model:14} {o.output:12} {o.inputs:7} {o.max_abs_error:12.3g} {o.max_rel_error:12.3g}  {mark}")
        for d in report.detections:
            print(
                f"  detections ({d.inputs}): reference {d.reference}, candidate {d.candidate}, "
                f"agree {d.agreed} within {radius:g} px ({d.agreement:.1%}; at least {report.min_agreement:.0%} passes)"
            )
        if report.f1 is not None:
            f = report.f1
            print(f"  F1 on {len(f.slides)} slide(s) with truth: reference {f.reference_f1:.4f} (TP/FP/FN "
                  f"{'/'.join(map(str, f.reference))}), candidate {f.candidate_f1:.4f} "
                  f"({'/'.join(map(str, f.candidate))}), change {f.change:+.4f} (a loss of at most "
                  f"{report.max_f1_drop:g} passes)")
        print("PASSED" if report.passed else "FAILED: see the lines above")
    return ExitCode.OK if report.passed else ExitCode.ERROR


def _slides_with_truth(slides: list[str], truths: list[str]) -> list[tuple[str, str]]:
    from edge.devtools.synth import default_truth_path

    if truths and len(truths) != len(slides):
        raise ConfigError(f"give one --truth per --slide: {len(slides)} slides, {len(truths)} truths")
    return [(s, truths[i] if truths else str(default_truth_path(s))) for i, s in enumerate(slides)]


def _same_models(bundle: Any, reference: Any) -> None:
    names, ref_names = [m.name for m in bundle.models], [m.name for m in reference.models]
    if names != ref_names:
        raise ConfigError(
            f"bundle {bundle.name} has models {names}, the reference {reference.name} has {ref_names}:"
            " only versions of the same bundle (e.g. INT8 and its FP32 source) can be compared"
        )


def cmd_quantize(args: argparse.Namespace) -> int:
    from edge.devtools.quantize import REPORT_NAME, calibration_set, quantize_bundle
    from edge.engines import load_bundle

    config = config_from_args(args)
    bundle = load_bundle(config.engines.bundle)
    print(f"reading calibration tiles and crops from {len(args.calibration_slide)} slide(s) ...", file=sys.stderr)
    calibration = calibration_set(bundle, args.calibration_slide, config, tiles=args.tiles, crops=args.crops)
    counts = ", ".join(f"{name} {n}" for name, n in calibration.counts().items())
    print(f"calibration inputs: {counts}", file=sys.stderr)
    new = quantize_bundle(bundle, calibration, args.out, version=args.version, target=args.target)
    print(f"wrote bundle {new.name} {new.version} to {new.path} (INT8 QDQ; report: {new.path / REPORT_NAME})")
    for name, m in json.loads((new.path / REPORT_NAME).read_text(encoding="utf-8"))["models"].items():
        timed = "fp32_items_per_s" in m
        speed = f" ({m['int8_items_per_s']}/s; FP32 {m['fp32_items_per_s']}/s here)" if timed else ""
        how = "kept FP32, INT8 slower" if m["kept_fp32"] else "INT8"
        how += ", first conv space-to-depth" if m["space_to_depth_convs"] else ""
        print(f"  {name}: {how}{speed}")
    print(f"next: mitosis-edge engines verify --bundle {new.path} --reference {bundle.path} --slide SLIDE ...")
    return ExitCode.OK


def cmd_wrap(args: argparse.Namespace) -> int:
    from edge.engines import load_bundle
    from edge.engines.manifest import set_model_sha256
    from edge.engines.wrap import wrap_file

    bundle = load_bundle(args.bundle, check_graphs=False)
    try:
        model = bundle.model(args.model)
    except KeyError as exc:
        raise ConfigError(f"--model: {exc.args[0]}") from None
    path, sha = wrap_file(args.source, model, args.out)
    print(
        f"wrote {path}: input {model.input_spec.describe()} (uint8 NHWC RGB; {model.layout} "
        f"{model.channel_order} normalisation inside the graph)"
    )
    table = f"[{'detector' if model.role == 'detector' else 'classifier'}] {model.name}"
    if path.resolve() == model.path.resolve():
        set_model_sha256(bundle.manifest_path, model.name, sha)
        print(f'sha256 = "{sha}"   # written to {table} of {bundle.manifest_path}')
    else:
        print(f'sha256 = "{sha}"   # put this in {table} of {bundle.manifest_path} when {path} becomes its file')
    return ExitCode.OK


def cmd_build(args: argparse.Namespace) -> int:
    from edge.engines import load_bundle
    from edge.engines.build import build_bundle, build_options

    config = config_from_args(args)
    bundle = load_bundle(config.engines.bundle)
    options = build_options(
        config.engines, hardware_compat=args.hardware_compat, version_compatible=args.version_compatible
    )
    records = build_bundle(bundle, options, config.engines.plan_cache_dir)
    if args.json:
        print(json.dumps([r.sidecar for r in records], indent=2, default=str))
        return ExitCode.OK
    for r in records:
        s = r.sidecar
        print(
            f"built {s['model']}: {r.plan_path} ({s['precision']}, batch 1..{s['max_batch']}, "
            f"{s['build_seconds']:.0f} s, TensorRT {s['tensorrt_version']} on {s['gpu_name']})"
        )
    return ExitCode.OK


def cmd_bench_engine(args: argparse.Namespace) -> int:
    from edge.devtools.bench import bench_engine, to_json

    config = config_from_args(args)
    result = to_json(bench_engine(config.engines.bundle, config, batches=args.batches, repeats=args.repeats))
    if args.json:
        print(json.dumps(result, indent=2))
        return ExitCode.OK
    print(f"bundle {result['bundle']} on {result['backend']}")
    for m in result["models"]:
        line = f"  {m['role']:10} {m['model']:14} batch {m['batch_size']:3}  {m['items_per_s']:9.1f} /s"
        if "overhead" in m:
            line += (
                f"  bare session.run {m['bare_items_per_s']:9.1f} /s  overhead {m['overhead']:+.1%}"
                f"  (submit/collect {m['submit_overhead']:+.1%})"
            )
        print(line)
    print(f"peak RSS {result['peak_rss_mb']:.0f} MiB")
    return ExitCode.OK
