"""Measure scan QC against issue 18's targets on synthetic slides with planted faults, and on the real slides.

    python tools/qc_targets.py faults --out DIR     # 5 unseen seeds with blur, folds, pen; blurred hotspot; 5 clean
    python tools/qc_targets.py faults --fault-seeds 101,102,103 --clean-seeds 201,202,203   # other seeds
    python tools/qc_targets.py drift --out DIR      # 30 slides, eosin shifted after slide 20, through the store
    python tools/qc_targets.py real                 # the real slides in ../shared/data

Each slide goes through the whole pipeline (demo bundle, CPU), as `mitosis-edge analyze` runs it.
Out-of-focus recall and false area are measured on the QC grid: a tissue cell is truly out of focus when
its centre lies in a planted blur disc; false area is detected cells outside every disc over all
tissue cells. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.analysis.pipeline import analyze_slide  # noqa: E402
from edge.config import Config  # noqa: E402
from edge.devtools.synth import SynthParams, default_truth_path, generate_slide, load_truth  # noqa: E402
from edge.devtools.synth.faults import disc_mask, segment_distance  # noqa: E402
from edge.engines import load_bundle, open_engines  # noqa: E402

# Seeds the thresholds were chosen on (never use them to measure): 101-103 and 6101-6105 with faults, 201-203 and
# 6201-6205 clean; 8101-8105 and 8201-8205 measured once, then clean 8201's pen false alarm changed Macenko's floor;
# tests/test_qc.py uses 6202, 7102, 7103, 7106 and 9105. 9101-9105 and 9201-9205 measured, then fold 9105 (missed)
# chose qc.fold_eosin_ratio. 10101-10105 and 10201-10205 measured, then checked the sparser sampling for QC's
# cost; 11101-11105 and 11201-11205 measured, then fold 11103 (missed) chose qc.fold_density_ratio. The defaults
# below were first run to measure.
TUNING_SEEDS = (101, 102, 103, 6101, 6102, 6103, 6104, 6105, 8101, 8102, 8103, 8104, 8105,
                9101, 9102, 9103, 9104, 9105, 10101, 10102, 10103, 10104, 10105, 11101, 11102, 11103, 11104, 11105,
                201, 202, 203, 6201, 6202, 6203, 6204, 6205, 8201, 8202, 8203, 8204, 8205,
                9201, 9202, 9203, 9204, 9205, 10201, 10202, 10203, 10204, 10205, 11201, 11202, 11203, 11204, 11205)
FAULT_SEEDS = (12101, 12102, 12103, 12104, 12105)
CLEAN_SEEDS = (12201, 12202, 12203, 12204, 12205)
SIDE = 4096


def _analyze(path: Path, config: Config, engines: Any) -> Any:
    return analyze_slide(path, config, engines=engines)


def _hits_segments(mask: np.ndarray, px0: tuple[float, float], segments: list[tuple[tuple[float, float],
                   tuple[float, float]]], width: float) -> bool:
    """Whether any flagged pixel of ``mask`` (each px0 level-0 px) lies within the band of the segments."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return False
    cy = ((ys + 0.5) * px0[1]).astype(np.float32)
    cx = ((xs + 0.5) * px0[0]).astype(np.float32)
    return any(bool((segment_distance(cy, cx, a, b) <= width / 2 + max(px0)).any()) for a, b in segments)


