"""Files written for one slide: result JSON, QuPath GeoJSON, MIDOG JSON, CSV and an overlay PNG.

Each file is built in memory by a pure function and written atomically (a temporary file in
the same folder, fsynced, then renamed), so a crash never leaves half a file under a real name.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge.analysis.caveats import clip_polygon, diagnostic_notice, plausibility_flags
from edge.analysis.qc import QcMaps
from edge.analysis.scoring import Figure, SlideResult, points_in_hotspot
from edge.errors import ConfigError
from edge.fileio import atomic_write
from edge.vocab import DetectionClass

__all__ = [
    "CLASS_COLOURS",
    "CLASS_NAMES",
    "CSV_COLUMNS",
    "HOTSPOT_POLYGON_VERTICES",
    "OVERLAY_MAX_SIDE",
    "RESULT_SCHEMA",
    "csv_text",
    "export_folder_name",
    "geojson_dict",
    "is_export_folder",
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
EXPORT_STEM_CHARS = 80  # the slide's name in its export folder's name is cut to this length
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
    DetectionClass.NON_MITOTIC: "Mitotic figure look-alike",
    "hotspot": "Hotspot",
    "out_of_focus": "QC: out of focus",
    "fold": "QC: tissue fold",
    "pen": "QC: pen or dirt",
}
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "normal": (0, 190, 0),
    "atypical": (230, 0, 0),
    "uncertain": (240, 200, 0),
    DetectionClass.NON_MITOTIC: (150, 150, 150),
    "hotspot": (0, 110, 255),
    "out_of_focus": (255, 140, 0),
    "fold": (120, 0, 160),
    "pen": (0, 170, 170),
}
QC_LAYER_ALPHA = 90  # the overlay's QC regions: tinted, the tissue still visible beneath
_TISSUE_OUTLINE = (40, 40, 160)
# Fixed namespace: feature ids are the same every time the same slide is exported.
_ID_NAMESPACE = uuid.UUID("6f1e5d0c-8f53-4b61-9a53-3c7f3b0c2e11")


def export_folder_name(job_id: int, slide_path: str) -> str:
    """``<job>-<slide stem>``: the job id keeps it unique, the stem tells a person which slide it is.

    >>> export_folder_name(12, "/scans/S24 042 HE.ome.tiff")
    '12-S24_042_HE.ome'
    """
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(slide_path).stem).strip("._-")[:EXPORT_STEM_CHARS]
    return f"{job_id}-{stem}" if stem else str(job_id)


def is_export_folder(name: str) -> bool:
    """Whether ``name`` is a job's export folder (``<job>-<stem>``, the older ``<job>``, or either with a
    suffix such as ``.partial``), as ``export_folder_name`` writes them.

    >>> [is_export_folder(n) for n in ("12-S24_042_HE.ome", "12", "12.partial", "notes", "x12")]
    [True, True, True, False, False]
    """
    return re.match(r"\d+(?:[-.]|$)", name) is not None


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
    """The result.json content: the schema tag, the notice and flags (edge.analysis.caveats),
    then `SlideResult.to_json_dict`.

    "notice" is there only for a bundle not meant for diagnosis; "flags" is always there (maybe empty).
    """
    data = result.to_json_dict()
    head: dict[str, Any] = {"schema": RESULT_SCHEMA}
    notice = diagnostic_notice(data)
    if notice:
        head["notice"] = notice
    head["flags"] = [flag.to_json_dict() for flag in plausibility_flags(data)]
    return {**head, **data}


def _measurements(figure: Figure) -> dict[str, float]:
    values: dict[str, float] = {"detector_score": figure.detector_score, "p_mitotic": figure.p_mitotic}
    if figure.p_atypical is not None:
        values["p_atypical"] = figure.p_atypical
    values.update({name: float(v) for name, v in figure.scores.items()})
    return {name: v for name, v in values.items() if math.isfinite(v)}


def geojson_dict(
    result: SlideResult, *, include_lookalikes: bool = False, qc_maps: QcMaps | None = None
) -> dict[str, Any]:
    """A GeoJSON FeatureCollection QuPath imports: one Point detection per figure, the hotspot as annotation.

    Coordinates are level-0 pixels (QuPath's convention, origin top left). Only mitotic
    figures unless `include_lookalikes`; the hotspot is a closed polygon of
    HOTSPOT_POLYGON_VERTICES vertices (an ellipse in pixels when mpp_x != mpp_y).
    """
    features: list[dict[str, Any]] = []
    for index, figure in enumerate(result.figures):
        kind = figure.detection_class
        if kind == DetectionClass.NON_MITOTIC and not include_lookalikes:
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
        slide_w, slide_h = _slide_size(result)
        if slide_w and slide_h:  # QuPath gets the part of the field that is on the slide
            ring = clip_polygon(ring, slide_w, slide_h) or ring
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
    if qc_maps is not None:
        features.extend(_qc_features(result, qc_maps))
    return {"type": "FeatureCollection", "features": features}


def _qc_features(result: SlideResult, qc_maps: QcMaps) -> list[dict[str, Any]]:
    """Out-of-focus, folded and pen-marked regions as QuPath annotations with their class."""
    features = []
    for index, (kind, rings) in enumerate(qc_maps.regions()):
        coords = [[[round(x, 1), round(y, 1)] for x, y in ring] + [[round(ring[0][0], 1), round(ring[0][1], 1)]]
                  for ring in rings]
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(_ID_NAMESPACE, f"{result.slide_path}#qc{index}")),
                "geometry": {"type": "Polygon", "coordinates": coords},
                "properties": {
                    "objectType": "annotation",
                    "name": CLASS_NAMES[kind],
                    "classification": {"name": CLASS_NAMES[kind], "color": list(CLASS_COLOURS[kind])},
                },
            }
        )
    return features


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
    hotspot_view: Any = None,
    qc_maps: QcMaps | None = None,
) -> Any:
    """The overlay a person reads: a PIL image of at most `max_side` px a side.

    A header (slide name, hotspot mitotic count and AMF/NMF ratio, the bundle's notice when it is not
    for diagnosis), the thumbnail with tissue outline, every candidate and the hotspot circle and a
    scale bar, and a side panel with the hotspot field at a finer scale (`hotspot_view`: pixels,
    origin_um, mpp; from the pipeline) with its figures marked, a scale bar and the legend.
    Look-alikes (candidates the classifiers rejected) are drawn as thin grey rings.
    """
    from PIL import Image, ImageDraw

    rgb = np.asarray(thumbnail)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4) or rgb.dtype != np.uint8:
        raise ConfigError(f"thumbnail must be uint8 RGB of shape (H, W, 3), got {rgb.dtype} {rgb.shape}")
    mpp_x, mpp_y = (float(v) for v in thumbnail_mpp)
    if not (math.isfinite(mpp_x) and math.isfinite(mpp_y) and mpp_x > 0 and mpp_y > 0):
        raise ConfigError(f"thumbnail_mpp={thumbnail_mpp!r} must be two positive µm-per-pixel values")
    unit = max(max_side, 512) / OVERLAY_MAX_SIDE  # fonts and margins scale with the canvas
    margin = round(24 * unit)
    panel = round(OVERLAY_INSET_PX * unit)
    header = round(170 * unit)
    height, width = rgb.shape[:2]
    room_w, room_h = max_side - panel - 3 * margin, max_side - header - margin
    scale = min(1.0, room_w / width, room_h / height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    overview = _overview(result, rgb, (mpp_x, mpp_y), size, tissue_mask, qc_maps)
    sx = size[0] / (width * mpp_x)  # overview px per µm
    _scale_bar(ImageDraw.Draw(overview), sx, size, unit)

    canvas_w = size[0] + panel + 3 * margin
    canvas_h = header + max(size[1], round(1.55 * panel)) + margin
    canvas = Image.new("RGB", (canvas_w, canvas_h), (255, 255, 255))
    canvas.paste(overview, (margin, header))
    draw = ImageDraw.Draw(canvas)
    _header(draw, result, margin, unit)
    left = size[0] + 2 * margin
    top = header
    if hotspot_view is not None:
        inset = _inset(result, hotspot_view, panel, unit)
        title = _plain(f"hotspot field at {hotspot_view.mpp[0]:.2g} µm/px")
        draw.text((left, top), title, fill=(0, 0, 0), font=_font(26 * unit))
        top += round(36 * unit)
        canvas.paste(inset, (left, top))
        draw.rectangle((left, top, left + panel - 1, top + panel - 1), outline=(0, 0, 0), width=1)
        top += panel + margin
    _legend(draw, result, (left, top), unit, qc_maps)
    return canvas


OVERLAY_INSET_PX = 600  # side of the hotspot inset on a 2048 px overlay
_LEGEND = (
    ("normal", "mitotic figure, normal"),
    ("atypical", "mitotic figure, atypical"),
    ("uncertain", "mitotic figure, subtype uncertain"),
    (DetectionClass.NON_MITOTIC, "look-alike (not mitotic)"),
    ("hotspot", "hotspot field"),
)


_FONT_FILE = "DejaVuSans.ttf"  # has µ and ²; Pillow's bundled default font has neither


@functools.cache
def _font(size: float) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.truetype(_FONT_FILE, max(10, round(size)))
    except OSError:  # no DejaVu on this machine: Pillow's own font, with µ and ² spelled out (see _plain)
        return ImageFont.load_default(size=max(10, round(size)))


def _plain(text: str) -> str:
    """The text as the font can draw it: 'um' and 'mm2' when only Pillow's default font is there."""
    if hasattr(_font(12), "path") and Path(getattr(_font(12), "path", "")).name == _FONT_FILE:
        return text
    return text.replace("µ", "u").replace("²", "2")


def _overview(
    result: SlideResult,
    rgb: NDArray[np.uint8],
    mpp: tuple[float, float],
    size: tuple[int, int],
    tissue_mask: NDArray[np.bool_] | None,
    qc_maps: QcMaps | None = None,
) -> Any:
    from PIL import Image, ImageDraw
    from scipy import ndimage

    height, width = rgb.shape[:2]
    base = Image.fromarray(rgb[:, :, :3]).convert("RGBA")
    if size != (width, height):
        base = base.resize(size, Image.Resampling.LANCZOS)
    sx, sy = size[0] / (width * mpp[0]), size[1] / (height * mpp[1])  # µm -> overview px, per axis
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

    if qc_maps is not None:
        base = Image.alpha_composite(base, Image.fromarray(_qc_layer(qc_maps, _slide_mpp(result), sx, sy, size)))

    marks = Image.new("RGBA", size, (0, 0, 0, 0))
    _mark_figures(ImageDraw.Draw(marks), result, (0.0, 0.0), (sx, sy), max(4.0, max(size) / 256))
    spot = result.scores.hotspot.hotspot
    if math.isfinite(spot.center_x_um):
        cx, cy = spot.center_x_um * sx, spot.center_y_um * sy
        rx, ry = spot.radius_um * sx, spot.radius_um * sy
        ImageDraw.Draw(marks).ellipse(
            (cx - rx, cy - ry, cx + rx, cy + ry), outline=(*CLASS_COLOURS["hotspot"], 255), width=3
        )
    return Image.alpha_composite(base, marks).convert("RGB")


def _mark_figures(
    draw: Any, result: SlideResult, origin_um: tuple[float, float], px_per_um: tuple[float, float], r: float
) -> None:
    """A ring per candidate at (µm - origin) * px_per_um; mitotic figures drawn last, on top."""
    for figure in sorted(result.figures, key=lambda f: f.is_mitotic):
        kind = figure.detection_class
        x = (figure.x_um - origin_um[0]) * px_per_um[0]
        y = (figure.y_um - origin_um[1]) * px_per_um[1]
        colour = CLASS_COLOURS[kind]
        if kind == DetectionClass.NON_MITOTIC:
            draw.ellipse((x - r * 0.7, y - r * 0.7, x + r * 0.7, y + r * 0.7), outline=(*colour, 160), width=1)
        else:
            draw.ellipse((x - r, y - r, x + r, y + r), outline=(*colour, 255), width=max(2, round(r / 4)))


def _inset(result: SlideResult, view: Any, side: int, unit: float) -> Any:
    from PIL import Image, ImageDraw

    pixels = np.asarray(view.pixels)
    image = Image.fromarray(pixels[:, :, :3]).resize((side, side), Image.Resampling.LANCZOS)
    zoom = (side / (pixels.shape[1] * view.mpp[0]), side / (pixels.shape[0] * view.mpp[1]))  # inset px per µm
    draw = ImageDraw.Draw(image, "RGBA")
    _mark_figures(draw, result, view.origin_um, zoom, max(6.0, 9 * unit))
    spot = result.scores.hotspot.hotspot
    cx = (spot.center_x_um - view.origin_um[0]) * zoom[0]
    cy = (spot.center_y_um - view.origin_um[1]) * zoom[1]
    rx, ry = spot.radius_um * zoom[0], spot.radius_um * zoom[1]
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), outline=(*CLASS_COLOURS["hotspot"], 255), width=3)
    _scale_bar(draw, zoom[0], (side, side), unit)
    return image


