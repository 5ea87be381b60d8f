"""The demo bundle (engines/demo): it loads cleanly, its detector finds the mitoses planted in a
synthetic slide it never saw, its classifiers score mitoses above imposters, and the training
script that made it still runs (a quick smoke run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.analysis.detect import decode
from edge.devtools.synth import default_truth_path, load_truth
from edge.engines.manifest import Bundle, load_bundle
from edge.wsi.slide import open_slide

from .conftest import SynthFactory

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "engines" / "demo"
MATCH_RADIUS_UM = 7.5  # a detection this close to a planted mitosis finds it
# Seeds 1001+, 2001+ and 3001+ made the bundle (train / validation / test); this one is unseen.
UNSEEN = {"width": 2048, "height": 2048, "seed": 23, "mitoses": 12, "imposters": 12}


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return load_bundle(DEMO)


def session(path: Path) -> Any:
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_demo_bundle_loads_with_no_problems(bundle: Bundle) -> None:
    assert bundle.name == "demo"
    assert "not for diagnosis" in bundle.intended_use.lower()
    assert bundle.detector.output_format == "yolo_raw"
    assert bundle.detector.size == 1024 and bundle.detector.mpp == 0.25
    assert len(bundle.classifiers) == 2
    assert all(c.atypical is not None for c in bundle.classifiers)
    assert bundle.model_card is not None and bundle.model_card.is_file()
    for model in bundle.models:
        assert model.path.stat().st_size < 5_000_000, f"{model.path.name} should stay small"


def test_detector_finds_the_planted_mitoses_of_an_unseen_slide(bundle: Bundle, synth_slide: SynthFactory) -> None:
    path = synth_slide(**UNSEEN)
    truth = load_truth(default_truth_path(path))
    detector = session(bundle.detector.path)
    size = bundle.detector.size
    # Tiles every 512 px: every point of the slide lies well inside at least one of them.
    origins = [(x, y) for y in (0, 512, 1024) for x in (0, 512, 1024)]
    found = []
    with open_slide(path) as slide:
        scale = slide.read_scale(bundle.detector.mpp)
        tiles = np.stack([slide.read_region(x, y, size, size, scale) for x, y in origins])
    for i in range(0, len(tiles), 4):
        (rows,) = detector.run([bundle.detector.output], {bundle.detector.input_name: tiles[i : i + 4]})
        for (x, y), tile_rows in zip(origins[i : i + 4], rows, strict=True):
            boxes = decode(tile_rows, bundle.detector)
            found.append(np.stack([boxes.cx, boxes.cy], axis=1) + np.array([x, y]))
    centres = np.concatenate(found)
    radius_px = MATCH_RADIUS_UM / truth.mpp
    mitoses = [o for o in truth.objects if o.is_mitosis]
    hits = [np.hypot(*(centres - (o.x_px, o.y_px)).T).min() <= radius_px for o in mitoses]
    assert len(mitoses) == UNSEEN["mitoses"]
    missed = [o for o, hit in zip(mitoses, hits, strict=True) if not hit]
    assert np.mean(hits) >= 0.9, f"recall {np.mean(hits):.2f}: missed {missed}"
    # Candidates far from every planted object (mitosis or imposter) are few: a modest number per
    # 1024² tile (one figure seen by overlapping tiles counts once).
    planted = np.array([(o.x_px, o.y_px) for o in truth.objects])
    stray = [c for c in centres if np.hypot(*(planted - c).T).min() > radius_px]
    distinct: list[np.ndarray] = []
    for c in stray:
        if all(np.hypot(*(c - d)) > radius_px for d in distinct):
            distinct.append(c)
    tile_areas = UNSEEN["width"] * UNSEEN["height"] / size**2
    assert len(distinct) <= 5 * tile_areas, f"{len(distinct)} candidates away from any planted object"


def test_classifiers_score_mitoses_above_imposters(bundle: Bundle, synth_slide: SynthFactory) -> None:
    path = synth_slide(**UNSEEN)
    truth = load_truth(default_truth_path(path))
    for spec in bundle.classifiers:
        classifier = session(spec.path)
        with open_slide(path) as slide:
            scale = slide.read_scale(spec.mpp)
            crops = np.stack([
                slide.read_region(o.x_px - spec.size / 2, o.y_px - spec.size / 2, spec.size, spec.size, scale)
                for o in truth.objects
            ])
        (logits,) = classifier.run([spec.mitotic.output], {spec.input_name: crops})
        p = 1 / (1 + np.exp(-logits.reshape(-1)))
        is_mf = np.array([o.is_mitosis for o in truth.objects])
        assert p[is_mf].mean() > p[~is_mf].mean() + 0.5, (
            f"{spec.name}: mean p(MF) {p[is_mf].mean():.2f} on mitoses vs {p[~is_mf].mean():.2f} on imposters"
        )


@pytest.mark.slow
def test_training_script_quick_run_writes_a_loadable_bundle(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="training needs torch: pip install -e '.[train]'")
    pytest.importorskip("onnx", reason="training needs onnx: pip install -e '.[train]'")
    out = tmp_path / "bundle"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train_demo_models.py"), "--quick", "--out", str(out),
         "--work", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=170, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "summary" in result.stderr
    quick = load_bundle(out)
    assert "QUICK" in quick.description
    assert {c.name for c in quick.classifiers} == {c.name for c in load_bundle(DEMO).classifiers}
    assert (out / "MODEL_CARD.md").is_file() and (out / "training_report.json").is_file()
