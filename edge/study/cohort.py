"""Cohort runs: every slide of an archive analysed once, one durable row per slide, resumable.

The pure core lists the slides (a folder by the watcher's slide rules, or a CSV), gives each a case
id (the TCGA patient barcode, else the file stem) and a stable slide id (name + fingerprint), turns
an analysis into a row, and decides which slides a re-run skips (same fingerprint and bundle, done).
:class:`ResultsTable` is the durable part: ``slides.csv``, one line appended and fsynced per finished
slide, so a killed run loses only the slides that were in flight. The Ray shell (:func:`run_cohort`)
schedules one slide per task on worker actors that keep their engines open between slides.

Why CSV and not Parquet: a row must be on disk the moment its slide finishes, and Parquet files
cannot be appended to (each write is a new file or a rewrite); CSV appends one fsynced line, is read
by every statistics tool and spreadsheet, and needs no pyarrow.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import io
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.config import DEFAULT_IGNORE_PATTERNS, DEFAULT_SLIDE_EXTENSIONS, Config
from edge.errors import ConfigError, EdgeError, MissingExtraError
from edge.service.watcher import slide_unit
from edge.wsi.fingerprint import fingerprint_slide

log = logging.getLogger(__name__)

__all__ = [
    "COHORT_INSTALL_HINT",
    "ROW_COLUMNS",
    "CohortSlide",
    "CohortSummary",
    "ResultsTable",
    "case_id_for",
    "list_slides",
    "plan_run",
    "run_cohort",
    "slide_id_for",
]

COHORT_INSTALL_HINT = 'pip install "mitosis-edge[cohort]"  (or: pip install "ray>=2.9" lifelines matplotlib)'
RESULTS_FILE = "slides.csv"
EXPORTS_DIR = "slides"
MAX_ATTEMPTS = 2  # a worker that dies mid-slide (kill -9, a crashing reader library) costs the slide one retry
WORKER_MALLOC_ARENAS = 2  # measured: worker RSS levels off after ~4 slides instead of creeping up
TCGA_BARCODE = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}", re.IGNORECASE)

# the row of one slide, in column order; extra columns of the input CSV follow
ROW_COLUMNS = (
    "slide_id", "slide_path", "case_id", "status", "error", "fingerprint",
    "hotspot_mc", "hotspot_amf", "hotspot_nmf", "hotspot_uncertain", "hotspot_ratio", "hotspot_area_mm2",
    "slide_mf", "slide_amf", "slide_nmf", "slide_uncertain", "slide_ratio",
    "density_per_mm2", "tissue_mm2", "mpp", "resampled", "tiles", "candidates", "seconds",
    "bundle_name", "bundle_version", "bundle_sha256", "backend",
    "node", "worker_pid", "worker_rss_mb", "worker_peak_rss_mb", "attempt", "finished_at",
)  # fmt: skip


# --- which slides, under which names -------------------------------------------------------------


def case_id_for(path: str | Path) -> str:
    """The case a slide belongs to: the TCGA patient barcode (first 12 characters) or the file stem.

    >>> case_id_for("/archive/TCGA-A2-A0T2-01Z-00-DX1.0F5B.svs")
    'TCGA-A2-A0T2'
    >>> case_id_for("/archive/S21-04711 B2.ome.tiff")
    'S21-04711 B2'
    """
    name = Path(path).name
    if TCGA_BARCODE.match(name):
        return name[:12].upper()
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem if Path(name).suffix else name


def slide_id_for(path: str | Path, fingerprint_key: str) -> str:
    """A folder-safe, stable id: the file name and 10 hex digits of the fingerprint.

    >>> slide_id_for("/a/b c.svs", "sha256:0123456789abcdef")
    'b_c.svs-0123456789'
    """
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).name).strip("._") or "slide"
    return f"{name[:80]}-{fingerprint_key.removeprefix('sha256:')[:10]}"


@dataclass(frozen=True)
class CohortSlide:
    """One slide of the list: where it is, its case, an optional mpp override and the input's extra columns."""

    path: Path
    case_id: str
    mpp: float | None = None
    extra: Mapping[str, str] = field(default_factory=dict)


