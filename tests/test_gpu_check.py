"""tools/gpu_check.py: plain "not run" rows without a GPU, and its GPU paths over the fake CUDA and TensorRT."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.fake_cudart import FakeCudart
from tests.fake_tensorrt import fake_probe, make_fake_trt
from tests.tiny_bundle import make_tiny_bundle

TOOL = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"


def load_tool(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", TOOL)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_everything_after_the_probe_is_not_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge.engines.probe import GpuProbe

    tool = load_tool(monkeypatch)
    monkeypatch.setattr(tool, "probe_gpu", lambda timeout: GpuProbe(ok=False, reason="no GPU: libcuda.so.1 not found"))
    assert tool.main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["check"]: r for r in report["checks"]}
    assert rows["gpu"] == {"check": "gpu", "status": "not run", "result": "no GPU: libcuda.so.1 not found"}
    assert rows["cuda data path"]["status"] == rows["tensorrt plans"]["status"] == "not run"
    assert report["passed"] is True


def test_on_a_fake_gpu_it_builds_checks_parity_and_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cudart = FakeCudart()
    trt = make_fake_trt(10, cudart=cudart)
    tool = load_tool(monkeypatch)
    monkeypatch.setattr(tool, "probe_gpu", lambda timeout: fake_probe(trt_version=trt.__version__))
    monkeypatch.setattr("edge.engines.cuda.import_cudart", lambda module=None: module or cudart)
    monkeypatch.setattr("edge.engines.tensorrt.load_tensorrt", lambda module=None, **kw: module or trt)
    folder = make_tiny_bundle(tmp_path / "tiny")
    tool.main(["--bundle", str(folder), "--mb", "1", "--repeats", "2", "--plan-cache", str(tmp_path / "plans")])
    table = capsys.readouterr().out
    lines = {line.split("  ")[0]: line for line in table.splitlines()}
    assert "ok" in lines["round trip host→GPU→host"] and "identical" in lines["round trip host→GPU→host"]
    assert "GB/s" in lines["pinned H2D bandwidth"]
    for precision in ("fp32", "fp16"):
        for model in ("detector", "a", "b"):
            assert f"plan {model} {precision}" in lines and " ok " in lines[f"plan {model} {precision}"]
            assert "items/s" in lines[f"speed {model} {precision}"]
        assert "max abs 0, max rel 0" in lines[f"parity detector {precision} raw"]
    # the fake GPU runs copies one after the other, so the overlap check rightly fails there
    assert "FAILED" in lines["copy overlap, 2 streams"]
    assert cudart.live() == dict.fromkeys(cudart.live(), 0)
    # the pipeline check opens engines as the daemon does, through the real GPU probe: here it says why not
    assert "not run" in lines["pipeline tensorrt"] and "GPU" in lines["pipeline tensorrt"]


def test_a_missing_bundle_is_not_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tool = load_tool(monkeypatch)
    trt = make_fake_trt(11)
    monkeypatch.setattr("edge.engines.tensorrt.load_tensorrt", lambda module=None, **kw: module or trt)
    report: Any = tool.Report()
    tool.check_tensorrt(report, fake_probe(), str(tmp_path / "nowhere"), tmp_path, 0, 1)
    (row,) = report.rows
    assert row.check == "tensorrt plans" and row.status == "not run" and "not usable" in row.result
