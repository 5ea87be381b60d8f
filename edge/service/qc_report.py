"""`mitosis-edge qc report`: per-scanner plots of stain vectors, focus and MF density over time, from the store.

For each scanner one PNG with four panels (eosin and haematoxylin vector angle from the rolling
baseline, median focus, MF density), the baseline band drawn around each slide as the daemon saw
it (edge.analysis.drift), slides outside the band in red and drift events as vertical lines; plus
``qc_report.json`` with the same numbers for lab software. matplotlib is needed (the ``report``
extra) and imported only here.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge.analysis.drift import DRIFT_MEASURES, HistoryPoint, deviations, measured_alike
from edge.config import QcConfig
from edge.errors import ConfigError
from edge.fileio import atomic_write
from edge.service.store import QcRecord, Store

__all__ = ["parse_since", "scanner_series", "write_report"]

_TITLES = {
    "eosin": "eosin vector, degrees from baseline",
    "hematoxylin": "haematoxylin vector, degrees from baseline",
    "focus": "median focus (Crete blur, 0 sharp)",
    "mitotic_density": "MF density per mm² of tissue",
}


def parse_since(text: str | None) -> float | None:
    """``--since``: an ISO date or date-time (UTC when no zone is given) -> unix seconds.

    >>> parse_since("2026-01-02")
    1767312000.0
    """
    if text is None:
        return None
    try:
        moment = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--since={text!r} is not a date; use YYYY-MM-DD or YYYY-MM-DDTHH:MM") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.UTC)
    return moment.timestamp()


def scanner_series(records: Sequence[QcRecord], config: QcConfig) -> list[dict[str, Any]]:
    """Each slide of one scanner (oldest first) with its measures, the baseline it was compared with and
    the band: the same numbers the daemon's drift check used, recomputed from the stored history."""
    rows = []
    history: list[HistoryPoint] = []
    for record in records:
        devs = deviations(measured_alike(history, record.measures), record.measures, config)
        row: dict[str, Any] = {
            "job_id": record.job_id,
            "slide_path": record.slide_path,
            "created_at": record.created_at,
            "verdict": record.verdict,
            "in_band": record.in_band,
            "drift": bool(record.assessment.get("drift")),
            "message": record.assessment.get("message", ""),
        }
        for name in DRIFT_MEASURES:
            row[name] = _with_band(name, record.measures.get(name), devs.get(name))
        rows.append(row)
        history.append(HistoryPoint(record.job_id, record.created_at, record.measures, record.in_band))
    return rows


def _with_band(name: str, value: Any, dev: dict[str, float] | None) -> dict[str, Any]:
    """A slide's value with the baseline and band (low, high) it was judged against, in the plotted units."""
    if name in ("eosin", "hematoxylin"):  # plotted as degrees from the baseline's direction
        value = dev["deviation"] if dev else None
        return {"value": value, "baseline": 0.0 if dev else None, "low": 0.0 if dev else None,
                "high": dev["band"] if dev else None}
    if dev is None:
        return {"value": value, "baseline": None, "low": None, "high": None}
    if name == "mitotic_density":  # the band is a ratio (log1p space), drawn back in density units
        return {"value": value, "baseline": math.expm1(dev["baseline"]),
                "low": max(0.0, math.expm1(dev["baseline"] - dev["band"])),
                "high": math.expm1(dev["baseline"] + dev["band"])}
    return {"value": value, "baseline": dev["baseline"], "low": dev["baseline"] - dev["band"],
            "high": dev["baseline"] + dev["band"]}


def write_report(
    store: Store, out_dir: Path, config: QcConfig, *, scanner: str | None = None, since: float | None = None
) -> dict[str, Any]:
    """Write one PNG per scanner and qc_report.json into ``out_dir``; return the report.

    The baseline of each slide is drawn from all of its scanner's history, also before ``since``.
    """
    records = store.qc_history(scanner=scanner)
    if not records:
        which = f"scanner {scanner!r}" if scanner else "any scanner"
        raise ConfigError(
            f"the store {store.path} holds no scan QC for {which}; analyse slides with [qc] enabled first"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_scanner: dict[str, list[QcRecord]] = {}
    for record in records:
        by_scanner.setdefault(record.scanner, []).append(record)
    report: dict[str, Any] = {"schema": "mitosis-edge/qc-report/1", "since": since, "scanners": {}}
    for name, group in sorted(by_scanner.items()):
        series = [row for row in scanner_series(group, config) if since is None or row["created_at"] >= since]
        if not series:
            continue
        png = out / f"qc_{_safe(name)}.png"
        atomic_write(png, _plot(name, series))
        verdicts = {v: sum(1 for r in series if r["verdict"] == v) for v in ("pass", "review", "rescan")}
        report["scanners"][name] = {"slides": len(series), "verdicts": verdicts,
                                    "drift_events": [r["message"] for r in series if r["drift"]],
                                    "plot": str(png), "series": series}
    if not report["scanners"]:
        raise ConfigError(f"no scan QC since {since} in {store.path}; try an earlier --since")
    atomic_write(out / "qc_report.json", (json.dumps(report, indent=1) + "\n").encode("utf-8"))
    return report


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80] or "unknown"


def _plot(scanner: str, series: Sequence[dict[str, Any]]) -> bytes:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - depends on the install
        raise ConfigError("qc report draws with matplotlib: pip install 'mitosis-edge[report]'") from None
    import io

    times = [_dt.datetime.fromtimestamp(r["created_at"], _dt.UTC) for r in series]
    fig, axes = plt.subplots(len(DRIFT_MEASURES), 1, figsize=(10, 10), sharex=True)
    for ax, name in zip(axes, DRIFT_MEASURES, strict=True):
        values = [r[name]["value"] for r in series]
        low, base, high = ([r[name][k] for r in series] for k in ("low", "baseline", "high"))
        xs = [t for t, lo in zip(times, low, strict=True) if lo is not None]
        if xs:
            ax.fill_between(xs, [v for v in low if v is not None], [v for v in high if v is not None],
                            step="mid", color="tab:blue", alpha=0.15, label="baseline band")
            ax.plot(xs, [v for v in base if v is not None], color="tab:blue", lw=1, label="baseline")
        points = [(t, v, lo is not None and not lo <= v <= hi)
                  for t, v, lo, hi in zip(times, values, low, high, strict=True) if v is not None]
        inside = [(t, v) for t, v, out in points if not out]
        outside = [(t, v) for t, v, out in points if out]
        if inside:
            ax.plot(*zip(*inside, strict=True), "o", ms=4, color="black", label="slide")
        if outside:
            ax.plot(*zip(*outside, strict=True), "o", ms=5, color="tab:red", label="outside the band (this measure)")
        for t, r in zip(times, series, strict=True):
            if r["drift"]:
                ax.axvline(t, color="tab:red", lw=1, ls="--")
        ax.set_title(_TITLES[name], fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"scanner {scanner}: {len(series)} slides; dashed lines = drift events")
    fig.autofmt_xdate()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()
