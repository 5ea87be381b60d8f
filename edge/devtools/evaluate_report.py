"""`evaluate --report`: many images with truth, F1 over the MF threshold, PR curves and agreement plots
per group (paper Figures S1, S2).

Every classified candidate in result.json keeps its ensemble ``p_mitotic`` and ``p_atypical``, so the
decision can be replayed at any threshold without running the models again: at threshold t a candidate
is an MF when ``p_mitotic >= t`` and its subtype follows the bundle's confident-only cut-offs. Matching
is the MIDOG protocol of :mod:`edge.devtools.evaluate`. Groups (tumour type, scanner, ...) come from a CSV keyed
by image; the MIDOG++ cross-validation table works as it is.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge.devtools.evaluate import (
    DEFAULT_MATCH_RADIUS_UM,
    DEFAULT_TRUTH_MPP,
    RESULT_SCHEMA,
    PointSet,
    match_points,
    read_json,
    truth_from_json,
)
from edge.errors import ConfigError, MissingExtraError

log = logging.getLogger(__name__)

__all__ = ["ReportImage", "collect_images", "read_groups", "threshold_curve", "write_report"]

THRESHOLDS = np.round(np.arange(0.02, 0.99, 0.01), 2)
THRESHOLD_STEP = 0.15  # the scatter plots' lower and higher thresholds are the calibrated one ∓ this
GROUP_COLUMNS = ("Tumor", "Scanner")  # MIDOG++'s table; other tables: every column but the key


@dataclass
class ReportImage:
    """One image: every candidate's position and probabilities, its truth, tissue area and groups."""

    name: str
    points_um: NDArray[np.float64]
    p_mitotic: NDArray[np.float64]
    p_atypical: NDArray[np.float64]  # nan without an atypical head
    truth: PointSet
    tissue_mm2: float | None
    threshold: float | None  # the bundle's MF threshold when the result names a readable bundle
    atypical_above: float = 0.9
    normal_below: float = 0.1
    groups: dict[str, str] = field(default_factory=dict)