def _scale_bar(draw: Any, px_per_um: float, size: tuple[int, int], unit: float) -> None:
    """A bar of a round length (1, 2 or 5 × 10^k µm) about a fifth of the width, bottom left, labelled."""
    target_um = size[0] / 5 / px_per_um
    exponent = math.floor(math.log10(target_um))
    length_um = max((m * 10**exponent for m in (1, 2, 5) if m * 10**exponent <= target_um), default=10**exponent)
    length = length_um * px_per_um
    pad = round(14 * unit)
    x0, y1 = pad, size[1] - pad
    y0 = y1 - max(4, round(8 * unit))
    label = _plain(f"{length_um / 1000:g} mm" if length_um >= 1000 else f"{length_um:g} µm")
    font = _font(22 * unit)
    draw.rectangle((x0 - 4, y0 - round(30 * unit), x0 + length + 4, y1 + 4), fill=(255, 255, 255, 200))
    draw.rectangle((x0, y0, x0 + length, y1), fill=(0, 0, 0, 255))
    draw.text((x0, y0 - round(27 * unit)), label, fill=(0, 0, 0, 255), font=font)


def _header(draw: Any, result: SlideResult, margin: int, unit: float) -> None:
    counts = result.scores.hotspot.counts
    spot = result.scores.hotspot.hotspot
    ratio = "undefined (no normal figure)" if counts.atypical_ratio is None else f"{counts.atypical_ratio:.2f}"
    draw.text((margin, round(14 * unit)), Path(result.slide_path).name, fill=(0, 0, 0), font=_font(40 * unit))
    summary = (
        f"hotspot mitotic count {counts.mitotic} in {spot.area_mm2:.2f} mm²   ·   AMF/NMF {ratio}   ·   "
        f"{result.scores.totals.mitotic} mitotic figures on the slide"
    )
    draw.text((margin, round(64 * unit)), _plain(summary), fill=(0, 0, 0), font=_font(28 * unit))
    data = {"slide": result.slide, "scores": result.scores.to_json_dict(), "provenance": result.provenance}
    flags = [flag.code.replace("_", " ") for flag in plausibility_flags(data)]
    lines = [diagnostic_notice(data), f"flags: {', '.join(flags)} (see result.json)" if flags else ""]
    for row, line in enumerate(line for line in lines if line):
        draw.text((margin, round((102 + 28 * row) * unit)), _plain(line), fill=(200, 0, 0), font=_font(22 * unit))


