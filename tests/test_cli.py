"""The `mitosis-edge` command as a user runs it: info, synth, bench read and the demo (a daemon end to end)."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import SynthFactory, data_file


def run_cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("mitosis-edge")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "edge", *args]
    full_env = {**os.environ, **env} if env else None
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, env=full_env)


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0 and "mitosis-edge" in result.stdout


def test_info_on_a_real_svs() -> None:
    result = run_cli("info", str(data_file("wsi/CMU-1-Small-Region.svs")))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "aperio" in out and "2220 x 2967" in out and "0.4990" in out and "20x" in out
    assert "upsampled" in out  # 0.499 µm/px read at 0.25


def test_info_json_with_tiles() -> None:
    result = run_cli("info", str(data_file("wsi/CMU-1-Small-Region.svs")), "--json", "--tiles")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["mpp_x"] == 0.499 and info["mpp_source"] == "vendor"
    assert info["levels"][0]["width"] == 2220
    assert info["read"]["upsampled"] is True
    assert info["tiles"] > 0 and 0 < info["tissue_area_mm2"] < 2.22 * 2.967 * 0.25


def test_info_says_when_mpp_is_missing_and_accepts_an_override() -> None:
    path = str(data_file("wsi/tcga-cr-7395-01a-01-ts1.svs"))
    result = run_cli("info", path)
    assert result.returncode == 0 and "MISSING" in result.stdout and "--mpp" in result.stdout
    result = run_cli("info", path, "--mpp", "0.5", "--json")
    assert json.loads(result.stdout)["mpp_source"] == "override"


def test_tiles_of_a_slide_without_mpp_fail_with_the_fix() -> None:
    path = str(data_file("wsi/tcga-cr-7395-01a-01-ts1.svs"))
    result = run_cli("info", path, "--tiles")
    assert result.returncode == 1
    assert path in result.stderr and "--mpp" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["broken.svs", "dicom-label-not-wsi.dcm"])
def test_unreadable_files_exit_non_zero_with_a_clear_message(name: str) -> None:
    path = str(data_file(f"wsi/{name}"))
    result = run_cli("info", path)
    assert result.returncode == 1
    assert path in result.stderr and "Traceback" not in result.stderr


def test_missing_file(tmp_path: Path) -> None:
    result = run_cli("info", str(tmp_path / "missing.svs"))
    assert result.returncode == 1 and "no such file" in result.stderr


def test_bad_config_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "edge.toml"
    cfg.write_text("[tiling]\ntile_sise = 512\n")
    result = run_cli("--config", str(cfg), "info", str(tmp_path / "x.svs"))
    assert result.returncode == 2 and "tiling.tile_sise" in result.stderr


def test_synth_writes_a_slide_and_its_truth(tmp_path: Path) -> None:
    out = tmp_path / "s.tiff"
    result = run_cli("synth", str(out), "--width", "2048", "--height", "1536", "--seed", "5", "--mitoses", "12")
    assert result.returncode == 0, result.stderr
    truth = json.loads((tmp_path / "s.truth.json").read_text())
    assert sum(o["class"] in ("normal", "atypical") for o in truth["objects"]) == 12
    info = json.loads(run_cli("info", str(out), "--json").stdout)
    assert (info["width"], info["height"], info["mpp_x"]) == (2048, 1536, 0.25)


def test_synth_refuses_bad_parameters(tmp_path: Path) -> None:
    result = run_cli("synth", str(tmp_path / "s.tiff"), "--width", "0", "--height", "100")
    assert result.returncode == 2 and "width" in result.stderr


def test_bench_read_json(synth_slide: SynthFactory) -> None:
    result = run_cli("bench", "read", str(synth_slide()), "--json", "--repeats", "1")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    for key in ("stream_tiles_per_s", "floor_tiles_per_s", "ratio", "peak_rss_mb"):
        assert figures[key] > 0
    assert figures["tiles"] > 0 and figures["region_reader"] == "tiles"


def test_info_tiles_reports_the_plan_efficiency() -> None:
    result = run_cli("info", "--tiles", "--json", str(data_file("wsi/CMU-1-Small-Region.svs")))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    plan = data["tile_plan"]
    assert data["tile_layout"] == "fit" and plan["tiles"] == data["tiles"]
    assert plan["tiles"] <= 0.85 * plan["grid_tiles"]  # a small section: its edges are most of its tiles
    assert 0 < plan["tissue_mm2"] < plan["covered_mm2"] < plan["read_mm2"]
    assert plan["tissue_fraction_of_read"] == pytest.approx(plan["tissue_mm2"] / plan["read_mm2"], abs=1e-3)
    text = run_cli("info", "--tiles", str(data_file("wsi/CMU-1-Small-Region.svs"))).stdout
    assert "tile plan    fit:" in text and "of the read pixels are tissue" in text


def test_bench_daemon_latency_starts_slides_when_the_scanner_closes_them() -> None:
    result = run_cli("bench", "daemon", "--latency", "--slides", "2", "--quiet-period", "30", "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["done"] == 2 and figures["observer"] == "native" and len(figures["per_slide"]) == 2
    for row in figures["per_slide"]:  # on close, not after the 30 s quiet period
        assert 0 < row["to_queued_s"] <= row["to_start_s"] <= row["to_result_s"] < 30
    assert figures["analyze_seconds"] > 0


def test_demo_runs_a_daemon_that_picks_up_a_copied_slide_and_reports_over_grpc(tmp_path: Path) -> None:
    result = run_cli("demo", "--size", "6144", "--keep", str(tmp_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "queued" in out and "result over gRPC" in out
    assert "mitotic count" in out and "F1 " in out and "planted" in out
    assert (tmp_path / "inbox" / "demo-slide.tiff").exists() and (tmp_path / "data" / "edge.db").exists()
    exports = list((tmp_path / "data" / "results").iterdir())
    assert len(exports) == 1
    for name in ("result.json", "detections.geojson", "midog.json", "detections.csv", "overlay.png"):
        assert (exports[0] / name).exists()


def test_the_demo_leaves_nothing_behind_and_no_warning_in_the_middle(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    result = run_cli("demo", "--size", "2048", env={"TMPDIR": str(temp)})
    assert result.returncode == 0, result.stderr
    assert list(temp.glob("mitosis-edge-demo-*")) == []  # (other libraries may leave their own files)
    assert "WARNING" not in result.stderr and "tokens" not in result.stderr
    assert "NOTICE     demo models" in result.stdout and "NOT for diagnosis" in result.stdout
    exports = next(line for line in result.stdout.splitlines() if line.startswith("exports"))
    assert exports.endswith("detections.csv, detections.geojson, midog.json, overlay.png, result.json")


def test_info_and_analyze_agree_that_a_29_um_slide_is_refused(tmp_path: Path) -> None:
    slide = str(data_file("wsi/camelyon-multiframe.dcm"))
    info = run_cli("info", slide, "--json")
    assert info.returncode == 0, info.stderr
    refusal = json.loads(info.stdout)["read"]["refusal"]
    assert refusal.startswith("scanned at 29 µm/px, too coarse")
    assert "REFUSED" in run_cli("info", slide).stdout
    analyze = run_cli("analyze", slide, "--out", str(tmp_path))
    assert analyze.returncode == 1 and refusal in analyze.stderr


# --- errors and logs an operator reads ---------------------------------------------------------------


def edge_process(*argv: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-m", "edge", *argv], env=env, text=True, **kwargs)


def test_json_logs_are_all_json_with_millisecond_zoned_times_and_no_library_chatter(tmp_path: Path) -> None:
    slide = data_file("wsi/CMU-1-Small-Region.svs")
    process = edge_process("--log-format", "json", "-vv", "analyze", str(slide), "--out", str(tmp_path),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr
    entries = [json.loads(line) for line in stderr.splitlines()]  # every line parses
    assert entries and all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", e["time"])
                           for e in entries)
    assert any(e["logger"].startswith("edge") and e["level"] == "debug" for e in entries)
    assert not [e for e in entries if e["level"] == "debug" and e["logger"].split(".")[0] in ("pyvips", "watchdog")]


def test_a_library_warning_names_the_slide_being_read(monkeypatch: pytest.MonkeyPatch) -> None:
    from edge.logs import configure, slide_context

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))  # pytest's handlers come back afterwards
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setenv("GRPC_VERBOSITY", os.environ.get("GRPC_VERBOSITY", "NONE"))
    configure(logging.WARNING, "json")
    stream = io.StringIO()
    handler = root.handlers[0]
    handler.setStream(stream)  # type: ignore[attr-defined]
    with slide_context("/scans/a.svs"):
        logging.getLogger("tifffile").warning("invalid page offset 123")
    logging.getLogger("tifffile").warning("outside any slide")
    logging.captureWarnings(False)
    lines = [json.loads(line)["message"] for line in stream.getvalue().splitlines()]
    assert lines == ["invalid page offset 123 [slide /scans/a.svs]", "outside any slide"]


def test_output_piped_to_a_reader_that_stops_ends_quietly() -> None:
    slide = data_file("wsi/CMU-1-Small-Region.svs")
    process = edge_process("info", str(slide), "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    process.stdout.close()  # like `| head -0`: nobody reads
    _, stderr = process.communicate(timeout=120)
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr
    assert process.returncode == 141


def test_serve_check_lists_every_problem_at_once(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    tokens = tmp_path / "tokens"
    tokens.write_text("0123456789abcdef0123 boss lis\n")
    tokens.chmod(0o644)
    config = tmp_path / "edge.toml"
    config.write_text(
        f'[watch]\nfolders = ["{tmp_path / "missing"}"]\n'
        f'[daemon]\ndata_dir = "{tmp_path / "data"}"\nmetrics_listen = "127.0.0.1:{busy.getsockname()[1]}"\n'
        f'[server]\ntls_cert = "{tmp_path / "no.pem"}"\ntls_key = "{tmp_path / "no.key"}"\n'
        f'tokens_file = "{tokens}"\n'
    )
    with busy:
        process = edge_process("serve", "--check", "--config", str(config),  # a global option after serve
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = process.communicate(timeout=120)
    assert process.returncode == 2 and "4 problem(s)" in err
    failed = {line.split("  ")[1].strip() for line in out.splitlines() if line.startswith("FAIL")}
    assert failed == {"TLS certificate and key", "tokens file", "watch folders", "metrics port"}
    assert "no.pem cannot be read" in out and "role 'boss'" in out and "missing does not exist" in out
    assert "daemon.metrics_listen (--metrics)" in out
    assert re.search(r"ok\s+model bundle\s+demo", out)


def test_a_metrics_port_in_use_is_a_configuration_error_with_exit_2(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    with busy:
        process = edge_process("serve", "--data", str(tmp_path / "data"), "--listen", "127.0.0.1:0", "--insecure",
                               "--metrics", f"127.0.0.1:{busy.getsockname()[1]}",
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = process.communicate(timeout=120)
    assert process.returncode == 2, err
    assert "configuration error" in err and "daemon.metrics_listen" in err and "(--metrics)" in err
    assert "Traceback" not in err


def test_every_option_of_every_command_has_help() -> None:
    from edge.cli.main import _subcommands, build_parser

    parser = build_parser()
    missing = [
        f"{command.prog} {'/'.join(action.option_strings) or action.dest}"
        for command in [parser, *_subcommands(parser)]
        for action in command._actions
        if not isinstance(action, argparse._SubParsersAction | argparse._HelpAction)
        and not (action.help or "").strip()
    ]
    assert missing == []
