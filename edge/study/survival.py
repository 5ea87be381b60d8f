"""Survival by the slide scores of a cohort run (paper §2.4, Figure 3), with lifelines.

For each variable (hotspot mitotic count, AMF/NMF ratio in the hotspot and over the slide, MF
density) the cutoff with the smallest Cox p-value over the observed values is searched (each group
at least ``min_group`` cases), as in the paper. Choosing the best of many cutoffs makes that p-value
far too small, so a corrected one is reported beside it: the maximally selected log-rank statistic
over the same cutoffs with the Lausen & Schumacher (1992) approximation of its null distribution
(R ``maxstat``, ``pmethod="Lau92"``). Pre-specified cutoffs and the variable as a continuous Cox
covariate are reported too. "High" is always ``value > cutoff``.

Estimators (Cox model, log-rank test, Kaplan-Meier) are lifelines'; this module only arranges the
data, chooses cutoffs and writes the report. lifelines, pandas and matplotlib come with the
``cohort`` extra and are imported here only.
"""

from __future__ import annotations

import csv
import html
import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge.analysis.scoring import DEFAULT_HOTSPOT_AREA_MM2, mitotic_score_hint
from edge.errors import ConfigError, MissingExtraError

log = logging.getLogger(__name__)

__all__ = [
    "VARIABLES",
    "CutoffResult",
    "SurvivalTable",
    "VariableResult",
    "aggregate",
    "analyze_variable",
    "build_table",
    "censor_at",
    "cutoff_result",
    "lausen_schumacher_p",
    "parse_cutoffs",
    "parse_min_group",
    "read_clinical",
    "read_results",
    "run_survival",
    "simulated_cohort",
]

DAYS_PER_YEAR = 365.25
MAX_CUTOFFS = 200  # more distinct values than this: the search uses this many quantiles of them


@dataclass(frozen=True)
class Variable:
    key: str  # name on the command line (--cutoff mc=11)
    column: str  # column in slides.csv
    label: str


VARIABLES = (
    Variable("mc", "hotspot_mc", "hotspot mitotic count"),
    Variable("hotspot_ratio", "hotspot_ratio", "AMF/NMF ratio in the hotspot"),
    Variable("slide_ratio", "slide_ratio", "AMF/NMF ratio over the slide"),
    Variable("density", "density_per_mm2", "MF density per mm² of tissue"),
)
VARIABLE_KEYS = tuple(v.key for v in VARIABLES)


def _lifelines() -> Any:
    try:
        import lifelines
    except ImportError:
        raise MissingExtraError(
            'survival analysis needs lifelines, which is not installed; install it with: '
            'pip install "mitosis-edge[cohort]"  (or: pip install lifelines matplotlib)'
        ) from None
    return lifelines


# --- the table: one row per case -------------------------------------------------------------------


@dataclass
class SurvivalTable:
    """Cases with a time, an event and the variables; and everything left out, with the reason."""

    case_ids: list[str]
    time_days: NDArray[np.float64]
    event: NDArray[np.int_]
    values: dict[str, NDArray[np.float64]]  # variable key -> value per case (nan = undefined)
    slides_per_case: dict[str, int]
    unmatched: dict[str, list[str]] = field(default_factory=dict)  # reason -> slide paths or case ids


def censor_at(time_days: NDArray[np.float64], event: NDArray[np.int_], horizon_days: float
              ) -> tuple[NDArray[np.float64], NDArray[np.int_]]:
    """Administrative censoring: follow-up beyond the horizon becomes a censored time at the horizon.

    >>> t, e = censor_at(np.array([100.0, 5000.0]), np.array([1, 1]), 3652.5)
    >>> t.tolist(), e.tolist()
    ([100.0, 3652.5], [1, 0])
    """
    late = time_days > horizon_days
    return np.where(late, horizon_days, time_days), np.where(late, 0, event)