def faults(out: Path, fault_seeds: tuple[int, ...] = FAULT_SEEDS,
           clean_seeds: tuple[int, ...] = CLEAN_SEEDS) -> dict[str, Any]:
    config = Config()
    bundle = load_bundle(config.engines.bundle)
    report: dict[str, Any] = {"fault_slides": [], "hotspot_slides": [], "clean_slides": []}
    with open_engines(bundle, config.engines, detector_batch=config.stream.batch_size) as engines:
        truth_cells = found_cells = false_cells = tissue_cells = 0
        for seed in fault_seeds:
            path = out / f"faults-{seed}.tiff"
            generate_slide(path, SynthParams(SIDE, SIDE, seed=seed, blur_regions=2, folds=1, pen_strokes=2))
            truth = load_truth(default_truth_path(path))
            analysis = _analyze(path, config, engines)
            maps, qc = analysis.qc_maps, analysis.result.qc
            tissue = maps.tissue_cells
            blurred = disc_mask(truth.faults.blur, maps.out_of_focus.shape, maps.cell_px0) & tissue
            oof = maps.out_of_focus & tissue
            folds = [_hits_segments(maps.fold, maps.thumb_px0, [((f.x0_px, f.y0_px), (f.x1_px, f.y1_px))], f.width_px)
                     for f in truth.faults.folds]
            pens = [_hits_segments(maps.pen, maps.thumb_px0, list(zip(p.points_px[:-1], p.points_px[1:], strict=True)),
                                   p.width_px) for p in truth.faults.pen]
            truth_cells += int(blurred.sum())
            found_cells += int((blurred & oof).sum())
            false_cells += int((oof & ~blurred).sum())
            tissue_cells += int(tissue.sum())
            report["fault_slides"].append({
                "seed": seed, "recall": round(float((blurred & oof).sum() / max(blurred.sum(), 1)), 3),
                "false_area": round(float((oof & ~blurred).sum() / max(tissue.sum(), 1)), 3),
                "folds_flagged": folds, "pen_flagged": pens, "verdict": qc["verdict"], "reasons": qc["reasons"],
            })
        report["out_of_focus_recall"] = round(found_cells / max(truth_cells, 1), 3)
        report["out_of_focus_false_area"] = round(false_cells / max(tissue_cells, 1), 3)
        report["every_fold_flagged"] = all(all(s["folds_flagged"]) for s in report["fault_slides"])
        report["every_pen_stroke_flagged"] = all(all(s["pen_flagged"]) for s in report["fault_slides"])
        for seed in fault_seeds[:2]:
            path = out / f"hotspot-{seed}.tiff"
            generate_slide(path, SynthParams(SIDE, SIDE, seed=seed, blur_hotspot=True))
            qc = _analyze(path, config, engines).result.qc
            report["hotspot_slides"].append({"seed": seed, "verdict": qc["verdict"], "reasons": qc["reasons"]})
        for seed in clean_seeds:
            path = out / f"clean-{seed}.tiff"
            generate_slide(path, SynthParams(SIDE, SIDE, seed=seed))
            qc = _analyze(path, config, engines).result.qc
            report["clean_slides"].append({"seed": seed, "verdict": qc["verdict"], "reasons": qc["reasons"],
                                           "focus_median": qc["focus_median"]})
    report["blurred_hotspot_rescan"] = all(s["verdict"] == "rescan" for s in report["hotspot_slides"])
    report["clean_pass"] = all(s["verdict"] == "pass" for s in report["clean_slides"])
    return report


def drift(out: Path, slides: int = 30, change_after: int = 20, shift_deg: float = 8.0) -> dict[str, Any]:
    from edge.service.store import Store

    config = Config()
    bundle = load_bundle(config.engines.bundle)
    events: list[dict[str, Any]] = []
    with open_engines(bundle, config.engines, detector_batch=config.stream.batch_size) as engines, \
            Store.open(out / "edge.db") as store:
        for i in range(1, slides + 1):
            path = out / f"seq-{i:02d}.tiff"
            shift = shift_deg if i > change_after else 0.0
            generate_slide(path, SynthParams(2048, 2048, seed=5000 + i, stain_shift=shift))
            analysis = _analyze(path, config, engines)
            job, _ = store.add_job(str(path))
            store.claim_next_job()
            store.complete_job(job.job_id, analysis.result, {}, config.qc)
        for event in store.events_after(0):
            if event.type == "drift":
                index = int(Path(event.payload["slide_path"]).stem.split("-")[1])
                events.append({"slide": index, "message": event.payload["message"]})
        records = store.qc_history()
    first = min((e["slide"] for e in events), default=None)
    return {
        "slides": slides, "change_after": change_after, "shift_deg": shift_deg, "drift_events": events,
        "first_drift_slide": first,
        "within_5_slides_and_not_before": first is not None and change_after < first <= change_after + 5,
        "outside_baseline": [int(Path(r.slide_path).stem.split("-")[1]) for r in records if not r.in_band],
    }


def real() -> dict[str, Any]:
    data = ROOT.parent / "shared" / "data" / "wsi"
    config = Config()
    report = {}
    bundle = load_bundle(config.engines.bundle)
    with open_engines(bundle, config.engines, detector_batch=config.stream.batch_size) as engines:
        for name, mpp in (("CMU-1-Small-Region.svs", None), ("tcga-cr-7395-01a-01-ts1.svs", 0.25)):
            cfg = config.with_overrides({"slide.mpp_override": mpp})
            qc = _analyze(data / name, cfg, engines).result.qc
            report[name] = {k: qc[k] for k in ("verdict", "reasons", "focus_median", "focus_p90",
                                               "out_of_focus_fraction", "fold_fraction", "pen_fraction")}
            report[name]["stains"] = qc["stains"]
    return report


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give whole numbers separated by commas, e.g. 8101,8102") from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed")
    return seeds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("faults", "drift", "real"))
    parser.add_argument("--out", help="where the synthetic slides go (default: a temporary folder)")
    parser.add_argument("--fault-seeds", type=_seeds, default=FAULT_SEEDS,
                        help="faults: comma-separated seeds of slides with faults (the first two: blurred hotspot)")
    parser.add_argument("--clean-seeds", type=_seeds, default=CLEAN_SEEDS, help="faults: seeds of the clean slides")
    args = parser.parse_args()
    tuned = sorted(set(args.fault_seeds + args.clean_seeds) & set(TUNING_SEEDS))
    if args.part == "faults" and tuned:
        print(f"note: seeds {tuned} chose the thresholds: not a measure on unseen slides", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="qc-targets-") as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        result = (faults(out, args.fault_seeds, args.clean_seeds) if args.part == "faults"
                  else drift(out) if args.part == "drift" else real())
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
