"""Building TensorRT plans and the plan cache, against fake TensorRT 10 and 11 modules."""

from __future__ import annotations

import inspect
import json
import logging
import shlex
from pathlib import Path
from typing import Any

import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper

from edge import __version__
from edge.engines.build import (
    BuildOptions,
    build_bundle,
    build_command,
    build_options,
    build_plan,
    ensure_plans,
    find_plan,
    machine_info,
)
from edge.engines.manifest import Bundle, load_bundle
from edge.engines.plans import (
    MachineInfo,
    cache_key,
    list_plans,
    plan_matches_machine,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)
from edge.engines.probe import GpuProbe
from edge.errors import BackendUnavailableError, ConfigError, EngineError, PlanError
from tests.fake_tensorrt import fake_plan_header, fake_probe, make_fake_trt, write_fp16_detector, write_qdq_detector
from tests.tiny_bundle import make_tiny_bundle

# The fields of ARCHITECTURE.md's "Engine cache key", in order.
KEY_FIELDS = (
    "onnx_sha256",
    "precision_recipe",
    "profile_shapes",
    "builder_flags",
    "hardware_compat",
    "version_compatible",
    "tensorrt_version",
    "cuda_major",
    "compute_capability",
    "gpu_name",
)
BASE_KEY: dict[str, Any] = {
    "onnx_sha256": "a" * 64,
    "precision_recipe": "fp16/builder-flags/model",
    "profile_shapes": {"tiles": [[1, 32, 32, 3], [4, 32, 32, 3], [8, 32, 32, 3]]},
    "builder_flags": ["FP16"],
    "hardware_compat": "none",
    "version_compatible": False,
    "tensorrt_version": "10.13.3.9",
    "cuda_major": 12,
    "compute_capability": "8.9",
    "gpu_name": "NVIDIA L4",
}
CHANGED: dict[str, Any] = {
    "onnx_sha256": "b" * 64,
    "precision_recipe": "fp16/strongly-typed/fp16-onnx",
    "profile_shapes": {"tiles": [[1, 32, 32, 3], [4, 32, 32, 3], [16, 32, 32, 3]]},
    "builder_flags": ["INT8"],
    "hardware_compat": "ampere+",
    "version_compatible": True,
    "tensorrt_version": "10.14.1.48",
    "cuda_major": 13,
    "compute_capability": "9.0",
    "gpu_name": "NVIDIA L40S",
}


@pytest.fixture
def bundle(tmp_path: Path) -> Bundle:
    return load_bundle(make_tiny_bundle(tmp_path / "tiny"))


def trt_and_probe(major: int = 10, **probe: Any) -> tuple[Any, GpuProbe]:
    return make_fake_trt(major), fake_probe(**probe)


# -- the cache key ------------------------------------------------------------------------------


def test_cache_key_takes_exactly_the_architecture_fields() -> None:
    assert tuple(inspect.signature(cache_key).parameters) == KEY_FIELDS


@pytest.mark.parametrize("field", KEY_FIELDS)
def test_changing_any_key_field_changes_the_key(field: str) -> None:
    assert cache_key(**BASE_KEY) != cache_key(**{**BASE_KEY, field: CHANGED[field]})


@given(
    sha=st.text("0123456789abcdef", min_size=64, max_size=64),
    flags=st.lists(
        st.sampled_from(["FP16", "INT8", "-TF32", "network:STRONGLY_TYPED", "VERSION_COMPATIBLE"]), unique=True
    ),
    batches=st.tuples(st.integers(1, 4), st.integers(4, 8), st.integers(8, 128)),
    trt=st.from_regex(r"1[01]\.[0-9]{1,2}\.[0-9]\.[0-9]{1,2}", fullmatch=True),
    cc=st.sampled_from(["7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0"]),
)
def test_same_inputs_same_key_and_flag_order_does_not_matter(
    sha: str, flags: list[str], batches: tuple[int, int, int], trt: str, cc: str
) -> None:
    fields = {
        **BASE_KEY,
        "onnx_sha256": sha,
        "builder_flags": flags,
        "tensorrt_version": trt,
        "compute_capability": cc,
        "profile_shapes": {"x": [[b, 16, 16, 3] for b in batches]},
    }
    key = cache_key(**fields)
    assert len(key) == 64 and int(key, 16) >= 0
    assert cache_key(**fields) == key
    assert cache_key(**{**fields, "builder_flags": list(reversed(flags))}) == key
    assert cache_key(**{**fields, "onnx_sha256": sha.upper()}) == key  # hex case is not a difference
    other = {**fields, "profile_shapes": {"x": [[b + 1, 16, 16, 3] for b in batches]}}
    assert cache_key(**other) != key


