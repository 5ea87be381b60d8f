"""The TensorRT engine, end to end over a fake TensorRT and a fake CUDA runtime: outputs equal ONNX Runtime's."""

from __future__ import annotations

import json
import logging
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edge.engines.base import Engine
from edge.engines.build import BuildOptions, build_plan, open_tensorrt_plans
from edge.engines.engineset import open_tensorrt_engines
from edge.engines.manifest import Bundle, ModelSpec, load_bundle
from edge.engines.plans import PlanRecord
from edge.engines.probe import GpuProbe
from edge.engines.tensorrt import TensorRTEngine, numpy_dtype
from edge.errors import BackendUnavailableError, ConfigError, EngineError, EngineInputError, PlanError
from tests.fake_cudart import FakeCudart, cudaError_t
from tests.fake_tensorrt import fake_probe, make_fake_trt, write_fp16_detector
from tests.tiny_bundle import make_tiny_bundle


@pytest.fixture
def bundle(tmp_path: Path) -> Bundle:
    return load_bundle(make_tiny_bundle(tmp_path / "tiny"))


@pytest.fixture
def cudart() -> FakeCudart:
    return FakeCudart()


def reference(path: Path, name: str, batch: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {name: batch}), strict=True))


def pixels(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def plan_for(
    model: ModelSpec, bundle: Bundle, tmp_path: Path, trt: Any, options: BuildOptions | None = None
) -> PlanRecord:
    return build_plan(
        model, bundle, options or BuildOptions(precision="fp32"), tmp_path / "plans", trt=trt, probe=fake_probe()
    )


def open_engine(record: PlanRecord, trt: Any, cudart: FakeCudart, **kw: Any) -> TensorRTEngine:
    return TensorRTEngine(record.plan_path, trt=trt, cudart=cudart, probe=fake_probe(), **kw)


@pytest.mark.parametrize("major", [10, 11])
def test_a_batch_runs_end_to_end_and_equals_onnx_runtime(
    bundle: Bundle, tmp_path: Path, cudart: FakeCudart, major: int
) -> None:
    trt = make_fake_trt(major, cudart=cudart)
    for model in (bundle.detector, bundle.classifiers[0]):
        with open_engine(plan_for(model, bundle, tmp_path, trt), trt, cudart) as engine:
            assert isinstance(engine, Engine) and engine.backend == "tensorrt" and engine.name == model.name
            assert engine.input_spec == model.input_spec
            assert [o.name for o in engine.output_spec] == list(model.output_names)
            assert engine.max_batch == (8 if model.role == "detector" else 64)
            batch = pixels((3, model.size, model.size, 3))
            got = engine.infer(batch)
            want = reference(model.path, model.input_name, batch)
            assert got.keys() == want.keys()
            for name in want:
                assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
                np.testing.assert_array_equal(got[name], want[name])
    assert cudart.live() == dict.fromkeys(cudart.live(), 0)


def test_outputs_are_owned_copies_sliced_to_the_batch(bundle: Bundle, tmp_path: Path, cudart: FakeCudart) -> None:
    trt = make_fake_trt(10, cudart=cudart)
    with open_engine(plan_for(bundle.classifiers[0], bundle, tmp_path, trt), trt, cudart, in_flight=1) as engine:
        first = engine.infer(pixels((5, 16, 16, 3), seed=1))
        kept = {k: v.copy() for k, v in first.items()}
        second = engine.infer(pixels((2, 16, 16, 3), seed=2))  # reuses the same pinned buffers
        assert first["mitotic"].shape == (5, 1) and second["mitotic"].shape == (2, 1)
        for name, value in kept.items():
            np.testing.assert_array_equal(first[name], value)


def test_two_batches_in_flight_overlap_and_come_back_in_order(
    bundle: Bundle, tmp_path: Path, cudart: FakeCudart
) -> None:
    trt = make_fake_trt(10, cudart=cudart)
    model = bundle.detector
    batches = [pixels((n, 32, 32, 3), seed=n) for n in (1, 4, 2, 8, 3)]
    with open_engine(plan_for(model, bundle, tmp_path, trt), trt, cudart, in_flight=2) as engine:
        first, second = engine.submit(batches[0]), engine.submit(batches[1])
        assert trt.stats["executions"] == 0  # queued on two streams; submit waited for nothing
        assert not first.done() and not second.done()  # (the fake GPU runs queued work when polled)
        rest = [engine.submit(b) for b in batches[2:]]  # the third waits for the oldest (slot 0), and so on
        pendings = [first, second, *rest]
        results = [p.result(timeout=5) for p in reversed(pendings)][::-1]  # collect in any order
    for batch, got in zip(batches, results, strict=True):
        np.testing.assert_array_equal(got["raw"], reference(model.path, "tiles", batch)["raw"])
    assert trt.stats["executions"] == len(batches)


def test_results_can_be_collected_on_another_thread(bundle: Bundle, tmp_path: Path, cudart: FakeCudart) -> None:
    trt = make_fake_trt(11, cudart=cudart)
    model = bundle.classifiers[1]
    batches = [pixels((4, 16, 16, 3), seed=s) for s in range(6)]
    handoff: queue.Queue[Any] = queue.Queue()
    collected: list[dict[str, np.ndarray]] = []

    def collect() -> None:
        while (pending := handoff.get()) is not None:
            collected.append(pending.result(timeout=5))

    with open_engine(plan_for(model, bundle, tmp_path, trt), trt, cudart) as engine:
        worker = threading.Thread(target=collect, name="collector")
        worker.start()
        try:
            for batch in batches:
                handoff.put(engine.submit(batch))
        finally:
            handoff.put(None)
            worker.join(timeout=10)
    for batch, got in zip(batches, collected, strict=True):
        np.testing.assert_array_equal(got["mitotic"], reference(model.path, "crops", batch)["mitotic"])


def test_bad_batches_are_refused(bundle: Bundle, tmp_path: Path, cudart: FakeCudart) -> None:
    trt = make_fake_trt(10, cudart=cudart)
    with open_engine(plan_for(bundle.detector, bundle, tmp_path, trt), trt, cudart) as engine:
        with pytest.raises(EngineInputError, match=r"batch of 9 is outside 1..max_batch=8"):
            engine.submit(pixels((9, 32, 32, 3)))
        with pytest.raises(EngineInputError, match="must be uint8, got float32"):
            engine.infer(np.zeros((1, 32, 32, 3), np.float32))
        with pytest.raises(EngineInputError, match=r"got \(1, 16, 32, 3\) \(axis 1\)"):
            engine.infer(np.zeros((1, 16, 32, 3), np.uint8))
        assert engine.infer(pixels((8, 32, 32, 3)))["raw"].shape == (8, 512, 6)
    with pytest.raises(PlanError, match=r"max_batch=16 is more than plan .* allows \(8"):
        open_engine(plan_for(bundle.detector, bundle, tmp_path, trt), trt, cudart, max_batch=16)
    with open_engine(plan_for(bundle.detector, bundle, tmp_path, trt), trt, cudart, max_batch=2) as small:
        assert small.max_batch == 2


def test_a_plan_built_for_another_gpu_is_refused_with_the_rebuild_command(
    bundle: Bundle, tmp_path: Path, cudart: FakeCudart
) -> None:
    trt = make_fake_trt(10, cudart=cudart)
    record = plan_for(bundle.detector, bundle, tmp_path, trt)
    other_gpu = fake_probe(name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    with pytest.raises(PlanError) as info:
        TensorRTEngine(record.plan_path, trt=trt, cudart=cudart, probe=other_gpu)
    assert (
        "does not fit this machine: built for compute capability 8.9 (NVIDIA Fake GPU), this GPU is NVIDIA H100"
        in str(info.value)
    )
    assert info.value.command == record.sidecar["build_command"]
    assert info.value.command.startswith("mitosis-edge engines build --bundle ")
    assert "; rebuild with: mitosis-edge engines build" in str(info.value)


def test_a_plan_from_another_tensorrt_version_is_refused(bundle: Bundle, tmp_path: Path, cudart: FakeCudart) -> None:
    record = plan_for(bundle.detector, bundle, tmp_path, make_fake_trt(10, version="10.13.3.9", cudart=cudart))
    newer = make_fake_trt(10, version="10.14.1.48", cudart=cudart)
    with pytest.raises(PlanError, match=r"TensorRT 10\.13\.3\.9 built it, this machine has TensorRT 10\.14\.1\.48"):
        open_engine(record, newer, cudart)
    record.sidecar_path.unlink()  # without a sidecar, TensorRT itself refuses the plan
    with pytest.raises(PlanError) as info:
        open_engine(record, newer, cudart, rebuild_command="mitosis-edge engines build --bundle x")
    assert "could not deserialize plan" in str(info.value) and "expecting library version 10.14.1.48" in str(info.value)
    assert info.value.command == "mitosis-edge engines build --bundle x"
    assert cudart.live() == dict.fromkeys(cudart.live(), 0)


def test_a_version_compatible_plan_loads_on_a_later_tensorrt(
    bundle: Bundle, tmp_path: Path, cudart: FakeCudart
) -> None:
    options = BuildOptions(precision="fp32", version_compatible=True)
    record = plan_for(bundle.detector, bundle, tmp_path, make_fake_trt(10, version="10.13.3.9"), options)
    newer = make_fake_trt(10, version="10.14.1.48", cudart=cudart)
    with open_engine(record, newer, cudart) as engine:
        batch = pixels((2, 32, 32, 3))
        want = reference(bundle.detector.path, "tiles", batch)["raw"]
        np.testing.assert_array_equal(engine.infer(batch)["raw"], want)


def test_undeserializable_bytes_are_a_plan_error(tmp_path: Path, cudart: FakeCudart) -> None:
    plan = tmp_path / "broken.plan"
    plan.write_bytes(b"\x00not a plan at all")
    with pytest.raises(PlanError, match=r"could not deserialize plan .*Magic tag does not match"):
        open_engine(PlanRecord(plan, {}, ""), make_fake_trt(11, cudart=cudart), cudart)
    with pytest.raises(PlanError, match="cannot read TensorRT plan"):
        open_engine(PlanRecord(tmp_path / "missing.plan", {}, ""), make_fake_trt(11, cudart=cudart), cudart)


def test_fp16_outputs_map_to_float16(bundle: Bundle, tmp_path: Path, cudart: FakeCudart) -> None:
    variant = write_fp16_detector(bundle.detector.path.with_name("detector.fp16.onnx"), 32)
    trt = make_fake_trt(11, cudart=cudart)
    record = plan_for(bundle.detector, bundle, tmp_path, trt, BuildOptions(precision="fp16"))
    with open_engine(record, trt, cudart) as engine:
        assert engine.output_spec[0].dtype == "float16"
        batch = pixels((3, 32, 32, 3))
        got = engine.infer(batch)["raw"]
    want = reference(variant, "tiles", batch)["raw"]
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, want)
    with pytest.raises(EngineError, match="has no numpy equivalent"):
        numpy_dtype(trt, trt.DataType.BF16)


def test_cuda_graphs_are_captured_after_a_first_run_and_replayed(
    bundle: Bundle, tmp_path: Path, cudart: FakeCudart
) -> None:
    trt = make_fake_trt(10, cudart=cudart)
    model = bundle.classifiers[0]
    with open_engine(plan_for(model, bundle, tmp_path, trt), trt, cudart, cuda_graphs=True, in_flight=1) as engine:
        for seed in range(4):
            batch = pixels((3, 16, 16, 3), seed=seed)
            got = engine.infer(batch)
            np.testing.assert_array_equal(got["atypical"], reference(model.path, "crops", batch)["atypical"])
        assert cudart.calls["cudaStreamBeginCapture"] == 1  # captured once, on the second run
        assert cudart.calls["cudaGraphLaunch"] == 3
        engine.infer(pixels((5, 16, 16, 3)))  # a new batch shape runs plainly first
        assert cudart.calls["cudaGraphLaunch"] == 3
    assert cudart.live() == dict.fromkeys(cudart.live(), 0)


def test_a_failed_graph_capture_falls_back_to_plain_launches(
    bundle: Bundle, tmp_path: Path, cudart: FakeCudart, caplog: pytest.LogCaptureFixture
) -> None:
    trt = make_fake_trt(11, cudart=cudart)
    model = bundle.detector
    cudart.fail_always["cudaStreamBeginCapture"] = cudaError_t.cudaErrorStreamCaptureUnsupported
    with (
        open_engine(plan_for(model, bundle, tmp_path, trt), trt, cudart, cuda_graphs=True, in_flight=1) as engine,
        caplog.at_level(logging.WARNING, logger="edge.engines.tensorrt"),
    ):
        for seed in range(3):
            batch = pixels((2, 32, 32, 3), seed=seed)
            np.testing.assert_array_equal(engine.infer(batch)["raw"], reference(model.path, "tiles", batch)["raw"])
    assert cudart.calls["cudaStreamBeginCapture"] == 1  # tried once per shape, then plain launches
    assert "CUDA graph capture for batch 2 failed, using plain launches" in caplog.text
    assert "cudaErrorStreamCaptureUnsupported" in caplog.text


def test_close_finishes_batches_in_flight_and_is_idempotent(bundle: Bundle, tmp_path: Path, cudart: FakeCudart) -> None:
    trt = make_fake_trt(10, cudart=cudart)
    engine = open_engine(plan_for(bundle.detector, bundle, tmp_path, trt), trt, cudart)
    batch = pixels((2, 32, 32, 3))
    pending = engine.submit(batch)
    engine.close()
    engine.close()
    assert "closed" in repr(engine)
    assert pending.done()
    np.testing.assert_array_equal(pending.result()["raw"], reference(bundle.detector.path, "tiles", batch)["raw"])
    with pytest.raises(EngineError, match="engine 'detector' is closed"):
        engine.submit(batch)
    assert cudart.live() == dict.fromkeys(cudart.live(), 0)


def test_a_failed_launch_is_an_engine_error(bundle: Bundle, tmp_path: Path, cudart: FakeCudart) -> None:
    trt = make_fake_trt(10, cudart=cudart)
    with open_engine(plan_for(bundle.detector, bundle, tmp_path, trt), trt, cudart) as engine:
        cudart.fail["cudaMemcpyAsync"] = cudaError_t.cudaErrorIllegalAddress
        with pytest.raises(EngineError, match=r"cudaMemcpyAsync .* failed: cudaErrorIllegalAddress"):
            engine.infer(pixels((1, 32, 32, 3)))
        assert engine.infer(pixels((1, 32, 32, 3)))["raw"].shape == (1, 512, 6)  # the engine stays usable


def test_without_a_gpu_tensorrt_is_never_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_import(*args: Any, **kw: Any) -> Any:
        raise AssertionError("tensorrt must not be imported without a GPU")

    monkeypatch.setattr("edge.engines.tensorrt.load_tensorrt", no_import)
    with pytest.raises(BackendUnavailableError, match="no usable NVIDIA GPU: no GPU: cuInit failed"):
        TensorRTEngine(tmp_path / "x.plan", probe=GpuProbe(ok=False, reason="no GPU: cuInit failed"))


def test_open_tensorrt_plans_builds_what_is_missing_and_rebuilds_a_damaged_plan(
    bundle: Bundle, tmp_path: Path, cudart: FakeCudart
) -> None:
    trt = make_fake_trt(11, cudart=cudart)
    options = BuildOptions(precision="fp32")
    engines = open_tensorrt_plans(bundle, options, tmp_path, trt=trt, cudart=cudart, probe=fake_probe())
    try:
        assert list(engines) == ["detector", "a", "b"] and trt.stats["builds"] == 3
    finally:
        for engine in engines.values():
            engine.close()
    damaged = engines["a"].plan_path
    sidecar = json.loads(damaged.with_suffix(".json").read_text())
    damaged.write_bytes(b"garbage".ljust(sidecar["plan_bytes"], b"\x00"))  # same size: only loading finds out
    with pytest.raises(PlanError, match="could not deserialize"):
        open_tensorrt_plans(bundle, options, tmp_path, on_missing="fail", trt=trt, cudart=cudart, probe=fake_probe())
    engines = open_tensorrt_plans(bundle, options, tmp_path, trt=trt, cudart=cudart, probe=fake_probe())
    for engine in engines.values():
        engine.close()
    assert trt.stats["builds"] == 4
    assert cudart.live() == dict.fromkeys(cudart.live(), 0)


def test_open_tensorrt_engines_gives_the_engine_set_open_engines_returns(
    bundle: Bundle, tmp_path: Path, cudart: FakeCudart
) -> None:
    from edge.config import EnginesConfig

    trt = make_fake_trt(10, cudart=cudart)
    config = EnginesConfig(backend="tensorrt", precision="fp32", plan_cache=str(tmp_path / "plans"))
    with pytest.raises(PlanError, match="no TensorRT plan for tiny/detector"):
        open_tensorrt_engines(
            bundle,
            EnginesConfig(backend="tensorrt", plan_cache=str(tmp_path / "plans"), on_missing_plan="fail"),
            trt=trt,
            cudart=cudart,
            probe=fake_probe(),
        )
    with pytest.raises(ConfigError, match=r"sends 16 tiles per batch .* take at most 8"):
        open_tensorrt_engines(bundle, config, detector_batch=16, trt=trt, cudart=cudart, probe=fake_probe())
    with open_tensorrt_engines(bundle, config, detector_batch=4, trt=trt, cudart=cudart, probe=fake_probe()) as engines:
        assert engines.backend == "tensorrt" and engines.detector.name == "detector"
        assert sorted(engines.classifiers) == ["a", "b"] and set(engines.plan_keys) == {"detector", "a", "b"}
        assert all(len(k) == 64 for k in engines.plan_keys.values())
        assert (tmp_path / "plans" / "timing.cache").is_file()
    assert cudart.live() == dict.fromkeys(cudart.live(), 0)


def test_gpu_times_are_measured_with_events(bundle: Bundle, tmp_path: Path, cudart: FakeCudart) -> None:
    trt = make_fake_trt(10, cudart=cudart)
    with open_engine(plan_for(bundle.detector, bundle, tmp_path, trt), trt, cudart) as engine:
        pending = engine.submit(pixels((2, 32, 32, 3)))
        times = engine.gpu_times_ms(pixels((8, 32, 32, 3)), repeats=3)
        assert len(times) == 3 and all(t >= 0 for t in times)
        assert pending.result()["raw"].shape == (2, 512, 6)  # collected before timing, still readable
        assert cudart.calls["cudaEventRecord"] == 6
    assert cudart.live() == dict.fromkeys(cudart.live(), 0)
