"""The two-stage pipeline's wiring, with fake engines whose answers are known: every tile's figure found
once, decisions applied, failures and cancel mid-way leave nothing running."""

from __future__ import annotations

import dataclasses
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile

from edge.analysis.pipeline import analyze_slide
from edge.config import Config, StreamConfig
from edge.engines import EngineSet, FakeEngine, load_bundle
from edge.errors import EngineError, SlideReadError, StreamCancelled, TileDecodeError
from tests.conftest import SynthFactory
from tests.tiny_bundle import make_tiny_bundle

TILE = 256


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("b") / "tiny", detector_size=TILE, crop_size=32)


def fake_engines(bundle_dir: Path, *, atypical_logit: float = 5.0, fail_after: int | None = None) -> EngineSet:
    """A detector that sees one figure at the centre of every tile; classifiers sure it is a mitosis."""
    bundle = load_bundle(bundle_dir)

    def detector(batch: np.ndarray) -> dict[str, np.ndarray]:
        row = np.array([TILE / 2, TILE / 2, 20.0, 20.0, 0.9, 1.0], np.float32)
        return {"raw": np.tile(row, (len(batch), 1, 1))}

    def classifier(batch: np.ndarray) -> dict[str, np.ndarray]:
        n = len(batch)
        return {"mitotic": np.full((n, 1), 5.0, np.float32), "atypical": np.full((n, 1), atypical_logit, np.float32)}

    det_spec = bundle.detector
    engines = EngineSet(
        bundle,
        FakeEngine(det_spec.input_spec, (), detector, name="detector", max_batch=8, fail_after=fail_after),
        {c.name: FakeEngine(c.input_spec, (), classifier, name=c.name, max_batch=64) for c in bundle.classifiers},
        backend="fake",
    )
    return engines


def _config(bundle_dir: Path) -> Config:
    return Config(stream=StreamConfig(reader_threads=2, batch_size=4))


