"""What a reader must know before trusting a result: the models' intended use and plausibility flags.

Pure functions of a result summary (the result.json content without "figures"), so result.json,
GetResult, `client get`, `analyze` and the demo say the same, also for results stored before
these flags existed. Positions are slide µm (level-0 px × mpp), areas mm².
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "ResultFlag",
    "caveat_lines",
    "clip_polygon",
    "diagnostic_notice",
    "plausibility_flags",
]

# Words in a bundle's intended_use that mean it must not be read as a diagnosis.
_NOT_FOR_DIAGNOSIS = ("not for diagnos", "not for clinical", "research use only", "ruo", "demonstration")
_CIRCLE_SAMPLES = 64  # per axis: the share of the hotspot circle outside the slide, to about 1 %
_MPP_TOLERANCE = 0.03  # as slide.mpp_tolerance's default: within 3 % of the models' mpp is not resampling


@dataclass(frozen=True)
class ResultFlag:
    """One plausibility flag: a stable code, a sentence for a person and the number behind it."""

    code: str
    message: str
    value: float | None = None

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)


def diagnostic_notice(summary: Mapping[str, Any]) -> str:
    """The bundle's intended use when it says the models are not for diagnosis, else "".

    >>> diagnostic_notice({"provenance": {"bundle": {"name": "demo",
    ...     "intended_use": "demonstration and tests only; NOT for diagnosis"}}})
    'demo models: demonstration and tests only; NOT for diagnosis. These figures mean nothing about a patient.'
    >>> diagnostic_notice({"provenance": {"bundle": {"intended_use": "mitotic count in canine mast cell tumours"}}})
    ''
    """
    bundle = (summary.get("provenance") or {}).get("bundle") or {}
    if not isinstance(bundle, Mapping):
        return ""
    use = str(bundle.get("intended_use") or "").strip()
    if not use or not any(word in use.lower() for word in _NOT_FOR_DIAGNOSIS):
        return ""
    name = str(bundle.get("name") or "bundle")
    return f"{name} models: {use.rstrip('.')}. These figures mean nothing about a patient."


def plausibility_flags(summary: Mapping[str, Any]) -> list[ResultFlag]:
    """Flags on a result summary: upsampled slide, mpp from an override, field > tissue, hotspot off the slide.

    >>> summary = {"slide": {"width": 2220, "height": 2967, "mpp_x": 0.499, "mpp_y": 0.499, "mpp_source": "vendor"},
    ...            "scores": {"tissue_area_mm2": 1.2, "hotspot": {"area_mm2": 2.0, "radius_um": 797.9,
    ...                       "center_x_um": 100.0, "center_y_um": 700.0}},
    ...            "provenance": {"settings": {"slide": {"target_mpp": 0.25}}}}
    >>> [f.code for f in plausibility_flags(summary)]
    ['upsampled', 'field_larger_than_tissue', 'hotspot_outside_slide']
    """
    slide = summary.get("slide") or {}
    scores = summary.get("scores") or {}
    spot = scores.get("hotspot") or {}
    flags: list[ResultFlag] = []
    mpp = _pair(slide.get("mpp_x"), slide.get("mpp_y"))
    settings = ((summary.get("provenance") or {}).get("settings") or {}).get("slide") or {}
    target = _number(settings.get("target_mpp"))
    tolerance = _number(settings.get("mpp_tolerance"))
    if mpp is not None and target:
        factor = min(mpp) / target
        if factor > 1 + (_MPP_TOLERANCE if tolerance is None else tolerance):
            flags.append(ResultFlag(
                "upsampled",
                f"the slide was scanned at {min(mpp):.3g} µm/px and read upsampled {factor:.2f}x to the models' "
                f"{target:.3g} µm/px: fine detail of mitotic figures is missing, counts are unreliable",
                round(factor, 3),
            ))
    if slide.get("mpp_source") == "override" and mpp is not None:
        flags.append(ResultFlag(
            "mpp_override",
            f"the pixel size {mpp[0]:.4g} µm/px was given as an override, not read from the slide: "
            "areas and the hotspot field are only as right as that number",
            mpp[0],
        ))
    tissue, area = _number(scores.get("tissue_area_mm2")), _number(spot.get("area_mm2"))
    if tissue is not None and area and tissue < area:
        flags.append(ResultFlag(
            "field_larger_than_tissue",
            f"the hotspot field ({area:.2g} mm²) is larger than all the tissue found ({tissue:.2g} mm²): "
            "the count is not a count in a full field and cannot be compared with one",
            round(tissue, 4),
        ))
    outside = _share_outside(spot, slide, mpp)
    if outside is not None and outside > 0.005:
        flags.append(ResultFlag(
            "hotspot_outside_slide",
            f"{outside:.0%} of the hotspot circle lies outside the slide: the field holds less than its nominal area",
            round(outside, 3),
        ))
    return flags


def caveat_lines(summary: Mapping[str, Any]) -> list[str]:
    """The notice and each flag as lines of a one-screen summary ("NOTICE ...", "flag ...")."""
    notice = diagnostic_notice(summary)
    lines = [f"NOTICE     {notice}"] if notice else []
    lines += [f"flag       {flag.code}: {flag.message}" for flag in plausibility_flags(summary)]
    return lines


def clip_polygon(ring: Sequence[Sequence[float]], width: float, height: float) -> list[list[float]]:
    """A closed ring clipped to the rectangle [0, width] × [0, height] (Sutherland–Hodgman; convex rings).

    Returns the closed clipped ring ([] when nothing is left).

    >>> clip_polygon([[-1, -1], [2, -1], [2, 2], [-1, 2], [-1, -1]], 1, 1)
    [[0.0, 1.0], [0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]
    """
    points = [(float(x), float(y)) for x, y in ring]
    if len(points) > 1 and points[0] == points[-1]:
        points.pop()
    edges = ((0, 0.0, False), (0, float(width), True), (1, 0.0, False), (1, float(height), True))
    for axis, limit, keep_below in edges:
        if not points:
            break
        clipped: list[tuple[float, float]] = []
        for i, current in enumerate(points):
            previous = points[i - 1]
            inside_now = current[axis] <= limit if keep_below else current[axis] >= limit
            inside_before = previous[axis] <= limit if keep_below else previous[axis] >= limit
            if inside_now != inside_before:
                t = (limit - previous[axis]) / (current[axis] - previous[axis])
                crossing = [previous[0] + t * (current[0] - previous[0]), previous[1] + t * (current[1] - previous[1])]
                crossing[axis] = limit
                clipped.append((crossing[0], crossing[1]))
            if inside_now:
                clipped.append(current)
        points = clipped
    if len(points) < 3:
        return []
    closed = [[x, y] for x, y in points]
    return [*closed, list(closed[0])]


def _share_outside(
    spot: Mapping[str, Any], slide: Mapping[str, Any], mpp: tuple[float, float] | None
) -> float | None:
    cx, cy, r = (_number(spot.get(k)) for k in ("center_x_um", "center_y_um", "radius_um"))
    width, height = _number(slide.get("width")), _number(slide.get("height"))
    if cx is None or cy is None or not r or mpp is None or not width or not height:
        return None
    w_um, h_um = width * mpp[0], height * mpp[1]
    if cx - r >= 0 and cy - r >= 0 and cx + r <= w_um and cy + r <= h_um:
        return 0.0
    steps = (np.arange(_CIRCLE_SAMPLES) + 0.5) / _CIRCLE_SAMPLES * 2 - 1
    gx, gy = np.meshgrid(steps, steps)
    disc = gx**2 + gy**2 <= 1
    x, y = cx + gx[disc] * r, cy + gy[disc] * r
    inside = (x >= 0) & (x <= w_um) & (y >= 0) & (y <= h_um)
    return float(1.0 - inside.mean())


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _pair(x: Any, y: Any) -> tuple[float, float] | None:
    a, b = _number(x), _number(y)
    return (a, b) if a and b and a > 0 and b > 0 else None
