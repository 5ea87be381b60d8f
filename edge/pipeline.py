"""The two-stage pipeline on one slide: tile stream → detector → candidates → crops → classifier ensemble → scores.

Streaming and bounded: the tile stream reads ahead in its own threads while the detector runs one
batch behind (submit, then collect the previous batch), so reading and inference overlap and
memory depends on batch size and queue depth, never on the slide. Candidates are small (a few
numbers each); crops are read in batches while the previous batch is classified. The numeric work
lives in the pure modules ``detect``, ``classify`` and ``scoring``; this module only wires them.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge import __version__
from edge.classify import (
    atypical_probability,
    classifier_outputs_to_probabilities,
    crop_origins,
    decide,
    ensemble_mitotic,
)
from edge.config import Config
from edge.detect import Boxes, TileOwnership, decode, merge_across_tiles, nms, to_slide
from edge.engines import Bundle, EngineSet, load_bundle, open_engines
from edge.engines.base import Pending
from edge.errors import EdgeError, SlideReadError, StreamCancelled
from edge.scoring import Figure, SlideResult, hotspot_radius_um, score_slide, tissue_fraction_in_circles
from edge.slide import Slide, open_slide
from edge.stream import SlidePlan, TileBatch, open_stream, plan_slide

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)
MAX_UPSAMPLING = 2.5  # a slide coarser than 2.5x the model's mpp has too little detail to find mitoses
CROP_READ_THREADS = 2
OVERVIEW_SIDE_PX = 2048  # the overlay's thumbnail: enough to see each figure's mark on a 15 mm slide


@dataclass
class StageTimes:
    """Wall seconds per stage (``read`` is summed over reader threads, so it can exceed the wall time)."""

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


@dataclass
class _Detections:
    parts: list[Boxes] = field(default_factory=list)
    raw: int = 0


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
        return _analyze(Path(path), pipeline_config(config, engines.bundle), engines, cancel_event, progress, t_start)
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
    times = StageTimes()
    report = progress or (lambda stage, done, total: None)
    with open_slide(path, config.slide) as slide:
        t0 = time.perf_counter()
        sp = plan_slide(slide, config)
        _check_scale(slide, sp, bundle)
        times.plan = time.perf_counter() - t0
        total = len(sp.plan)
        report("detect", 0, total)
        detections = _detect(slide, sp, config, engines, cancel_event, times, report)
        t0 = time.perf_counter()
        boxes = Boxes.concat(detections.parts)
        mpp0 = slide.info.level_mpp(0)
        merged = merge_across_tiles(boxes, bundle.detector.merge_radius_um / mpp0[0])
        times.decode += time.perf_counter() - t0
        figures = _classify(slide, merged, config, engines, cancel_event, times, report)
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
        times.score = time.perf_counter() - t0
        info = slide.info
        overview, overview_mpp = slide.thumbnail(
            max(info.width * mpp0[0], info.height * mpp0[1]) / OVERVIEW_SIDE_PX
        )
        times.total = time.perf_counter() - t_start
        slide_meta = {
            "width": info.width, "height": info.height, "mpp_x": mpp0[0], "mpp_y": mpp0[1],
            "mpp_source": info.mpp_source, "format": info.format, "vendor": info.vendor,
            "read_level": sp.scale.level, "read_mpp": sp.scale.mpp_x, "resampled": sp.scale.resampled,
            "tiles": total,
        }
        result = SlideResult(
            slide_path=str(path),
            slide=slide_meta,
            scores=scores,
            figures=tuple(figures),
            provenance=_provenance(config, engines, times),
        )
        return Analysis(result, sp, overview, overview_mpp, times, total, detections.raw)


def _check_scale(slide: Slide, sp: SlidePlan, bundle: Bundle) -> None:
    mpp0 = slide.info.level_mpp(0)
    if min(mpp0) > bundle.detector.mpp * MAX_UPSAMPLING:
        raise SlideReadError(
            slide.path,
            f"scanned at {mpp0[0]:.3g} µm/px, too coarse for the detector at {bundle.detector.mpp} µm/px "
            f"(at most {MAX_UPSAMPLING}x upsampling); mitotic figures need a 20x or 40x scan. If the recorded mpp "
            "is wrong, pass the right one with --mpp",
        )


def _detect(
    slide: Slide,
    sp: SlidePlan,
    config: Config,
    engines: EngineSet,
    cancel_event: threading.Event | None,
    times: StageTimes,
    report: Progress,
) -> _Detections:
    """Stream tiles through the detector, one batch in flight behind the one being read."""
    spec = engines.bundle.detector
    ownership = TileOwnership(sp.plan)
    px0_per_out = (sp.plan.px0_per_out_x, sp.plan.px0_per_out_y)
    found = _Detections()
    detector = engines.detector
    in_flight: list[tuple[TileBatch, Pending]] = []

    def collect(entry: tuple[TileBatch, Pending]) -> None:
        batch, pending = entry
        t0 = time.perf_counter()
        outputs = pending.result()
        times.detect += time.perf_counter() - t0
        t0 = time.perf_counter()
        raw = outputs[spec.output]
        for i, tile in enumerate(batch.tiles):
            boxes = nms(decode(raw[i], spec), spec.nms_iou, spec.max_detections)
            found.raw += len(boxes)
            if len(boxes) == 0:
                continue
            cx_out = tile.x + boxes.cx
            cy_out = tile.y + boxes.cy
            keep = ownership.owned_by(tile.index, cx_out, cy_out) & (boxes.cx < tile.width) & (boxes.cy < tile.height)
            if keep.any():
                found.parts.append(to_slide(boxes.take(keep), tile, px0_per_out))
        times.decode += time.perf_counter() - t0

    done = 0
    try:
        with open_stream(slide, sp, config, cancel_event) as stream:
            for batch in stream:
                in_flight.append((batch, detector.submit(batch.pixels)))
                if len(in_flight) > 1:
                    first = in_flight.pop(0)
                    collect(first)
                    done += len(first[0].tiles)
                    report("detect", done, len(sp.plan))
            while in_flight:
                first = in_flight.pop(0)
                collect(first)
                done += len(first[0].tiles)
                report("detect", done, len(sp.plan))
            times.read = stream.stats.read_seconds
            times.read_wait = stream.stats.wait_seconds
    finally:
        for _batch, pending in in_flight:  # an error mid-way: wait for the engine before leaving
            try:
                pending.result()
            except EdgeError:
                pass
    return found


def _classify(
    slide: Slide,
    boxes: Boxes,
    config: Config,
    engines: EngineSet,
    cancel_event: threading.Event | None,
    times: StageTimes,
    report: Progress,
) -> list[Figure]:
    """Read a crop per candidate for each classifier (grouped by crop size and mpp) and run the ensemble."""
    bundle = engines.bundle
    n = len(boxes)
    report("classify", 0, n)
    if n == 0:
        return []
    mpp0 = slide.info.level_mpp(0)
    p_mitotic: dict[str, np.ndarray] = {}
    p_atypical: dict[str, np.ndarray] = {}
    groups: dict[tuple[int, float], list[str]] = {}
    for clf in bundle.classifiers:
        groups.setdefault((clf.size, clf.mpp), []).append(clf.name)
    batch_size = max(1, min(config.engines.classifier_batch, *(e.max_batch for e in engines.classifiers.values())))
    work = n * len(groups)
    for g, ((size, mpp), names) in enumerate(groups.items()):
        scale = slide.read_scale(mpp)
        x0, y0 = crop_origins(boxes.cx, boxes.cy, size, (scale.px0_per_out_x, scale.px0_per_out_y))
        results: dict[str, list[tuple[np.ndarray, np.ndarray | None]]] = {name: [] for name in names}
        for start, crops in _crop_batches(slide, x0, y0, size, scale, batch_size, cancel_event, times):
            t0 = time.perf_counter()
            pending = {name: engines.classifiers[name].submit(crops) for name in names}
            for name in names:
                spec = next(c for c in bundle.classifiers if c.name == name)
                results[name].append(classifier_outputs_to_probabilities(pending[name].result(), spec))
            times.classify += time.perf_counter() - t0
            report("classify", g * n + min(n, start + len(crops)), work)
        for name in names:
            p_mitotic[name] = np.concatenate([m for m, _ in results[name]])
            if all(a is not None for _, a in results[name]):
                p_atypical[name] = np.concatenate([a for _, a in results[name] if a is not None])
    weights = {c.name: c.weight for c in bundle.classifiers}
    ensemble = ensemble_mitotic(p_mitotic, weights)
    chosen = [c.name for c in bundle.atypical_classifiers if c.name in p_atypical]
    atypical = atypical_probability(p_atypical, chosen)
    is_mitotic, subtype = decide(ensemble, atypical, bundle.decision)
    figures = []
    for i in range(n):
        scores = {f"mitotic:{k}": float(v[i]) for k, v in p_mitotic.items()}
        scores.update({f"atypical:{k}": float(v[i]) for k, v in p_atypical.items()})
        mitotic = bool(is_mitotic[i])
        figures.append(
            Figure(
                x_px=float(boxes.cx[i]), y_px=float(boxes.cy[i]),
                x_um=float(boxes.cx[i] * mpp0[0]), y_um=float(boxes.cy[i] * mpp0[1]),
                width_px=float(boxes.w[i]), height_px=float(boxes.h[i]),
                detector_score=float(boxes.score[i]),
                p_mitotic=float(ensemble[i]),
                p_atypical=None if atypical is None else float(atypical[i]),
                is_mitotic=mitotic,
                subtype=str(subtype[i]) if mitotic else None,  # type: ignore[arg-type]
                scores=scores,
            )
        )
    return figures


def _crop_batches(
    slide: Slide,
    x0: np.ndarray,
    y0: np.ndarray,
    size: int,
    scale: Any,
    batch_size: int,
    cancel_event: threading.Event | None,
    times: StageTimes,
) -> Iterator[tuple[int, np.ndarray]]:
    """Batches of crops, the next one read in worker threads while the caller classifies this one."""

    def read(start: int) -> np.ndarray:
        t0 = time.perf_counter()
        stop = min(len(x0), start + batch_size)
        out = np.empty((stop - start, size, size, 3), np.uint8)
        for j, i in enumerate(range(start, stop)):
            slide.read_region(float(x0[i]), float(y0[i]), size, size, scale, out=out[j])
        times.crops += time.perf_counter() - t0
        return out

    starts = list(range(0, len(x0), batch_size))
    with ThreadPoolExecutor(CROP_READ_THREADS, thread_name_prefix="crops") as pool:
        ahead = [pool.submit(read, s) for s in starts[:2]]
        for k, start in enumerate(starts):
            if cancel_event is not None and cancel_event.is_set():
                for f in ahead:
                    f.cancel()
                raise StreamCancelled("analysis cancelled while classifying candidates")
            crops = ahead.pop(0).result()
            if k + 2 < len(starts):
                ahead.append(pool.submit(read, starts[k + 2]))
            yield start, crops


def _provenance(config: Config, engines: EngineSet, times: StageTimes) -> dict[str, Any]:
    bundle = engines.bundle
    return {
        "package": "mitosis-edge",
        "version": __version__,
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "bundle": {
            "name": bundle.name, "version": bundle.version, "path": str(bundle.path),
            "manifest_sha256": bundle.manifest_sha256,
            "models": {m.name: {"file": m.path.name, "sha256": m.sha256} for m in bundle.models},
            "intended_use": bundle.intended_use,
        },
        "backend": engines.backend,
        "plan_keys": dict(engines.plan_keys),
        "settings": config.to_dict(),
        "timings_s": times.to_dict(),
    }
