"""Drift per scanner: each slide's stain vectors, focus and MF density against the scanner's rolling baseline.

Pure: the store keeps the history (table ``qc_history``) and calls :func:`assess` in the transaction
that stores a result. The baseline of a scanner is its last ``baseline_slides`` slides that were
themselves inside the band, so a drifting run does not drag the baseline along with it. A
measure is outside the band when it is further from the baseline's mean than
``drift_sigmas`` baseline standard deviations, and at least the configured floor (a few degrees of
stain angle, a few hundredths of focus, a doubling of MF density), so a very steady scanner does not
raise drift over noise. Drift is judged on the mean of the last ``drift_run`` slides (the band's
spread part shrunk by the square root of their number), so a lasting shift is seen within a few
slides while one odd slide is not; the event is raised once, when the mean first leaves the band.
A baseline holds only slides measured the same way (``MEASURES_VERSION``): when an upgrade changes how
focus or the stains are measured, each scanner's baseline starts again instead of calling the change drift.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge.config import QcConfig

__all__ = ["DRIFT_MEASURES", "MEASURES_VERSION", "Assessment", "HistoryPoint", "assess", "deviations", "measured_alike",
           "measures_of"]

DRIFT_MEASURES = ("eosin", "hematoxylin", "focus", "mitotic_density")
# 2: focus along four directions, Macenko's floor on the mean optical density, blue ink kept out of the samples
# (CMU-1's eosin vector moved 7°, focus medians ~0.03 lower). Rows stored before carry no version: 1.
# 3: focus from every 32nd row at focus_mpp and colour from every 32nd pixel (were 16th), for QC's cost
# (CMU-1's eosin vector moved 2°, its focus median by 0.0001).
MEASURES_VERSION = 3
DENSITY_FLOOR_LOG = math.log(2.0)  # MF density varies by tumour: only a doubling (or halving) stands out


@dataclass(frozen=True)
class HistoryPoint:
    """One stored slide of a scanner, older first in a history."""

    job_id: int
    created_at: float
    measures: Mapping[str, Any]
    in_band: bool


@dataclass(frozen=True)
class Assessment:
    """How one slide compares with its scanner's baseline."""

    in_band: bool
    baseline_slides: int
    run: int  # consecutive slides outside the band, this one included (0 when inside)
    drift: bool  # this slide completes a run of drift_run: raise the event
    moved: dict[str, dict[str, float]] = field(default_factory=dict)  # measure -> value, baseline, band, deviation
    message: str = ""

    def to_json_dict(self) -> dict[str, Any]:
        return {"in_band": self.in_band, "baseline_slides": self.baseline_slides, "run": self.run,
                "drift": self.drift, "moved": self.moved, "message": self.message}


def measures_of(qc: Mapping[str, Any], mitotic_density_per_mm2: float | None) -> dict[str, Any]:
    """What drift follows for one slide, from its qc section and scores."""
    stains = qc.get("stains") or {}
    return {
        "hematoxylin": stains.get("hematoxylin"),
        "eosin": stains.get("eosin"),
        "focus": qc.get("focus_median"),
        "mitotic_density": mitotic_density_per_mm2,
        "out_of_focus_fraction": qc.get("out_of_focus_fraction"),
        "verdict": qc.get("verdict"),
        "measures_version": MEASURES_VERSION,
    }


def _vector_deviation(values: Sequence[Sequence[float]], current: Sequence[float]) -> tuple[float, list[float], float]:
    """(degrees of current from the baseline's mean direction, that mean, the baseline's own angular SD)."""
    arr = np.array([np.asarray(v, np.float64) / np.linalg.norm(v) for v in values])
    mean = arr.mean(axis=0)
    mean /= np.linalg.norm(mean)
    spread = np.degrees(np.arccos(np.clip(arr @ mean, -1.0, 1.0)))
    cur = np.asarray(current, np.float64)
    angle = math.degrees(math.acos(float(np.clip(cur @ mean / np.linalg.norm(cur), -1.0, 1.0))))
    return angle, [round(float(v), 5) for v in mean], float(np.sqrt(np.mean(spread**2)))


def measured_alike(history: Sequence[HistoryPoint], current: Mapping[str, Any]) -> list[HistoryPoint]:
    """The slides of ``history`` measured the same way as ``current`` (the same MEASURES_VERSION)."""
    version = current.get("measures_version", 1)
    return [p for p in history if p.measures.get("measures_version", 1) == version]


