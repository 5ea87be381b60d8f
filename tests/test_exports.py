"""Exports of one slide: result.json, QuPath GeoJSON, MIDOG JSON, CSV, overlay PNG; written atomically."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge.analysis.exports import (
    CLASS_COLOURS,
    CSV_COLUMNS,
    HOTSPOT_POLYGON_VERTICES,
    OVERLAY_MAX_SIDE,
    RESULT_SCHEMA,
    geojson_dict,
    midog_dict,
    result_dict,
    write_exports,
)
from edge.analysis.scoring import Figure, SlideResult, score_slide
from edge.errors import ConfigError

MPP = 0.25


def figure(x_px: float, y_px: float, subtype: str | None, *, mitotic: bool = True) -> Figure:
    return Figure(
        x_px=x_px,
        y_px=y_px,
        x_um=x_px * MPP,
        y_um=y_px * MPP,
        width_px=50.0,
        height_px=50.0,
        detector_score=0.7,
        p_mitotic=0.92 if mitotic else 0.1,
        p_atypical=None if subtype is None else {"normal": 0.02, "atypical": 0.97, "uncertain": 0.5}[subtype],
        is_mitotic=mitotic,
        subtype=subtype if mitotic else None,  # type: ignore[arg-type]
        scores={"mitotic:net": 0.92},
    )


@pytest.fixture
def result() -> SlideResult:
    figures = (
        figure(12000, 12000, "normal"),
        figure(12100, 12050, "atypical"),
        figure(12200, 11900, "uncertain"),
        figure(30000, 30000, "normal"),
        figure(12050, 12010, None, mitotic=False),
        figure(20000, 10000, None, mitotic=False),
    )
    scores = score_slide(figures, tissue_area_mm2=12.5)
    slide = {"width": 40000, "height": 32000, "mpp_x": MPP, "mpp_y": MPP, "format": "tiff", "vendor": "generic"}
    provenance = {"package_version": "0.1.0", "backend": "onnxruntime", "created_at": "2026-01-01T00:00:00Z"}
    return SlideResult("/scans/slide-1.tiff", slide, scores, figures, provenance)


def test_geojson_points_classes_colours_and_measurements(result: SlideResult) -> None:
    data = geojson_dict(result)
    assert data["type"] == "FeatureCollection"
    detections = [f for f in data["features"] if f["properties"]["objectType"] == "detection"]
    assert len(detections) == 4  # mitotic figures only by default
    names = {f["properties"]["classification"]["name"]: f["properties"]["classification"]["color"] for f in detections}
    assert names == {
        "Mitotic figure (normal)": list(CLASS_COLOURS["normal"]),
        "Mitotic figure (atypical)": list(CLASS_COLOURS["atypical"]),
        "Mitotic figure (uncertain subtype)": list(CLASS_COLOURS["uncertain"]),
    }
    first = detections[0]
    assert first["geometry"] == {"type": "Point", "coordinates": [12000, 12000]}
    assert first["properties"]["measurements"] == {
        "detector_score": 0.7,
        "p_mitotic": 0.92,
        "p_atypical": 0.02,
        "mitotic:net": 0.92,
    }
    assert len({f["id"] for f in data["features"]}) == len(data["features"])
    with_lookalikes = geojson_dict(result, include_lookalikes=True)
    lookalikes = [
        f
        for f in with_lookalikes["features"]
        if f["properties"]["classification"]["name"] == "Mitotic figure look-alike"
    ]
    assert len(lookalikes) == 2


def test_geojson_hotspot_is_a_closed_circle_of_the_right_radius(result: SlideResult) -> None:
    data = geojson_dict(result)
    (spot,) = [f for f in data["features"] if f["properties"]["objectType"] == "annotation"]
    assert spot["properties"]["classification"]["name"] == "Hotspot"
    assert spot["geometry"]["type"] == "Polygon"
    ring = np.array(spot["geometry"]["coordinates"][0])
    assert len(ring) == HOTSPOT_POLYGON_VERTICES + 1
    assert ring[0].tolist() == ring[-1].tolist()
    hotspot = result.scores.hotspot.hotspot
    centre = np.array([hotspot.center_x_um, hotspot.center_y_um]) / MPP
    np.testing.assert_allclose(np.hypot(*(ring - centre).T), hotspot.radius_um / MPP)
    measurements = spot["properties"]["measurements"]
    assert measurements["Mitotic count"] == 3
    assert (measurements["Atypical count"], measurements["Normal count"], measurements["Uncertain count"]) == (1, 1, 1)
    assert measurements["AMF/NMF ratio"] == 1.0


def test_midog_json_in_millimetres(result: SlideResult) -> None:
    data = midog_dict(result)
    assert data["type"] == "Multiple points"
    assert data["version"] == {"major": 1, "minor": 0}
    assert len(data["points"]) == 4
    first = data["points"][0]
    assert first["name"] == "mitotic figure"
    assert first["point"] == pytest.approx([3.0, 3.0, 0])
    assert first["probability"] == 0.92


def test_exports_need_the_slide_mpp(result: SlideResult) -> None:
    broken = SlideResult(result.slide_path, {"width": 10}, result.scores, result.figures, {})
    with pytest.raises(ConfigError, match="mpp"):
        midog_dict(broken)


def test_write_exports_writes_every_file_atomically(result: SlideResult, tmp_path: Path) -> None:
    thumbnail = np.full((1000, 1250, 3), 230, dtype=np.uint8)  # 8 µm/px: 40000 x 32000 px at 0.25
    mask = np.zeros((1000, 1250), dtype=bool)
    mask[100:900, 100:1100] = True
    thumbnail[mask] = (200, 120, 180)
    paths = write_exports(result, tmp_path / "out", thumbnail=thumbnail, thumbnail_mpp=(8.0, 8.0), tissue_mask=mask)
    assert set(paths) == {"result", "geojson", "midog", "csv", "overlay"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "detections.csv",
        "detections.geojson",
        "midog.json",
        "overlay.png",
        "result.json",
    ]

    data = json.loads(paths["result"].read_text(encoding="utf-8"))
    assert data["schema"] == RESULT_SCHEMA
    assert SlideResult.from_json_dict(data) == result

    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text(encoding="utf-8"))))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == len(result.figures)
    assert [r["is_mitotic"] for r in rows] == ["true", "true", "true", "true", "false", "false"]
    assert [r["in_hotspot"] for r in rows] == ["true", "true", "true", "false", "true", "false"]
    assert rows[4]["p_atypical"] == "" and rows[4]["subtype"] == ""
    assert float(rows[0]["x_um"]) == 3000.0

    with Image.open(paths["overlay"]) as image:
        assert max(image.size) <= OVERLAY_MAX_SIDE and image.size[0] > 1250  # the thumbnail whole, plus the panel
        assert image.mode == "RGB"
        pixels = np.asarray(image)
    assert (pixels == np.array(CLASS_COLOURS["hotspot"])).all(axis=-1).any()
    assert (pixels == np.array(CLASS_COLOURS["normal"])).all(axis=-1).any()


def test_overlay_is_capped_and_mpp_derived_from_the_slide(result: SlideResult, tmp_path: Path) -> None:
    thumbnail = np.full((3200, 4000, 3), 240, dtype=np.uint8)
    paths = write_exports(result, tmp_path, thumbnail=thumbnail)
    with Image.open(paths["overlay"]) as image:
        assert image.size[0] == OVERLAY_MAX_SIDE and image.size[1] <= OVERLAY_MAX_SIDE
    paths = write_exports(result, tmp_path)  # again, without a thumbnail: files replaced, no overlay key
    assert "overlay" not in paths
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]


def test_a_failed_write_leaves_no_partial_file(
    result: SlideResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edge.fileio as fileio

    write_exports(result, tmp_path)
    before = (tmp_path / "result.json").read_bytes()

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", fail)
    empty = SlideResult(result.slide_path, result.slide, score_slide([], tissue_area_mm2=1.0), (), {})
    with pytest.raises(OSError, match="disk full"):
        write_exports(empty, tmp_path)
    assert (tmp_path / "result.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "detections.csv",
        "detections.geojson",
        "midog.json",
        "result.json",
    ]


def test_no_figures_exports_an_empty_collection_without_hotspot(tmp_path: Path) -> None:
    scores = score_slide([], tissue_area_mm2=0.0)
    result = SlideResult("x.svs", {"mpp_x": 0.5, "mpp_y": 0.5}, scores, (), {})
    paths = write_exports(result, tmp_path)
    assert json.loads(paths["geojson"].read_text())["features"] == []
    assert json.loads(paths["midog"].read_text())["points"] == []
    data = json.loads(paths["result"].read_text())
    assert data["scores"]["hotspot"]["center_x_um"] is None
    assert data["scores"]["mitotic_density_per_mm2"] is None
    assert not math.isnan(data["scores"]["hotspot"]["area_mm2"])


def test_hotspot_reaching_past_the_slide_edge_is_clipped_and_flagged(result: SlideResult) -> None:
    near_edge = tuple(figure(f.x_px, f.y_px - 11000, f.subtype, mitotic=f.is_mitotic) for f in result.figures[:3])
    scores = score_slide(near_edge, tissue_area_mm2=12.5)
    clipped = SlideResult(result.slide_path, result.slide, scores, near_edge, result.provenance)
    (spot,) = [f for f in geojson_dict(clipped)["features"] if f["properties"]["objectType"] == "annotation"]
    ring = np.array(spot["geometry"]["coordinates"][0])
    assert ring.min() >= 0.0  # no negative coordinates for QuPath
    assert ring[:, 1].min() == 0.0 and ring[0].tolist() == ring[-1].tolist()
    flags = {f["code"]: f for f in result_dict(clipped)["flags"]}
    assert 0.0 < flags["hotspot_outside_slide"]["value"] < 1.0


def test_result_json_says_not_for_diagnosis_for_a_demo_bundle(result: SlideResult) -> None:
    demo = {"bundle": {"name": "demo", "intended_use": "demonstration and tests only; NOT for diagnosis"}}
    data = result_dict(SlideResult(result.slide_path, result.slide, result.scores, result.figures, demo))
    assert list(data)[:3] == ["schema", "notice", "flags"]
    assert "NOT for diagnosis" in data["notice"] and data["flags"] == []
    assert "notice" not in result_dict(result)


def test_overlay_has_a_title_legend_scale_bar_and_a_finer_inset_of_the_hotspot(result: SlideResult) -> None:
    from types import SimpleNamespace

    from edge.analysis.exports import overlay_image

    thumbnail = np.full((1000, 1250, 3), 235, dtype=np.uint8)
    spot = result.scores.hotspot.hotspot
    side_um = 2.2 * spot.radius_um
    origin = (spot.center_x_um - side_um / 2, spot.center_y_um - side_um / 2)
    view = SimpleNamespace(pixels=np.full((700, 700, 3), 250, np.uint8), origin_um=origin,
                           mpp=(side_um / 700, side_um / 700))
    plain = np.asarray(overlay_image(result, thumbnail, (8.0, 8.0)))
    with_inset = np.asarray(overlay_image(result, thumbnail, (8.0, 8.0), hotspot_view=view))
    height, width = with_inset.shape[:2]
    assert max(width, height) <= OVERLAY_MAX_SIDE
    header = with_inset[: height // 12]
    assert (header.sum(axis=-1) < 100).sum() > 500  # the slide's name and the counts, in black
    right = with_inset[:, width - 620 :]
    normal = (right == np.array(CLASS_COLOURS["normal"])).all(axis=-1)
    assert normal.sum() > (plain[:, width - 620 :] == np.array(CLASS_COLOURS["normal"])).all(axis=-1).sum()
    bar = (with_inset[:, :width - 620].sum(axis=-1) == 0).sum(axis=1)  # the scale bar: a solid black row
    assert bar.max() > 50
