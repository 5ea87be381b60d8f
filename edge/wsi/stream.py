"""The tile stream: reader threads fill a bounded window of batches that the caller takes in order.

Memory is bounded by ``queue_depth`` batches of ``batch_size`` tiles (plus the one the caller
holds), whatever the slide's size. Cancel with :meth:`TileStream.cancel` or an external event;
the stream then raises :class:`edge.errors.StreamCancelled` and leaves no thread behind.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge.config import Config
from edge.errors import StreamCancelled
from edge.wsi.slide import BACKGROUND, ReadScale, Slide
from edge.wsi.tiling import PlanEfficiency, Tile, TilePlan, plan_efficiency, plan_tiles, tissue_area_mm2, tissue_mask

log = logging.getLogger(__name__)

STOP_POLL_S = 0.05  # seconds a blocked reader or consumer waits before looking at the stop flag again


@dataclass(frozen=True)
class TileBatch:
    """Up to ``batch_size`` tiles. ``pixels`` is (n, tile_size, tile_size, 3) uint8 RGB; a tile smaller
    than tile_size (at a slide smaller than one tile) is padded with white at its right and bottom."""

    index: int
    tiles: tuple[Tile, ...]
    pixels: np.ndarray
    measures: tuple[Any, ...] = ()  # what the stream's ``measure`` returned for each tile, when it has one


# A measurement the reader threads make on each batch as it is decoded (e.g. scan QC): (its tiles, its
# pixels) to one result per tile; it must not change shared state, since readers run it side by side.
TileMeasure = Callable[[tuple[Tile, ...], np.ndarray], tuple[Any, ...]]


@dataclass
class StreamStats:
    tiles: int = 0
    batches: int = 0
    read_seconds: float = 0.0  # summed over reader threads
    wait_seconds: float = 0.0  # time the consumer waited for a batch
    wall_seconds: float = 0.0
    peak_batches_in_memory: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class TileStream:
    """Iterate over a tile plan in batches. Use as a context manager or exhaust the iterator."""

    def __init__(
        self,
        slide: Slide,
        plan: TilePlan,
        scale: ReadScale,
        *,
        threads: int = 2,
        batch_size: int = 4,
        queue_depth: int = 4,
        cancel_event: threading.Event | None = None,
        measure: TileMeasure | None = None,
    ) -> None:
        if threads < 1 or batch_size < 1 or queue_depth < 1:
            raise ValueError(f"threads={threads}, batch_size={batch_size}, queue_depth={queue_depth} must all be >= 1")
        self.slide = slide
        self.plan = plan
        self.scale = scale
        self.threads = threads
        self.batch_size = batch_size
        self.queue_depth = queue_depth
        self.measure = measure
        self.stats = StreamStats()
        self._cancel = cancel_event or threading.Event()
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._slots = threading.Semaphore(queue_depth)
        self._ready: dict[int, TileBatch] = {}
        self._error: BaseException | None = None
        self._next_claim = 0
        self._in_memory = 0
        self._workers: list[threading.Thread] = []
        self._batches = [plan.tiles[i : i + batch_size] for i in range(0, len(plan.tiles), batch_size)]

    def __enter__(self) -> TileStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cancel(self) -> None:
        """Ask the stream to stop; the iterating thread gets StreamCancelled."""
        self._cancel.set()
        with self._cond:
            self._cond.notify_all()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def close(self) -> None:
        """Stop the readers and wait for them. Safe to call more than once."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._workers:
            t.join()
        self._workers = []

    def __iter__(self) -> Iterator[TileBatch]:
        start = time.perf_counter()
        self._workers = [
            threading.Thread(target=self._read_loop, name=f"edge-tile-reader-{i}", daemon=True)
            for i in range(min(self.threads, max(1, len(self._batches))))
        ]
        for t in self._workers:
            t.start()
        try:
            for b in range(len(self._batches)):
                yield self._take(b)
        finally:
            self.close()
            self.stats.wall_seconds = time.perf_counter() - start

    def _take(self, b: int) -> TileBatch:
        waited = time.perf_counter()
        with self._cond:
            while True:
                # cancel wins over batches already read: the caller asked to stop now
                if self._cancel.is_set():
                    raise StreamCancelled(f"tile stream of {self.slide.path} cancelled after {self.stats.tiles} tiles")
                if b in self._ready:
                    break
                if self._error is not None:
                    raise self._error
                self._cond.wait(STOP_POLL_S)
            batch = self._ready.pop(b)
            self._in_memory -= 1
        self._slots.release()
        self.stats.wait_seconds += time.perf_counter() - waited
        self.stats.tiles += len(batch.tiles)
        self.stats.batches += 1
        return batch

    def _should_stop(self) -> bool:
        return self._stop.is_set() or self._cancel.is_set() or self._error is not None

    def _read_loop(self) -> None:
        while not self._should_stop():
            if not self._slots.acquire(timeout=STOP_POLL_S):
                continue
            with self._cond:
                b = self._next_claim
                self._next_claim += 1
            if b >= len(self._batches):
                self._slots.release()
                return
            try:
                batch = self._read_batch(b)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
                with self._cond:
                    if self._error is None:
                        self._error = exc
                    self._cond.notify_all()
                return
            if batch is None:  # stopped mid-batch
                return
            with self._cond:
                self._ready[b] = batch
                self._in_memory += 1
                self.stats.peak_batches_in_memory = max(self.stats.peak_batches_in_memory, self._in_memory)
                self._cond.notify_all()

    def _read_batch(self, b: int) -> TileBatch | None:
        tiles = self._batches[b]
        size = self.plan.tile_size
        t0 = time.perf_counter()
        pixels = np.empty((len(tiles), size, size, 3), np.uint8)
        for i, tile in enumerate(tiles):
            if self._should_stop():
                return None
            if tile.width != size or tile.height != size:
                pixels[i] = BACKGROUND
            view = pixels[i, : tile.height, : tile.width]
            self.slide.read_region(tile.x0, tile.y0, tile.width, tile.height, self.scale, out=view)
        read = time.perf_counter() - t0
        # measured here, while the consumer runs the detector on earlier batches, not after it
        measures = self.measure(tiles, pixels) if self.measure is not None else ()
        with self.stats._lock:
            self.stats.read_seconds += read
        return TileBatch(index=b, tiles=tiles, pixels=pixels, measures=measures)


