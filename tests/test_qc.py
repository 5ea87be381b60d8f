"""Scan QC: focus, folds, pen and stain measured in the tile stream, the verdict and its reasons, what the
result, the exports and the CLI show, and QC off leaving the scores as they were."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from edge.analysis.qc import (
    REFERENCE_STAINS,
    QcAccumulator,
    angle_deg,
    crete_blur,
    focus_sums,
    fold_mask,
    macenko,
    optical_density,
    pen_mask,
    verdict_of,
)
from edge.config import Config, QcConfig
from edge.devtools.synth import load_truth
from edge.devtools.synth.faults import PEN_INKS, disc_mask, segment_distance, shift_eosin
from edge.errors import ConfigError, QcError
from tests.conftest import SynthFactory, data_file
from tests.test_cli import run_cli

SIDE = 3072  # px at 0.25 µm/px: 0.77 mm, a few tiles


# --- the measures ----------------------------------------------------------------------------------


def test_focus_reads_blur_whatever_the_contrast() -> None:
    rng = np.random.default_rng(0)
    sharp = ndimage.gaussian_filter(rng.uniform(0, 255, (256, 256)), 0.7).astype(np.float32)
    blurs = [float(crete_blur(focus_sums(ndimage.gaussian_filter(sharp, s), 256))[0, 0]) for s in (0, 1, 2, 4)]
    assert blurs == sorted(blurs) and blurs[0] < 0.3 < 0.5 < blurs[-1]
    faint = (sharp - sharp.mean()) * 0.2 + 200  # the same texture at a fifth of the contrast: not blurrier
    assert float(crete_blur(focus_sums(faint.astype(np.float32), 256))[0, 0]) == pytest.approx(blurs[0], abs=0.02)


@pytest.mark.parametrize("angle", [0.0, 30.0, 45.0, 60.0, 90.0, 135.0])
def test_sharp_fibres_at_any_angle_are_in_focus(angle: float) -> None:
    # Smooth stroma or muscle at 0.5 µm/px: fibres that vary across, not along, themselves. Measured along
    # rows and columns only, diagonal fibres read blurred in both, and a clean slide was called out of focus.
    rng = np.random.default_rng(1)
    across = ndimage.gaussian_filter1d(rng.uniform(0, 255, 1024), 1.5)
    ys, xs = np.mgrid[0:256, 0:256].astype(np.float64)
    t = np.radians(angle)
    fibres = np.interp(xs * np.cos(t) + ys * np.sin(t) + 400, np.arange(1024), across).astype(np.float32)
    sharp = float(crete_blur(focus_sums(fibres, 256))[0, 0])
    defocused = float(crete_blur(focus_sums(ndimage.gaussian_filter(fibres, 4), 256))[0, 0])  # 2 µm blur
    assert sharp < QcConfig().focus_threshold < defocused, (sharp, defocused)


def test_macenko_recovers_known_stain_vectors() -> None:
    rng = np.random.default_rng(1)
    h, e = np.array([0.65, 0.70, 0.29]), np.array([0.07, 0.99, 0.11])
    h, e = h / np.linalg.norm(h), e / np.linalg.norm(e)
    amounts = rng.gamma(2.0, 0.4, (20000, 2))
    amounts[:3000, 1] = amounts[3000:6000, 0] = 0.0  # pure nuclei and pure stroma, as a slide has
    od = amounts[:, :1] * h + amounts[:, 1:] * e
    found = macenko(od)
    assert angle_deg(found.hematoxylin, h) < 2.0 and angle_deg(found.eosin, e) < 2.0
    with pytest.raises(QcError, match="stained pixels"):
        macenko(od[:10])


def test_macenko_finds_an_eosin_that_absorbs_little_red() -> None:
    # Pure stroma at usual amounts absorbs < 0.15 OD of red: a per-channel floor kept only eosin mixed with
    # haematoxylin, the eosin vector turned ~11° towards it, and dense pink muscle fell outside the cone (pen).
    rng = np.random.default_rng(5)
    h, e = np.array([0.62, 0.80, 0.30]), np.array([0.09, 0.90, 0.42])
    h, e = h / np.linalg.norm(h), e / np.linalg.norm(e)
    amounts = np.stack([rng.gamma(2.0, 0.5, 20000), rng.gamma(2.0, 0.15, 20000)], axis=1)  # pale eosin
    amounts[:8000, 0] = amounts[8000:10000, 1] = 0.0  # stroma and muscle: eosin only; some pure nuclei
    found = macenko(amounts[:, :1] * h + amounts[:, 1:] * e)
    assert angle_deg(found.eosin, e) < 2.0 and angle_deg(found.hematoxylin, h) < 2.0


def test_macenko_on_a_real_h_and_e_image_finds_haematoxylin_and_eosin() -> None:
    image = np.asarray(Image.open(data_file("he/tiatoolbox_target_image.png")).convert("RGB"))
    found = macenko(optical_density(image, 245.0))
    assert angle_deg(found.hematoxylin, REFERENCE_STAINS[0]) < 15  # Ruifrok & Johnston's vectors
    assert angle_deg(found.eosin, REFERENCE_STAINS[1]) < 30  # eosin varies more between labs
    assert found.hematoxylin[0] > found.eosin[0]  # haematoxylin absorbs more red


def test_pen_ink_is_told_from_stain() -> None:
    stains = REFERENCE_STAINS
    inks = np.array([PEN_INKS[c] for c in ("green", "blue", "black")], np.float32)
    mixes = np.array([0.8 * stains[0] + 0.3 * stains[1], 0.2 * stains[0] + 1.0 * stains[1], 1.2 * stains[0]])
    od = np.concatenate([inks, mixes]).astype(np.float32).reshape(2, 3, 3)
    assert pen_mask(od, stains, QcConfig()).ravel().tolist() == [True, True, True, False, False, False]


def _fold_found(hem: np.ndarray, eos: np.ndarray, segment: tuple[tuple[float, float], tuple[float, float]],
                radius: float) -> tuple[np.ndarray, np.ndarray]:
    """A fold (both stain amounts doubled) planted along ``segment`` of an 8 µm/px thumbnail: (fold, found)."""
    ys, xs = (np.mgrid[0:128, 0:128] + 0.5).astype(np.float32)
    fold = segment_distance(ys, xs, *segment) <= radius
    hem[fold] *= 2.0
    eos[fold] *= 2.0
    h, e = REFERENCE_STAINS
    od = (hem[..., None] * h + eos[..., None] * e).astype(np.float32)
    found = fold_mask(od, np.ones((128, 128), bool), REFERENCE_STAINS, QcConfig(), (8.0, 8.0))
    assert not (found & ~ndimage.binary_dilation(fold, iterations=2)).any()
    return fold, found


def test_a_fold_over_dense_tissue_is_flagged() -> None:
    # A thumbnail (8 µm/px) whose right half is crowded nuclei, with a 130 µm fold lying across it. Judged
    # against surroundings that included the fold itself, only a third of it was flagged.
    rng = np.random.default_rng(3)
    hem = ndimage.gaussian_filter(rng.gamma(2.0, 0.5, (128, 128)), 1.0) * 0.3
    eos = ndimage.gaussian_filter(rng.gamma(2.0, 0.5, (128, 128)), 1.0) * 0.35
    hem[:, 64:] *= 3.0
    fold, found = _fold_found(hem, eos, ((80.0, 20.0), (110.0, 110.0)), 8)
    assert (found & fold).sum() >= 0.75 * fold.sum()


def test_a_fold_over_cellular_tissue_with_little_eosin_is_flagged() -> None:
    # Eosin-rich stroma on the left; on the right cellular tissue with 0.72x its eosin, with a 90 µm fold across
    # it. Doubled, the fold's eosin reaches only ~1.43x the slide's median (set by the stroma), under the 1.5x
    # doubling bar that used to apply to it (synthetic seed 9105's fold, missed that way).
    rng = np.random.default_rng(5)
    hem = ndimage.gaussian_filter(rng.gamma(16.0, 0.0625, (128, 128)), 1.0) * 0.1
    eos = ndimage.gaussian_filter(rng.gamma(16.0, 0.0625, (128, 128)), 1.0) * 0.5
    hem[:, 80:] *= 5.0
    eos[:, 80:] *= 0.72
    fold, found = _fold_found(hem, eos, ((104.0, 10.0), (104.0, 118.0)), 5)
    assert (found & fold).sum() >= 0.6 * fold.sum()


def test_a_fold_over_light_stroma_is_flagged() -> None:
    # Cellular tissue, dense in haematoxylin, sets the slide's median density on the left; on the right loose
    # stroma at ~0.65x that density with a 100 µm fold across it. Doubled, the fold is twice its surroundings
    # in density and eosin, but only ~1.3x the slide's median density: under the 1.5x bar that used to apply
    # (synthetic seed 11103's fold, over light tissue, missed that way).
    rng = np.random.default_rng(7)
    hem = ndimage.gaussian_filter(rng.gamma(16.0, 0.0625, (128, 128)), 1.0) * 0.5
    eos = ndimage.gaussian_filter(rng.gamma(16.0, 0.0625, (128, 128)), 1.0) * 0.3
    hem[:, 80:] *= 0.5
    fold, found = _fold_found(hem, eos, ((100.0, 10.0), (100.0, 118.0)), 6)
    assert (found & fold).sum() >= 0.6 * fold.sum()


def test_the_fold_of_seed_9105_is_flagged_end_to_end(synth_slide: SynthFactory, tmp_path: Path) -> None:
    # A 74 µm fold over cellular tissue with little eosin, along the edge of a lobe: the one fold missed
    # while tuning scan QC (tools/qc_targets.py).
    slide = synth_slide(width=4096, height=4096, seed=9105, blur_regions=2, folds=1, pen_strokes=2)
    out = tmp_path / "out"
    qc = _analyze(slide, out)["qc"]
    assert qc["fold_regions"] >= 1 and qc["fold_fraction"] > 0
    (planted,) = load_truth(slide.with_name(slide.stem + ".truth.json")).faults.folds
    geojson = json.loads((out / "detections.geojson").read_text())
    folds = [f for f in geojson["features"] if f["properties"]["classification"]["name"] == "QC: tissue fold"]
    points = np.array([p for f in folds for ring in f["geometry"]["coordinates"] for p in ring], np.float32)
    near = segment_distance(points[:, 1], points[:, 0], (planted.x0_px, planted.y0_px), (planted.x1_px, planted.y1_px))
    assert (near <= planted.width_px / 2 + 64).any()  # outlined on the planted band (64 px: one thumbnail pixel x2)


def test_blue_ink_over_nuclei_is_pen_and_stays_out_of_the_stain_vectors() -> None:
    # Crowded nuclei under a 40 µm blue marker line, nowhere over glass. Ink + haematoxylin passed as
    # haematoxylin, turned the H vector ~11° towards the ink, and the ink then lay inside the H-E cone.
    rng = np.random.default_rng(4)
    h, e = np.array([0.62, 0.80, 0.30]), np.array([0.09, 0.90, 0.42])  # edge.devtools.synth's stains
    nuclei = np.zeros((1024, 1024))
    nuclei[rng.integers(0, 1024, 4000), rng.integers(0, 1024, 4000)] = 1
    nuclei[:, :512] *= rng.uniform(size=(1024, 512)) < 0.15  # stroma left, crowded nuclei right
    hem = np.minimum(ndimage.gaussian_filter(nuclei, 6.0) * 120, 1.0)
    eos = 0.6 * (1 - 0.7 * hem) * (1 + 1.5 * ndimage.gaussian_filter(rng.normal(size=(1024, 1024)), 2.0))
    od = hem[..., None] * h + eos[..., None] * e
    ink = np.zeros((1024, 1024), bool)
    ink[:, 640:800] = True
    od[ink] += np.asarray(PEN_INKS["blue"])
    rgb = np.clip(np.rint(245 * np.exp(-od)), 0, 255).astype(np.uint8)
    acc = QcAccumulator(1024, 1024, 0.25, QcConfig(), np.full(3, 245.0, np.float32))
    acc.add_tile(0, 0, rgb)
    stains = acc.stains()
    assert stains is not None and angle_deg(stains.hematoxylin, h) < 5.0
    thumbnail = rgb.reshape(128, 8, 128, 8, 3).mean(axis=(1, 3))  # 2 µm/px
    pen = pen_mask(optical_density(thumbnail, 245.0), stains.matrix(), QcConfig())
    assert pen[ink[::8, ::8]].mean() > 0.9 and not pen[~ink[::8, ::8]].any()


def test_the_verdict_says_why() -> None:
    cfg = QcConfig()
    assert verdict_of({"out_of_focus_fraction": 0.0, "hotspot": {"out_of_focus_fraction": 0.0}}, cfg) == ("pass", [])
    verdict, reasons = verdict_of({"out_of_focus_fraction": 0.03, "hotspot": {"out_of_focus_fraction": 0.5}}, cfg)
    assert verdict == "rescan" and reasons == ["the hotspot is 50% out of focus", "3.0% of the tissue is out of focus"]
    verdict, reasons = verdict_of({"pen_fraction": 0.01, "next_fields": [{"out_of_focus_fraction": 0.3}]}, cfg)
    assert verdict == "review" and reasons == ["the next-best field 1 is 30% out of focus",
                                               "pen marks or dirt on 1.0% of the tissue"]
    rescan = verdict_of({"out_of_focus_fraction": 0.12}, cfg)
    assert rescan == ("rescan", ["12.0% of the tissue is out of focus (rescan at 10%)"])


def test_qc_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"qc\.review_out_of_focus_fraction=0\.2 must not exceed"):
        Config().with_overrides({"qc.review_out_of_focus_fraction": 0.2})
    with pytest.raises(ConfigError, match=r"qc\.focus_threshold=1\.5"):
        Config().with_overrides({"qc.focus_threshold": 1.5})
    with pytest.raises(ConfigError, match=r"qc\.fold_eosin_ratio"):
        Config().with_overrides({"qc.fold_eosin_ratio": 0})


def test_an_out_of_focus_field_is_found_tile_by_tile() -> None:
    rng = np.random.default_rng(2)
    texture = ndimage.gaussian_filter(rng.uniform(0, 1, (1024, 1024)), 2.0)  # nucleus-sized detail
    texture = np.clip((texture - texture.mean()) / texture.std() * 0.25 + 0.5, 0, 1)
    rgb = np.stack([240 - 120 * texture, 240 - 200 * texture, 240 - 60 * texture], axis=2)
    blurred = rgb.copy()
    blurred[:, 512:] = ndimage.gaussian_filter(rgb, (6, 6, 0))[:, 512:]  # the right half out of focus
    acc = QcAccumulator(1024, 1024, 0.25, QcConfig(), np.full(3, 245.0, np.float32))
    acc.add_tile(0, 0, np.clip(blurred, 0, 255).astype(np.uint8))
    tissue, oof, _ = acc.out_of_focus_map()
    assert tissue.all()
    assert oof[:, 5:].all() and not oof[:, :4].any()  # 8 cells of 32 µm a side; the border cell may go either way



def test_tiles_measured_together_in_the_readers_give_the_same_figures_as_one_by_one() -> None:
    # the tile stream's readers measure each batch as one stack (numpy's per-call cost paid once per batch);
    # the figures must be those of each tile alone, and a smaller tile at the slide's edge is measured on its
    # own pixels, not on the white padding of its batch slot
    from edge.wsi.tiling import Tile

    rng = np.random.default_rng(5)
    texture = ndimage.gaussian_filter(rng.uniform(0, 1, (4, 1024, 1024)), (0, 2, 2))
    pixels = np.clip(240 - 160 * texture[..., None] * np.array([0.6, 1.0, 0.3]), 0, 255).astype(np.uint8)
    pixels[3, 700:] = 255  # the last slot holds a tile 700 px tall, padded white below
    tiles = tuple(Tile(index=i, col=i, row=0, x=1024 * i, y=0, width=1024, height=700 if i == 3 else 1024,
                       x0=1024.0 * i, y0=0.0, width0=1024.0, height0=700.0 if i == 3 else 1024.0) for i in range(4))
    acc = QcAccumulator(4096, 1024, 0.25, QcConfig(), np.full(3, 245.0, np.float32))
    together = acc.measure_batch(tiles, pixels)
    for tile, measured in zip(tiles, together, strict=True):
        alone = acc.measure(tile.x, tile.y, pixels[tile.col, : tile.height, : tile.width])
        assert measured is not None and alone is not None
        assert (measured.n_rows, measured.n_cols) == (tile.height // acc.cell, 1024 // acc.cell)
        for name in ("sums", "tissue", "clipped", "dense"):
            np.testing.assert_array_equal(getattr(measured, name), getattr(alone, name), err_msg=name)

def test_samples_measured_later_in_stacks_fill_the_grid_as_tiles_measured_one_by_one() -> None:
    # the readers only sample each batch; the detector loop measures the samples many tiles at a time while
    # the detector runs (QcAccumulator.measure_pending), and the grid and the stain samples come out as if
    # each tile had been measured alone, in the stream's order, an edge tile measured at once included
    from edge.wsi.tiling import Tile

    rng = np.random.default_rng(8)
    texture = ndimage.gaussian_filter(rng.uniform(0, 1, (6, 1024, 1024)), (0, 1.5, 1.5))
    pixels = np.clip(235 - 170 * texture[..., None] * np.array([0.6, 1.0, 0.35]), 0, 255).astype(np.uint8)
    pixels[5, :, 600:] = 255  # the last tile is 600 px wide (the slide's right edge)
    tiles = tuple(Tile(index=i, col=i % 3, row=i // 3, x=1024 * (i % 3), y=1024 * (i // 3),
                       width=600 if i == 5 else 1024, height=1024, x0=1024.0 * (i % 3), y0=1024.0 * (i // 3),
                       width0=600.0 if i == 5 else 1024.0, height0=1024.0) for i in range(6))
    glass = np.full(3, 240.0, np.float32)
    alone = QcAccumulator(2648, 2048, 0.25, QcConfig(), glass)
    for t in tiles:
        alone.add_tile(t.x, t.y, pixels[t.index, : t.height, : t.width])
    streamed = QcAccumulator(2648, 2048, 0.25, QcConfig(), glass)
    for batch in (slice(0, 2), slice(2, 4), slice(4, 6)):  # as the stream's batches, in order
        for item in streamed.sample_batch(tiles[batch], pixels[batch]):
            streamed.add(item)
        streamed.measure_pending(at_least=3)  # measures once three samples wait: after the 2nd batch
    assert len(streamed._pending) == 2  # tile 4's sample, and the edge tile measured at once queued behind it
    streamed.measure_pending()  # the rest, as slide_maps does when the stream ends
    for name in ("sums", "tissue", "clipped", "seen"):
        np.testing.assert_array_equal(getattr(streamed.grid, name), getattr(alone.grid, name), err_msg=name)
    np.testing.assert_array_equal(np.concatenate(streamed._samples), np.concatenate(alone._samples))


def test_optical_density_of_8_bit_pixels_is_the_formula_exactly() -> None:
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (64, 48, 3)).astype(np.uint8)
    glass = np.array([241.0, 236.0, 247.0], np.float32)
    np.testing.assert_array_equal(optical_density(rgb, glass), optical_density(rgb.astype(np.float32), glass))


# --- synthetic faults with truth, through `mitosis-edge analyze` -------------------------------------


def _analyze(slide: Path, out: Path, *extra: str) -> dict[str, Any]:
    result = run_cli("analyze", str(slide), "--out", str(out), *extra)
    assert result.returncode == 0, result.stderr
    assert "scan QC" in result.stdout
    return dict(json.loads((out / "result.json").read_text()))


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory, synth_slide: SynthFactory) -> tuple[Path, Path, dict[str, Any]]:
    slide = synth_slide(width=SIDE, height=SIDE, seed=7106, blur_regions=1, folds=1, pen_strokes=2)
    out = tmp_path_factory.mktemp("qc") / "faulty"
    return slide, out, _analyze(slide, out)


def test_planted_blur_folds_and_pen_are_found(faulty: tuple[Path, Path, dict[str, Any]]) -> None:
    slide, out, result = faulty
    truth = load_truth(slide.with_name(slide.stem + ".truth.json"))
    assert len(truth.faults.blur) == 1 and len(truth.faults.folds) == 1 and len(truth.faults.pen) == 2
    qc = result["qc"]
    assert qc["out_of_focus_fraction"] > 0.05 and qc["fold_regions"] >= 1 and qc["pen_regions"] >= 2
    assert qc["verdict"] in ("review", "rescan") and any("out of focus" in r for r in qc["reasons"])
    assert any("pen" in r for r in qc["reasons"])
    geojson = json.loads((out / "detections.geojson").read_text())
    regions = {f["properties"]["classification"]["name"] for f in geojson["features"]
               if f["geometry"]["type"] == "Polygon"}
    assert {"QC: out of focus", "QC: tissue fold", "QC: pen or dirt"} <= regions
    overlay = np.asarray(Image.open(out / "overlay.png").convert("RGB"))
    assert overlay.shape[0] > 100


def test_the_planted_blur_is_where_qc_says(faulty: tuple[Path, Path, dict[str, Any]]) -> None:
    slide, out, _ = faulty
    truth = load_truth(slide.with_name(slide.stem + ".truth.json"))
    blur = truth.faults.blur[0]
    geojson = json.loads((out / "detections.geojson").read_text())
    rings = [np.array(f["geometry"]["coordinates"][0]) for f in geojson["features"]
             if f["properties"]["classification"]["name"] == "QC: out of focus"]
    centre = np.concatenate(rings).mean(axis=0)
    assert math.hypot(centre[0] - blur.x_px, centre[1] - blur.y_px) < blur.radius_px


def test_a_blurred_hotspot_means_rescan(synth_slide: SynthFactory, tmp_path: Path) -> None:
    slide = synth_slide(width=SIDE, height=SIDE, seed=7102, blur_hotspot=True)
    qc = _analyze(slide, tmp_path / "out")["qc"]
    assert qc["verdict"] == "rescan", qc["reasons"]


def test_clean_slides_pass_and_qc_off_gives_the_same_scores(synth_slide: SynthFactory, tmp_path: Path) -> None:
    slide = synth_slide(width=SIDE, height=SIDE, seed=7103)
    with_qc = _analyze(slide, tmp_path / "on")
    assert with_qc["qc"]["verdict"] == "pass", with_qc["qc"]["reasons"]
    config = tmp_path / "off.toml"
    config.write_text("[qc]\nenabled = false\n")
    result = run_cli("--config", str(config), "analyze", str(slide), "--out", str(tmp_path / "off"))
    assert result.returncode == 0, result.stderr
    assert "scan QC" not in result.stdout
    without = json.loads((tmp_path / "off" / "result.json").read_text())
    assert "qc" not in without
    assert without["scores"] == with_qc["scores"] and without["figures"] == with_qc["figures"]


def test_a_clean_slide_of_smooth_diagonal_muscle_passes(synth_slide: SynthFactory, tmp_path: Path) -> None:
    # Seed 6202 has an island of smooth muscle whose fibres run diagonally: measured along rows and
    # columns only, it read 4.2% out of focus and the clean slide got `review`.
    slide = synth_slide(width=4096, height=4096, seed=6202)
    qc = _analyze(slide, tmp_path / "out")["qc"]
    assert qc["verdict"] == "pass" and qc["out_of_focus_fraction"] == 0.0, qc["reasons"]


def test_the_sharp_tissue_hotspot_is_reported_beside_the_plain_one(synth_slide: SynthFactory, tmp_path: Path) -> None:
    slide = synth_slide(width=SIDE, height=SIDE, seed=7102, blur_hotspot=True)
    config = tmp_path / "sharp.toml"
    config.write_text("[qc]\nhotspot_excludes_blur = true\n")
    result = run_cli("--config", str(config), "analyze", str(slide), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    qc = json.loads((tmp_path / "out" / "result.json").read_text())["qc"]
    sharp = qc["sharp_hotspot"]
    assert sharp["out_of_focus_fraction"] < qc["hotspot"]["out_of_focus_fraction"]
    assert "best field among sharp tissue" in result.stdout


def test_synth_records_a_stain_shift_in_its_truth(synth_slide: SynthFactory) -> None:
    plain = load_truth(synth_slide(width=1024, height=1024, seed=9).with_suffix(".truth.json"))
    shifted = load_truth(synth_slide(width=1024, height=1024, seed=9, stain_shift=10.0).with_suffix(".truth.json"))
    assert shifted.faults.stain_shift_deg == 10.0
    assert angle_deg(plain.faults.eosin_od, shifted.faults.eosin_od) == pytest.approx(10.0, abs=0.5)
    assert plain.faults.hematoxylin_od == shifted.faults.hematoxylin_od


def test_shift_eosin_and_disc_mask_are_exact() -> None:
    h, e = np.array([0.6, 0.8, 0.3]), np.array([0.1, 0.9, 0.4])
    assert angle_deg(e, shift_eosin(h, e, 12.0)) == pytest.approx(12.0)
    from edge.devtools.synth.faults import BlurRegion

    mask = disc_mask((BlurRegion(0, 50.0, 50.0, 20.0, 2.0),), (10, 10), (10.0, 10.0))
    assert mask[5, 5] and not mask[0, 0] and mask.sum() == 12


# --- real slides ---------------------------------------------------------------------------------


def test_a_real_slide_in_focus_passes_and_names_its_scanner(tmp_path: Path) -> None:
    result = _analyze(data_file("wsi/CMU-1-Small-Region.svs"), tmp_path / "out")
    qc = result["qc"]
    assert qc["verdict"] == "pass", qc["reasons"]
    assert qc["out_of_focus_fraction"] < 0.01 and qc["focus_median"] < 0.4
    # Its dense epidermis lining a keratin-filled space reads like doubled tissue: outlined, under the review line.
    assert qc["fold_fraction"] < QcConfig().review_fold_fraction
    assert result["slide"]["scanner"] == {"vendor": "aperio", "model": "unknown", "serial": "CPAPERIOCS",
                                          "id": "aperio/-/CPAPERIOCS"}


def test_qc_overhead_is_reported_by_bench_analyze(synth_slide: SynthFactory) -> None:
    slide = synth_slide(width=2048, height=2048, seed=7104)
    result = run_cli("bench", "analyze", str(slide), "--json", "--detector-seconds", "0.5", "--qc-runs", "2")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["qc_seconds"] > 0 and 0 < report["qc_share"] < 1
    assert report["end_to_end_seconds_without_qc"] > 0 and report["qc_overhead"] is not None
    assert report["qc_runs"] == 2 and report["qc_overhead_median"] is not None


def test_config_section_is_complete() -> None:
    names = {f.name for f in dataclasses.fields(QcConfig)}
    assert {"enabled", "hotspot_excludes_blur", "focus_threshold", "baseline_slides", "drift_run"} <= names
