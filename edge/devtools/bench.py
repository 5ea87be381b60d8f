"""The `mitosis-edge bench ...` measurements: each a ratio against a baseline measured in the same run.

``bench read``: the tile stream against a decode floor. ``bench engine``: each engine against a bare
``session.run`` loop. ``bench analyze``: end to end against read-only and detector-only. ``bench daemon``:
a burst of slides dropped into a running daemon's inbox (``--latency``: slides written one by one, as a
scanner does). ``bench cohort``: ``cohort run`` on Ray against one warm process.

Each returns a frozen dataclass built in one place (its ``bench_*`` function); :func:`to_json` is the one
conversion to the JSON that ``--json`` prints.

For ``bench read``, the floor decodes every stored tile that the tile plan touches, once, with the same number of
threads, and nothing else (no assembly, no overlap re-reads, no queue). ``ratio`` is
stream tiles/s over floor tiles/s for the same plan, both measured in this one run, so it says
how much the stream adds to the unavoidable decoding, on a machine however loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import resource
import statistics
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edge.config import Config
from edge.errors import SlideReadError
from edge.wsi.slide import direct_reader, open_slide
from edge.wsi.stream import open_stream, plan_slide

log = logging.getLogger(__name__)

DEFAULT_REPEATS = 2  # best of N for stream and floor, interleaved
FLOOR_WINDOW_PER_THREAD = 32  # stored tiles in flight per thread in the floor, so it holds little memory

NO_FLOOR_NOTE = "no decode floor: this slide's levels are not tiled TIFF pages read directly"
_OMIT_IF_NONE = {"omit_if_none": True}  # the key is left out of the JSON when the value is None
_FLATTEN = {"flatten": True}  # a nested result's keys go into its parent's JSON (none when it is None)


@dataclass(frozen=True)
class ReadBench:
    """`bench read`: the tile stream against the decode floor on one slide (tiles/s, MP/s, seconds)."""

    slide: str
    tiles: int
    tile_size: int
    overlap: int
    mpp: float
    level: int
    resampled: bool
    region_reader: str
    threads: int
    batch_size: int
    queue_depth: int
    repeats: int
    stream_seconds: float
    stream_tiles_per_s: float
    stream_mp_per_s: float
    floor_stored_tiles: int
    floor_seconds: float | None
    floor_tiles_per_s: float | None
    floor_mp_per_s: float | None
    ratio: float | None  # stream tiles/s over floor tiles/s
    peak_rss_mb: float
    floor_note: str | None = field(default=None, metadata=_OMIT_IF_NONE)


@dataclass(frozen=True)
class BareComparison:
    """One model's engine against a bare ``session.run`` loop (ONNX Runtime on the CPU only)."""

    bare_items_per_s: float
    overhead: float  # engine seconds / bare seconds - 1
    submit_overhead: float


@dataclass(frozen=True)
class ModelBench:
    model: str
    role: str
    batch_size: int
    batches: int
    items_per_s: float
    submit_items_per_s: float
    bare: BareComparison | None = field(default=None, metadata=_FLATTEN)


@dataclass(frozen=True)
class EngineBench:
    """`bench engine`: every model of a bundle on the configured backend."""

    bundle: str
    backend: str
    threads: int | None
    models: tuple[ModelBench, ...]
    detector_tiles_per_s: float
    peak_rss_mb: float


@dataclass(frozen=True)
class AnalyzeBench:
    """`bench analyze`: end to end against read-only and detector-only, and scan QC's cost."""

    slide: str
    tiles: int
    tile_layout: str
    tile_plan: Mapping[str, Any]
    candidates: int
    backend: str
    bundle: str
    batch_size: int
    read_tiles_per_s: float
    detector_tiles_per_s: float
    detector_tiles_per_s_before_after: tuple[float, ...]
    read_seconds_before_after: tuple[float, ...]
    end_to_end_tiles_per_s: float
    end_to_end_seconds: float
    ratio: float | None  # end to end over the slower baseline
    end_to_end_seconds_without_qc: float
    qc_overhead: float | None
    qc_overhead_median: float | None
    qc_runs: int
    qc_seconds: float | None
    qc_share: float | None
    stage_seconds: Mapping[str, float]
    peak_rss_mb: float


@dataclass(frozen=True)
class Pickup:
    """Seconds from the end of the quiet period to a job being created."""

    first: float | None
    median: float | None
    max: float | None


