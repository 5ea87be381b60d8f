"""The offline install route (docs/deployment.md, "Offline install"): a wheelhouse and the tested versions in
deploy/constraints.txt give a working `mitosis-edge` in a new virtual environment without any package index."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def wheelhouse_tool():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("wheelhouse", ROOT / "tools" / "wheelhouse.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_constraints_pin_every_dependency_at_the_tested_version() -> None:
    tool = wheelhouse_tool()
    pins = dict(line.split("==") for line in tool._pins())
    installed = tool.dependency_closure()
    assert pins == installed, "deploy/constraints.txt is stale: run python tools/wheelhouse.py freeze"
    assert {"onnxruntime", "grpcio", "pyvips-binary", "openslide-bin"} <= set(pins)


@pytest.mark.slow
def test_an_offline_install_from_a_wheelhouse_gives_a_working_command(tmp_path: Path) -> None:
    """Built here without network: the project's wheel in a folder; the dependencies come from this environment
    (a venv with system site packages), so pip checks them against the pins, never reaching an index."""
    tool = wheelhouse_tool()
    wheel = tool.build_project_wheel(tmp_path / "wheelhouse")
    assert wheel.name.startswith("mitosis_edge-")
    python = tool.install(tmp_path / "wheelhouse", tmp_path / "venv", system_site_packages=True)
    exe = python.parent / "mitosis-edge"
    env = {"PATH": str(python.parent), "HOME": str(tmp_path)}
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True, env=env, check=True, cwd=tmp_path)
    assert version.stdout.startswith("mitosis-edge ")
    located = subprocess.run(
        [str(python), "-c", "import edge, sys; print(edge.__file__)"], capture_output=True, text=True, env=env,
        check=True, cwd=tmp_path,
    )
    assert located.stdout.startswith(str(tmp_path / "venv"))  # the installed copy, not this checkout
    check = subprocess.run(
        [str(exe), "serve", "--check", "--insecure", "--data", str(tmp_path / "data"), "--listen", "127.0.0.1:0",
         "--metrics", ""],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "model bundle             demo" in check.stdout  # the embedded bundle came with the wheel
    assert sys.prefix not in located.stdout