def test_every_tile_figure_is_found_once_classified_and_scored(bundle_dir: Path, synth_slide: SynthFactory) -> None:
    path = synth_slide(width=2048, height=1536, seed=3)
    stages: dict[str, tuple[int, int]] = {}
    with fake_engines(bundle_dir) as engines:
        analysis = analyze_slide(path, _config(bundle_dir), engines=engines,
                                 progress=lambda s, d, t: stages.__setitem__(s, (d, t)))
    plan = analysis.slide_plan.plan
    result = analysis.result
    expected = {(t.x0 + TILE / 2 * plan.px0_per_out_x, t.y0 + TILE / 2 * plan.px0_per_out_y) for t in plan.tiles}
    assert {(f.x_px, f.y_px) for f in result.figures} == expected
    assert all(f.is_mitotic and f.subtype == "atypical" for f in result.figures)
    assert result.scores.totals.mitotic == len(plan) == analysis.tiles
    assert result.scores.totals.atypical_ratio is None  # no normal figures: undefined, not a division error
    assert stages["detect"] == (len(plan), len(plan)) and stages["classify"][0] == stages["classify"][1]
    assert result.provenance["backend"] == "fake" and result.provenance["bundle"]["name"] == "tiny"
    timings = result.provenance["timings_s"]
    assert list(timings) == ["plan", "read", "read_wait", "detect", "decode", "crops", "classify", "score", "total"]
    assert timings == analysis.times.to_dict() and all(v >= 0 for v in timings.values())
    assert timings["total"] > 0 and timings["detect"] + timings["classify"] <= timings["total"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        analysis.times.total = 0.0  # type: ignore[misc]
    assert all(f.scores.keys() == {"mitotic:a", "mitotic:b", "atypical:a", "atypical:b"} for f in result.figures)


def test_uncertain_subtypes_stay_out_of_the_ratio(bundle_dir: Path, synth_slide: SynthFactory) -> None:
    with fake_engines(bundle_dir, atypical_logit=0.0) as engines:  # p(atypical) = 0.5: uncertain
        result = analyze_slide(synth_slide(width=2048, height=1536, seed=3), _config(bundle_dir),
                               engines=engines).result
    totals = result.scores.totals
    assert totals.uncertain == totals.mitotic > 0 and totals.atypical == totals.normal == 0


def test_an_engine_failing_mid_slide_raises_and_leaves_no_thread(bundle_dir: Path, synth_slide: SynthFactory) -> None:
    engines = fake_engines(bundle_dir, fail_after=2)
    with pytest.raises(EngineError, match="simulated failure on batch 3"):
        analyze_slide(synth_slide(width=2048, height=1536, seed=3), _config(bundle_dir), engines=engines)


def test_a_slide_whose_reads_fail_half_way_names_the_tile(
    bundle_dir: Path, synth_slide: SynthFactory, tmp_path: Path
) -> None:
    path = tmp_path / "damaged.tiff"
    shutil.copy(synth_slide(width=2048, height=1536, seed=3), path)
    with fake_engines(bundle_dir) as engines:  # a stored tile under the middle tissue tile of the plan
        tiles = analyze_slide(path, _config(bundle_dir), engines=engines).slide_plan.plan.tiles
    middle = tiles[len(tiles) // 2]
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
        across = -(-page.imagewidth // page.tilewidth)
        victim = int(middle.y0 + TILE // 2) // page.tilelength * across + int(middle.x0 + TILE // 2) // page.tilewidth
    with path.open("r+b") as fh:
        fh.seek(offsets[victim])
        fh.write(b"\x00\x13" * (counts[victim] // 2))
    with fake_engines(bundle_dir) as engines, pytest.raises(TileDecodeError) as err:
        analyze_slide(path, _config(bundle_dir), engines=engines)
    assert str(path) in str(err.value)


def test_cancel_stops_the_analysis(bundle_dir: Path, synth_slide: SynthFactory) -> None:
    cancel = threading.Event()

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "detect" and done > 0:
            cancel.set()

    with fake_engines(bundle_dir) as engines, pytest.raises(StreamCancelled):
        analyze_slide(synth_slide(width=2048, height=1536, seed=3), _config(bundle_dir), engines=engines,
                      cancel_event=cancel, progress=progress)


def test_a_slide_far_coarser_than_the_models_is_refused(bundle_dir: Path, synth_slide: SynthFactory) -> None:
    with fake_engines(bundle_dir) as engines, pytest.raises(SlideReadError, match="too coarse for the detector"):
        analyze_slide(synth_slide(width=1024, height=1024, mpp=1.0, seed=3), _config(bundle_dir), engines=engines)


def test_crops_cut_from_the_tile_in_memory_match_crops_read_from_the_slide(
    bundle_dir: Path, synth_slide: SynthFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The classifiers see the same pixels whether a crop is cut from the detector's tile or read again."""
    import edge.analysis.pipeline as pipeline

    path = synth_slide(width=2048, height=1536, seed=3)
    seen: dict[bool, list[np.ndarray]] = {True: [], False: []}
    original = pipeline._Candidates._crops

    def recording(self: pipeline._Candidates, group: pipeline._CropGroup, *args: object) -> np.ndarray:
        crops = original(self, group, *args)  # type: ignore[arg-type]
        seen[group.from_tiles].append(crops)
        return crops

    monkeypatch.setattr(pipeline._Candidates, "_crops", recording)
    with fake_engines(bundle_dir) as engines:
        analyze_slide(path, _config(bundle_dir), engines=engines)
        init = pipeline._Candidates.__init__

        def from_the_slide(self: pipeline._Candidates, *args: object) -> None:
            init(self, *args)  # type: ignore[arg-type]
            for group in self.groups:
                group.from_tiles = False

        monkeypatch.setattr(pipeline._Candidates, "__init__", from_the_slide)
        analyze_slide(path, _config(bundle_dir), engines=engines)
    cut, read = np.concatenate(seen[True]), np.concatenate(seen[False])
    assert len(cut) == len(read) > 0
    assert np.array_equal(cut, read)


def add_members(bundle_dir: Path, folder: Path, members: str, atypical_heads: str) -> Path:
    """A copy of the tiny bundle with more [[classifier]] tables (TOML, ``{sha}`` = clf_a.onnx's sha256)."""
    from edge.engines.manifest import sha256_file

    shutil.copytree(bundle_dir, folder)
    manifest = folder / "manifest.toml"
    text = manifest.read_text().replace('atypical_heads = ["a", "b"]', f"atypical_heads = {atypical_heads}")
    members = members.replace("{sha}", sha256_file(folder / "clf_a.onnx"))
    manifest.write_text(text.replace("[decision]", members + "\n[decision]"))
    return folder


ATYPICAL_ONLY = """
[[classifier]]
name = "amf"
file = "clf_a.onnx"
sha256 = "{sha}"
input = "crops"
size = 32
mpp = 0.25
atypical_output = "atypical"
scores = "logits"

[[classifier]]
name = "unused"
file = "clf_a.onnx"
sha256 = "{sha}"
input = "crops"
size = 32
mpp = 0.25
weight = 0
mitotic_output = "mitotic"
"""


def test_an_atypical_only_member_subtypes_only_the_figures_that_passed_the_mf_vote(
    bundle_dir: Path, synth_slide: SynthFactory, tmp_path: Path
) -> None:
    bundle = load_bundle(add_members(bundle_dir, tmp_path / "amf", ATYPICAL_ONLY, '["amf"]'))
    amf = bundle.model("amf")
    assert [c.name for c in bundle.mitotic_voters] == ["a", "b"] and amf.weight == 0  # type: ignore[attr-defined]
    assert [c.name for c in bundle.subtype_only] == ["amf"]
    assert [c.name for c in bundle.unused_classifiers] == ["unused"]
    seen: list[int] = []

    def voter(batch: np.ndarray) -> dict[str, np.ndarray]:  # every other candidate is a mitosis
        logit = np.where(np.arange(len(batch)) % 2 == 0, 5.0, -5.0).astype(np.float32)[:, None]
        return {"mitotic": logit, "atypical": np.full((len(batch), 1), -5.0, np.float32)}

    def subtyper(batch: np.ndarray) -> dict[str, np.ndarray]:
        seen.append(len(batch))
        return {"mitotic": np.zeros((len(batch), 1), np.float32), "atypical": np.full((len(batch), 1), 5.0, np.float32)}

    def never(batch: np.ndarray) -> dict[str, np.ndarray]:
        raise AssertionError("a member with MF weight 0 and no atypical head in use must not run")

    def detector(batch: np.ndarray) -> dict[str, np.ndarray]:
        return {"raw": np.tile(np.array([TILE / 2, TILE / 2, 20.0, 20.0, 0.9, 1.0], np.float32), (len(batch), 1, 1))}

    fns = {"a": voter, "b": voter, "amf": subtyper, "unused": never}
    engines = EngineSet(
        bundle,
        FakeEngine(bundle.detector.input_spec, (), detector, name="detector", max_batch=8),
        {c.name: FakeEngine(c.input_spec, (), fns[c.name], name=c.name, max_batch=64) for c in bundle.classifiers},
        backend="fake",
    )
    config = Config(stream=StreamConfig(reader_threads=2, batch_size=4))
    config = dataclasses.replace(config, engines=dataclasses.replace(config.engines, classifier_batch=8))
    with engines:
        result = analyze_slide(synth_slide(width=4096, height=3072, seed=3), config, engines=engines).result
    mitoses = [f for f in result.figures if f.is_mitotic]
    others = [f for f in result.figures if not f.is_mitotic]
    assert mitoses and others
    assert sum(seen) == len(mitoses) and len(seen) < len(mitoses) and max(seen) <= 8  # batched, MF only
    assert all(f.subtype == "atypical" and f.scores["atypical:amf"] > 0.99 for f in mitoses)
    assert all("atypical:amf" not in f.scores and f.p_atypical is None for f in others)
    assert all(not any(k.endswith(("amf", "unused")) for k in f.scores if k.startswith("mitotic:")) for f in mitoses)
    assert result.provenance["bundle"]["ensemble"] == {
        "mitotic_voters": {"a": 0.5, "b": 0.5}, "subtypers": ["amf"], "subtype_only": ["amf"], "not_run": ["unused"],
    }