@dataclass(frozen=True)
class DaemonBench:
    """`bench daemon`: ``slides`` slides dropped at once; each processed exactly once, pickup, memory."""

    slides: int
    finished_in_time: bool
    jobs: int
    done: int
    failed: int
    slides_with_one_job: int
    slides_with_several_jobs: int
    wall_seconds: float
    slides_per_hour: float
    pickup_after_quiet_s: Pickup
    rss_mb_after_quarter: float | None
    rss_mb_at_end: float | None
    peak_rss_mb_daemon_process: float


@dataclass(frozen=True)
class JobTimes:
    """Seconds from a slide's last byte to its job being queued, started and stored."""

    to_queued_s: float
    to_start_s: float | None
    to_result_s: float | None


@dataclass(frozen=True)
class LatencySlide:
    slide: str
    state: str  # the job's final state, or "timeout"
    times: JobTimes | None = field(default=None, metadata=_FLATTEN)


@dataclass(frozen=True)
class LatencyBench:
    """`bench daemon --latency`: slides written one by one as a scanner does, time to result."""

    slides: int
    size_px: int
    observer: str
    quiet_period_s: float
    close_settle_s: float
    analyze_seconds: float
    done: int
    median_to_queued_s: float | None
    median_to_start_s: float | None
    median_to_result_s: float | None
    max_to_start_s: float | None
    per_slide: tuple[LatencySlide, ...]


@dataclass(frozen=True)
class CohortBench:
    """`bench cohort`: ``cohort run`` on Ray against the same slides in one warm process."""

    slides: int
    sizes_px: tuple[int, ...]
    hostile: int
    sequential_s: float
    sequential_before_after_s: tuple[float, float]
    sequential_failed: int
    sequential_peak_rss_mb: int
    cohort_s: float
    ratio: float | None
    ray_start_s: float
    ratio_without_ray_start: float
    workers: int
    cpus_per_slide: float
    slides_per_node: Mapping[str, int]
    good_done_exactly_once: bool
    hostile_failed: Mapping[str, str]  # file name -> the row's error, shortened
    worker_rss_mb: Mapping[str, tuple[float, float, float]]  # after its first slide, after its last, peak
    rerun_analysed: int
    rerun_skipped: int
    case_ids_example: str


BenchResult = ReadBench | EngineBench | AnalyzeBench | DaemonBench | LatencyBench | CohortBench


def to_json(result: BenchResult) -> dict[str, Any]:
    """The JSON object `bench ... --json` prints for a result: fields in order, nested results as objects.

    >>> to_json(LatencySlide("a.tiff", "timeout"))
    {'slide': 'a.tiff', 'state': 'timeout'}
    >>> to_json(LatencySlide("a.tiff", "done", JobTimes(0.5, 1.0, None)))
    {'slide': 'a.tiff', 'state': 'done', 'to_queued_s': 0.5, 'to_start_s': 1.0, 'to_result_s': None}
    """
    return _json_object(result)