@dataclass(frozen=True)
class SlidePlan:
    """Everything needed to stream a slide: the read scale, the tissue mask and the tile plan."""

    scale: ReadScale
    mask: np.ndarray
    mask_mpp: tuple[float, float]
    tissue_area_mm2: float
    plan: TilePlan
    thumbnail: np.ndarray | None = None  # the RGB thumbnail the mask was computed on (mask_mpp)

    @property
    def efficiency(self) -> PlanEfficiency:
        """Tiles, tissue, covered and read area of the plan (see :func:`edge.wsi.tiling.plan_efficiency`)."""
        return plan_efficiency(self.plan, self.mask, self.mask_mpp)


def plan_slide(slide: Slide, config: Config) -> SlidePlan:
    """Read the thumbnail, find the tissue and plan the tiles at the configured target mpp."""
    scale = slide.read_scale(config.slide.target_mpp)
    mpp0 = slide.info.level_mpp(0)
    thumb_mpp = config.tissue.thumbnail_mpp_for(slide.info.width * mpp0[0], slide.info.height * mpp0[1])
    thumb, mask_mpp = slide.thumbnail(thumb_mpp)
    mask = tissue_mask(thumb, (mask_mpp[0] + mask_mpp[1]) / 2, config.tissue)
    plan = plan_tiles(
        slide.info.width,
        slide.info.height,
        (scale.px0_per_out_x, scale.px0_per_out_y),
        (scale.mpp_x, scale.mpp_y),
        mask,
        config.tiling,
    )
    area = tissue_area_mm2(mask, mask_mpp[0], mask_mpp[1])
    log.info(
        "%s: %d tiles of %d px at %.4g µm/px (%s layout; the grid keeps %d) on %.2f mm² of tissue (level %d%s)",
        slide.path,
        len(plan),
        plan.tile_size,
        scale.mpp_x,
        plan.layout,
        plan.grid_tiles,
        area,
        scale.level,
        ", upsampled" if scale.upsampled else "",
    )
    return SlidePlan(scale=scale, mask=mask, mask_mpp=mask_mpp, tissue_area_mm2=area, plan=plan, thumbnail=thumb)


def open_stream(
    slide: Slide, slide_plan: SlidePlan, config: Config, cancel_event: threading.Event | None = None,
    measure: TileMeasure | None = None,
) -> TileStream:
    """A TileStream with the configured threads, batch size and queue depth (and ``measure`` per tile)."""
    return TileStream(
        slide,
        slide_plan.plan,
        slide_plan.scale,
        threads=config.stream.threads,
        batch_size=config.stream.batch_size,
        queue_depth=config.stream.queue_depth,
        cancel_event=cancel_event,
        measure=measure,
    )