def list_slides(source: str | Path) -> list[CohortSlide]:
    """The slides of a folder (recursive, the watcher's rules: MRXS and DICOM folders are one slide each)
    or of a CSV with ``slide_path`` and optional ``case_id``, ``mpp`` and any other columns.

    Relative paths in a CSV are taken from the CSV's folder. Raises ConfigError naming the problem.
    """
    src = Path(source)
    if src.is_dir():
        units: dict[Path, None] = {}
        for root, _dirs, names in os.walk(src):
            for name in sorted(names):
                unit = slide_unit(Path(root, name), extensions=DEFAULT_SLIDE_EXTENSIONS,
                                  ignore_patterns=DEFAULT_IGNORE_PATTERNS)
                if unit is not None and unit.exists():
                    units.setdefault(unit)
        if not units:
            known = ", ".join(DEFAULT_SLIDE_EXTENSIONS)
            raise ConfigError(f"--slides {str(src)!r}: no slides found (extensions {known})")
        return [CohortSlide(path=u, case_id=case_id_for(u)) for u in sorted(units)]
    if src.is_file():
        return _slides_from_csv(src)
    raise ConfigError(f"--slides {str(src)!r} does not exist; give a folder of slides or a CSV with a slide_path "
                      "column")


def _slides_from_csv(path: Path) -> list[CohortSlide]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--slides {str(path)!r} cannot be read: {exc}") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = reader.fieldnames or []
    if "slide_path" not in columns:
        raise ConfigError(f"--slides {str(path)!r} has no 'slide_path' column (columns: {columns}); "
                          "give a CSV with slide_path and optional case_id, mpp")
    slides = []
    for line, row in enumerate(reader, start=2):
        raw = (row.get("slide_path") or "").strip()
        if not raw:
            raise ConfigError(f"--slides {str(path)!r} line {line}: empty slide_path")
        slide_path = Path(raw) if Path(raw).is_absolute() else path.parent / raw
        mpp: float | None = None
        if (row.get("mpp") or "").strip():
            try:
                mpp = float(row["mpp"])
            except ValueError:
                mpp = math.nan
            if not (math.isfinite(mpp) and mpp > 0):
                raise ConfigError(f"--slides {str(path)!r} line {line}: mpp={row['mpp']!r} must be a positive "
                                  "number of µm/px (or empty)")
        extra = {k: v for k, v in row.items() if k and k not in ("slide_path", "case_id", "mpp")}
        slides.append(CohortSlide(path=slide_path, case_id=(row.get("case_id") or "").strip()
                                  or case_id_for(slide_path), mpp=mpp, extra=extra))
    if not slides:
        raise ConfigError(f"--slides {str(path)!r} lists no slides")
    return slides


# --- rows -----------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 6) -> str:
    return "" if value is None or not math.isfinite(value) else f"{round(value, digits):g}"


def result_row(result: Any, *, tiles: int, seconds: float) -> dict[str, str]:
    """The score columns of a row from a :class:`edge.analysis.scoring.SlideResult`."""
    s = result.scores
    hs, tot = s.hotspot.counts, s.totals
    bundle = result.provenance.get("bundle", {})
    return {
        "hotspot_mc": str(hs.mitotic), "hotspot_amf": str(hs.atypical), "hotspot_nmf": str(hs.normal),
        "hotspot_uncertain": str(hs.uncertain), "hotspot_ratio": _num(hs.atypical_ratio),
        "hotspot_area_mm2": _num(s.hotspot.hotspot.area_mm2),
        "slide_mf": str(tot.mitotic), "slide_amf": str(tot.atypical), "slide_nmf": str(tot.normal),
        "slide_uncertain": str(tot.uncertain), "slide_ratio": _num(tot.atypical_ratio),
        "density_per_mm2": _num(s.mitotic_density_per_mm2), "tissue_mm2": _num(s.tissue_area_mm2),
        "mpp": _num(result.slide.get("mpp_x")), "resampled": str(bool(result.slide.get("resampled", False))).lower(),
        "tiles": str(tiles), "candidates": str(s.candidates), "seconds": f"{seconds:.2f}",
        "bundle_name": str(bundle.get("name", "")), "bundle_version": str(bundle.get("version", "")),
        "bundle_sha256": str(bundle.get("manifest_sha256", "")), "backend": str(result.provenance.get("backend", "")),
    }


