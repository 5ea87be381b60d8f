"""`mitosis-edge engines ...` and `bench engine` as an ML engineer runs them."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any, get_args, get_type_hints

import onnx
import pytest

from edge.cli.main import build_parser
from edge.config import EnginesConfig, load_config
from edge.engines.manifest import sha256_file
from edge.errors import ConfigError
from edge.vocab import BACKENDS, HARDWARE_COMPAT, PRECISIONS, QUANTIZE_TARGETS
from tests.test_cli import run_cli
from tests.tiny_bundle import float_classifier, make_tiny_bundle


def test_engines_check_reports_a_consistent_bundle(tmp_path: Path) -> None:
    folder = make_tiny_bundle(tmp_path / "tiny")
    result = run_cli("engines", "check", "--bundle", str(folder))
    assert result.returncode == 0, result.stderr
    assert "bundle tiny 0.0.1 is consistent" in result.stdout and "crops: uint8[B,16,16,3]" in result.stdout


def test_engines_check_lists_every_problem_and_exits_1(tmp_path: Path) -> None:
    folder = make_tiny_bundle(tmp_path / "tiny")
    manifest = folder / "manifest.toml"
    manifest.write_text(
        manifest.read_text().replace('input = "tiles"', 'input = "image"').replace("size = 16", "size = 24")
    )
    result = run_cli("engines", "check", "--bundle", str(folder))
    assert result.returncode == 1
    assert "problems in the engine bundle" in result.stderr
    assert "input name expected 'image', found 'tiles'" in result.stderr
    assert "clf_b.onnx (b): input crops height (axis 1) expected 24, found 16" in result.stderr
    assert "Traceback" not in result.stderr


def test_engines_verify_passes_onnxruntime_against_itself_on_random_and_slide_inputs(tmp_path: Path) -> None:
    folder = make_tiny_bundle(tmp_path / "tiny")
    result = run_cli("engines", "verify", "--bundle", str(folder), "--backend", "onnxruntime", "--tiles", "2", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] is True
    assert {o["inputs"] for o in report["outputs"]} == {"random", "slide"}
    assert all(o["max_abs_error"] == 0 for o in report["outputs"])
    assert report["detections"][0]["agreement"] == 1.0


def test_engines_verify_without_a_gpu_says_what_is_missing(tmp_path: Path) -> None:
    folder = make_tiny_bundle(tmp_path / "tiny")
    result = run_cli("engines", "verify", "--bundle", str(folder), "--backend", "tensorrt", "--tiles", "0")
    assert result.returncode == 1
    assert "GPU" in result.stderr and "Traceback" not in result.stderr


def test_engines_wrap_writes_a_uint8_model_and_prints_its_sha256(tmp_path: Path) -> None:
    folder = make_tiny_bundle(tmp_path / "tiny")
    source = tmp_path / "float.onnx"
    onnx.save(float_classifier(16), str(source))
    (folder / "clf_a.onnx").unlink()
    result = run_cli("engines", "wrap", str(source), "--bundle", str(folder), "--model", "a")
    assert result.returncode == 0, result.stderr
    sha = sha256_file(folder / "clf_a.onnx")
    assert f'sha256 = "{sha}"' in result.stdout
    assert run_cli("engines", "check", "--bundle", str(folder)).returncode == 0  # same graph as before


def test_engines_wrap_names_an_unknown_model(tmp_path: Path) -> None:
    folder = make_tiny_bundle(tmp_path / "tiny")
    result = run_cli("engines", "wrap", str(folder / "clf_a.onnx"), "--bundle", str(folder), "--model", "zz")
    assert result.returncode == 2
    assert "no model 'zz'; models: detector, a, b" in result.stderr


def test_engines_list_shows_bundles_and_plans_and_the_machine(tmp_path: Path) -> None:
    bundles = tmp_path / "bundles"
    make_tiny_bundle(bundles / "tiny")
    shutil.copytree(bundles / "tiny", bundles / "broken")
    (bundles / "broken" / "clf_a.onnx").write_bytes(b"x")
    env_result = run_cli(
        "engines", "list", "--json", "--plan-cache", str(tmp_path / "plans"), env={"MITOSIS_EDGE_BUNDLES": str(bundles)}
    )
    assert env_result.returncode == 0, env_result.stderr
    listing = json.loads(env_result.stdout)
    by_name = {b["name"]: b for b in listing["bundles"]}
    assert by_name["tiny"]["problems"] == [] and len(by_name["tiny"]["models"]) == 3
    assert any("clf_a.onnx" in p for p in by_name["broken"]["problems"])
    assert listing["plans"] == []
    text = run_cli("engines", "list", env={"MITOSIS_EDGE_BUNDLES": str(bundles)}).stdout
    assert "NOT USABLE" in text and "tiny 0.0.1" in text


def test_bench_engine_reports_overhead_against_bare_session_run(tmp_path: Path) -> None:
    folder = make_tiny_bundle(tmp_path / "tiny")
    result = run_cli("bench", "engine", "--bundle", str(folder), "--batches", "3", "--repeats", "1", "--json")
    assert result.returncode == 0, result.stderr
    bench = json.loads(result.stdout)
    assert bench["detector_tiles_per_s"] > 0
    assert {m["model"] for m in bench["models"]} == {"detector", "a", "b"}
    assert all("overhead" in m and "bare_items_per_s" in m for m in bench["models"])


def _options_named(parser: argparse.ArgumentParser, flag: str, where: str = "mitosis-edge") -> list[tuple[str, Any]]:
    found = []
    for action in parser._actions:
        if flag in action.option_strings:
            found.append((where, action.choices))
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _options_named(sub, flag, f"{where} {name}")
    return found


def test_every_backend_option_and_the_config_take_the_one_backend_vocabulary() -> None:
    backends = _options_named(build_parser(), "--backend")
    assert len(backends) >= 8  # analyze, run, calibrate, daemon, bench, cohort ...: all the same list
    assert {choices for _, choices in backends} == {BACKENDS}, backends
    assert BACKENDS == ("onnxruntime", "onnxruntime-cuda", "tensorrt")
    hints = get_type_hints(EnginesConfig, include_extras=True)
    assert get_args(hints["backend"]) == BACKENDS and get_args(hints["precision"]) == PRECISIONS
    for flag, words in (
        ("--precision", PRECISIONS),
        ("--target", QUANTIZE_TARGETS),
        ("--hardware-compat", HARDWARE_COMPAT),
    ):
        assert {c for _, c in _options_named(build_parser(), flag)} == {words}, flag


def test_a_backend_not_in_the_vocabulary_is_refused_by_name(tmp_path: Path) -> None:
    result = run_cli("analyze", str(tmp_path / "x.tiff"), "--backend", "openvino")
    assert result.returncode == 2
    assert "invalid choice: 'openvino' (choose from 'onnxruntime', 'onnxruntime-cuda', 'tensorrt')" in result.stderr
    with pytest.raises(ConfigError, match=r"engines\.backend"):
        load_config(None, {"engines.backend": "openvino"})
