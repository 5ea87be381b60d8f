"""Files written for one slide: result JSON, QuPath GeoJSON, MIDOG JSON, CSV and an overlay PNG.

Each file is built in memory by a pure function and written atomically (a temporary file in
the same folder, fsynced, then renamed), so a crash never leaves half a file under a real name.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge.errors import ConfigError
from edge.fileio import atomic_write
from edge.scoring import Figure, SlideResult, points_in_hotspot

__all__ = [
    "CLASS_COLOURS",
    "CLASS_NAMES",
    "CSV_COLUMNS",
    "HOTSPOT_POLYGON_VERTICES",
    "OVERLAY_MAX_SIDE",
    "RESULT_SCHEMA",
    "csv_text",
    "geojson_dict",
    "midog_dict",
    "overlay_image",
    "result_dict",
    "review_geojson_dict",
    "write_exports",
    "write_json_file",
]

logger = logging.getLogger(__name__)

RESULT_SCHEMA = "mitosis-edge/result/1"
HOTSPOT_POLYGON_VERTICES = 128
OVERLAY_MAX_SIDE = 2048  # px: the overlay is a preview, not a second slide
CSV_COLUMNS = (
    "x_px",
    "y_px",
    "x_um",
    "y_um",
    "detector_score",
    "p_mitotic",
    "p_atypical",
    "is_mitotic",
    "subtype",
    "in_hotspot",
)

# QuPath classification names and RGB colours; the overlay uses the same colours.
CLASS_NAMES = {
    "normal": "Mitotic figure (normal)",
    "atypical": "Mitotic figure (atypical)",
    "uncertain": "Mitotic figure (uncertain subtype)",
    "lookalike": "Mitotic figure look-alike",
    "hotspot": "Hotspot",
}
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "normal": (0, 190, 0),
    "atypical": (230, 0, 0),
    "uncertain": (240, 200, 0),
    "lookalike": (150, 150, 150),
    "hotspot": (0, 110, 255),
}
_TISSUE_OUTLINE = (40, 40, 160)
# Fixed namespace: feature ids are the same every time the same slide is exported.
_ID_NAMESPACE = uuid.UUID("6f1e5d0c-8f53-4b61-9a53-3c7f3b0c2e11")


def _figure_class(figure: Figure) -> str:
    if not figure.is_mitotic:
        return "lookalike"
    return figure.subtype if figure.subtype in ("normal", "atypical") else "uncertain"


def _slide_mpp(result: SlideResult) -> tuple[float, float]:
    try:
        mpp = float(result.slide["mpp_x"]), float(result.slide["mpp_y"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            f"{result.slide_path}: slide mpp_x={result.slide.get('mpp_x')!r}, mpp_y={result.slide.get('mpp_y')!r}; "
            "exports need the slide's µm per pixel (give an mpp override when the slide records none)"
        ) from None
    if not all(math.isfinite(v) and v > 0 for v in mpp):
        raise ConfigError(f"{result.slide_path}: slide mpp={mpp!r} must be two positive numbers of µm per pixel")
    return mpp


def result_dict(result: SlideResult) -> dict[str, Any]:
    """The result.json content: the schema tag, then `SlideResult.to_json_dict`."""
    return {"schema": RESULT_SCHEMA, **result.to_json_dict()}


def _measurements(figure: Figure) -> dict[str, float]:
    values: dict[str, float] = {"detector_score": figure.detector_score, "p_mitotic": figure.p_mitotic}
    if figure.p_atypical is not None:
        values["p_atypical"] = figure.p_atypical
    values.update({name: float(v) for name, v in figure.scores.items()})
    return {name: v for name, v in values.items() if math.isfinite(v)}


def geojson_dict(result: SlideResult, *, include_lookalikes: bool = False) -> dict[str, Any]:
    """A GeoJSON FeatureCollection QuPath imports: one Point detection per figure, the hotspot as annotation.

    Coordinates are level-0 pixels (QuPath's convention, origin top left). Only mitotic
    figures unless `include_lookalikes`; the hotspot is a closed polygon of
    HOTSPOT_POLYGON_VERTICES vertices (an ellipse in pixels when mpp_x != mpp_y).
    """
    features: list[dict[str, Any]] = []
    for index, figure in enumerate(result.figures):
        kind = _figure_class(figure)
        if kind == "lookalike" and not include_lookalikes:
            continue
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(_ID_NAMESPACE, f"{result.slide_path}#figure{index}")),
                "geometry": {"type": "Point", "coordinates": [figure.x_px, figure.y_px]},
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": CLASS_NAMES[kind], "color": list(CLASS_COLOURS[kind])},
                    "measurements": _measurements(figure),
                },
            }
        )
    spot = result.scores.hotspot
    if math.isfinite(spot.hotspot.center_x_um):
        mpp_x, mpp_y = _slide_mpp(result)
        angles = np.linspace(0.0, 2.0 * math.pi, HOTSPOT_POLYGON_VERTICES, endpoint=False)
        cx, cy = spot.hotspot.center_x_um / mpp_x, spot.hotspot.center_y_um / mpp_y
        ring = [
            [cx + spot.hotspot.radius_um / mpp_x * math.cos(a), cy + spot.hotspot.radius_um / mpp_y * math.sin(a)]
            for a in angles
        ]
        ring.append(ring[0])
        measurements: dict[str, float] = {
            "Mitotic count": spot.counts.mitotic,
            "Atypical count": spot.counts.atypical,
            "Normal count": spot.counts.normal,
            "Uncertain count": spot.counts.uncertain,
            "Area mm2": spot.hotspot.area_mm2,
            "Radius um": spot.hotspot.radius_um,
        }
        if spot.counts.atypical_ratio is not None:
            measurements["AMF/NMF ratio"] = spot.counts.atypical_ratio
        if spot.tissue_fraction is not None:
            measurements["Tissue fraction"] = spot.tissue_fraction
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(_ID_NAMESPACE, f"{result.slide_path}#hotspot")),
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "annotation",
                    "name": f"Hotspot ({spot.counts.mitotic} MF in {spot.hotspot.area_mm2:.2f} mm²)",
                    "classification": {"name": CLASS_NAMES["hotspot"], "color": list(CLASS_COLOURS["hotspot"])},
                    "measurements": measurements,
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def midog_dict(result: SlideResult) -> dict[str, Any]:
    """The MIDOG challenge "Multiple points" output: mitotic figures only, coordinates in mm."""
    mpp_x, mpp_y = _slide_mpp(result)
    points = [
        {
            "name": "mitotic figure",
            "point": [f.x_px * mpp_x / 1000.0, f.y_px * mpp_y / 1000.0, 0],
            "probability": f.p_mitotic,
        }
        for f in result.figures
        if f.is_mitotic
    ]
    return {"type": "Multiple points", "points": points, "version": {"major": 1, "minor": 0}}


def csv_text(result: SlideResult) -> str:
    """detections.csv: one row per candidate, mitotic or not, with CSV_COLUMNS.

    `in_hotspot` is geometric: the candidate's centre lies in the hotspot circle, whatever its class.
    """
    points = np.array([(f.x_um, f.y_um) for f in result.figures], dtype=np.float64).reshape(-1, 2)
    inside = points_in_hotspot(result.scores.hotspot.hotspot, points)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for figure, in_hotspot in zip(result.figures, inside, strict=True):
        writer.writerow(
            [
                repr(figure.x_px),
                repr(figure.y_px),
                repr(figure.x_um),
                repr(figure.y_um),
                repr(figure.detector_score),
                repr(figure.p_mitotic),
                "" if figure.p_atypical is None else repr(figure.p_atypical),
                "true" if figure.is_mitotic else "false",
                figure.subtype or "",
                "true" if in_hotspot else "false",
            ]
        )
    return buffer.getvalue()


def overlay_image(
    result: SlideResult,
    thumbnail: NDArray[np.uint8],
    thumbnail_mpp: tuple[float, float],
    tissue_mask: NDArray[np.bool_] | None = None,
    max_side: int = OVERLAY_MAX_SIDE,
) -> Any:
    """The thumbnail (scaled to at most `max_side`) with tissue outline, figures and hotspot; a PIL image."""
    from PIL import Image, ImageDraw
    from scipy import ndimage

    rgb = np.asarray(thumbnail)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4) or rgb.dtype != np.uint8:
        raise ConfigError(f"thumbnail must be uint8 RGB of shape (H, W, 3), got {rgb.dtype} {rgb.shape}")
    mpp_x, mpp_y = (float(v) for v in thumbnail_mpp)
    if not (math.isfinite(mpp_x) and math.isfinite(mpp_y) and mpp_x > 0 and mpp_y > 0):
        raise ConfigError(f"thumbnail_mpp={thumbnail_mpp!r} must be two positive µm-per-pixel values")
    height, width = rgb.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    base = Image.fromarray(rgb[:, :, :3]).convert("RGBA")
    if size != (width, height):
        base = base.resize(size, Image.Resampling.LANCZOS)
    # µm -> overlay px, per axis (rounding of the size makes the two scales differ a little)
    sx, sy = size[0] / (width * mpp_x), size[1] / (height * mpp_y)

    if tissue_mask is not None:
        mask = np.asarray(tissue_mask, dtype=bool)
        if mask.ndim != 2:
            raise ConfigError(f"tissue_mask must be 2-D, got shape {mask.shape}")
        if mask.shape[::-1] != size:
            mask = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST), dtype=bool)
        outline = mask & ~ndimage.binary_erosion(mask, iterations=max(1, round(max(size) / 1024)))
        layer = np.zeros((size[1], size[0], 4), dtype=np.uint8)
        layer[outline] = (*_TISSUE_OUTLINE, 255)
        base = Image.alpha_composite(base, Image.fromarray(layer))

    marks = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(marks)
    r = max(4.0, max(size) / 256)
    for figure in sorted(result.figures, key=lambda f: f.is_mitotic):  # MFs drawn on top
        kind = _figure_class(figure)
        x, y = figure.x_um * sx, figure.y_um * sy
        colour = CLASS_COLOURS[kind]
        if kind == "lookalike":
            draw.ellipse((x - r * 0.7, y - r * 0.7, x + r * 0.7, y + r * 0.7), outline=(*colour, 110), width=1)
        else:
            draw.ellipse((x - r, y - r, x + r, y + r), outline=(*colour, 255), width=2)
    spot = result.scores.hotspot.hotspot
    if math.isfinite(spot.center_x_um):
        cx, cy = spot.center_x_um * sx, spot.center_y_um * sy
        rx, ry = spot.radius_um * sx, spot.radius_um * sy
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), outline=(*CLASS_COLOURS["hotspot"], 255), width=3)
    return Image.alpha_composite(base, marks).convert("RGB")


def _json_bytes(data: Mapping[str, Any]) -> bytes:
    # allow_nan=False: NaN is not JSON and QuPath and other readers reject it.
    return (json.dumps(data, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def review_geojson_dict(
    slide_path: str, review_id: int, figures: Sequence[tuple[float, float, str, str]]
) -> dict[str, Any]:
    """QuPath GeoJSON of a signed review: one Point per hotspot figure, classified as the pathologist decided.

    `figures` holds (x_px, y_px, reviewed class, model class or "added"); reviewed class "non_mitotic" is
    exported as a look-alike, so a rejection stays visible in QuPath.
    """
    features = []
    for index, (x, y, reviewed, model) in enumerate(figures):
        kind = "lookalike" if reviewed == "non_mitotic" else reviewed
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(_ID_NAMESPACE, f"{slide_path}#review{review_id}#{index}")),
            "geometry": {"type": "Point", "coordinates": [x, y]},
            "properties": {
                "objectType": "detection",
                "classification": {"name": CLASS_NAMES[kind], "color": list(CLASS_COLOURS[kind])},
                "measurements": {"Reviewed": 1.0, "Added by reviewer": float(model == "added"),
                                 "Changed by reviewer": float(model not in (reviewed, "added"))},
            },
        })
    return {"type": "FeatureCollection", "features": features}


def write_json_file(path: Path, data: Mapping[str, Any]) -> None:
    """One JSON export, written atomically (NaN refused)."""
    atomic_write(path, _json_bytes(data))


def write_exports(
    result: SlideResult,
    out_dir: Path,
    *,
    thumbnail: NDArray[np.uint8] | None = None,
    thumbnail_mpp: tuple[float, float] | None = None,
    tissue_mask: NDArray[np.bool_] | None = None,
    include_lookalikes: bool = False,
) -> dict[str, Path]:
    """Write result.json, detections.geojson, midog.json, detections.csv and (with a thumbnail) overlay.png.

    Returns {"result", "geojson", "midog", "csv"[, "overlay"]} -> path. `thumbnail_mpp` defaults
    to the slide's level-0 size over the thumbnail's. `include_lookalikes` adds the non-mitotic
    candidates to the GeoJSON as "Mitotic figure look-alike".
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Build everything first: a bad input fails before any file is replaced.
    contents: dict[str, tuple[str, bytes]] = {
        "result": ("result.json", _json_bytes(result_dict(result))),
        "geojson": ("detections.geojson", _json_bytes(geojson_dict(result, include_lookalikes=include_lookalikes))),
        "midog": ("midog.json", _json_bytes(midog_dict(result))),
        "csv": ("detections.csv", csv_text(result).encode("utf-8")),
    }
    if thumbnail is not None:
        mpp = thumbnail_mpp if thumbnail_mpp is not None else _thumbnail_mpp(result, thumbnail)
        image = overlay_image(result, thumbnail, mpp, tissue_mask)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=False)
        contents["overlay"] = ("overlay.png", buffer.getvalue())
    written: dict[str, Path] = {}
    for key, (name, data) in contents.items():
        path = out / name
        atomic_write(path, data)
        written[key] = path
    logger.info("wrote %d exports for %s to %s", len(written), result.slide_path, out)
    return written


def _thumbnail_mpp(result: SlideResult, thumbnail: NDArray[np.uint8]) -> tuple[float, float]:
    mpp_x, mpp_y = _slide_mpp(result)
    try:
        width, height = float(result.slide["width"]), float(result.slide["height"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            f"{result.slide_path}: give thumbnail_mpp; the slide's width/height are not recorded to derive it"
        ) from None
    rows, cols = np.asarray(thumbnail).shape[:2]
    return width * mpp_x / cols, height * mpp_y / rows