def deviations(
    history: Sequence[HistoryPoint], current: Mapping[str, Any], config: QcConfig, *, averaged: int = 1
) -> dict[str, dict[str, float]]:
    """How far each measure of ``current`` lies from the baseline drawn from ``history`` (older first), and the
    band it may move within: {measure: {"value", "baseline", "deviation", "band"}}; empty without a baseline.

    Stain vectors: degrees from the baseline's mean direction (value = deviation). Focus: Crete units.
    MF density: log(1 + density), so the band is a ratio. ``current`` may be the mean of ``averaged``
    slides: the band's spread part then shrinks by its square root (the floors stay).
    """
    shrink = 1.0 / math.sqrt(averaged)
    baseline = [p for p in history if p.in_band][-config.baseline_slides :]
    out: dict[str, dict[str, float]] = {}
    if len(baseline) < config.baseline_min_slides:
        return out
    for name in ("eosin", "hematoxylin"):
        vectors = [v for v in (p.measures.get(name) for p in baseline) if v]
        if current.get(name) and len(vectors) >= config.baseline_min_slides:
            angle, _mean, sd = _vector_deviation(vectors, current[name])
            band = max(config.drift_sigmas * sd * shrink, config.drift_stain_deg)
            out[name] = {"value": round(angle, 2), "baseline": 0.0, "deviation": round(angle, 2),
                         "band": round(band, 2)}
    for name, floor, transform in (
        ("focus", config.drift_focus, float),
        ("mitotic_density", DENSITY_FLOOR_LOG, lambda v: math.log1p(float(v))),
    ):
        series = [transform(v) for v in (p.measures.get(name) for p in baseline) if v is not None]
        if current.get(name) is None or len(series) < config.baseline_min_slides:
            continue
        mean, sd = float(np.mean(series)), float(np.std(series))
        out[name] = {"value": round(float(current[name]), 4), "baseline": round(mean, 4),
                     "deviation": round(transform(current[name]) - mean, 4),
                     "band": round(max(config.drift_sigmas * sd * shrink, floor), 4)}
    return out


def assess(history: Sequence[HistoryPoint], current: Mapping[str, Any], config: QcConfig) -> Assessment:
    """Compare ``current`` (from :func:`measures_of`) with the baseline drawn from ``history`` (older first).

    A slide is outside the band on its own measures. Drift is judged on the mean of the last
    ``drift_run`` slides (this one included) against the baseline before them, with the band's spread
    shrunk accordingly: one stain batch's scatter does not raise it, a lasting shift does, once, on
    the slide where the mean first leaves the band.

    >>> from edge.config import QcConfig
    >>> base = [HistoryPoint(i, i, {"eosin": [0.1, 0.9, 0.42], "focus": 0.3}, True) for i in range(10)]
    >>> assess(base, {"eosin": [0.1, 0.9, 0.42], "focus": 0.3}, QcConfig()).in_band
    True
    >>> shifted = assess(base, {"eosin": [0.3, 0.9, 0.2], "focus": 0.3}, QcConfig())
    >>> shifted.in_band, shifted.moved["eosin"]["deviation"] > shifted.moved["eosin"]["band"]
    (False, True)
    """
    history = measured_alike(history, current)
    n_baseline = len([p for p in history if p.in_band][-config.baseline_slides :])
    moved = {k: v for k, v in deviations(history, current, config).items() if abs(v["deviation"]) > v["band"]}
    run = 0
    if moved:
        run = 1
        for point in reversed(history):
            if point.in_band:
                break
            run += 1
    window = _window_moved(history, current, config)
    drift = bool(window) and not _window_moved(history[:-1], history[-1].measures, config) if history else False
    if drift:
        return Assessment(not moved, n_baseline, run, True, window, _describe(window, n_baseline, config.drift_run))
    if not moved:
        return Assessment(True, n_baseline, 0, False)
    return Assessment(False, n_baseline, run, False, moved, _describe(moved, n_baseline, 1))


def _window_moved(history: Sequence[HistoryPoint], current: Mapping[str, Any], config: QcConfig) -> dict[str, Any]:
    """The measures whose mean over the last drift_run slides (ending with ``current``) left the band."""
    k = config.drift_run
    if len(history) < k - 1:
        return {}
    before, recent = history[: len(history) - (k - 1)], [*(p.measures for p in history[len(history) - (k - 1) :]),
                                                          current]
    mean: dict[str, Any] = {}
    for name in DRIFT_MEASURES:
        found = [m.get(name) for m in recent]
        values: list[Any] = [v for v in found if v is not None and v != []]
        if len(values) < len(found):
            continue
        if name in ("eosin", "hematoxylin"):
            unit = np.array([np.asarray(v, np.float64) / np.linalg.norm(v) for v in values]).mean(axis=0)
            mean[name] = list(unit / np.linalg.norm(unit))
        elif name == "mitotic_density":
            mean[name] = math.expm1(float(np.mean([math.log1p(float(v)) for v in values])))
        else:
            mean[name] = float(np.mean([float(v) for v in values]))
    devs = deviations(before, mean, config, averaged=k)
    return {name: d for name, d in devs.items() if abs(d["deviation"]) > d["band"]}


def _describe(moved: Mapping[str, Mapping[str, float]], baseline: int, run: int) -> str:
    parts = []
    for name, m in moved.items():
        if name in ("eosin", "hematoxylin"):
            parts.append(f"{name} vector moved {m['deviation']:.1f}° (band {m['band']:.1f}°)")
        elif name == "focus":
            parts.append(f"focus {m['value']:.3f} against {m['baseline']:.3f} ± {m['band']:.3f}")
        else:
            parts.append(f"MF density {m['value']:.2f}/mm² against a baseline of {math.expm1(m['baseline']):.2f}/mm²")
    slides = "this slide" if run == 1 else f"the last {run} slides (their mean)"
    return f"{'; '.join(parts)} from this scanner's baseline of {baseline} slides, over {slides}"