def _legend(
    draw: Any, result: SlideResult, origin: tuple[int, int], unit: float, qc_maps: QcMaps | None = None
) -> None:
    counts = result.scores.hotspot.counts
    in_hotspot = {"normal": counts.normal, "atypical": counts.atypical, "uncertain": counts.uncertain}
    x, y = origin
    font = _font(24 * unit)
    step = round(36 * unit)
    r = round(9 * unit)
    for kind, text in _LEGEND:
        colour = CLASS_COLOURS[kind]
        cy = y + step // 2
        width = 1 if kind == DetectionClass.NON_MITOTIC else 3
        draw.ellipse((x, cy - r, x + 2 * r, cy + r), outline=colour, width=width)
        label = f"{text}: {in_hotspot[kind]} in hotspot" if kind in in_hotspot else text
        draw.text((x + 3 * r, cy - round(14 * unit)), label, fill=(0, 0, 0), font=font)
        y += step
    cy = y + step // 2
    draw.line((x, cy, x + 2 * r, cy), fill=_TISSUE_OUTLINE, width=3)
    draw.text((x + 3 * r, cy - round(14 * unit)), "tissue outline", fill=(0, 0, 0), font=font)
    if qc_maps is None:
        return
    for kind, text, mask in (("out_of_focus", "scan QC: out of focus", qc_maps.out_of_focus),
                             ("fold", "scan QC: fold", qc_maps.fold), ("pen", "scan QC: pen or dirt", qc_maps.pen)):
        if not mask.any():
            continue
        y += step
        cy = y + step // 2
        draw.rectangle((x, cy - r, x + 2 * r, cy + r), fill=(*CLASS_COLOURS[kind], QC_LAYER_ALPHA))
        draw.text((x + 3 * r, cy - round(14 * unit)), text, fill=(0, 0, 0), font=font)