def _float(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def read_results(results_dir: str | Path) -> list[dict[str, str]]:
    path = Path(results_dir) / "slides.csv"
    if not path.is_file():
        raise ConfigError(f"--results {str(results_dir)!r} has no slides.csv; give the --out folder of a cohort run")
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def read_clinical(
    path: str | Path, *, endpoint: str = "OS", id_col: str | None = None, time_col: str | None = None,
    event_col: str | None = None,
) -> tuple[dict[str, tuple[float, int]], list[str]]:
    """case id -> (time in days, event 0/1) from a clinical CSV (or TSV); and the rows that could not be used."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--clinical {str(file)!r} cannot be read: {exc}") from None
    dialect = "excel-tab" if text.split("\n", 1)[0].count("\t") > text.split("\n", 1)[0].count(",") else "excel"
    reader = csv.DictReader(text.splitlines(), dialect=dialect)
    columns = reader.fieldnames or []
    ids = id_col or next((c for c in ("bcr_patient_barcode", "case_id") if c in columns), "bcr_patient_barcode")
    times = time_col or f"{endpoint}.time"
    events = event_col or endpoint
    missing = [c for c in (ids, times, events) if c not in columns]
    if missing:
        raise ConfigError(f"--clinical {str(file)!r} has no column(s) {missing} (columns: {columns[:20]}); "
                          "pass --id-col, --time-col and --event-col, or --endpoint OS|PFI|DSS|DFI for a TCGA CDR "
                          "table")
    table: dict[str, tuple[float, int]] = {}
    unusable = []
    for line, row in enumerate(reader, start=2):
        case = (row.get(ids) or "").strip()
        t, e = _float(row.get(times)), _float(row.get(events))
        if not case or not (math.isfinite(t) and t >= 0) or e not in (0.0, 1.0):
            unusable.append(f"line {line} ({case or 'no id'}): {times}={row.get(times)!r}, "
                            f"{events}={row.get(events)!r}")
            continue
        table[case.upper() if case.upper().startswith("TCGA-") else case] = (t, int(e))
    if not table:
        raise ConfigError(f"--clinical {str(file)!r}: no row has a case id, a time >= 0 and an event of 0 or 1 "
                          f"in {ids!r}, {times!r}, {events!r}")
    return table, unusable


def aggregate(values: Sequence[float], how: str) -> float:
    """Several slides of one case: the worst (max, as a pathologist reports), the mean, or the first.

    Undefined values (nan) are left out; a case with none stays undefined.

    >>> aggregate([3.0, float("nan"), 7.0], "max"), aggregate([3.0, 7.0], "mean"), aggregate([3.0, 7.0], "first")
    (7.0, 5.0, 3.0)
    """
    defined = [v for v in values if math.isfinite(v)]
    if not defined:
        return math.nan
    if how == "max":
        return max(defined)
    if how == "mean":
        return sum(defined) / len(defined)
    if how == "first":
        return defined[0]
    raise ConfigError(f"--per-case {how!r}: choose max, mean or first")


def build_table(
    rows: Sequence[Mapping[str, str]], clinical: Mapping[str, tuple[float, int]], *, per_case: str = "max",
    horizon_days: float = 10 * DAYS_PER_YEAR,
) -> SurvivalTable:
    """Join slide rows to clinical data by case id; aggregate slides per case; censor at the horizon."""
    unmatched: dict[str, list[str]] = {"failed slides": [], "slides without clinical data": [],
                                       "clinical cases without a slide": []}
    by_case: dict[str, list[Mapping[str, str]]] = {}
    for row in rows:
        if row.get("status") != "done":
            unmatched["failed slides"].append(f"{row.get('slide_path')}: {row.get('error', '')}")
            continue
        case = row.get("case_id", "")
        case = case.upper() if case.upper().startswith("TCGA-") else case
        if case not in clinical:
            unmatched["slides without clinical data"].append(f"{row.get('slide_path')} (case {case})")
            continue
        by_case.setdefault(case, []).append(row)
    unmatched["clinical cases without a slide"] = sorted(set(clinical) - set(by_case)
                                                         - {c for c in clinical if _has_failed_slide(rows, c)})
    cases = sorted(by_case)
    time = np.array([clinical[c][0] for c in cases], dtype=np.float64)
    event = np.array([clinical[c][1] for c in cases], dtype=np.int_)
    time, event = censor_at(time, event, horizon_days)
    values = {v.key: np.array([aggregate([_float(r.get(v.column)) for r in by_case[c]], per_case) for c in cases])
              for v in VARIABLES}
    return SurvivalTable(cases, time, event, values, {c: len(by_case[c]) for c in cases}, unmatched)


def _has_failed_slide(rows: Sequence[Mapping[str, str]], case: str) -> bool:
    return any(r.get("case_id", "").upper() == case.upper() and r.get("status") != "done" for r in rows)


# --- statistics -------------------------------------------------------------------------------------


def parse_min_group(text: str, n: int) -> int:
    """``10%`` of n cases, or a count.

    >>> parse_min_group("10%", 300), parse_min_group("25", 300)
    (30, 25)
    """
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        raise ConfigError(f"--min-group {text!r}: give a share such as 10% or a number of cases") from None
    count = math.ceil(n * value / 100) if text.endswith("%") else int(value)
    if not value > 0 or (count * 2 > n > 0):
        raise ConfigError(f"--min-group {text!r} is {count} of {n} cases: two groups cannot both be that large")
    return max(1, count)


def lausen_schumacher_p(statistic: float, minprop: float, maxprop: float) -> float:
    """P(max |standardised log-rank| >= statistic) over cutoffs between the minprop and maxprop quantiles,
    by Lausen & Schumacher (1992); clipped to [0, 1] (the approximation exceeds 1 for small statistics).

    >>> round(lausen_schumacher_p(3.5, 0.1, 0.9), 6)   # R: maxstat::pLausen92(3.5, 0.1, 0.9)
    0.013324
    """
    from scipy.stats import norm

    b = float(statistic)
    if b < 1:  # as R's maxstat: the approximation is meaningless below 1
        return 1.0
    db = norm.pdf(b)
    p = 4 * db / b + db * (b - 1 / b) * math.log((maxprop * (1 - minprop)) / ((1 - maxprop) * minprop))
    return float(min(1.0, max(0.0, p)))


@dataclass(frozen=True)
class CutoffResult:
    """Two groups at one cutoff (high: value > cutoff): Cox HR (high vs low) with 95% CI, Cox and log-rank p."""

    cutoff: float
    n_low: int
    n_high: int
    events_low: int
    events_high: int
    hazard_ratio: float | None
    ci_low: float | None
    ci_high: float | None
    cox_p: float | None
    logrank_p: float | None
    logrank_statistic: float | None  # chi-square, 1 df


def _quiet_fit(fitter: Any, frame: Any, **kw: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fitter.fit(frame, **kw)


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def cutoff_result(x: NDArray[np.float64], time: NDArray[np.float64], event: NDArray[np.int_], cutoff: float
                  ) -> CutoffResult:
    """Cox model and log-rank test (lifelines) of ``x > cutoff`` against the rest."""
    import pandas as pd

    ll = _lifelines()
    from lifelines.statistics import logrank_test

    high = x > cutoff
    n_high, n_low = int(high.sum()), int((~high).sum())
    ev_high, ev_low = int(event[high].sum()), int(event[~high].sum())
    hr = lo = hi = cox_p = None
    if n_high and n_low and (ev_high + ev_low):
        frame = pd.DataFrame({"T": time, "E": event, "high": high.astype(float)})
        try:
            cph = _quiet_fit(ll.CoxPHFitter(), frame, duration_col="T", event_col="E")
            s = cph.summary.loc["high"]
            hr, lo, hi = _finite(s["exp(coef)"]), _finite(s["exp(coef) lower 95%"]), _finite(s["exp(coef) upper 95%"])
            cox_p = _finite(s["p"])
        except Exception as exc:  # noqa: BLE001 - ConvergenceError and numerical failures: no Cox at this cutoff
            log.debug("Cox model at cutoff %g did not converge: %s", cutoff, exc)
    lr_p = lr_stat = None
    if n_high and n_low:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lr = logrank_test(time[high], time[~high], event[high], event[~high])
        lr_p, lr_stat = _finite(lr.p_value), _finite(lr.test_statistic)
    return CutoffResult(float(cutoff), n_low, n_high, ev_low, ev_high, hr, lo, hi, cox_p, lr_p, lr_stat)


def candidate_cutoffs(x: NDArray[np.float64], min_group: int) -> NDArray[np.float64]:
    """Observed values that leave at least ``min_group`` cases on each side (high: value > cutoff)."""
    values = np.unique(x)
    n = len(x)
    low_sizes = np.searchsorted(np.sort(x), values, side="right")
    ok = (low_sizes >= min_group) & (n - low_sizes >= min_group)
    chosen = values[ok]
    if len(chosen) > MAX_CUTOFFS:
        chosen = np.unique(np.quantile(chosen, np.linspace(0, 1, MAX_CUTOFFS), method="nearest"))
    return chosen


@dataclass
class VariableResult:
    key: str
    label: str
    cases: int  # with a defined value
    undefined: int  # cases left out because the value is undefined (e.g. a ratio without normal figures)
    best: CutoffResult | None
    corrected_p: float | None
    corrected_p_method: str
    searched: int  # cutoffs tried
    prespecified: list[CutoffResult]
    continuous: dict[str, float | None]  # HR per unit with CI and p
    figures: list[str] = field(default_factory=list)

    def to_json_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return d


CORRECTION = ("maximally selected log-rank statistic over the searched cutoffs, "
              "Lausen & Schumacher (1992) approximation (R maxstat pmethod='Lau92')")


def analyze_variable(
    key: str, x: NDArray[np.float64], time: NDArray[np.float64], event: NDArray[np.int_], *,
    min_group: str = "10%", prespecified: Sequence[float] = (),
) -> VariableResult:
    """Cutoff search (smallest Cox p), the corrected p-value, pre-specified cutoffs and the continuous Cox model."""
    import pandas as pd

    ll = _lifelines()
    label = next(v.label for v in VARIABLES if v.key == key)
    defined = np.isfinite(x)
    xs, ts, es = x[defined], time[defined], event[defined]
    n = len(xs)
    result = VariableResult(key, label, n, int((~defined).sum()), None, None, CORRECTION, 0, [], {})
    if n < 4 or es.sum() == 0:
        return result
    floor = parse_min_group(min_group, n)
    tried = [cutoff_result(xs, ts, es, c) for c in candidate_cutoffs(xs, floor)]
    result.searched = len(tried)
    with_p = [c for c in tried if c.cox_p is not None]
    if with_p:
        result.best = min(with_p, key=lambda c: (c.cox_p, c.cutoff))
        stats = [c.logrank_statistic for c in tried if c.logrank_statistic is not None]
        if stats:
            minprop = floor / n
            result.corrected_p = lausen_schumacher_p(math.sqrt(max(stats)), minprop, 1 - minprop)
    result.prespecified = [cutoff_result(xs, ts, es, c) for c in prespecified]
    frame = pd.DataFrame({"T": ts, "E": es, key: xs})
    try:
        s = _quiet_fit(ll.CoxPHFitter(), frame, duration_col="T", event_col="E").summary.loc[key]
        result.continuous = {"hazard_ratio_per_unit": _finite(s["exp(coef)"]),
                             "ci_low": _finite(s["exp(coef) lower 95%"]), "ci_high": _finite(s["exp(coef) upper 95%"]),
                             "cox_p": _finite(s["p"])}
    except Exception as exc:  # noqa: BLE001 - as above: reported as undefined
        log.debug("continuous Cox model of %s did not converge: %s", key, exc)
    return result


def default_cutoffs(rows: Sequence[Mapping[str, str]]) -> dict[str, list[float]]:
    """The breast mitotic-score boundaries (score 1|2 and 2|3) rescaled to the hotspot area of the run.

    "High" is value > cutoff, so the boundary count c (score 2 from c on) becomes cutoff c - 1 rounded up.
    """
    areas = [_float(r.get("hotspot_area_mm2")) for r in rows if r.get("status") == "done"]
    area = next((a for a in areas if math.isfinite(a) and a > 0), DEFAULT_HOTSPOT_AREA_MM2)
    low, high = mitotic_score_hint(0, area).cutoffs
    return {"mc": [float(math.ceil(low) - 1), float(math.ceil(high) - 1)]}


def parse_cutoffs(items: Sequence[str]) -> dict[str, list[float]]:
    """``["mc=11", "slide_ratio=0.11"]`` -> ``{"mc": [11.0], "slide_ratio": [0.11]}``."""
    out: dict[str, list[float]] = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in VARIABLE_KEYS or not value:
            known = ", ".join(VARIABLE_KEYS)
            raise ConfigError(f"--cutoff {item!r}: write VARIABLE=VALUE with VARIABLE one of {known}")
        try:
            out.setdefault(name, []).append(float(value))
        except ValueError:
            raise ConfigError(f"--cutoff {item!r}: {value!r} is not a number") from None
    return out


# --- figures and report ------------------------------------------------------------------------------


def km_plot(key: str, label: str, x: NDArray[np.float64], time: NDArray[np.float64], event: NDArray[np.int_],
            best: CutoffResult, corrected_p: float | None, out_dir: Path, horizon_years: float) -> list[str]:
    """Kaplan-Meier curves of the two groups with 95% bands and a numbers-at-risk table; PNG and SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lifelines import KaplanMeierFitter
    from lifelines.plotting import add_at_risk_counts

    defined = np.isfinite(x)
    xs, years, es = x[defined], time[defined] / DAYS_PER_YEAR, event[defined]
    fig, ax = plt.subplots(figsize=(7.0, 5.2))
    fitters = []
    for name, mask, colour in ((f"≤ {best.cutoff:g}", xs <= best.cutoff, "#1f77b4"),
                               (f"> {best.cutoff:g}", xs > best.cutoff, "#d62728")):
        kmf = KaplanMeierFitter(label=f"{name} (n={int(mask.sum())})")
        kmf.fit(years[mask], es[mask])
        kmf.plot_survival_function(ax=ax, ci_show=True, color=colour)
        fitters.append(kmf)
    ax.set_xlim(0, horizon_years)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("years")
    ax.set_ylabel("survival probability")
    corrected = "n/a" if corrected_p is None else f"{corrected_p:.3g}"
    hr = "n/a" if best.hazard_ratio is None else f"{best.hazard_ratio:.2f} ({best.ci_low:.2f}-{best.ci_high:.2f})"
    ax.set_title(f"{label}: cutoff {best.cutoff:g}\nHR {hr}, log-rank p {best.logrank_p:.3g}, "
                 f"corrected p {corrected}", fontsize=10)
    add_at_risk_counts(*fitters, ax=ax, rows_to_show=["At risk"])
    fig.tight_layout()
    names = []
    for ext in ("png", "svg"):
        name = f"km_{key}.{ext}"
        fig.savefig(out_dir / name, dpi=120)
        names.append(name)
    plt.close(fig)
    return names


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "n/a" if v is None else format(v, spec)


def _cutoff_line(c: CutoffResult) -> str:
    return (f"| {c.cutoff:g} | {c.n_low} ({c.events_low}) | {c.n_high} ({c.events_high}) "
            f"| {_fmt(c.hazard_ratio, '.2f')} "
            f"({_fmt(c.ci_low, '.2f')}-{_fmt(c.ci_high, '.2f')}) | {_fmt(c.cox_p)} | {_fmt(c.logrank_p)} |")


def report_markdown(summary: Mapping[str, Any], results: Sequence[VariableResult]) -> str:
    lines = [
        "# Survival by mitotic figures",
        "",
        f"Endpoint **{summary['endpoint']}**, censored at {summary['horizon_years']:g} years; "
        f"{summary['cases']} cases ({summary['events']} events) from {summary['slides']} slides, "
        f"several slides per case aggregated by **{summary['per_case']}**. "
        "High group: value > cutoff. Searched cutoffs: every observed value leaving at least "
        f"{summary['min_group']} cases per group; the smallest Cox p is chosen (as in the paper) and its "
        f"corrected p-value is the {CORRECTION}.",
        "",
        "Not for diagnosis: a research summary of model outputs.",
        "",
    ]
    head = "| cutoff | low n (events) | high n (events) | HR (95% CI) | Cox p | log-rank p |\n|---|---|---|---|---|---|"
    for r in results:
        lines += [f"## {r.label} (`{r.key}`)", ""]
        lines.append(f"{r.cases} cases with a value" + (f", {r.undefined} undefined (left out)" if r.undefined else ""))
        lines.append("")
        if r.best is None:
            lines += ["No cutoff could be tested (too few cases or events).", ""]
        else:
            lines += [f"**Chosen cutoff {r.best.cutoff:g}** of {r.searched} searched: raw Cox p {_fmt(r.best.cox_p)}, "
                      f"**corrected p {_fmt(r.corrected_p)}**", "", head, _cutoff_line(r.best), ""]
            lines += [f"![Kaplan-Meier {r.key}]({r.figures[0]})", ""] if r.figures else []
        if r.prespecified:
            lines += ["Pre-specified cutoffs:", "", head, *(_cutoff_line(c) for c in r.prespecified), ""]
        if r.continuous:
            c = r.continuous
            lines += [f"Continuous Cox covariate: HR per unit {_fmt(c['hazard_ratio_per_unit'])} "
                      f"({_fmt(c['ci_low'])}-{_fmt(c['ci_high'])}), p {_fmt(c['cox_p'])}", ""]
    lines += ["## Left out", ""]
    for reason, items in summary["unmatched"].items():
        lines.append(f"- {reason}: {len(items)}")
        lines += [f"  - {html.escape(i)}" for i in items[:200]]
        if len(items) > 200:
            lines.append(f"  - ... {len(items) - 200} more in survival.json")
    return "\n".join(lines) + "\n"


def markdown_to_html(markdown: str, title: str) -> str:
    """The report's Markdown as one self-contained HTML page (figures as relative links), via the markdown package
    when installed, else as preformatted text with the figures shown."""
    try:
        import markdown as md

        body = md.markdown(markdown, extensions=["tables"])
    except ImportError:
        parts = []
        for line in markdown.splitlines():
            if line.startswith("![") and "](" in line:
                parts.append(f'<img src="{html.escape(line.split("](")[1].rstrip(")"))}" width="640">')
            else:
                parts.append(f"<pre>{html.escape(line)}</pre>" if line else "")
        body = "\n".join(parts)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #999;padding:2px 6px}pre{margin:0;white-space:pre-wrap}</style></head>"
            f"<body>\n{body}\n</body></html>\n")