# -- options -------------------------------------------------------------------------------------


def test_options_defaults_per_role_and_validation() -> None:
    options = BuildOptions()
    roles = (options.max_batch_for("detector"), options.max_batch_for("classifier"))
    assert (options.precision, *roles) == ("fp16", 8, 64)
    assert (options.opt_batch_for("detector"), options.opt_batch_for("classifier")) == (4, 32)
    assert BuildOptions(max_batch=1).opt_batch_for("detector") == 1
    for bad, message in [
        ({"precision": "fp8"}, "precision='fp8' must be one of fp32, fp16, int8"),
        ({"max_batch": -1}, "max_batch=-1 must be an integer >= 0"),
        ({"max_batch": 4, "opt_batch": 8}, "opt_batch=8 must not exceed max_batch=4"),
        ({"workspace_gb": 0}, "workspace_gb=0 must be more than 0"),
        ({"hardware_compat": "hopper"}, "hardware_compat='hopper' must be one of none, ampere+"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            BuildOptions(**bad)
    with pytest.raises(ConfigError, match="opt_batch=16 must not exceed the detector's max batch 8"):
        BuildOptions(opt_batch=16).opt_batch_for("detector")


def test_options_from_engines_config(tmp_path: Path) -> None:
    from edge.config import EnginesConfig

    config = EnginesConfig(precision="fp32", max_batch=16, plan_cache=str(tmp_path / "plans"), workspace_gb=2.0)
    options = build_options(config, hardware_compat="ampere+", version_compatible=True)
    assert options == BuildOptions("fp32", 16, 0, 2.0, tmp_path / "plans" / "timing.cache", "ampere+", True)


def test_build_command_is_exact(bundle: Bundle, tmp_path: Path) -> None:
    options = BuildOptions(
        precision="int8", max_batch=16, workspace_gb=2, hardware_compat="ampere+", version_compatible=True
    )
    command = build_command(bundle, options, tmp_path / "plans")
    assert shlex.split(command) == [
        "mitosis-edge",
        "engines",
        "build",
        "--bundle",
        str(bundle.path),
        "--precision",
        "int8",
        "--max-batch",
        "16",
        "--workspace-gb",
        "2",
        "--hardware-compat",
        "ampere+",
        "--version-compatible",
        "--plan-cache",
        str(tmp_path / "plans"),
    ]
    assert build_command(bundle, BuildOptions()) == (
        f"mitosis-edge engines build --bundle {shlex.quote(str(bundle.path))} --precision fp16 --max-batch 0"
    )


# -- building --------------------------------------------------------------------------------------


def test_fp32_on_tensorrt_10_builds_a_dynamic_batch_plan_with_a_full_sidecar(bundle: Bundle, tmp_path: Path) -> None:
    trt, probe = trt_and_probe(10)
    record = build_plan(
        bundle.detector,
        bundle,
        BuildOptions(precision="fp32", workspace_gb=2),
        tmp_path / "plans",
        trt=trt,
        probe=probe,
    )
    assert record.plan_path == tmp_path / "plans" / "tiny" / f"detector-{record.key[:16]}.plan"
    assert record.plan_path.is_file() and record.sidecar_path.is_file()
    assert sorted(p.name for p in record.plan_path.parent.iterdir()) == sorted(
        [record.plan_path.name, record.sidecar_path.name]
    )  # no temporary files left behind
    header = fake_plan_header(record.plan_path)
    assert header["strongly_typed"] is False and "TF32" not in header["flags"] and "FP16" not in header["flags"]
    assert header["workspace"] == 2 << 30
    assert header["io"][0]["profile"] == [[1, 32, 32, 3], [4, 32, 32, 3], [8, 32, 32, 3]]
    sidecar = json.loads(record.sidecar_path.read_text())
    assert sidecar == record.sidecar
    expected = {
        "key": record.key,
        "bundle": "tiny",
        "bundle_version": "0.0.1",
        "model": "detector",
        "role": "detector",
        "onnx_sha256": bundle.detector.sha256,
        "precision": "fp32",
        "precision_recipe": "fp32/builder-flags/model",
        "max_batch": 8,
        "opt_batch": 4,
        "tensorrt_version": trt.__version__,
        "gpu_name": "NVIDIA Fake GPU",
        "compute_capability": "8.9",
        "cuda_major": 13,
        "package_version": __version__,
        "hardware_compat": "none",
        "version_compatible": False,
        "builder_flags": ["-TF32"],
        "plan_bytes": record.plan_path.stat().st_size,
    }
    assert {k: sidecar[k] for k in expected} == expected
    assert set(sidecar["key_fields"]) == set(KEY_FIELDS)
    assert cache_key(**sidecar["key_fields"]) == record.key
    assert sidecar["build_seconds"] >= 0 and sidecar["built_at"].endswith("+00:00")
    assert sidecar["build_command"].startswith("mitosis-edge engines build --bundle ")


def test_fp16_on_tensorrt_10_sets_the_fp16_builder_flag(bundle: Bundle, tmp_path: Path) -> None:
    trt, probe = trt_and_probe(10)
    record = build_plan(bundle.detector, bundle, BuildOptions(precision="fp16"), tmp_path, trt=trt, probe=probe)
    header = fake_plan_header(record.plan_path)
    assert "FP16" in header["flags"] and header["strongly_typed"] is False
    assert record.sidecar["precision_recipe"] == "fp16/builder-flags/model"


def test_tensorrt_11_has_no_weak_typing_flags() -> None:
    trt = make_fake_trt(11)
    with pytest.raises(AttributeError):
        trt.BuilderFlag.FP16
    with pytest.raises(AttributeError):
        trt.BuilderFlag.INT8
    assert trt.BuilderFlag.VERSION_COMPATIBLE and trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED.value == 0
    assert not hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    assert make_fake_trt(10).NetworkDefinitionCreationFlag.STRONGLY_TYPED.value == 1


def test_fp16_on_tensorrt_11_builds_the_autocast_onnx_strongly_typed(bundle: Bundle, tmp_path: Path) -> None:
    variant = write_fp16_detector(bundle.detector.path.with_name("detector.fp16.onnx"), 32)
    trt, probe = trt_and_probe(11)
    record = build_plan(bundle.detector, bundle, BuildOptions(precision="fp16"), tmp_path, trt=trt, probe=probe)
    header = fake_plan_header(record.plan_path)
    assert header["strongly_typed"] is True and not {"FP16", "INT8"} & set(header["flags"])
    assert header["io"][1]["dtype"] == "HALF"  # the fp16 graph's output, as compiled
    assert record.sidecar["onnx_path"] == str(variant)
    assert record.sidecar["onnx_sha256"] != bundle.detector.sha256
    assert record.sidecar["precision_recipe"] == "fp16/strongly-typed/fp16-onnx"


def test_fp16_on_tensorrt_11_without_an_fp16_onnx_says_how_to_make_one(bundle: Bundle, tmp_path: Path) -> None:
    trt, probe = trt_and_probe(11)
    with pytest.raises(EngineError) as info:
        build_plan(bundle.detector, bundle, BuildOptions(precision="fp16"), tmp_path, trt=trt, probe=probe)
    text = str(info.value)
    assert "TensorRT 11 builds strongly typed networks only" in text
    assert str(bundle.detector.path.with_name("detector.fp16.onnx")) in text
    assert "python -m modelopt.onnx.autocast --onnx_path" in text and "--precision fp32" in text
    assert trt.stats["builds"] == 0


@pytest.mark.parametrize("major", [10, 11])
def test_int8_without_qdq_nodes_is_refused_clearly(bundle: Bundle, tmp_path: Path, major: int) -> None:
    trt, probe = trt_and_probe(major)
    with pytest.raises(EngineError) as info:
        build_plan(bundle.detector, bundle, BuildOptions(precision="int8"), tmp_path, trt=trt, probe=probe)
    text = str(info.value)
    assert "needs a Q/DQ (explicitly quantized) ONNX" in text and "does not calibrate" in text
    assert "detector.int8.onnx" in text and "python -m modelopt.onnx.quantization" in text


@pytest.mark.parametrize(("major", "strongly", "flag"), [(10, False, "INT8"), (11, True, None)])
def test_int8_builds_the_qdq_onnx(bundle: Bundle, tmp_path: Path, major: int, strongly: bool, flag: str | None) -> None:
    variant = write_qdq_detector(bundle.detector.path.with_name("detector.int8.onnx"), 32)
    trt, probe = trt_and_probe(major)
    record = build_plan(bundle.detector, bundle, BuildOptions(precision="int8"), tmp_path, trt=trt, probe=probe)
    header = fake_plan_header(record.plan_path)
    assert header["strongly_typed"] is strongly
    assert ("INT8" in header["flags"]) is (flag == "INT8")
    assert record.sidecar["onnx_path"] == str(variant)


def test_timing_cache_is_written_and_reused(bundle: Bundle, tmp_path: Path) -> None:
    trt, probe = trt_and_probe(10)
    cache = tmp_path / "caches" / "timing.cache"
    options = BuildOptions(precision="fp16", timing_cache=cache)
    build_plan(bundle.detector, bundle, options, tmp_path / "plans", trt=trt, probe=probe)
    assert cache.is_file() and trt.stats == {**trt.stats, "timing_cache_hits": 0, "timing_cache_misses": 1}
    build_plan(bundle.detector, bundle, options, tmp_path / "plans", trt=trt, probe=probe)
    assert trt.stats["timing_cache_hits"] == 1


def test_a_damaged_timing_cache_only_costs_time(
    bundle: Bundle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trt, probe = trt_and_probe(10)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"not a cache")
    with caplog.at_level(logging.WARNING, logger="edge.engines.build"):
        build_plan(bundle.detector, bundle, BuildOptions(timing_cache=cache), tmp_path, trt=trt, probe=probe)
    assert "is unusable" in caplog.text
    assert cache.read_bytes().startswith(b"FAKETRT-TIMING")


@pytest.mark.parametrize("major", [10, 11])
def test_hardware_and_version_compatibility_are_set(bundle: Bundle, tmp_path: Path, major: int) -> None:
    trt, probe = trt_and_probe(major)
    options = BuildOptions(precision="fp32", hardware_compat="ampere+", version_compatible=True)
    record = build_plan(bundle.detector, bundle, options, tmp_path, trt=trt, probe=probe)
    header = fake_plan_header(record.plan_path)
    assert header["hardware_compat"] == "AMPERE_PLUS" and header["version_compatible"] is True
    assert "VERSION_COMPATIBLE" in header["flags"]
    # an Ampere+ plan serves every card of the class: another GPU computes the same key
    other = find_plan(
        bundle.detector, bundle, options, tmp_path, MachineInfo(trt.__version__, 13, "NVIDIA A100", "8.0")
    )
    assert other is not None and other.key == record.key


def test_parser_errors_are_all_reported(bundle: Bundle, tmp_path: Path) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["tiles"], ["x"], to=TensorProto.FLOAT),
            helper.make_node("MagicOp", ["x"], ["y"], domain="com.example", name="first"),
            helper.make_node("OtherOp", ["y"], ["raw"], domain="com.example", name="second"),
        ],
        "custom",
        [helper.make_tensor_value_info("tiles", TensorProto.UINT8, ["b", 32, 32, 3])],
        [helper.make_tensor_value_info("raw", TensorProto.FLOAT, ["b", 512, 6])],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(bundle.detector.path))
    trt, probe = trt_and_probe(10)
    with pytest.raises(EngineError) as info:
        build_plan(bundle.detector, bundle, BuildOptions(), tmp_path, trt=trt, probe=probe)
    text = str(info.value)
    assert "could not parse" in text and "(2 error(s))" in text
    assert "No importer registered for op: MagicOp" in text and "No importer registered for op: OtherOp" in text


