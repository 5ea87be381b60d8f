"""Check a GPU box end to end: CUDA, the pinned-memory data path, TensorRT plans, parity and throughput.

Run it on the machine that will run mitosis-edge with ``--backend tensorrt``:

    python tools/gpu_check.py                 # one table
    python tools/gpu_check.py --json          # the same as JSON
    python tools/gpu_check.py --bundle DIR --plan-cache DIR --mb 512 --repeats 7

After the plans it runs the pipeline end to end on TensorRT (`bench analyze` on a synthetic slide, the
end-to-end ratio target) and the daemon (`bench daemon`, a few slides).

Every check that cannot run says why ("not run: ..."); a check that runs and fails says so and the
exit status is 1. On a machine without a GPU everything after the probe is "not run".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from edge.engines.probe import GpuProbe, probe_gpu
from edge.errors import EdgeError

OK, FAILED, NOT_RUN = "ok", "FAILED", "not run"
DEFAULT_MB = 256  # MiB per copy for bandwidth and overlap
OVERLAP_SPEEDUP = 1.3  # two streams faster than this over one-after-the-other counts as overlapping
PRECISIONS = ("fp32", "fp16")
FP32_TOLERANCE = 1e-3  # max abs error, relative to the output's largest magnitude
FP16_TOLERANCE = 2e-2


@dataclass
class Row:
    """One line of the report."""

    check: str
    status: str  # ok, FAILED, not run
    result: str


class Report:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add(self, check: str, status: str, result: str) -> None:
        self.rows.append(Row(check, status, result))

    def not_run(self, check: str, reason: str) -> None:
        self.add(check, NOT_RUN, reason)

    @property
    def failed(self) -> bool:
        return any(r.status == FAILED for r in self.rows)

    def table(self) -> str:
        width = max([len(r.check) for r in self.rows] + [5])
        lines = [f"{'check':{width}}  {'status':8} result", f"{'-' * width}  {'-' * 8} {'-' * 40}"]
        lines += [
            f"{r.check:{width}}  {r.status + ':' if r.status == NOT_RUN else r.status:8} {r.result}" for r in self.rows
        ]
        return "\n".join(lines)


@contextmanager
def guarded(report: Report, check: str) -> Iterator[None]:
    """Turn any error inside a check into a FAILED row: a diagnostic tool reports, it does not crash."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - every failure is a result here
        report.add(check, FAILED, f"{type(exc).__name__}: {exc}".replace("\n", " | ")[:400])


# ---------------------------------------------------------------------------------------------
# probe


def check_probe(report: Report, probe: GpuProbe, device: int) -> str:
    """Rows for the GPU, CUDA and TensorRT; returns why the GPU checks cannot run ("" when they can)."""
    if not probe.ok:
        report.not_run("gpu", probe.reason)
        why = "no usable GPU (see the gpu row)"
    else:
        for d in probe.devices:
            mark = " (used)" if d.index == device else ""
            report.add(f"gpu {d.index}{mark}", OK, f"{d.name}, compute {d.compute_capability}, {d.memory_mb} MiB")
        report.add("driver", OK, f"supports CUDA {probe.driver_version or '?'}")
        why = "" if any(d.index == device for d in probe.devices) else f"no device {device}"
    if probe.cuda_runtime_available:
        report.add("cuda-python", OK, f"CUDA runtime {probe.cuda_runtime_version or '?'}")
    else:
        report.not_run("cuda-python", "not installed: pip install 'cuda-python>=12.6'")
    if probe.tensorrt_version:
        report.add("tensorrt", OK, f"{probe.tensorrt_module} {probe.tensorrt_version}")
    else:
        report.not_run("tensorrt", probe.tensorrt_error or "not checked")
    return why


# ---------------------------------------------------------------------------------------------
# the CUDA data path