def _json_object(value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(value):
        item = getattr(value, f.name)
        if item is None and (f.metadata.get("omit_if_none") or f.metadata.get("flatten")):
            continue
        if f.metadata.get("flatten"):
            out.update(_json_object(item))
        else:
            out[f.name] = _json_value(item)
    return out


def _json_value(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _json_object(value)
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _json_value(v) for k, v in value.items()}
    return value


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_read(path: str | Path, config: Config, repeats: int = DEFAULT_REPEATS) -> ReadBench:
    """Measure the stream and the decode floor on one slide."""
    with contextlib.ExitStack() as closing:
        slide = closing.enter_context(open_slide(path, config.slide))
        sp = plan_slide(slide, config)
        plan = sp.plan
        n = len(plan)
        mp_per_tile = plan.tile_size * plan.tile_size / 1e6
        _warm_page_cache(Path(slide.path))
        stream_s: list[float] = []
        floor_s: list[float] = []
        reader = direct_reader(slide)
        if reader is None and slide.info.reader == "tiffslide" and config.slide.region_reader != "library":
            # the stream reads through another reader (pyvips): the floor still decodes stored tiles directly
            try:
                floor_slide = open_slide(path, dataclasses.replace(config.slide, region_reader="tiles"))
                closing.enter_context(floor_slide)
                reader = direct_reader(floor_slide)
            except SlideReadError:
                reader = None
        stored: list[int] = []
        if reader is not None:
            level = sp.scale.level
            lv = slide.info.levels[level]
            fx, fy = slide.info.width / lv.width, slide.info.height / lv.height
            seen: set[int] = set()
            for t in plan.tiles:
                lx, ly = int(t.x0 / fx), int(t.y0 / fy)
                lw = max(1, round(t.width0 / fx))
                lh = max(1, round(t.height0 / fy))
                for idx in reader.stored_tiles(level, lx, ly, min(lw, lv.width - lx), min(lh, lv.height - ly)):
                    if idx not in seen:
                        seen.add(idx)
                        stored.append(idx)
        for _ in range(repeats):
            t0 = time.perf_counter()
            with open_stream(slide, sp, config) as stream:
                for _batch in stream:
                    pass
            stream_s.append(time.perf_counter() - t0)
            if reader is not None:
                t0 = time.perf_counter()
                with ThreadPoolExecutor(config.stream.threads) as pool:
                    window = FLOOR_WINDOW_PER_THREAD * config.stream.threads  # bounded, like the stream
                    for start in range(0, len(stored), window):
                        for _tile in pool.map(
                            lambda i: reader.decode_tile(sp.scale.level, i), stored[start : start + window]
                        ):
                            pass
                floor_s.append(time.perf_counter() - t0)
        best_stream = min(stream_s)
        stream_tps = n / best_stream if best_stream > 0 else 0.0
        floor_best = min(floor_s) if floor_s else None
        floor_tps = n / floor_best if floor_best else None
        return ReadBench(
            slide=str(path),
            tiles=n,
            tile_size=plan.tile_size,
            overlap=plan.overlap,
            mpp=sp.scale.mpp_x,
            level=sp.scale.level,
            resampled=sp.scale.resampled,
            region_reader=slide.info.region_reader,
            threads=config.stream.threads,
            batch_size=config.stream.batch_size,
            queue_depth=config.stream.queue_depth,
            repeats=repeats,
            stream_seconds=best_stream,
            stream_tiles_per_s=stream_tps,
            stream_mp_per_s=stream_tps * mp_per_tile,
            floor_stored_tiles=len(stored),
            floor_seconds=floor_best,
            floor_tiles_per_s=floor_tps,
            floor_mp_per_s=floor_tps * mp_per_tile if floor_tps else None,
            ratio=stream_tps / floor_tps if floor_tps else None,
            peak_rss_mb=peak_rss_mb(),
            floor_note=None if floor_tps else NO_FLOOR_NOTE,
        )


def _warm_page_cache(path: Path) -> None:
    """Read the file once so that stream and floor both start from a warm page cache."""
    if path.is_file():
        with path.open("rb") as fh:
            while fh.read(16 << 20):
                pass


def bench_engine(
    bundle_name: str | Path | None, config: Config, *, batches: int = 8, repeats: int = 3, seed: int = 0
) -> EngineBench:
    """Per model: the engine (infer, and submit with the next batch queued) against a bare ``session.run`` loop.

    Every loop runs the same uint8 batches; loops are interleaved and the best of ``repeats`` kept,
    so ``overhead`` (engine seconds / bare seconds - 1) is a ratio measured in one run.
    """
    import numpy as np

    from edge.engines import load_bundle, open_engines

    bundle = load_bundle(bundle_name)
    rng = np.random.default_rng(seed)
    models: list[ModelBench] = []
    with open_engines(bundle, config.engines, detector_batch=config.stream.batch_size) as engines:
        for model in bundle.models:
            engine = engines.detector if model.role == "detector" else engines.classifiers[model.name]
            size = config.stream.batch_size if model.role == "detector" else config.engines.classifier_batch
            size = min(size, engine.max_batch)
            data = [rng.integers(0, 256, (size, model.size, model.size, 3), dtype=np.uint8) for _ in range(batches)]
            bare = _bare_session_loop(model.path, engine, config, data)
            timings: dict[str, list[float]] = {"bare": [], "infer": [], "submit": []}
            engine.infer(data[0])  # warm-up: first runs allocate arenas
            for _ in range(repeats):
                loops = (
                    ("bare", bare),
                    ("infer", functools.partial(_sequential, engine, data)),
                    ("submit", functools.partial(_pipelined, engine, data)),
                )
                for label, loop in loops:
                    if loop is None:
                        continue
                    t0 = time.perf_counter()
                    loop()
                    timings[label].append(time.perf_counter() - t0)
            items = size * batches
            bare_s = min(timings["bare"]) if timings["bare"] else None
            models.append(
                ModelBench(
                    model=model.name,
                    role=model.role,
                    batch_size=size,
                    batches=batches,
                    items_per_s=items / min(timings["infer"]),
                    submit_items_per_s=items / min(timings["submit"]),
                    bare=None
                    if bare_s is None
                    else BareComparison(
                        bare_items_per_s=items / bare_s,
                        overhead=min(timings["infer"]) / bare_s - 1.0,
                        submit_overhead=min(timings["submit"]) / bare_s - 1.0,
                    ),
                )
            )
    detector = next(m for m in models if m.role == "detector")
    return EngineBench(
        bundle=bundle.name,
        backend=config.engines.backend,
        threads=config.engines.intra_op_threads or None,
        models=tuple(models),
        detector_tiles_per_s=detector.items_per_s,
        peak_rss_mb=peak_rss_mb(),
    )


def _read_all(slide: Any, sp: Any, config: Config, held: list[Any], keep: int) -> float:
    """Seconds to stream every tile of the plan; the first ``keep`` batches are kept in ``held``."""
    t0 = time.perf_counter()
    with open_stream(slide, sp, config) as stream:
        for batch in stream:
            if len(held) < keep:
                held.append(batch.pixels)
    return time.perf_counter() - t0


def _detector_rate(engine: Any, held: list[Any], seconds: float) -> float:
    """Tiles/s of the detector alone on ``held`` batches, repeated for at least ``seconds``."""
    tiles = 0
    t0 = time.perf_counter()
    while True:
        _pipelined(engine, held)
        tiles += sum(len(b) for b in held)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return tiles / elapsed


def _sequential(engine: Any, data: list[Any]) -> None:
    for batch in data:
        engine.infer(batch)


def _pipelined(engine: Any, data: list[Any]) -> None:
    """submit/collect with one batch queued behind the running one, as the pipeline drives engines."""
    pending = [engine.submit(data[0])]
    for batch in data[1:]:
        pending.append(engine.submit(batch))
        pending.pop(0).result()
    for p in pending:
        p.result()


def _bare_session_loop(path: Path, engine: Any, config: Config, data: list[Any]) -> Any:
    """A plain ``session.run`` loop with the engine's own session settings, or None for other backends."""
    if engine.backend != "onnxruntime":
        return None
    import numpy as np

    from edge.engines.onnxrt import new_session

    session = new_session(path, intra_op_threads=config.engines.intra_op_threads)
    name = session.get_inputs()[0].name
    session.run(None, {name: np.zeros((1, *engine.input_spec.shape[1:]), np.uint8)})
    return lambda: [session.run(None, {name: b}) for b in data]



def bench_analyze(
    path: str | Path, config: Config, *, detector_batches: int = 8, detector_seconds: float = 2.0, qc_runs: int = 5
) -> AnalyzeBench:
    """End to end against read-only and detector-only, measured in one run with the same engines.

    read-only streams every tile of the plan; detector-only runs ``detector_batches`` batches of this
    slide's tiles, held in memory, through the detector with one batch queued (as the pipeline
    drives it), again and again for at least ``detector_seconds``; end to end is the whole analysis.
    Both baselines are measured before and after the end-to-end runs and the faster of each is kept,
    so a noisy neighbour slows the baseline no more than it slows the pipeline. ``ratio`` is end to
    end over the slower of the two baselines. End to end, with scan QC and without it, is the faster
    of two runs each after a warm-up run (``qc_overhead``: with over without, minus 1).
    """
    from edge.analysis.pipeline import analyze_slide, pipeline_config
    from edge.engines import load_bundle, open_engines

    bundle = load_bundle(config.engines.bundle)
    with open_engines(bundle, config.engines, detector_batch=config.stream.batch_size) as engines:
        pconfig = pipeline_config(config, bundle)
        with open_slide(path, pconfig.slide) as slide:
            sp = plan_slide(slide, pconfig)
            efficiency = sp.efficiency
            _warm_page_cache(Path(slide.path))
            held: list[Any] = []
            read_s = [_read_all(slide, sp, pconfig, held, detector_batches)]
            engines.detector.infer(held[0])  # warm-up
            detector_tps = [_detector_rate(engines.detector, held, detector_seconds)]
            # Scan QC's cost: the same analysis without it, in the same run (and QC's own seconds, which
            # noise on a shared machine does not blur). A first analysis warms what every later one reuses
            # (the classifiers' first runs, the page cache); then without and with QC in turn, twice, and
            # the faster of each: the one-off costs and a noisy neighbour are then no one's overhead. A few per
            # cent is what is measured, and one run on a shared machine varies by as much: qc_runs of each.
            no_qc = dataclasses.replace(config, qc=dataclasses.replace(config.qc, enabled=False))
            analyze_slide(path, config, engines=engines)
            with_runs, without_runs = [], []
            for _ in range(max(1, qc_runs) if config.qc.enabled else 1):
                if config.qc.enabled:
                    without_runs.append(analyze_slide(path, no_qc, engines=engines))
                with_runs.append(analyze_slide(path, config, engines=engines))
            analysis = min(with_runs, key=lambda a: a.times.total)
            without_qc = min(without_runs, key=lambda a: a.times.total) if without_runs else analysis
            detector_tps.append(_detector_rate(engines.detector, held, detector_seconds))
            read_s.append(_read_all(slide, sp, pconfig, [], 0))
    n = analysis.tiles
    read_tps = n / min(read_s) if min(read_s) > 0 else 0.0
    e2e_tps = n / analysis.times.total if analysis.times.total > 0 else 0.0
    slower = min(read_tps, max(detector_tps))
    total = analysis.times.total
    qc_seconds = (analysis.result.qc or {}).get("seconds")
    return AnalyzeBench(
        slide=str(path),
        tiles=n,
        tile_layout=sp.plan.layout,
        tile_plan=efficiency.to_json_dict(),
        candidates=analysis.result.scores.candidates,
        backend=engines.backend,
        bundle=bundle.name,
        batch_size=config.stream.batch_size,
        read_tiles_per_s=read_tps,
        detector_tiles_per_s=max(detector_tps),
        detector_tiles_per_s_before_after=tuple(detector_tps),
        read_seconds_before_after=tuple(read_s),
        end_to_end_tiles_per_s=e2e_tps,
        end_to_end_seconds=total,
        ratio=e2e_tps / slower if slower > 0 else None,
        end_to_end_seconds_without_qc=without_qc.times.total,
        qc_overhead=total / without_qc.times.total - 1.0 if without_qc.times.total > 0 else None,
        qc_overhead_median=_median_overhead(with_runs, without_runs),
        qc_runs=len(without_runs),
        qc_seconds=qc_seconds,
        qc_share=(qc_seconds or 0.0) / total if total > 0 else None,
        stage_seconds=analysis.times.to_dict(),
        peak_rss_mb=peak_rss_mb(),
    )


def _median_overhead(with_runs: list[Any], without_runs: list[Any]) -> float | None:
    """Median end to end with QC over the median without it, minus 1; None without runs of both."""
    if not with_runs or not without_runs:
        return None
    without = statistics.median(a.times.total for a in without_runs)
    return statistics.median(a.times.total for a in with_runs) / without - 1.0 if without > 0 else None


def bench_daemon(
    config: Config,
    *,
    slides: int = 200,
    size: int = 1536,
    quiet_period_s: float = 1.0,
    timeout_s: float = 1800.0,
    workdir: str | Path | None = None,
) -> DaemonBench:
    """Drop ``slides`` distinct slides into a running daemon's inbox at once and measure what the issue asks:
    each processed exactly once, the delay from the end of the quiet period to the job, and whether
    memory stays flat (RSS after the first 25% of slides against after all of them).

    The slides are a few generated ones plus byte-distinct copies (a few bytes appended after the
    TIFF data, which readers ignore), so the fingerprints differ without minutes of generation.
    """
    import shutil
    import tempfile
    import threading

    from edge.service.daemon import Daemon

    with tempfile.TemporaryDirectory(prefix="mitosis-edge-bench-daemon-", dir=workdir) as tmp:
        root = Path(tmp)
        staging, inbox, bases = _inbox_and_slides(root, min(4, slides), size, seed=9000)
        names = []
        for i in range(slides):
            name = f"slide-{i:04d}.tiff"
            target = staging / name
            shutil.copyfile(bases[i % len(bases)], target)
            with target.open("ab") as f:
                f.write(i.to_bytes(8, "little"))
            names.append(name)
        config = config.with_overrides({
            "watch.folders": [str(inbox)], "watch.polling_folders": [], "watch.quiet_period_s": quiet_period_s,
            "watch.poll_interval_s": min(0.5, quiet_period_s), "daemon.data_dir": str(root / "data"),
            "daemon.metrics_listen": "", "daemon.min_free_disk_mb": 0, "server.enabled": False,
        })
        rss: list[tuple[int, float]] = []
        with Daemon(config) as daemon:
            while not daemon.is_ready():
                time.sleep(0.05)
            dropped = time.time()
            for name in names:
                os.replace(staging / name, inbox / name)
            t0 = time.perf_counter()
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(0.5):
                    rss.append((daemon.store.counts_by_state()["done"], current_rss_mb()))

            sampler = threading.Thread(target=sample, name="bench-rss")
            sampler.start()
            try:
                finished = _wait_terminal(daemon, slides, timeout_s)
            finally:
                stop.set()
                sampler.join()
            wall = time.perf_counter() - t0
            jobs = daemon.store.list_jobs(limit=10_000)
            results = sum(1 for j in jobs if j.state == "done")
    per_slide: dict[str, int] = {}
    for j in jobs:
        per_slide[Path(j.slide_path).name] = per_slide.get(Path(j.slide_path).name, 0) + 1
    pickup = sorted(j.created_at - dropped - quiet_period_s for j in jobs)
    early = [m for done, m in rss if done >= slides // 4]
    return DaemonBench(
        slides=slides,
        finished_in_time=finished,
        jobs=len(jobs),
        done=results,
        failed=sum(1 for j in jobs if j.state == "failed"),
        slides_with_one_job=sum(1 for n in names if per_slide.get(n) == 1),
        slides_with_several_jobs=sum(1 for n in names if per_slide.get(n, 0) > 1),
        wall_seconds=wall,
        slides_per_hour=slides / wall * 3600 if wall > 0 else 0.0,
        pickup_after_quiet_s=Pickup(
            first=pickup[0] if pickup else None,
            median=pickup[len(pickup) // 2] if pickup else None,
            max=pickup[-1] if pickup else None,
        ),
        rss_mb_after_quarter=early[0] if early else None,
        rss_mb_at_end=rss[-1][1] if rss else None,
        peak_rss_mb_daemon_process=peak_rss_mb(),
    )


def bench_daemon_latency(
    config: Config,
    *,
    slides: int = 20,
    size: int = 1536,
    quiet_period_s: float | None = None,
    observer: str | None = None,
    timeout_s: float = 600.0,
    workdir: str | Path | None = None,
) -> LatencyBench:
    """Time to result as a lab feels it: ``slides`` slides written one after another into a running
    daemon's inbox the way a scanner writes (in chunks under the final name, then closed), each after
    the previous one's result is stored. Per slide: seconds from the last byte written to the job
    being queued, to the job starting and to its result being stored; and, measured in the same run
    with the same engines, the wall time of ``analyze`` on one of the slides (analysis and exports, as
    the command does them, engines already loaded), the yardstick for last-byte-to-result. The quiet
    period and observer are the config's unless given.
    """
    import shutil
    import tempfile

    from edge.analysis.pipeline import analyze_slide
    from edge.engines import load_bundle, open_engines
    from edge.service.daemon import Daemon

    chunk = 1 << 20
    with tempfile.TemporaryDirectory(prefix="mitosis-edge-bench-latency-", dir=workdir) as tmp:
        root = Path(tmp)
        _staging, inbox, bases = _inbox_and_slides(root, min(2, slides), size, seed=9100)
        overrides: dict[str, Any] = {
            "watch.folders": [str(inbox)], "watch.polling_folders": [], "daemon.data_dir": str(root / "data"),
            "daemon.metrics_listen": "", "daemon.min_free_disk_mb": 0, "server.enabled": False,
            "watch.scan_on_start": False,
        }  # fmt: skip
        if quiet_period_s is not None:
            overrides["watch.quiet_period_s"] = quiet_period_s
        if observer is not None:
            overrides["watch.observer"] = observer
        config = config.with_overrides(overrides)
        bundle = load_bundle(config.engines.bundle)
        with open_engines(bundle, config.engines, detector_batch=config.stream.batch_size) as engines:
            analyze_s = []
            for attempt in range(2):  # the first warms the engines and the page cache up; the faster one counts
                t0 = time.perf_counter()
                analysis = analyze_slide(bases[0], config, engines=engines)
                analysis.write_exports(root / f"analyze-{attempt}")  # as `mitosis-edge analyze` does
                analyze_s.append(time.perf_counter() - t0)
        rows: list[LatencySlide] = []
        with Daemon(config) as daemon:
            while not daemon.is_ready():
                time.sleep(0.05)
            observer_kind = daemon_observer_kind(daemon, str(inbox))
            for i in range(slides):
                data = bases[i % len(bases)].read_bytes() + i.to_bytes(8, "little")  # byte-distinct copies
                target = inbox / f"slide-{i:04d}.tiff"
                with target.open("wb") as fh:  # like a scanner: chunks under the final name, then close
                    for offset in range(0, len(data), chunk):
                        fh.write(data[offset : offset + chunk])
                        fh.flush()
                    last_byte = time.time()
                job = _wait_job_terminal(daemon, str(target), timeout_s)
                times = None
                if job is not None:
                    times = JobTimes(
                        to_queued_s=job.created_at - last_byte,
                        to_start_s=(job.started_at - last_byte) if job.started_at else None,
                        to_result_s=(job.finished_at - last_byte) if job.finished_at else None,
                    )
                rows.append(LatencySlide(target.name, job.state if job else "timeout", times))
            shutil.rmtree(inbox, ignore_errors=True)

    def median(values: list[float | None]) -> float | None:
        known = sorted(v for v in values if v is not None)
        return known[len(known) // 2] if known else None

    timed = [r.times for r in rows if r.times is not None]
    return LatencyBench(
        slides=slides,
        size_px=size,
        observer=observer_kind,
        quiet_period_s=config.watch.quiet_period_s,
        close_settle_s=config.watch.close_settle_s,
        analyze_seconds=min(analyze_s),
        done=sum(1 for r in rows if r.state == "done"),
        median_to_queued_s=median([t.to_queued_s for t in timed]),
        median_to_start_s=median([t.to_start_s for t in timed]),
        median_to_result_s=median([t.to_result_s for t in timed]),
        max_to_start_s=max((t.to_start_s for t in timed if t.to_start_s is not None), default=None),
        per_slide=tuple(rows),
    )


def _inbox_and_slides(root: Path, count: int, size: int, seed: int) -> tuple[Path, Path, list[Path]]:
    """A staging folder with ``count`` generated slides of ``size`` px, and an empty inbox, under ``root``."""
    from edge.devtools.synth import SynthParams, generate_slide

    staging, inbox = root / "staging", root / "inbox"
    staging.mkdir()
    inbox.mkdir()
    bases = [staging / f"base-{i}.tiff" for i in range(count)]
    for i, base in enumerate(bases):
        generate_slide(base, SynthParams(width=size, height=size, seed=seed + i))
    return staging, inbox, bases


def daemon_observer_kind(daemon: Any, folder: str) -> str:
    """The observer the daemon's watcher chose for ``folder`` ("native", "polling" or "" if none)."""
    return str(daemon.watcher.observer_kinds.get(folder, "")) if daemon.watcher is not None else ""


def _wait_job_terminal(daemon: Any, slide_path: str, timeout_s: float) -> Any:
    """The job of ``slide_path`` once it is done, failed or cancelled; None after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for job in daemon.store.list_jobs(slide_path_contains=Path(slide_path).name):
            if job.state in ("done", "failed", "cancelled"):
                return job
        time.sleep(0.05)
    return None


def current_rss_mb() -> float:
    """Resident set size now of this process and its child processes (the daemon's analysis processes);
    Linux /proc; falls back to this process's peak elsewhere."""
    import multiprocessing

    total = 0.0
    for pid in ("self", *(str(c.pid) for c in multiprocessing.active_children())):
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):
            if pid == "self":
                return peak_rss_mb()
    return total


def _wait_terminal(daemon: Any, slides: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = daemon.store.counts_by_state()
        if counts["done"] + counts["failed"] + counts["cancelled"] >= slides and daemon.wait_idle(0.2):
            return True
        time.sleep(0.2)
    return False


def bench_cohort(
    config: Config,
    *,
    slides: int = 40,
    sizes: tuple[int, ...] = (2048, 3072, 4096),
    cpus_per_slide: float = 1.0,
    ray_address: str | None = None,
    workdir: str | Path | None = None,
) -> CohortBench:
    """``slides`` synthetic slides of mixed sizes, 3 of them hostile (random bytes, a truncated TIFF, an empty
    file), analysed one after another in this warm process (engines opened once, exports written) and then
    by ``cohort run`` on Ray, in one run; the throughput ratio is sequential seconds over cohort seconds
    (Ray's start included), the sequential time being the mean of a run before and one after the cohort
    run. Checks that every good slide has exactly one row, done, and the hostile ones
    failed with a reason, and that a re-run analyses nothing.
    """
    import csv
    import shutil
    import tempfile

    from edge.analysis.pipeline import analyze_slide
    from edge.devtools.synth import SynthParams, generate_slide
    from edge.engines import load_bundle, open_engines
    from edge.study.cohort import case_id_for, list_slides, run_cohort

    hostile = 3
    with tempfile.TemporaryDirectory(prefix="mitosis-edge-bench-cohort-", dir=workdir) as tmp:
        root = Path(tmp)
        archive = root / "archive"
        archive.mkdir()
        bases = []
        for i, size in enumerate(sizes):
            base = root / f"base-{size}.tiff"
            generate_slide(base, SynthParams(width=size, height=size, seed=7100 + i))
            bases.append(base)
        good = max(0, slides - hostile)
        for i in range(good):
            target = archive / f"slide-{i:04d}.tiff"
            shutil.copyfile(bases[i % len(bases)], target)
            with target.open("ab") as f:  # byte-distinct: its own fingerprint, same pixels
                f.write(i.to_bytes(8, "little"))
        (archive / "hostile-random.svs").write_bytes(os.urandom(64 * 1024))
        truncated = bases[-1].read_bytes()
        (archive / "hostile-truncated.tiff").write_bytes(truncated[: len(truncated) // 3])
        (archive / "hostile-empty.tiff").write_bytes(b"")
        listed = list_slides(archive)

        def sequential() -> tuple[float, int]:
            """Every slide one after another in this process, engines opened once, exports written."""
            t0 = time.perf_counter()
            failed = 0
            with open_engines(load_bundle(config.engines.bundle), config.engines,
                              detector_batch=config.stream.batch_size) as engines:
                for s in listed:
                    try:
                        analyze_slide(s.path, config, engines=engines).write_exports(root / "sequential" / s.path.name)
                    except SlideReadError:
                        failed += 1
            return time.perf_counter() - t0, failed

        # sequential before and after the cohort run: their mean is the reference, so load from other
        # processes that changes during the benchmark weighs on both sides alike
        before_s, seq_failed = sequential()
        out = root / "cohort"
        summary = run_cohort(listed, out, config, ray_address=ray_address, cpus_per_slide=cpus_per_slide)
        after_s, _ = sequential()
        sequential_s = (before_s + after_s) / 2
        sequential_rss = peak_rss_mb()
        with (out / "slides.csv").open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        per_slide: dict[str, int] = {}
        for row in rows:
            per_slide[row["slide_path"]] = per_slide.get(row["slide_path"], 0) + 1
        hostile_rows = [r for r in rows if Path(r["slide_path"]).name.startswith("hostile-")]
        good_rows = [r for r in rows if not Path(r["slide_path"]).name.startswith("hostile-")]
        rerun = run_cohort(listed, out, config, ray_address=ray_address, cpus_per_slide=cpus_per_slide)
        return CohortBench(
            slides=len(listed),
            sizes_px=tuple(sizes),
            hostile=hostile,
            sequential_s=round(sequential_s, 2),
            sequential_before_after_s=(round(before_s, 2), round(after_s, 2)),
            sequential_failed=seq_failed,
            sequential_peak_rss_mb=round(sequential_rss),
            cohort_s=round(summary.seconds, 2),
            ratio=round(sequential_s / summary.seconds, 3) if summary.seconds else None,
            ray_start_s=round(summary.ray_start_s, 2),
            ratio_without_ray_start=round(sequential_s / (summary.seconds - summary.ray_start_s), 3),
            workers=summary.workers,
            cpus_per_slide=cpus_per_slide,
            slides_per_node=summary.nodes,
            good_done_exactly_once=len(good_rows) == good
            and all(r["status"] == "done" for r in good_rows)
            and all(per_slide[r["slide_path"]] == 1 for r in good_rows),
            hostile_failed={
                Path(r["slide_path"]).name: r["error"][:160] for r in hostile_rows if r["status"] == "failed"
            },
            worker_rss_mb={w: (v[0], v[-1], summary.peak_rss_mb[w][-1]) for w, v in summary.rss_mb.items()},
            rerun_analysed=rerun.done + rerun.failed,
            rerun_skipped=rerun.skipped_done + rerun.skipped_failed,
            case_ids_example=case_id_for(listed[0].path),
        )