def _result_files(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.rglob("result.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"--pred {str(p)!r} does not exist; give result.json files or folders holding them")
    if not files:
        raise ConfigError(f"--pred {list(paths)}: no result.json found")
    return files


def _bundle_decision(provenance: Mapping[str, Any]) -> tuple[float | None, float, float]:
    path = (provenance.get("bundle") or {}).get("path")
    if path:
        try:
            from edge.engines import load_bundle

            d = load_bundle(path).decision
            return d.mitotic_threshold, d.atypical_above, d.normal_below
        except Exception as exc:  # noqa: BLE001 - the bundle moved or is gone: the threshold must come from --threshold
            log.info("bundle %s of a result is not readable (%s)", path, exc)
    return None, 0.9, 0.1


def _truth_index(paths: Sequence[str]) -> tuple[dict[str, PointSet], list[tuple[str, Any]]]:
    """Synthetic truths by slide file name; COCO files kept whole (their image is chosen per prediction)."""
    synth: dict[str, PointSet] = {}
    coco: list[tuple[str, Any]] = []
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.rglob("*.json")) if p.is_dir() else [p]
    for f in files:
        data = read_json(f, "truth")
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            coco.append((str(f), data))
        elif isinstance(data, dict) and str(data.get("schema", "")).startswith("mitosis-edge/synth-truth"):
            truth = truth_from_json(data, str(f))
            synth[PurePath(truth.image).name] = truth
    return synth, coco


def collect_images(pred_paths: Sequence[str], truth_paths: Sequence[str], *, truth_mpp: float = DEFAULT_TRUTH_MPP
                   ) -> tuple[list[ReportImage], list[str]]:
    """Pair every result.json with its truth by slide file name; results without truth are listed, not dropped."""
    synth, coco = _truth_index(truth_paths)
    if not synth and not coco:
        raise ConfigError(f"--truth {list(truth_paths)}: no synthetic truth or COCO JSON found")
    images, unmatched = [], []
    for f in _result_files(pred_paths):
        data = read_json(f, "predictions")
        if not (isinstance(data, dict) and data.get("schema") == RESULT_SCHEMA):
            raise ConfigError(f"--pred {str(f)!r} is not a result.json: the report needs every candidate's "
                              "probabilities (p_mitotic, p_atypical), which only result.json keeps; midog.json, "
                              "GeoJSON and CSV exports hold the mitotic figures only")
        figures = data.get("figures", [])
        if any("p_mitotic" not in fig for fig in figures):
            raise ConfigError(f"{f}: figures without p_mitotic; re-run analyze with this version to get them")
        name = PurePath(str(data.get("slide_path", ""))).name
        truth = synth.get(name)
        if truth is None:
            for source, doc in coco:
                try:
                    truth = truth_from_json(doc, source, truth_mpp=truth_mpp, image_hint=name)
                    break
                except ConfigError:
                    continue
        if truth is None:
            unmatched.append(f"{f} ({name}): no truth")
            continue
        threshold, above, below = _bundle_decision(data.get("provenance") or {})
        images.append(ReportImage(
            name=name,
            points_um=np.array([(fig["x_um"], fig["y_um"]) for fig in figures], dtype=np.float64).reshape(-1, 2),
            p_mitotic=np.array([fig["p_mitotic"] for fig in figures], dtype=np.float64),
            p_atypical=np.array([math.nan if fig.get("p_atypical") is None else fig["p_atypical"] for fig in figures],
                                dtype=np.float64),
            truth=truth, tissue_mm2=(data.get("scores") or {}).get("tissue_area_mm2"), threshold=threshold,
            atypical_above=above, normal_below=below))
    if not images:
        raise ConfigError(f"no result.json matched a truth by slide file name; unmatched: {unmatched[:5]}")
    return images, unmatched


def _key(text: str) -> str:
    stem = PurePath(text).name.split(".")[0]
    return str(int(stem)) if stem.isdigit() else stem.lower()


def read_groups(path: str | Path, images: Sequence[ReportImage], group_by: Sequence[str] = ()) -> list[str]:
    """Set each image's groups from a CSV (comma or semicolon) whose first column names the image (file name,
    stem or MIDOG++ slide number); returns the group columns used."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--groups {str(file)!r} cannot be read: {exc}") from None
    first = text.split("\n", 1)[0]
    reader = csv.DictReader(text.splitlines(), delimiter=";" if first.count(";") > first.count(",") else ",")
    columns = reader.fieldnames or []
    if len(columns) < 2:
        raise ConfigError(f"--groups {str(file)!r} needs an image column and at least one group column; has {columns}")
    key_col = columns[0]
    dims = list(group_by) or [c for c in GROUP_COLUMNS if c in columns] or columns[1:]
    missing = [d for d in dims if d not in columns]
    if missing:
        raise ConfigError(f"--group-by {missing} not in --groups {str(file)!r} (columns: {columns})")
    table = {_key(row[key_col]): row for row in reader if row.get(key_col)}
    for image in images:
        row = table.get(_key(image.name))
        image.groups = {d: (row[d] if row else "(not in groups table)") for d in dims}
    return list(dims)


# --- the numbers -----------------------------------------------------------------------------------


def _counts(image: ReportImage, t: float, radius_um: float) -> tuple[int, int, int]:
    keep = image.p_mitotic >= t
    m = match_points(image.points_um[keep], image.truth.points_um, radius_um)
    return m.tp, m.fp, m.fn


def threshold_curve(images: Sequence[ReportImage], thresholds: NDArray[np.float64] = THRESHOLDS, *,
                    radius_um: float = DEFAULT_MATCH_RADIUS_UM) -> dict[str, list[float | None]]:
    """TP/FP/FN summed over images at each threshold, with F1, precision and recall (None when undefined)."""
    rows = np.array([[_counts(im, float(t), radius_um) for im in images] for t in thresholds]).sum(axis=1)
    tp, fp, fn = rows[:, 0], rows[:, 1], rows[:, 2]

    def ratio(a: NDArray[Any], b: NDArray[Any]) -> list[float | None]:
        return [float(x) / float(y) if y else None for x, y in zip(a, b, strict=True)]

    return {"threshold": [float(t) for t in thresholds], "tp": tp.tolist(), "fp": fp.tolist(), "fn": fn.tolist(),
            "f1": ratio(2 * tp, 2 * tp + fp + fn), "precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn)}


def pr_auc(curve: Mapping[str, Sequence[float | None]]) -> float | None:
    """Area under the precision-recall curve over the threshold grid, with interpolated precision (at each recall,
    the best precision reached at that recall or more), summed over the steps in recall from 0.

    >>> pr_auc({"recall": [1.0, 0.5, 0.0], "precision": [0.5, 1.0, None]})
    0.75
    """
    pairs = [(r, p) for r, p in zip(curve["recall"], curve["precision"], strict=True)
             if r is not None and p is not None]
    if not pairs:
        return None
    recalls = sorted({r for r, _ in pairs})
    area, last = 0.0, 0.0
    for r in recalls:
        area += (r - last) * max(p for rr, p in pairs if rr >= r)
        last = r
    return area


def per_image_agreement(images: Sequence[ReportImage], t: float) -> dict[str, Any]:
    """True vs predicted MF density (per mm² of tissue) and AMF/NMF ratio per image at threshold t,
    with Pearson and Spearman coefficients (None with fewer than 3 images or no spread)."""
    from scipy.stats import pearsonr, spearmanr

    out: dict[str, Any] = {"threshold": t}
    for what in ("density", "ratio"):
        true, pred, names = [], [], []
        for im in images:
            keep = im.p_mitotic >= t
            if what == "density":
                if not im.tissue_mm2:
                    continue
                tv, pv = len(im.truth.points_um) / im.tissue_mm2, int(keep.sum()) / im.tissue_mm2
            else:
                t_amf = sum(s == "atypical" for s in im.truth.subtypes)
                t_nmf = sum(s == "normal" for s in im.truth.subtypes)
                p_amf = int((keep & (im.p_atypical > im.atypical_above)).sum())
                p_nmf = int((keep & (im.p_atypical < im.normal_below)).sum())
                if not t_nmf or not p_nmf:
                    continue
                tv, pv = t_amf / t_nmf, p_amf / p_nmf
            true.append(tv)
            pred.append(pv)
            names.append(im.name)
        r = rho = None
        if len(true) >= 3 and np.ptp(true) > 0 and np.ptp(pred) > 0:
            r, rho = float(pearsonr(true, pred)[0]), float(spearmanr(true, pred)[0])
        out[what] = {"images": names, "true": true, "predicted": pred, "pearson": r, "spearman": rho}
    return out


# --- figures and report --------------------------------------------------------------------------------


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError('evaluate --report draws with matplotlib, which is not installed; install it with: '
                                'pip install "mitosis-edge[cohort]"  (or: pip install matplotlib)') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(images: Sequence[ReportImage], out_dir: str | Path, *, threshold: float | None = None,
                 dims: Sequence[str] = (), unmatched: Sequence[str] = (),
                 radius_um: float = DEFAULT_MATCH_RADIUS_UM) -> dict[str, Any]:
    """F1-over-threshold and PR figures (all and per group), scatter plots at three thresholds,
    report.md/report.html and report.json in ``out_dir``."""
    from edge.study.survival import markdown_to_html

    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chosen = threshold if threshold is not None else next((im.threshold for im in images if im.threshold), None)
    if chosen is None:
        raise ConfigError("the results name no readable bundle, so the calibrated MF threshold is unknown; "
                          "pass --threshold (the bundle's [decision] mitotic_threshold)")
    groups: dict[str, dict[str, list[ReportImage]]] = {"all": {"all images": list(images)}}
    for d in dims:
        for im in images:
            groups.setdefault(d, {}).setdefault(im.groups.get(d, "?"), []).append(im)
    curves: dict[str, dict[str, Any]] = {}
    for dim, members in groups.items():
        for name, ims in sorted(members.items()):
            curve = threshold_curve(ims, radius_um=radius_um)
            f1 = [v if v is not None else -1.0 for v in curve["f1"]]
            top = max(f1)  # among equally good thresholds, the one nearest the calibrated
            best = min((i for i, v in enumerate(f1) if v == top), key=lambda i: abs(THRESHOLDS[i] - chosen))
            at = int(np.argmin(np.abs(THRESHOLDS - chosen)))
            curves.setdefault(dim, {})[name] = {
                "images": len(ims), "curve": curve, "pr_auc": pr_auc(curve),
                "best_threshold": curve["threshold"][best], "best_f1": curve["f1"][best],
                "f1_at_chosen": curve["f1"][at], "precision_at_chosen": curve["precision"][at],
                "recall_at_chosen": curve["recall"][at]}
    figures = []
    for dim, by_group in curves.items():
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
        for name, c in by_group.items():
            label = f"{name} (n={c['images']})"
            ax1.plot(c["curve"]["threshold"], [np.nan if v is None else v for v in c["curve"]["f1"]], label=label)
            rec = [np.nan if v is None else v for v in c["curve"]["recall"]]
            prec = [np.nan if v is None else v for v in c["curve"]["precision"]]
            line, = ax2.plot(rec, prec, label=f"{name}: PR-AUC {_f(c['pr_auc'])}")
            at = int(np.argmin(np.abs(THRESHOLDS - chosen)))
            ax2.plot([rec[at]], [prec[at]], "o", color=line.get_color())
        ax1.axvline(chosen, color="k", ls="--", lw=1, label=f"calibrated threshold {chosen:g}")
        ax1.set(xlabel="MF threshold (ensemble p)", ylabel="F1", ylim=(0, 1.02), xlim=(0, 1),
                title=f"F1 over threshold ({dim})")
        ax2.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02),
                title=f"precision-recall ({dim}); dot = calibrated threshold")
        ax1.legend(fontsize=7)
        ax2.legend(fontsize=7)
        fig.tight_layout()
        name = f"f1_pr_{_safe(dim)}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        figures.append(name)
    # one lower, one higher: THRESHOLD_STEP away, or half way to 0 or 1 when the calibrated one is near either
    levels = [round(chosen - min(THRESHOLD_STEP, chosen / 2), 2), chosen,
              round(chosen + min(THRESHOLD_STEP, (1 - chosen) / 2), 2)]
    agreement = [per_image_agreement(images, t) for t in levels]
    fig, axes = plt.subplots(2, 3, figsize=(12, 7.5))
    for col, a in enumerate(agreement):
        for row, (what, unit) in enumerate((("density", "MF per mm² of tissue"), ("ratio", "AMF/NMF ratio"))):
            ax = axes[row][col]
            d = a[what]
            ax.scatter(d["true"], d["predicted"], s=18)
            top = max([*d["true"], *d["predicted"], 1e-9]) * 1.05
            ax.plot([0, top], [0, top], color="grey", lw=0.8, ls=":")
            ax.set(xlabel=f"true {unit}", ylabel=f"predicted {unit}",
                   title=f"t={a['threshold']:g}: Pearson {_f(d['pearson'])}, Spearman {_f(d['spearman'])}")
            ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(out / "scatter.png", dpi=110)
    plt.close(fig)
    figures.append("scatter.png")
    data = {"images": len(images), "match_radius_um": radius_um, "calibrated_threshold": chosen,
            "scatter_thresholds": levels, "group_columns": list(dims), "unmatched": list(unmatched),
            "groups": curves, "agreement": agreement, "figures": figures}
    (out / "report.json").write_text(json.dumps(data, indent=1, allow_nan=False), encoding="utf-8")
    markdown = _markdown(data)
    (out / "report.md").write_text(markdown, encoding="utf-8")
    (out / "report.html").write_text(markdown_to_html(markdown, "Detection report"), encoding="utf-8")
    return data


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text).lower()


def _markdown(data: Mapping[str, Any]) -> str:
    lines = ["# Detection report", "",
             f"{data['images']} images; MIDOG matching within {data['match_radius_um']:g} µm; calibrated MF threshold "
             f"{data['calibrated_threshold']:g}. F1, precision and recall from TP/FP/FN summed over a group's images.",
             "", "| group | images | F1 at calibrated | precision | recall | best F1 (threshold) | PR-AUC |",
             "|---|---|---|---|---|---|---|"]
    for dim, members in data["groups"].items():
        for name, c in members.items():
            lines.append(f"| {dim}: {name} | {c['images']} | {_f(c['f1_at_chosen'])} | {_f(c['precision_at_chosen'])} "
                         f"| {_f(c['recall_at_chosen'])} | {_f(c['best_f1'])} ({c['best_threshold']:g}) "
                         f"| {_f(c['pr_auc'])} |")
    lines += [""] + [f"![{f}]({f})\n" for f in data["figures"]]
    lines += ["## Agreement per image", "", "| threshold | density Pearson | density Spearman | ratio Pearson | "
              "ratio Spearman |", "|---|---|---|---|---|"]
    for a in data["agreement"]:
        lines.append(f"| {a['threshold']:g} | {_f(a['density']['pearson'])} | {_f(a['density']['spearman'])} | "
                     f"{_f(a['ratio']['pearson'])} | {_f(a['ratio']['spearman'])} |")
    if data["unmatched"]:
        lines += ["", "## Results without truth (left out)", ""] + [f"- {u}" for u in data["unmatched"]]
    return "\n".join(lines) + "\n"