def check_cuda(report: Report, device: int, mb: int, repeats: int) -> None:
    from edge.engines.cuda import CudaRuntime

    cuda = CudaRuntime(device=device)
    nbytes = mb << 20
    made: list[Any] = []

    def keep(resource: Any) -> Any:
        made.append(resource)
        return resource

    try:
        host_a, host_b = keep(cuda.host_buffer(nbytes)), keep(cuda.host_buffer(nbytes))
        dev_a, dev_b = keep(cuda.device_buffer(nbytes)), keep(cuda.device_buffer(nbytes))
        s1, s2 = keep(cuda.stream()), keep(cuda.stream())
        start, end = keep(cuda.event()), keep(cuda.event())
        pattern = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
        host_a.array(np.uint8, (nbytes,))[:] = pattern

        def timed(copy: Callable[[], None], stream: Any) -> float:
            start.record(stream)
            copy()
            end.record(stream)
            end.synchronize()
            return end.elapsed_ms(start)

        h2d = [timed(lambda: cuda.memcpy_htod_async(dev_a, host_a, nbytes, s1), s1) for _ in range(repeats)]
        d2h = [timed(lambda: cuda.memcpy_dtoh_async(host_b, dev_a, nbytes, s1), s1) for _ in range(repeats)]
        for label, times in (("pinned H2D bandwidth", h2d), ("pinned D2H bandwidth", d2h)):
            ms = statistics.median(times)
            report.add(label, OK, f"{nbytes / ms / 1e6:.1f} GB/s ({mb} MiB, median of {repeats}, CUDA events)")
        same = np.array_equal(host_b.array(np.uint8, (nbytes,)), pattern)
        report.add("round trip host→GPU→host", OK if same else FAILED, f"{mb} MiB {'identical' if same else 'DIFFER'}")
        # overlap: an upload on one stream and a download on the other use the two copy engines at once
        cuda.memcpy_htod_async(dev_b, host_a, nbytes, s2)
        s2.synchronize()

        def both(concurrent: bool) -> float:
            t0 = time.perf_counter()
            cuda.memcpy_htod_async(dev_a, host_a, nbytes, s1)
            if not concurrent:
                s1.synchronize()
            cuda.memcpy_dtoh_async(host_b, dev_b, nbytes, s2)
            s1.synchronize()
            s2.synchronize()
            return time.perf_counter() - t0

        serial = statistics.median(both(False) for _ in range(repeats))
        overlapped = statistics.median(both(True) for _ in range(repeats))
        speedup = serial / overlapped
        verdict = (
            "yes"
            if speedup >= OVERLAP_SPEEDUP
            else "NO (copies serialise: check for pageable memory or a GPU with one copy engine)"
        )
        report.add(
            "copy overlap, 2 streams",
            OK if speedup >= OVERLAP_SPEEDUP else FAILED,
            f"{verdict}: H2D ∥ D2H {speedup:.2f}x faster than one after the other",
        )
    finally:
        for resource in reversed(made):
            resource.close()


# ---------------------------------------------------------------------------------------------
# TensorRT plans


def check_tensorrt(
    report: Report, probe: GpuProbe, bundle_name: str, cache_dir: Path, device: int, repeats: int
) -> None:
    from edge.engines.build import BuildOptions, build_plan
    from edge.engines.manifest import load_bundle
    from edge.engines.tensorrt import TensorRTEngine, load_tensorrt

    try:
        trt = load_tensorrt(need_builder=True, probe=probe)
    except EdgeError as exc:
        report.not_run("tensorrt plans", str(exc))
        return
    try:
        bundle = load_bundle(bundle_name)
    except EdgeError as exc:
        report.not_run("tensorrt plans", f"bundle {bundle_name!r} not usable: {exc}".replace("\n", " "))
        return
    for precision in PRECISIONS:
        options = BuildOptions(precision=precision, timing_cache=cache_dir / "timing.cache")
        for model in bundle.models:
            label = f"{model.name} {precision}"
            try:
                record = build_plan(model, bundle, options, cache_dir, trt=trt, probe=probe, device=device)
            except EdgeError as exc:
                report.not_run(f"plan {label}", str(exc).replace("\n", " | ")[:400])
                continue
            s = record.sidecar
            report.add(
                f"plan {label}",
                OK,
                f"built in {s['build_seconds']:.1f} s, batch 1..{s['max_batch']}, "
                f"{s['plan_bytes'] / 1e6:.1f} MB, {s['precision_recipe']}",
            )
            with (
                guarded(report, f"parity {label}"),
                TensorRTEngine(record.plan_path, name=model.name, trt=trt, probe=probe, device=device) as engine,
            ):
                check_parity(report, engine, model, label, precision)
                check_speed(report, engine, model, label, repeats)


def check_parity(report: Report, engine: Any, model: Any, label: str, precision: str) -> None:
    import onnxruntime as ort

    batch = np.random.default_rng(1).integers(
        0, 256, (min(4, engine.max_batch), model.size, model.size, 3), dtype=np.uint8
    )
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    want = dict(zip(names, session.run(None, {model.input_name: batch}), strict=True))
    got = engine.infer(batch)
    tolerance = FP32_TOLERANCE if precision == "fp32" else FP16_TOLERANCE
    for name in engine.output_spec:
        a, b = got[name.name].astype(np.float64), want[name.name].astype(np.float64)
        abs_err = float(np.max(np.abs(a - b))) if a.size else 0.0
        rel_err = abs_err / max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-12)
        report.add(
            f"parity {label} {name.name}",
            OK if rel_err <= tolerance else FAILED,
            f"max abs {abs_err:.3g}, max rel {rel_err:.3g} (to the output's range; limit {tolerance:g}) "
            "against ONNX Runtime on the CPU",
        )


def check_speed(report: Report, engine: Any, model: Any, label: str, repeats: int) -> None:
    n = engine.max_batch
    batch = np.random.default_rng(2).integers(0, 256, (n, model.size, model.size, 3), dtype=np.uint8)
    engine.infer(batch)  # warm up: first-run allocation, lazy kernel loading
    gpu_ms = statistics.median(engine.gpu_times_ms(batch, repeats=repeats))
    batches = 8
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pending = [engine.submit(batch) for _ in range(batches)]
        for p in pending:
            p.result()
        rates.append(batches * n / (time.perf_counter() - t0))
    report.add(
        f"speed {label}",
        OK,
        f"batch {n}: GPU {gpu_ms:.2f} ms/batch incl. copies (CUDA events), {statistics.median(rates):.1f} "
        f"items/s with {engine.in_flight} in flight (median of {repeats})",
    )