def run_survival(
    results_dir: str | Path, clinical_path: str | Path, out_dir: str | Path, *, endpoint: str = "OS",
    id_col: str | None = None, time_col: str | None = None, event_col: str | None = None, per_case: str = "max",
    horizon_years: float = 10.0, min_group: str = "10%", cutoffs: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, Any]:
    """The whole analysis: table, every variable, KM plots, report.md, report.html and survival.json in ``out_dir``."""
    _lifelines()
    if not (math.isfinite(horizon_years) and horizon_years > 0):
        raise ConfigError(f"--horizon-years {horizon_years!r} must be a positive number of years")
    rows = read_results(results_dir)
    clinical, unusable = read_clinical(clinical_path, endpoint=endpoint, id_col=id_col, time_col=time_col,
                                       event_col=event_col)
    table = build_table(rows, clinical, per_case=per_case, horizon_days=horizon_years * DAYS_PER_YEAR)
    table.unmatched["clinical rows without a usable time or event"] = unusable
    if len(table.case_ids) < 4:
        raise ConfigError(f"only {len(table.case_ids)} case(s) have both a result and clinical data; check that the "
                          "case ids match (TCGA: the 12-character patient barcode) or pass --id-col")
    chosen = default_cutoffs(rows) | dict(cutoffs or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for v in VARIABLES:
        r = analyze_variable(v.key, table.values[v.key], table.time_days, table.event, min_group=min_group,
                             prespecified=chosen.get(v.key, ()))
        if r.best is not None:
            r.figures = km_plot(v.key, v.label, table.values[v.key], table.time_days, table.event, r.best,
                                r.corrected_p, out, horizon_years)
        results.append(r)
    summary = {
        "endpoint": endpoint, "horizon_years": horizon_years, "per_case": per_case, "min_group": min_group,
        "cases": len(table.case_ids), "events": int(table.event.sum()), "slides": sum(table.slides_per_case.values()),
        "unmatched": table.unmatched, "corrected_p_method": CORRECTION, "high_group": "value > cutoff",
    }
    data = {**summary, "variables": [r.to_json_dict() for r in results],
            "cases_table": [{"case_id": c, "time_days": float(t), "event": int(e), "slides": table.slides_per_case[c],
                             **{k: _finite(float(table.values[k][i])) for k in VARIABLE_KEYS}}
                            for i, (c, t, e) in enumerate(zip(table.case_ids, table.time_days, table.event,
                                                              strict=True))]}
    (out / "survival.json").write_text(json.dumps(data, indent=1, allow_nan=False), encoding="utf-8")
    markdown = report_markdown(summary, results)
    (out / "report.md").write_text(markdown, encoding="utf-8")
    (out / "report.html").write_text(markdown_to_html(markdown, "Survival by mitotic figures"), encoding="utf-8")
    return data


# --- simulated cohorts (tests, and the closing figures: tools/survival_simulation.py) -------------------


def simulated_cohort(
    n: int = 300, *, hazard_ratio: float = 2.0, cutoff: int = 11, censored: float = 0.3, seed: int = 0,
    baseline_rate_per_year: float = 0.1,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(slide rows, TCGA-CDR-style clinical rows) of ``n`` cases whose hotspot MC is uniform on 0..30 and whose
    survival is exponential with ``hazard_ratio`` for MC > ``cutoff`` (1.0: no effect); exponential censoring
    times chosen so about ``censored`` of the cases are censored."""
    rng = np.random.default_rng(seed)
    mc = rng.integers(0, 31, n)
    rate = baseline_rate_per_year * np.where(mc > cutoff, hazard_ratio, 1.0)
    event_years = rng.exponential(1 / rate)
    censor_rate = censored / (1 - censored) * float(rate.mean())
    censor_years = rng.exponential(1 / censor_rate, n)
    years = np.minimum(event_years, censor_years)
    event = (event_years <= censor_years).astype(int)
    rows, clinical = [], []
    for i in range(n):
        case = f"TCGA-SI-{i:04d}"
        amf = int(rng.binomial(int(mc[i]), 0.1))
        nmf = int(mc[i]) - amf
        rows.append({"slide_id": f"{case}-01Z-00-DX1.svs-{i:010d}", "slide_path": f"/archive/{case}-01Z-00-DX1.svs",
                     "case_id": case, "status": "done", "hotspot_mc": str(mc[i]), "hotspot_area_mm2": "2",
                     "hotspot_ratio": f"{amf / nmf:.4f}" if nmf else "", "slide_ratio": f"{rng.uniform(0, 0.3):.4f}",
                     "density_per_mm2": f"{mc[i] / 2 * rng.uniform(0.2, 0.6):.4f}"})
        clinical.append({"bcr_patient_barcode": case, "OS": str(event[i]),
                         "OS.time": f"{years[i] * DAYS_PER_YEAR:.1f}"})
    return rows, clinical
