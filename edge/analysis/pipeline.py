"""The two-stage pipeline on one slide: tile stream → detector → candidates → crops → classifier ensemble → scores.

Streaming and bounded: the tile stream reads ahead in its own threads while the detector runs one
batch (collect the previous batch, classify its candidates, submit this one), so reading and
inference overlap and memory depends on batch size and queue depth, never on the slide. Candidates are small (a few
numbers each); their crops are cut from the tile in memory and classified in batches between
detector batches, so at most one classifier batch of crops waits at a time. The numeric work
lives in the pure modules ``detect``, ``classify`` and ``scoring``; this module only wires them.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from edge import __version__
from edge.analysis.classify import (
    atypical_probability,
    classifier_outputs_to_probabilities,
    crop_origins,
    decide,
    ensemble_mitotic,
)
from edge.analysis.detect import Boxes, TileOwnership, decode, keep_owned, merge_indices, nms, to_slide
from edge.analysis.provenance import BundleProvenance, Provenance
from edge.analysis.qc import QcAccumulator, QcMaps, SlideQc
from edge.analysis.scoring import (
    Figure,
    SlideResult,
    SlideScores,
    hotspot_radius_um,
    score_slide,
    tissue_fraction_in_circles,
)
from edge.config import Config
from edge.engines import Bundle, EngineSet, load_bundle, open_engines
from edge.engines.base import Pending
from edge.errors import EdgeError, ImplausibleSlideError, SlideReadError
from edge.logs import slide_context
from edge.wsi.slide import ReadScale, Slide, open_slide
from edge.wsi.stream import SlidePlan, TileBatch, open_stream, plan_slide
from edge.wsi.tiling import Tile, glass_colour

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)
MAX_UPSAMPLING = 2.5  # a slide coarser than 2.5x the model's mpp has too little detail to find mitoses
QC_MEASURE_TILES = 32  # scan QC measures the tiles' samples in stacks of this many (see QcAccumulator)
OVERVIEW_SIDE_PX = 2048  # the overlay's thumbnail: enough to see each figure's mark on a 15 mm slide
HOTSPOT_VIEW_PX = 768  # the overlay's inset of the hotspot field: about 2 µm/px for a 2 mm² field


@dataclass(frozen=True)
class HotspotView:
    """The hotspot field read finer than the thumbnail: RGB pixels, their top-left in slide µm, their µm/px."""

    pixels: np.ndarray
    origin_um: tuple[float, float]
    mpp: tuple[float, float]


@dataclass(frozen=True)
class StageTimes:
    """Wall seconds per stage of one slide (``read`` is summed over reader threads, so it can exceed the
    wall time). Built once, when the slide is done (:meth:`_StageClock.stage_times`); ``to_dict`` is the one
    JSON form (result.json's ``provenance.timings_s``, ``bench analyze``, the daemon's metrics)."""

    plan: float = 0.0
    read: float = 0.0
    read_wait: float = 0.0  # the detector loop waited for tiles: reading was the bottleneck
    detect: float = 0.0  # submit → outputs, wall time the detector loop waited for the engine
    decode: float = 0.0
    crops: float = 0.0
    classify: float = 0.0
    score: float = 0.0
    total: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in dataclasses.asdict(self).items()}


_Stage = Literal["plan", "read", "read_wait", "detect", "decode", "crops", "classify", "score"]


class _StageClock:
    """Seconds summed per stage while a slide is analysed; frozen into :class:`StageTimes` at the end."""

    def __init__(self) -> None:
        self._seconds: dict[_Stage, float] = {}

    def add(self, stage: _Stage, seconds: float) -> None:
        self._seconds[stage] = self._seconds.get(stage, 0.0) + seconds

    def since(self, stage: _Stage, t0: float) -> float:
        """Add the seconds from ``t0`` (a ``time.perf_counter()``) to now; return now."""
        now = time.perf_counter()
        self.add(stage, now - t0)
        return now

    def stage_times(self, total: float) -> StageTimes:
        return StageTimes(**self._seconds, total=total)


@dataclass
class Analysis:
    """What one slide's analysis produced: the result and what exports need besides it."""

    result: SlideResult
    slide_plan: SlidePlan  # the tissue mask (at mask_mpp) outlines the tissue in the overlay
    overview: np.ndarray  # RGB thumbnail for the overlay, longest side about OVERVIEW_SIDE_PX
    overview_mpp: tuple[float, float]
    times: StageTimes
    tiles: int
    candidates_before_merge: int
    hotspot_view: HotspotView | None = None  # the hotspot field at a finer scale, for the overlay's inset
    qc_maps: QcMaps | None = None  # where the out-of-focus, folded and pen-marked tissue is; None with QC off

    def write_exports(self, out_dir: Path) -> dict[str, Path]:
        """result.json, QuPath GeoJSON, MIDOG JSON, CSV and the overlay (thumbnail, tissue outline) in ``out_dir``."""
        from edge.analysis.exports import write_exports

        return write_exports(self.result, out_dir, thumbnail=self.overview, thumbnail_mpp=self.overview_mpp,
                             tissue_mask=self.slide_plan.mask, hotspot_view=self.hotspot_view,
                             qc_maps=self.qc_maps)