def _qc_layer(
    qc_maps: QcMaps, mpp0: tuple[float, float], sx: float, sy: float, size: tuple[int, int]
) -> NDArray[np.uint8]:
    """An RGBA layer tinting out-of-focus, folded and pen-marked tissue (each overlay pixel looks up its map)."""
    layer = np.zeros((size[1], size[0], 4), np.uint8)
    ys_um = (np.arange(size[1]) + 0.5) / sy
    xs_um = (np.arange(size[0]) + 0.5) / sx
    for kind, mask, px0 in (
        ("out_of_focus", qc_maps.out_of_focus, qc_maps.cell_px0),
        ("fold", qc_maps.fold, qc_maps.thumb_px0),
        ("pen", qc_maps.pen, qc_maps.thumb_px0),
    ):
        if not mask.any():
            continue
        rows = np.clip((ys_um / (px0[1] * mpp0[1])).astype(np.intp), 0, mask.shape[0] - 1)
        cols = np.clip((xs_um / (px0[0] * mpp0[0])).astype(np.intp), 0, mask.shape[1] - 1)
        hit = mask[np.ix_(rows, cols)]
        layer[hit] = (*CLASS_COLOURS[kind], QC_LAYER_ALPHA)
    return layer


def _json_bytes(data: Mapping[str, Any]) -> bytes:
    # allow_nan=False: NaN is not JSON and QuPath and other readers reject it.
    return (json.dumps(data, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def review_geojson_dict(
    slide_path: str, review_id: int, figures: Sequence[tuple[float, float, str, str]]
) -> dict[str, Any]:
    """QuPath GeoJSON of a signed review: one Point per hotspot figure, classified as the pathologist decided.

    `figures` holds (x_px, y_px, reviewed class, model class or "added"); a rejected figure (reviewed class
    "non_mitotic") is exported as a look-alike, so a rejection stays visible in QuPath.
    """
    features = []
    for index, (x, y, kind, model) in enumerate(figures):
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(_ID_NAMESPACE, f"{slide_path}#review{review_id}#{index}")),
            "geometry": {"type": "Point", "coordinates": [x, y]},
            "properties": {
                "objectType": "detection",
                "classification": {"name": CLASS_NAMES[kind], "color": list(CLASS_COLOURS[kind])},
                "measurements": {"Reviewed": 1.0, "Added by reviewer": float(model == "added"),
                                 "Changed by reviewer": float(model not in (kind, "added"))},
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
    hotspot_view: Any = None,
    qc_maps: QcMaps | None = None,
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
        "geojson": (
            "detections.geojson",
            _json_bytes(geojson_dict(result, include_lookalikes=include_lookalikes, qc_maps=qc_maps)),
        ),
        "midog": ("midog.json", _json_bytes(midog_dict(result))),
        "csv": ("detections.csv", csv_text(result).encode("utf-8")),
    }
    if thumbnail is not None:
        mpp = thumbnail_mpp if thumbnail_mpp is not None else _thumbnail_mpp(result, thumbnail)
        image = overlay_image(result, thumbnail, mpp, tissue_mask, hotspot_view=hotspot_view, qc_maps=qc_maps)
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


def _slide_size(result: SlideResult) -> tuple[float, float]:
    try:
        return float(result.slide["width"]), float(result.slide["height"])
    except (KeyError, TypeError, ValueError):
        return 0.0, 0.0


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