def check_pipeline(report: Report, bundle_name: str, cache_dir: Path, side: int) -> None:
    """The whole pipeline and the daemon on TensorRT: `bench analyze` on a synthetic slide (the issue's
    end-to-end target: >= 0.8 of the slower of read-only and detector-only) with ONNX Runtime on the CPU
    beside it for reference, then `bench daemon` with a few slides (each processed exactly once)."""
    from edge.config import load_config
    from edge.devtools.bench import bench_analyze, bench_daemon
    from edge.devtools.synth import SynthParams, generate_slide
    from edge.engines import load_bundle, open_engines

    settings = {"engines.bundle": bundle_name, "engines.plan_cache": str(cache_dir)}
    config = load_config(None, {**settings, "engines.backend": "tensorrt"})
    try:  # fail fast, before a slide is generated
        with open_engines(load_bundle(bundle_name), config.engines, detector_batch=config.stream.batch_size):
            pass
    except EdgeError as exc:
        report.not_run("pipeline tensorrt", str(exc).replace("\n", " | ")[:400])
        return
    slide = cache_dir / "gpu-check-slide.tiff"
    generate_slide(slide, SynthParams(width=side, height=side, seed=4242))
    for backend in ("tensorrt", "onnxruntime"):
        with guarded(report, f"pipeline {backend}"):
            r = bench_analyze(slide, load_config(None, {**settings, "engines.backend": backend}))
            meets = r.ratio is not None and r.ratio >= 0.8
            report.add(
                f"pipeline {backend}",
                OK if meets or backend != "tensorrt" else FAILED,
                f"{side}² slide, {r.tiles} tiles: end to end {r.end_to_end_tiles_per_s:.1f} tiles/s, read-only "
                f"{r.read_tiles_per_s:.1f}, detector-only {r.detector_tiles_per_s:.1f}, ratio {r.ratio:.2f} "
                f"(target >= 0.8), peak RSS {r.peak_rss_mb:.0f} MB",
            )
    with guarded(report, "daemon tensorrt"):
        d = bench_daemon(config, slides=8, size=2048, quiet_period_s=0.5, workdir=cache_dir)
        once = d.slides_with_one_job == d.slides and d.done == d.slides
        report.add(
            "daemon tensorrt",
            OK if once else FAILED,
            f"{d.done}/{d.slides} slides done once each, {d.slides_per_hour:.0f} slides/h, pickup "
            f"{d.pickup_after_quiet_s.max:.2f} s after the quiet period at most",
        )


# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> tuple[Report, GpuProbe]:
    report = Report()
    probe = probe_gpu(timeout=args.probe_timeout)
    why = check_probe(report, probe, args.device)
    if why:
        report.not_run("cuda data path", why)
    elif not probe.cuda_runtime_available:
        report.not_run("cuda data path", "cuda-python is not installed")
    else:
        with guarded(report, "cuda data path"):
            check_cuda(report, args.device, args.mb, args.repeats)
    if why:
        report.not_run("tensorrt plans", why)
    elif not probe.tensorrt_version:
        report.not_run("tensorrt plans", probe.tensorrt_error or "TensorRT is not installed")
    elif not probe.cuda_runtime_available:
        report.not_run("tensorrt plans", "cuda-python is not installed (the engine's data path needs it)")
    else:
        with contextlib.ExitStack() as stack:
            cache = Path(args.plan_cache) if args.plan_cache else Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-plans-"))
            )
            with guarded(report, "tensorrt plans"):
                check_tensorrt(report, probe, args.bundle, cache, args.device, args.repeats)
            if args.slide_px:
                with guarded(report, "pipeline tensorrt"):
                    check_pipeline(report, args.bundle, cache, args.slide_px)
    return report, probe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--bundle", default="demo", help="bundle folder or installed bundle name (default demo)")
    parser.add_argument("--plan-cache", metavar="DIR", help="keep the plans built here (default: a temporary folder)")
    parser.add_argument("--device", type=int, default=0, help="CUDA device index (default 0)")
    parser.add_argument("--mb", type=int, default=DEFAULT_MB, help=f"MiB per copy (default {DEFAULT_MB})")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats, median reported (default 5)")
    parser.add_argument("--probe-timeout", type=float, default=60.0, help="seconds for the GPU probe (default 60)")
    parser.add_argument("--slide-px", type=int, default=16384,
                        help="side of the synthetic slide for the pipeline check (default 16384; 0 skips it)")
    args = parser.parse_args(argv)
    report, probe = run(args)
    if args.json:
        print(
            json.dumps(
                {
                    "passed": not report.failed,
                    "probe": probe.to_json_dict(),
                    "checks": [asdict(r) for r in report.rows],
                },
                indent=2,
            )
        )
    else:
        print(report.table())
        print("FAILED" if report.failed else "passed (checks that could not run are listed as 'not run')")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