def test_a_failed_build_raises_with_the_builder_log(bundle: Bundle, tmp_path: Path) -> None:
    trt, probe = trt_and_probe(11)
    trt.fail_build = "Error Code 2: Internal Error (out of tactic memory)"
    with pytest.raises(EngineError) as info:
        build_plan(bundle.detector, bundle, BuildOptions(precision="fp32"), tmp_path, trt=trt, probe=probe)
    assert "failed to build tiny/detector (fp32/strongly-typed/model)" in str(info.value)
    assert "[ERROR] Error Code 2: Internal Error (out of tactic memory)" in str(info.value)
    assert not list(tmp_path.rglob("*.plan"))


def test_the_lean_runtime_cannot_build(bundle: Bundle, tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailableError, match=r"has no builder .* pip install 'tensorrt>=10'"):
        build_plan(
            bundle.detector, bundle, BuildOptions(), tmp_path, trt=make_fake_trt(10, lean=True), probe=fake_probe()
        )


def test_without_a_gpu_building_stops_before_tensorrt_is_imported(
    bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_import(*args: Any, **kw: Any) -> Any:
        raise AssertionError("tensorrt must not be imported without a GPU")

    monkeypatch.setattr("edge.engines.build.load_tensorrt", no_import)
    with pytest.raises(BackendUnavailableError, match=r"no usable NVIDIA GPU: no GPU: libcuda\.so\.1 not found"):
        build_plan(
            bundle.detector,
            bundle,
            BuildOptions(),
            tmp_path,
            probe=GpuProbe(ok=False, reason="no GPU: libcuda.so.1 not found"),
        )
    assert machine_info(GpuProbe(ok=False, reason="no GPU: x")) == (None, "no usable NVIDIA GPU: no GPU: x")


# -- the cache ------------------------------------------------------------------------------------


def test_find_list_and_ensure_plans(bundle: Bundle, tmp_path: Path) -> None:
    trt, probe = trt_and_probe(10)
    options = BuildOptions(precision="fp16")
    machine = MachineInfo.from_probe(probe, trt)
    assert machine_info(probe, trt) == (machine, "")
    assert find_plan(bundle.detector, bundle, options, tmp_path, machine) is None
    with pytest.raises(PlanError) as info:
        ensure_plans(bundle, options, tmp_path, on_missing="fail", trt=trt, probe=probe)
    assert info.value.command == build_command(bundle, options, tmp_path)
    assert "no TensorRT plan for tiny/detector (fp16, max batch 8) for NVIDIA Fake GPU" in str(info.value)
    records = ensure_plans(bundle, options, tmp_path, trt=trt, probe=probe)
    assert [r.model for r in records] == ["detector", "a", "b"] and trt.stats["builds"] == 3
    again = ensure_plans(bundle, options, tmp_path, on_missing="fail", trt=trt, probe=probe)
    assert again == records and trt.stats["builds"] == 3
    assert build_bundle(bundle, options, tmp_path, rebuild=False, trt=trt, probe=probe) == records
    assert trt.stats["builds"] == 3
    listed = list_plans(tmp_path)
    assert sorted(p["model"] for p in listed) == ["a", "b", "detector"]
    assert all(p["plan_present"] and Path(p["plan_path"]).is_file() for p in listed)
    # another GPU, another TensorRT or another option is a miss
    for other in (
        MachineInfo(trt.__version__, 13, "NVIDIA L40S", "8.9"),
        MachineInfo("10.14.1.48", 13, machine.gpu_name, "8.9"),
    ):
        assert find_plan(bundle.detector, bundle, options, tmp_path, other) is None
    assert find_plan(bundle.detector, bundle, BuildOptions(precision="fp32"), tmp_path, machine) is None
    # a truncated plan is a miss
    records[0].plan_path.write_bytes(records[0].plan_path.read_bytes()[:10])
    assert find_plan(bundle.detector, bundle, options, tmp_path, machine) is None


def test_build_bundle_names_unknown_models(bundle: Bundle, tmp_path: Path) -> None:
    trt, probe = trt_and_probe(10)
    assert [r.model for r in build_bundle(bundle, None, tmp_path, models=["a"], trt=trt, probe=probe)] == ["a"]
    with pytest.raises(EngineError, match=r"bundle 'tiny' has no model\(s\) \['zz'\]; models: detector, a, b"):
        build_bundle(bundle, None, tmp_path, models=["zz"], trt=trt, probe=probe)


@pytest.mark.parametrize(
    ("sidecar", "machine", "reason"),
    [
        (
            {"tensorrt_version": "10.13.3.9", "compute_capability": "8.9", "gpu_name": "L4", "cuda_major": 12},
            MachineInfo("10.13.3.9", 12, "L4", "8.9"),
            "",
        ),
        (
            {"tensorrt_version": "10.13.3.9", "compute_capability": "8.9", "gpu_name": "L4", "cuda_major": 12},
            MachineInfo("10.14.1.48", 12, "L4", "8.9"),
            "TensorRT 10.13.3.9 built it, this machine has TensorRT 10.14.1.48",
        ),
        (
            {
                "tensorrt_version": "10.13.3.9",
                "version_compatible": True,
                "compute_capability": "8.9",
                "gpu_name": "L4",
            },
            MachineInfo("10.14.1.48", 12, "L4", "8.9"),
            "",
        ),
        (
            {
                "tensorrt_version": "10.14.1.48",
                "version_compatible": True,
                "compute_capability": "8.9",
                "gpu_name": "L4",
            },
            MachineInfo("10.13.3.9", 12, "L4", "8.9"),
            "TensorRT 10.14.1.48 built it, this machine has TensorRT 10.13.3.9",
        ),
        (
            {"tensorrt_version": "10.13.3.9", "compute_capability": "8.9", "gpu_name": "L4", "cuda_major": 12},
            MachineInfo("10.13.3.9", 13, "H100", "9.0"),
            "built with CUDA 12, this machine has CUDA 13; "
            "built for compute capability 8.9 (L4), this GPU is H100 (compute 9.0)",
        ),
        (
            {"tensorrt_version": "10.13.3.9", "compute_capability": "8.9", "gpu_name": "L4"},
            MachineInfo("10.13.3.9", 12, "RTX 4090", "8.9"),
            "built on L4, this GPU is RTX 4090",
        ),
        (
            {
                "tensorrt_version": "10.13.3.9",
                "hardware_compat": "ampere+",
                "compute_capability": "8.9",
                "gpu_name": "L4",
            },
            MachineInfo("10.13.3.9", 12, "H100", "9.0"),
            "",
        ),
        (
            {
                "tensorrt_version": "10.13.3.9",
                "hardware_compat": "ampere+",
                "compute_capability": "8.9",
                "gpu_name": "L4",
            },
            MachineInfo("10.13.3.9", 12, "Tesla T4", "7.5"),
            "built for Ampere or newer GPUs (compute 8.0+), this GPU is Tesla T4",
        ),
    ],
)
def test_plan_matches_machine_names_every_difference(
    sidecar: dict[str, Any], machine: MachineInfo, reason: str
) -> None:
    ok, why = plan_matches_machine(sidecar, machine)
    assert ok is (reason == "")
    assert why.startswith(reason) if reason else why == ""


def test_one_sidecar_reader_skips_a_missing_one_quietly_and_names_a_damaged_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plan = tmp_path / "detector-0123456789abcdef.plan"
    with caplog.at_level(logging.WARNING, logger="edge.engines.plans"):
        assert read_sidecar(sidecar_path(plan)) is None
        assert caplog.text == ""
        write_sidecar(plan, {"key": "k", "model": "detector"})
        assert read_sidecar(sidecar_path(plan)) == {"key": "k", "model": "detector"}
        sidecar_path(plan).write_text("{not json")
        assert read_sidecar(sidecar_path(plan)) is None
        sidecar_path(plan).write_text("[1, 2]")
        assert read_sidecar(sidecar_path(plan)) is None
    assert caplog.text.count(str(sidecar_path(plan))) == 2
    assert "not a JSON object" in caplog.text