def pipeline_config(config: Config, bundle: Bundle) -> Config:
    """The config with tiles at the detector's input size and mpp."""
    tiling = dataclasses.replace(config.tiling, tile_size=bundle.detector.size)
    if tiling.overlap >= tiling.tile_size // 2:
        tiling = dataclasses.replace(tiling, overlap=tiling.tile_size // 8)
    slide = dataclasses.replace(config.slide, target_mpp=bundle.detector.mpp)
    return dataclasses.replace(config, tiling=tiling, slide=slide).validate()


def analyze_slide(
    path: str | Path,
    config: Config,
    *,
    engines: EngineSet | None = None,
    cancel_event: threading.Event | None = None,
    progress: Progress | None = None,
) -> Analysis:
    """Run both stages on one slide and score it. Engines are opened (and closed) here unless given.

    Raises SlideReadError subclasses for the slide, EngineError for the models, StreamCancelled
    when ``cancel_event`` is set; never leaves a thread or a batch in flight behind.
    """
    t_start = time.perf_counter()
    own_engines = engines is None
    if engines is None:
        bundle = load_bundle(config.engines.bundle)
        engines = open_engines(bundle, config.engines, detector_batch=config.stream.batch_size)
    try:
        with slide_context(path):  # library warnings (tifffile, openslide) name this slide
            return _analyze(
                Path(path), pipeline_config(config, engines.bundle), engines, cancel_event, progress, t_start
            )
    finally:
        if own_engines:
            engines.close()


def _analyze(
    path: Path,
    config: Config,
    engines: EngineSet,
    cancel_event: threading.Event | None,
    progress: Progress | None,
    t_start: float,
) -> Analysis:
    bundle = engines.bundle
    clock = _StageClock()
    report = progress or (lambda stage, done, total: None)
    with open_slide(path, config.slide) as slide:
        t0 = time.perf_counter()
        sp = plan_slide(slide, config)
        _check_scale(slide, sp, bundle)
        _check_tile_count(slide, sp, config)
        clock.since("plan", t0)
        total = len(sp.plan)
        report("detect", 0, total)
        qc = _qc_accumulator(sp, config)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-qc") as qc_pool:
            return _analyze_planned(slide, sp, path, config, engines, cancel_event, clock, report, qc, qc_pool, t_start)


def _analyze_planned(
    slide: Slide, sp: SlidePlan, path: str | Path, config: Config, engines: EngineSet,
    cancel_event: threading.Event | None, clock: _StageClock, report: Progress, qc: QcAccumulator | None,
    qc_pool: ThreadPoolExecutor, t_start: float,
) -> Analysis:
    bundle = engines.bundle
    total = len(sp.plan)
    mpp0 = slide.info.level_mpp(0)
    slide_qc: list[Future[SlideQc]] = []

    def stream_done() -> None:
        # Scan QC's slide-wide part (maps, stains) needs every tile and no figure: in a thread from now,
        # while the last candidates are classified, scored and the overview is read.
        if qc is not None:
            slide_qc.append(qc_pool.submit(
                qc.slide_maps, thumbnail=sp.thumbnail, mask=sp.mask, mask_mpp=sp.mask_mpp,
                px0_per_tile_px=(sp.plan.px0_per_out_x, sp.plan.px0_per_out_y), mpp0=mpp0,
            ))

    candidates = _detect(slide, sp, config, engines, cancel_event, clock, report, qc, stream_done)
    t0 = time.perf_counter()
    boxes, p_mitotic, p_atypical = candidates.merged(bundle.detector.merge_radius_um / mpp0[0])
    figures = _figures(boxes, p_mitotic, p_atypical, bundle, mpp0)
    clock.since("decode", t0)
    report("classify", len(figures), len(figures))
    t0 = time.perf_counter()
    radius_um = hotspot_radius_um(bundle.decision.hotspot_area_mm2)

    def tissue_fraction(centres_um: np.ndarray) -> np.ndarray:
        return tissue_fraction_in_circles(sp.mask, sp.mask_mpp, centres_um, radius_um)

    scores = score_slide(
        figures,
        tissue_area_mm2=sp.tissue_area_mm2,
        hotspot_area_mm2=bundle.decision.hotspot_area_mm2,
        tissue_fraction=tissue_fraction,
    )
    clock.since("score", t0)
    info = slide.info
    overview, overview_mpp = slide.thumbnail(
        max(info.width * mpp0[0], info.height * mpp0[1]) / OVERVIEW_SIDE_PX
    )
    hotspot_view = _hotspot_view(slide, _hotspot_center(scores), radius_um)
    qc_section, qc_maps = _finish_qc(qc, slide_qc[0].result() if slide_qc else None, figures,
                                     bundle.decision.hotspot_area_mm2, scores)
    times = clock.stage_times(total=time.perf_counter() - t_start)
    slide_meta = {
        "width": info.width, "height": info.height, "mpp_x": mpp0[0], "mpp_y": mpp0[1],
        "mpp_source": info.mpp_source, "format": info.format, "vendor": info.vendor,
        "read_level": sp.scale.level, "read_mpp": sp.scale.mpp_x, "resampled": sp.scale.resampled,
        "tiles": total, "scanner": dict(info.scanner),
    }
    if info.barcode:
        slide_meta["barcode"] = info.barcode
    result = SlideResult(
        slide_path=str(path),
        slide=slide_meta,
        scores=scores,
        figures=tuple(figures),
        provenance=_provenance(config, engines, times).to_json_dict(),
        qc=qc_section,
    )
    return Analysis(result, sp, overview, overview_mpp, times, total, candidates.raw, hotspot_view, qc_maps)


def scale_problem(mpp0: tuple[float, float], model_mpp: float) -> str | None:
    """Why a slide of level-0 pixel size ``mpp0`` cannot be analysed by models at ``model_mpp``; None when it can.

    ``info`` and ``analyze`` (and the daemon) ask this one function, so they agree.

    >>> scale_problem((0.499, 0.499), 0.25) is None, scale_problem((28.97, 28.97), 0.25).split(",")[0]
    (True, 'scanned at 29 µm/px')
    """
    if min(mpp0) <= model_mpp * MAX_UPSAMPLING:
        return None
    return (
        f"scanned at {mpp0[0]:.3g} µm/px, too coarse for the detector at {model_mpp} µm/px "
        f"(at most {MAX_UPSAMPLING}x upsampling); mitotic figures need a 20x or 40x scan. If the recorded mpp "
        "is wrong, give the right one (analyze --mpp X; client submit SLIDE --mpp X; [slide] mpp_override)"
    )


def _hotspot_center(scores: Any) -> tuple[float, float] | None:
    spot = scores.hotspot.hotspot
    if not (np.isfinite(spot.center_x_um) and np.isfinite(spot.center_y_um)):
        return None
    return float(spot.center_x_um), float(spot.center_y_um)


def _hotspot_view(slide: Slide, center_um: tuple[float, float] | None, radius_um: float) -> HotspotView | None:
    """The square around the hotspot circle (plus a margin) at about HOTSPOT_VIEW_PX px a side; None without one."""
    if center_um is None:
        return None
    mpp0 = slide.info.level_mpp(0)
    side_um = 2.2 * radius_um
    scale = slide.read_scale(max(side_um / HOTSPOT_VIEW_PX, min(mpp0)))
    side_x, side_y = round(side_um / scale.mpp_x), round(side_um / scale.mpp_y)
    left_um, top_um = center_um[0] - side_um / 2, center_um[1] - side_um / 2
    pixels = slide.read_region(left_um / mpp0[0], top_um / mpp0[1], side_x, side_y, scale)
    return HotspotView(pixels, (left_um, top_um), (scale.mpp_x, scale.mpp_y))


def _qc_accumulator(sp: SlidePlan, config: Config) -> QcAccumulator | None:
    if not config.qc.enabled:
        return None
    glass = glass_colour(sp.thumbnail) if sp.thumbnail is not None else np.full(3, 255.0, np.float32)
    return QcAccumulator(sp.plan.width, sp.plan.height, sp.plan.mpp_x, config.qc, glass)


def _finish_qc(
    qc: QcAccumulator | None, slide_qc: SlideQc | None, figures: list[Figure], area_mm2: float, scores: SlideScores,
) -> tuple[dict[str, Any] | None, QcMaps | None]:
    if qc is None or slide_qc is None:  # QC off (its slide-wide part starts whenever it is on)
        return None, None
    spot = scores.hotspot.hotspot
    return qc.finish(slide_qc, figures=figures, hotspot_area_mm2=area_mm2,
                     plain_hotspot=(spot.center_x_um, spot.center_y_um))


def _check_scale(slide: Slide, sp: SlidePlan, bundle: Bundle) -> None:
    problem = scale_problem(slide.info.level_mpp(0), bundle.detector.mpp)
    if problem is not None:
        raise SlideReadError(slide.path, problem)


def _check_tile_count(slide: Slide, sp: SlidePlan, config: Config) -> None:
    limit = config.slide.max_tiles
    if len(sp.plan) > limit:
        raise ImplausibleSlideError(
            slide.path,
            f"its tile plan holds {len(sp.plan)} tiles ({sp.tissue_area_mm2:.0f} mm² of tissue), more than "
            f"slide.max_tiles = {limit}: a crafted file or a larger scan than expected; raise the limit only if the "
            "scan is real",
        )


def _detect(
    slide: Slide,
    sp: SlidePlan,
    config: Config,
    engines: EngineSet,
    cancel_event: threading.Event | None,
    clock: _StageClock,
    report: Progress,
    qc: QcAccumulator | None = None,
    stream_done: Callable[[], None] | None = None,
) -> _Candidates:
    """Stream tiles through the detector and classify its candidates as they come; ``stream_done`` is called
    once every tile is through (scan QC's slide-wide part starts then, in a thread).

    Each batch's candidates are cut from the tile already in memory (no second read of the slide)
    and classified in batches of ``engines.classifier_batch`` between detector batches: on a CPU
    backend both engines share the cores, so running them in turn is as fast as overlapping them
    and keeps only one classifier batch of crops in memory.
    """
    spec = engines.bundle.detector
    ownership = TileOwnership(sp.plan)
    px0_per_out = (sp.plan.px0_per_out_x, sp.plan.px0_per_out_y)
    candidates = _Candidates(slide, sp, config, engines, clock)
    detector = engines.detector
    in_flight: list[tuple[TileBatch, Pending]] = []

    def collect(entry: tuple[TileBatch, Pending]) -> None:
        batch, pending = entry
        t0 = time.perf_counter()
        outputs = pending.result()
        t0 = clock.since("detect", t0)
        raw = outputs[spec.output]
        for i, tile in enumerate(batch.tiles):
            if qc is not None:
                qc.add(batch.measures[i])  # sampled by the stream's reader threads (qc.sample_batch)
            boxes = nms(decode(raw[i], spec), spec.nms_iou, spec.max_detections)
            candidates.raw += len(boxes)
            if len(boxes) == 0:
                continue
            keep = keep_owned(boxes, tile, ownership)
            if keep.any():
                local = boxes.take(keep)
                clock.since("decode", t0)
                candidates.add(tile, batch.pixels[i], local, to_slide(local, tile, px0_per_out))
                t0 = time.perf_counter()
        clock.since("decode", t0)
        candidates.classify_ready()

    done = 0
    try:
        sample = None if qc is None else qc.sample_batch  # in the stream's reader threads
        with open_stream(slide, sp, config, cancel_event, sample) as stream:
            for batch in stream:
                if in_flight:
                    first = in_flight.pop()
                    collect(first)
                    done += len(first[0].tiles)
                    report("detect", done, len(sp.plan))
                in_flight.append((batch, detector.submit(batch.pixels)))
                if qc is not None:  # while the detector runs this batch: QC's samples so far, as one stack
                    qc.measure_pending(QC_MEASURE_TILES)
            while in_flight:
                first = in_flight.pop()
                collect(first)
                done += len(first[0].tiles)
                report("detect", done, len(sp.plan))
            clock.add("read", stream.stats.read_seconds)
            clock.add("read_wait", stream.stats.wait_seconds)
        if stream_done is not None:  # every tile is in: what needs them all may start
            stream_done()
        candidates.classify_rest()
    finally:
        for _batch, pending in in_flight:  # an error mid-way: wait for the engine before leaving
            try:
                pending.result()
            except EdgeError:
                pass
    return candidates


@dataclass
class _CropGroup:
    """Classifiers that take the same crop (size and mpp), and the crops waiting for their next batch."""

    size: int
    scale: ReadScale
    names: list[str]
    from_tiles: bool  # the classifiers read at the tiles' scale: crops are cut from the tile in memory
    pending: list[np.ndarray] = field(default_factory=list)


class _Candidates:
    """Every candidate kept so far (level-0 boxes) and each classifier's probabilities for it."""

    def __init__(self, slide: Slide, sp: SlidePlan, config: Config, engines: EngineSet, clock: _StageClock) -> None:
        self.slide = slide
        self.engines = engines
        self.clock = clock
        self.raw = 0  # detections before ownership and merging
        self.boxes: list[Boxes] = []
        bundle = engines.bundle
        # MF voters run on every candidate; subtype-only members (the paper's atypical network) only on
        # candidates whose ensemble p(MF) passed the threshold; members used for neither are never run.
        self.weights = {c.name: c.weight for c in bundle.mitotic_voters}
        # tuples in the bundle's order: a set's order changes with each process's hash salt, and these
        # orders become the order of each figure's scores in the files written
        self.subtypers = tuple(c.name for c in bundle.atypical_classifiers)
        self.subtype_only = tuple(c.name for c in bundle.subtype_only)
        self.p_mitotic: dict[str, list[np.ndarray]] = {name: [] for name in self.weights}
        self.p_atypical: dict[str, list[np.ndarray]] = {name: [] for name in self.subtypers}
        self.waiting = 0  # candidates added but not yet classified
        self.batches = 0  # classifier batches run so far (the index of each one's probabilities)
        in_use = [c for c in bundle.classifiers if c.name in self.weights or c.name in self.subtype_only]
        self.batch_size = max(
            1, min(config.engines.classifier_batch, *(engines.classifiers[c.name].max_batch for c in in_use))
        )
        self.groups: list[_CropGroup] = []
        for clf in in_use:
            scale = slide.read_scale(clf.mpp)
            group = next((g for g in self.groups if g.size == clf.size and g.scale == scale), None)
            if group is None:
                self.groups.append(_CropGroup(clf.size, scale, [clf.name], scale == sp.scale))
            else:
                group.names.append(clf.name)
        # crops of candidates that passed the MF threshold, waiting for the subtype-only members' next batch
        self.passed_crops: list[list[np.ndarray]] = [[] for _ in self.groups]
        self.passed_slots: list[tuple[int, np.ndarray]] = []  # (classifier batch number, rows in that batch)
        self.passed_waiting = 0

    def __len__(self) -> int:
        return sum(len(b) for b in self.boxes)

    def add(self, tile: Tile, pixels: np.ndarray, local: Boxes, boxes: Boxes) -> None:
        """Queue crops of a tile's candidates: ``local`` in the tile's px, ``boxes`` the same in level-0 px."""
        t0 = time.perf_counter()
        for group in self.groups:
            group.pending.append(self._crops(group, tile, pixels, local, boxes))
        self.boxes.append(boxes)
        self.waiting += len(boxes)
        self.clock.since("crops", t0)

    def classify_ready(self) -> None:
        while self.waiting >= self.batch_size:
            self._classify(self.batch_size)

    def classify_rest(self) -> None:
        if self.waiting:
            self._classify(self.waiting)
        if self.passed_waiting:
            self._subtype()

    def merged(self, radius_px: float) -> tuple[Boxes, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """One candidate per figure across tiles (see ``merge_across_tiles``) with its probabilities."""
        boxes = Boxes.concat(self.boxes)
        keep = merge_indices(boxes, radius_px)
        # No candidate at all (a mitosis-free slide, a strict threshold, no tissue) is a valid result: empty arrays.
        p_mitotic = {name: _concat(parts)[keep] for name, parts in self.p_mitotic.items()}
        p_atypical = {name: _concat(parts)[keep] for name, parts in self.p_atypical.items()}
        return boxes.take(keep), p_mitotic, p_atypical

    def _crops(self, group: _CropGroup, tile: Tile, pixels: np.ndarray, local: Boxes, boxes: Boxes) -> np.ndarray:
        size = group.size
        out = np.empty((len(boxes), size, size, 3), np.uint8)
        left = np.round(local.cx.astype(np.float64) - size / 2).astype(np.int64)
        top = np.round(local.cy.astype(np.float64) - size / 2).astype(np.int64)
        inside = (left >= 0) & (top >= 0) & (left + size <= tile.width) & (top + size <= tile.height)
        if not group.from_tiles:
            inside[:] = False
        x0, y0 = crop_origins(boxes.cx, boxes.cy, size, (group.scale.px0_per_out_x, group.scale.px0_per_out_y))
        for j in range(len(boxes)):
            if inside[j]:
                out[j] = pixels[top[j] : top[j] + size, left[j] : left[j] + size]
            else:  # near the tile's edge, or another scale: read from the slide (pads past its edge)
                self.slide.read_region(float(x0[j]), float(y0[j]), size, size, group.scale, out=out[j])
        return out

    def _classify(self, n: int) -> None:
        t0 = time.perf_counter()
        bundle = self.engines.bundle
        batches = []
        for group in self.groups:
            crops = np.concatenate(group.pending) if len(group.pending) > 1 else group.pending[0]
            batch, rest = crops[:n], crops[n:]
            group.pending = [rest] if len(rest) else []
            batches.append(batch)
            voters = [name for name in group.names if name in self.weights]
            pending = {name: self.engines.classifiers[name].submit(batch) for name in voters}
            for name in voters:
                spec = next(c for c in bundle.classifiers if c.name == name)
                p_mf, p_amf = classifier_outputs_to_probabilities(pending[name].result(), spec)
                self.p_mitotic[name].append(cast(np.ndarray, p_mf))
                if name in self.subtypers:
                    self.p_atypical[name].append(cast(np.ndarray, p_amf))
        if self.subtype_only:
            for name in self.subtype_only:  # filled in for the candidates that pass, when their batch runs
                self.p_atypical[name].append(np.full(n, np.nan))
            ensemble = ensemble_mitotic({k: v[-1] for k, v in self.p_mitotic.items()}, self.weights)
            passed = np.flatnonzero(ensemble >= bundle.decision.mitotic_threshold)
            if passed.size:
                for i, batch in enumerate(batches):
                    if not set(self.subtype_only).isdisjoint(self.groups[i].names):
                        self.passed_crops[i].append(batch[passed])
                self.passed_slots.append((self.batches, passed))
                self.passed_waiting += passed.size
        self.batches += 1
        self.waiting -= n
        self.clock.since("classify", t0)
        if self.passed_waiting >= self.batch_size:
            self._subtype()

    def _subtype(self) -> None:
        """Run the subtype-only members on the MF crops collected so far, in batches."""
        t0 = time.perf_counter()
        bundle = self.engines.bundle
        for i, group in enumerate(self.groups):
            names = [name for name in group.names if name in self.subtype_only]
            if not names:
                continue
            crops = np.concatenate(self.passed_crops[i])
            self.passed_crops[i] = []
            for name in names:
                spec = next(c for c in bundle.classifiers if c.name == name)
                engine = self.engines.classifiers[name]
                pending = [engine.submit(crops[j : j + self.batch_size]) for j in range(0, len(crops), self.batch_size)]
                parts = [classifier_outputs_to_probabilities(p.result(), spec)[1] for p in pending]
                p_amf = np.concatenate(cast(list[np.ndarray], parts))
                offset = 0
                for batch_number, rows in self.passed_slots:
                    self.p_atypical[name][batch_number][rows] = p_amf[offset : offset + rows.size]
                    offset += rows.size
        self.passed_slots = []
        self.passed_waiting = 0
        self.clock.since("classify", t0)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0, np.float32)


def _figures(
    boxes: Boxes,
    p_mitotic: dict[str, np.ndarray],
    p_atypical: dict[str, np.ndarray],
    bundle: Bundle,
    mpp0: tuple[float, float],
) -> list[Figure]:
    """The ensemble's decision for every merged candidate."""
    if len(boxes) == 0:
        return []
    weights = {c.name: c.weight for c in bundle.mitotic_voters}
    ensemble = ensemble_mitotic(p_mitotic, weights)
    chosen = [c.name for c in bundle.atypical_classifiers if c.name in p_atypical]
    atypical = atypical_probability(p_atypical, chosen)
    is_mitotic, subtype = decide(ensemble, atypical, bundle.decision)
    figures = []
    for i in range(len(boxes)):
        scores = {f"mitotic:{k}": float(v[i]) for k, v in p_mitotic.items()}
        # a subtype-only member has no score for a candidate that did not pass the MF threshold
        scores.update({f"atypical:{k}": float(v[i]) for k, v in p_atypical.items() if not np.isnan(v[i])})
        mitotic = bool(is_mitotic[i])
        figures.append(
            Figure(
                x_px=float(boxes.cx[i]), y_px=float(boxes.cy[i]),
                x_um=float(boxes.cx[i] * mpp0[0]), y_um=float(boxes.cy[i] * mpp0[1]),
                width_px=float(boxes.w[i]), height_px=float(boxes.h[i]),
                detector_score=float(boxes.score[i]),
                p_mitotic=float(ensemble[i]),
                p_atypical=None if atypical is None or np.isnan(atypical[i]) else float(atypical[i]),
                is_mitotic=mitotic,
                subtype=str(subtype[i]) if mitotic else None,  # type: ignore[arg-type]
                scores=scores,
            )
        )
    return figures


def _provenance(config: Config, engines: EngineSet, times: StageTimes) -> Provenance:
    bundle = engines.bundle
    return Provenance(
        version=__version__,
        created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        bundle=BundleProvenance(
            name=bundle.name, version=bundle.version, path=str(bundle.path),
            manifest_sha256=bundle.manifest_sha256,
            models={m.name: {"file": m.path.name, "sha256": m.sha256} for m in bundle.models},
            intended_use=bundle.intended_use,
            ensemble=bundle.ensemble_roles(),
        ),
        backend=engines.backend,
        plan_keys=dict(engines.plan_keys),
        settings=config.to_dict(),
        timings_s=times.to_dict(),
    )
