"""`bench ... --json` prints the same keys, in the same order, as before the results became dataclasses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edge.devtools.bench import (
    NO_FLOOR_NOTE,
    AnalyzeBench,
    BareComparison,
    CohortBench,
    DaemonBench,
    EngineBench,
    JobTimes,
    LatencyBench,
    LatencySlide,
    ModelBench,
    Pickup,
    ReadBench,
    to_json,
)
from tests.conftest import SynthFactory
from tests.test_cli import run_cli
from tests.tiny_bundle import make_tiny_bundle

# The keys each command printed when its result was a hand-built dict (recorded on main before the change).
READ_KEYS = [
    "slide", "tiles", "tile_size", "overlap", "mpp", "level", "resampled", "region_reader", "threads",
    "batch_size", "queue_depth", "repeats", "stream_seconds", "stream_tiles_per_s", "stream_mp_per_s",
    "floor_stored_tiles", "floor_seconds", "floor_tiles_per_s", "floor_mp_per_s", "ratio", "peak_rss_mb",
]
ENGINE_KEYS = ["bundle", "backend", "threads", "models", "detector_tiles_per_s", "peak_rss_mb"]
MODEL_KEYS = ["model", "role", "batch_size", "batches", "items_per_s", "submit_items_per_s"]
BARE_KEYS = ["bare_items_per_s", "overhead", "submit_overhead"]
ANALYZE_KEYS = [
    "slide", "tiles", "tile_layout", "tile_plan", "candidates", "backend", "bundle", "batch_size",
    "read_tiles_per_s", "detector_tiles_per_s", "detector_tiles_per_s_before_after", "read_seconds_before_after",
    "end_to_end_tiles_per_s", "end_to_end_seconds", "ratio", "end_to_end_seconds_without_qc", "qc_overhead",
    "qc_overhead_median", "qc_runs", "qc_seconds", "qc_share", "stage_seconds", "peak_rss_mb",
]
DAEMON_KEYS = [
    "slides", "finished_in_time", "jobs", "done", "failed", "slides_with_one_job", "slides_with_several_jobs",
    "wall_seconds", "slides_per_hour", "pickup_after_quiet_s", "rss_mb_after_quarter", "rss_mb_at_end",
    "peak_rss_mb_daemon_process",
]
LATENCY_KEYS = [
    "slides", "size_px", "observer", "quiet_period_s", "close_settle_s", "analyze_seconds", "done",
    "median_to_queued_s", "median_to_start_s", "median_to_result_s", "max_to_start_s", "per_slide",
]
COHORT_KEYS = [
    "slides", "sizes_px", "hostile", "sequential_s", "sequential_before_after_s", "sequential_failed",
    "sequential_peak_rss_mb", "cohort_s", "ratio", "ray_start_s", "ratio_without_ray_start", "workers",
    "cpus_per_slide", "slides_per_node", "good_done_exactly_once", "hostile_failed", "worker_rss_mb",
    "rerun_analysed", "rerun_skipped", "case_ids_example",
]  # fmt: skip


def _read(**changes: Any) -> ReadBench:
    figures: dict[str, Any] = dict.fromkeys(READ_KEYS, 1.0)
    figures.update(slide="s.tiff", region_reader="tiles", resampled=False, **changes)
    return ReadBench(**figures)


def test_bench_read_json_keeps_its_keys_and_adds_a_note_only_without_a_floor() -> None:
    assert list(to_json(_read())) == READ_KEYS
    no_floor = to_json(
        _read(floor_seconds=None, floor_tiles_per_s=None, floor_mp_per_s=None, ratio=None, floor_note=NO_FLOOR_NOTE)
    )
    assert list(no_floor) == [*READ_KEYS, "floor_note"] and no_floor["floor_note"] == NO_FLOOR_NOTE
    assert no_floor["ratio"] is None  # a None that is a figure stays in the JSON


def test_bench_engine_json_nests_models_and_names_bare_figures_only_on_onnxruntime() -> None:
    cpu = ModelBench("detector", "detector", 8, 4, 10.0, 11.0, BareComparison(10.5, -0.05, -0.1))
    gpu = ModelBench("densenet", "classifier", 64, 4, 900.0, 950.0)
    data = to_json(EngineBench("demo", "onnxruntime", None, (cpu, gpu), 10.0, 300.0))
    assert list(data) == ENGINE_KEYS and data["threads"] is None
    assert list(data["models"][0]) == MODEL_KEYS + BARE_KEYS and list(data["models"][1]) == MODEL_KEYS
    assert data["models"][0]["overhead"] == -0.05
    assert json.loads(json.dumps(data)) == data


def test_bench_analyze_daemon_latency_and_cohort_json_keep_their_keys() -> None:
    analyze = AnalyzeBench(
        "s.tiff", 16, "fit", {"tiles": 16}, 3, "onnxruntime", "demo", 4, 1.0, 2.0, (2.0, 1.9), (0.5, 0.4),
        0.9, 17.0, 0.9, 16.0, 0.06, 0.05, 3, 0.5, 0.03, {"read": 1.0}, 300.0,
    )  # fmt: skip
    assert list(to_json(analyze)) == ANALYZE_KEYS
    assert to_json(analyze)["detector_tiles_per_s_before_after"] == [2.0, 1.9]
    daemon = to_json(DaemonBench(3, True, 3, 3, 0, 3, 0, 9.0, 1200.0, Pickup(0.1, 0.2, 0.3), 400.0, 410.0, 500.0))
    assert list(daemon) == DAEMON_KEYS and daemon["pickup_after_quiet_s"] == {"first": 0.1, "median": 0.2, "max": 0.3}
    rows = (LatencySlide("a.tiff", "done", JobTimes(0.4, 0.5, None)), LatencySlide("b.tiff", "timeout"))
    latency = to_json(LatencyBench(2, 1024, "native", 1.0, 0.5, 3.0, 1, 0.4, 0.5, None, 0.5, rows))
    assert list(latency) == LATENCY_KEYS
    assert latency["per_slide"] == [
        {"slide": "a.tiff", "state": "done", "to_queued_s": 0.4, "to_start_s": 0.5, "to_result_s": None},
        {"slide": "b.tiff", "state": "timeout"},
    ]
    cohort = CohortBench(
        40, (2048, 3072), 3, 10.0, (9.0, 11.0), 3, 800, 11.0, 0.909, 2.0, 1.11, 2, 1.0, {"node-1": 40}, True,
        {"hostile-empty.tiff": "empty file"}, {"w1": (300.0, 310.0, 320.0)}, 0, 40, "TCGA-AA-0001",
    )  # fmt: skip
    data = to_json(cohort)
    assert list(data) == COHORT_KEYS
    assert data["sizes_px"] == [2048, 3072] and data["worker_rss_mb"] == {"w1": [300.0, 310.0, 320.0]}


def test_bench_read_and_engine_print_the_same_keys_from_the_command_line(
    synth_slide: SynthFactory, tmp_path: Path
) -> None:
    read = run_cli("bench", "read", str(synth_slide()), "--json", "--repeats", "1")
    assert read.returncode == 0, read.stderr
    assert list(json.loads(read.stdout)) == READ_KEYS
    bundle = make_tiny_bundle(tmp_path / "tiny")
    engine = run_cli("bench", "engine", "--bundle", str(bundle), "--batches", "2", "--repeats", "1", "--json")
    assert engine.returncode == 0, engine.stderr
    data = json.loads(engine.stdout)
    assert list(data) == ENGINE_KEYS
    assert all(list(m) == MODEL_KEYS + BARE_KEYS for m in data["models"])  # the CPU backend: bare figures too