@dataclass(frozen=True)
class BundleKey:
    """What makes two runs of a slide the same analysis: the bundle's name, version and manifest sha256."""

    name: str
    version: str
    sha256: str


class ResultsTable:
    """``DIR/slides.csv``: one line per finished slide, appended and fsynced; the last line of a slide wins.

    A line cut short by a killed driver (no newline at the end) is dropped when the table is opened,
    so that slide runs again.
    """

    def __init__(self, out_dir: Path, extra_columns: Sequence[str] = ()) -> None:
        self.path = out_dir / RESULTS_FILE
        self.rows: dict[str, dict[str, str]] = {}
        extra = [c for c in extra_columns if c not in ROW_COLUMNS]
        self.columns = list(ROW_COLUMNS) + extra
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._load()
        else:
            self._rewrite()

    def _load(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            log.warning("%s: dropping a line cut short by an interrupted run (%d bytes)", self.path, len(data) - cut)
            data = data[:cut]
        reader = csv.DictReader(io.StringIO(data.decode("utf-8")))
        existing = list(reader.fieldnames or [])
        if "slide_id" not in existing:
            raise ConfigError(f"{self.path} is not a cohort results table (no slide_id column); give another --out")
        for row in reader:
            self.rows[row["slide_id"]] = {k: v or "" for k, v in row.items() if k is not None}
        wanted = existing + [c for c in self.columns if c not in existing]
        self.columns = wanted
        if wanted != existing or len(data) != self.path.stat().st_size:
            self._rewrite()

    def _rewrite(self) -> None:
        """Write every row under the current columns to a new file and rename it into place."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, self.columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows.values())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def append(self, row: Mapping[str, str]) -> None:
        """Append one slide's row and fsync it: it survives a kill -9 of the driver from here on."""
        buf = io.StringIO()
        csv.DictWriter(buf, self.columns, lineterminator="\n", extrasaction="ignore").writerow(row)
        with self.path.open("a", encoding="utf-8", newline="") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        self.rows[row["slide_id"]] = dict(row)


@dataclass
class PlannedSlide:
    """A slide of this run with its fingerprint (None when it could not be read) and id."""

    slide: CohortSlide
    slide_id: str
    fingerprint: str
    error: str = ""  # the slide could not be fingerprinted: it fails without being sent to a worker


@dataclass
class RunPlan:
    todo: list[PlannedSlide]
    skipped_done: list[PlannedSlide]
    skipped_failed: list[PlannedSlide]  # failed before with the same fingerprint and bundle; --retry-failed runs them


def plan_run(
    planned: Sequence[PlannedSlide], rows: Mapping[str, Mapping[str, str]], bundle: BundleKey, *, retry_failed: bool
) -> RunPlan:
    """Which slides run now: not yet in the table, or analysed with another bundle, or failed (with ``retry_failed``).

    >>> key = BundleKey("demo", "1", "ab")
    >>> s = PlannedSlide(CohortSlide(Path("a.svs"), "a"), "a.svs-1", "sha256:1")
    >>> row = {"status": "done", "fingerprint": "sha256:1", "bundle_sha256": "ab"}
    >>> [len(p) for p in dataclasses.astuple(plan_run([s], {"a.svs-1": row}, key, retry_failed=False))]
    [0, 1, 0]
    """
    plan = RunPlan([], [], [])
    for p in planned:
        row = rows.get(p.slide_id)
        same = (
            row is not None and row.get("fingerprint") == p.fingerprint and row.get("bundle_sha256") == bundle.sha256
            and not p.error
        )
        if same and row is not None and row.get("status") == "done":
            plan.skipped_done.append(p)
        elif same and row is not None and row.get("status") == "failed" and not retry_failed:
            plan.skipped_failed.append(p)
        else:
            plan.todo.append(p)
    return plan


def base_row(p: PlannedSlide) -> dict[str, str]:
    return {"slide_id": p.slide_id, "slide_path": str(p.slide.path), "case_id": p.slide.case_id,
            "fingerprint": p.fingerprint, **{k: str(v) for k, v in p.slide.extra.items()}}


def failed_row(p: PlannedSlide, bundle: BundleKey, error: str, *, attempt: int, seconds: float = 0.0) -> dict[str, str]:
    return {**base_row(p), "status": "failed", "error": error, "bundle_name": bundle.name,
            "bundle_version": bundle.version, "bundle_sha256": bundle.sha256, "attempt": str(attempt),
            "seconds": f"{seconds:.2f}", "finished_at": _now()}


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# --- the worker (runs inside a Ray actor) ---------------------------------------------------------


def worker_config(config: Config, cpus: int) -> Config:
    """Thread counts bounded by the CPUs Ray gave the worker, so parallel workers do not oversubscribe."""
    stream, engines = config.stream, config.engines
    if stream.reader_threads == 0:
        stream = dataclasses.replace(stream, reader_threads=max(1, cpus))
    if engines.intra_op_threads == 0:
        engines = dataclasses.replace(engines, intra_op_threads=max(1, cpus))
    return dataclasses.replace(config, stream=stream, engines=engines)


class CohortWorker:
    """One Ray actor: opens the bundle's engines once and analyses the slides sent to it, one at a time."""

    def __init__(self, config: Config, cpus: int) -> None:
        from edge.service.worker import EngineCache

        self.config = worker_config(config, cpus)
        self.engines = EngineCache()

    def analyze(self, p: PlannedSlide, out_dir: str, bundle: BundleKey, attempt: int) -> dict[str, str]:
        """Analyse one slide, write its exports under ``out_dir/slides/<id>/`` and return its row.

        Every error of the slide becomes a failed row naming it; only the death of this process escapes.
        """
        import resource

        from edge.analysis.pipeline import analyze_slide

        t0 = time.perf_counter()
        config = self.config
        if p.slide.mpp is not None:
            config = dataclasses.replace(config, slide=dataclasses.replace(config.slide, mpp_override=p.slide.mpp))
        try:
            analysis = analyze_slide(p.slide.path, config, engines=self.engines.get(config))
            final = Path(out_dir) / EXPORTS_DIR / p.slide_id
            partial = final.with_name(f".{p.slide_id}.partial-{os.getpid()}")
            shutil.rmtree(partial, ignore_errors=True)
            analysis.write_exports(partial)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            row = {**base_row(p), "status": "done", "error": "",
                   **result_row(analysis.result, tiles=analysis.tiles, seconds=time.perf_counter() - t0)}
        except EdgeError as exc:
            row = failed_row(p, bundle, f"{type(exc).__name__}: {exc}", attempt=attempt,
                             seconds=time.perf_counter() - t0)
        except Exception as exc:  # a library's bug on one slide fails that slide, never the run
            log.exception("slide %s failed unexpectedly", p.slide.path)
            row = failed_row(p, bundle, f"unexpected {type(exc).__name__}: {exc}", attempt=attempt,
                             seconds=time.perf_counter() - t0)
        row.update({"node": _node_id(), "worker_pid": str(os.getpid()), "attempt": str(attempt), "finished_at": _now(),
                    "worker_rss_mb": _rss_now_mb(),
                    "worker_peak_rss_mb": f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}"})
        return row

    def close(self) -> None:
        self.engines.close()


def _rss_now_mb() -> str:
    """This process's resident set size now, MiB ("" where /proc is missing)."""
    try:
        with open("/proc/self/statm") as fh:
            return f"{int(fh.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20:.0f}"
    except (OSError, ValueError, IndexError):
        return ""


def _node_id() -> str:
    try:
        import ray

        return str(ray.get_runtime_context().get_node_id())[:12]
    except Exception:  # noqa: BLE001 - outside Ray (tests call the worker directly)
        return "local"


# --- the Ray shell --------------------------------------------------------------------------------


@dataclass
class CohortSummary:
    total: int
    done: int = 0  # analysed in this run
    failed: int = 0  # failed in this run
    skipped_done: int = 0
    skipped_failed: int = 0
    retried: int = 0  # slides resent after their worker died
    seconds: float = 0.0
    ray_start_s: float = 0.0  # ray.init (starting Ray on this machine, or joining a cluster)
    workers: int = 0
    nodes: dict[str, int] = field(default_factory=dict)  # slides per node
    failures: list[tuple[str, str]] = field(default_factory=list)  # (slide path, reason), this run and skipped
    rss_mb: dict[str, list[float]] = field(default_factory=dict)  # worker -> RSS after each slide it analysed
    peak_rss_mb: dict[str, list[float]] = field(default_factory=dict)  # worker -> peak RSS so far, after each

    @property
    def failed_total(self) -> int:
        return self.failed + self.skipped_failed


Progress = Callable[[int, int, int, float | None], None]  # (done, failed, to run, eta seconds)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingExtraError(f"cohort runs need Ray, which is not installed; install it with: {COHORT_INSTALL_HINT}"
                                ) from None
    return ray


def bundle_key(config: Config) -> BundleKey:
    from edge.engines import load_bundle

    b = load_bundle(config.engines.bundle)
    return BundleKey(b.name, b.version, b.manifest_sha256)


def fingerprint_all(slides: Iterable[CohortSlide]) -> list[PlannedSlide]:
    planned = []
    for s in slides:
        try:
            key = fingerprint_slide(s.path).key
            planned.append(PlannedSlide(s, slide_id_for(s.path, key), key))
        except EdgeError as exc:
            missing = "sha256:" + "0" * 10
            planned.append(PlannedSlide(s, slide_id_for(s.path, missing), "", error=f"{type(exc).__name__}: {exc}"))
    return planned


def run_cohort(
    slides: Sequence[CohortSlide],
    out_dir: str | Path,
    config: Config,
    *,
    ray_address: str | None = None,
    cpus_per_slide: float = 1.0,
    gpus_per_slide: float = 0.0,
    max_workers: int = 0,
    retry_failed: bool = False,
    progress: Progress | None = None,
) -> CohortSummary:
    """Analyse every slide not yet done on Ray, appending one row per slide to ``out_dir/slides.csv``.

    Joins ``ray_address`` (or ``$RAY_ADDRESS``) or starts Ray on this machine; a Ray session already
    started by the caller is used as it is. Workers are actors with ``cpus_per_slide`` CPUs and
    ``gpus_per_slide`` GPUs each, as many as the cluster holds (at most ``max_workers`` when > 0).
    """
    ray = _import_ray()
    out = Path(out_dir)
    t0 = time.perf_counter()
    key = bundle_key(config)
    extra = list(dict.fromkeys(k for s in slides for k in s.extra))
    table = ResultsTable(out, extra)
    planned = fingerprint_all(slides)
    plan = plan_run(planned, table.rows, key, retry_failed=retry_failed)
    summary = CohortSummary(total=len(slides), skipped_done=len(plan.skipped_done),
                            skipped_failed=len(plan.skipped_failed))
    summary.failures += [(str(p.slide.path), table.rows[p.slide_id].get("error", "")) for p in plan.skipped_failed]
    todo = []
    for p in plan.todo:
        if p.error:  # unreadable before any analysis: fails here, alone
            table.append(failed_row(p, key, p.error, attempt=1))
            summary.failed += 1
            summary.failures.append((str(p.slide.path), p.error))
        else:
            todo.append(p)
    if not todo:
        summary.seconds = time.perf_counter() - t0
        return summary

    started = not ray.is_initialized()
    t_ray = time.perf_counter()
    if started:
        ray.init(address=ray_address, include_dashboard=False, configure_logging=False, log_to_driver=False)
    summary.ray_start_s = time.perf_counter() - t_ray
    try:
        _schedule(ray, todo, out, config, key, table, summary, cpus_per_slide, gpus_per_slide, max_workers, progress)
    finally:
        if started:
            ray.shutdown()
    summary.seconds = time.perf_counter() - t0
    return summary


def _schedule(
    ray: Any, todo: list[PlannedSlide], out: Path, config: Config, key: BundleKey, table: ResultsTable,
    summary: CohortSummary, cpus: float, gpus: float, max_workers: int, progress: Progress | None,
) -> None:
    resources = ray.cluster_resources()
    fits = int(resources.get("CPU", 1) // cpus) if cpus > 0 else len(todo)
    if gpus > 0:
        fits = min(fits, int(resources.get("GPU", 0) // gpus))
        if fits == 0:
            raise ConfigError(f"--gpus-per-slide {gpus:g}: the Ray cluster has {resources.get('GPU', 0):g} GPUs; "
                              "join a cluster with GPU nodes (--ray-address) or pass --gpus-per-slide 0")
    n = max(1, min(fits, len(todo), max_workers or len(todo)))
    # few malloc arenas: a long-lived worker with reader threads otherwise grows by an arena per thread
    env = {"MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", str(WORKER_MALLOC_ARENAS))}
    remote = ray.remote(CohortWorker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0,
                                              runtime_env={"env_vars": env})
    workers = [remote.remote(config, max(1, int(cpus))) for _ in range(n)]

    def replace(w: int) -> None:  # a dead worker's place goes to a new one, which opens its engines again
        ray.kill(workers[w], no_restart=True)
        workers[w] = remote.remote(config, max(1, int(cpus)))

    summary.workers = n
    queue = list(reversed(todo))
    attempts: dict[str, int] = {}
    in_flight: dict[Any, tuple[int, PlannedSlide]] = {}
    t_start = time.perf_counter()
    finished = 0

    def submit(w: int, p: PlannedSlide) -> None:
        attempts[p.slide_id] = attempts.get(p.slide_id, 0) + 1
        ref = workers[w].analyze.remote(p, str(out), key, attempts[p.slide_id])
        in_flight[ref] = (w, p)

    for w in range(n):
        if queue:
            submit(w, queue.pop())
    try:
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            w, p = in_flight.pop(ready[0])
            try:
                row = ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:
                if attempts[p.slide_id] < MAX_ATTEMPTS:
                    log.warning("the worker analysing %s died (%s); retrying the slide once", p.slide.path,
                                type(exc).__name__)
                    summary.retried += 1
                    replace(w)
                    submit(w, p)
                    continue
                reason = (f"the worker process died on this slide {MAX_ATTEMPTS} times "
                          "(killed, out of memory, or a crash in a reader library)")
                row = failed_row(p, key, reason, attempt=attempts[p.slide_id])
                replace(w)
            table.append(row)
            finished += 1
            if row["status"] == "done":
                summary.done += 1
            else:
                summary.failed += 1
                summary.failures.append((str(p.slide.path), row["error"]))
            node = row.get("node") or ""
            if node:
                summary.nodes[node] = summary.nodes.get(node, 0) + 1
            if row.get("worker_rss_mb") and row["status"] == "done":  # engines are open from the first done on
                worker = f"{node}:{row['worker_pid']}"
                summary.rss_mb.setdefault(worker, []).append(float(row["worker_rss_mb"]))
                summary.peak_rss_mb.setdefault(worker, []).append(float(row["worker_peak_rss_mb"]))
            if queue:
                submit(w, queue.pop())
            if progress is not None:
                elapsed = time.perf_counter() - t_start
                left = len(todo) - finished
                progress(summary.done, summary.failed, len(todo), elapsed / finished * left if finished else None)
    finally:  # Ctrl-C or an error: the slides in flight are abandoned with their workers; their rows never come
        for worker in workers:
            ray.kill(worker, no_restart=True)
