"""The tile stream delivers every planned tile in order, in batches, with bounded memory; it stops
cleanly on cancel and on a read that fails half-way, leaving no thread behind."""

from __future__ import annotations

import threading
import time
import tracemalloc

import numpy as np
import pytest

from edge.config import Config, SlideConfig, TilingConfig
from edge.errors import StreamCancelled, TileDecodeError
from edge.wsi.slide import Level, Slide, SlideInfo, open_slide
from edge.wsi.stream import TileStream, open_stream, plan_slide
from edge.wsi.tiling import plan_tiles

from .conftest import SynthFactory


class PatternReader:
    """An in-memory level reader: R = x mod 251, G = y mod 251, so every pixel says where it came from."""

    name = "fake"

    def __init__(self, fail_after: int | None = None, delay_s: float = 0.0) -> None:
        self.reads = 0
        self.fail_after = fail_after
        self.delay_s = delay_s
        self._lock = threading.Lock()

    def read(self, level: int, x: int, y: int, w: int, h: int, out: np.ndarray) -> None:
        with self._lock:
            self.reads += 1
            n = self.reads
        if self.fail_after is not None and n > self.fail_after:
            raise TileDecodeError("fake.tiff", f"level {level} tile at ({x}, {y}) failed to decode")
        if self.delay_s:
            time.sleep(self.delay_s)
        out[:, :, 0] = (np.arange(x, x + w) % 251)[None, :]
        out[:, :, 1] = (np.arange(y, y + h) % 251)[:, None]
        out[:, :, 2] = level

    def close(self) -> None:
        pass


def fake_slide(width: int, height: int, reader: PatternReader) -> Slide:
    info = SlideInfo(
        path="fake.tiff", format="generic-tiff", reader="fake", region_reader="fake", vendor="fake",
        width=width, height=height, levels=(Level(0, width, height, 1.0),), mpp_x=0.25, mpp_y=0.25,
        mpp_source="vendor", objective_power=40.0,
    )  # fmt: skip
    return Slide(info, reader, SlideConfig())


def stream_for(
    slide: Slide, tile: int = 256, overlap: int = 16, cancel_event: threading.Event | None = None, **kw: int
) -> TileStream:
    plan = plan_tiles(slide.info.width, slide.info.height, (1.0, 1.0), (0.25, 0.25), None, TilingConfig(tile, overlap))
    return TileStream(slide, plan, slide.read_scale(0.25), cancel_event=cancel_event, **kw)


def test_every_tile_arrives_in_order_with_its_own_pixels() -> None:
    slide = fake_slide(1500, 1100, PatternReader())
    stream = stream_for(slide, threads=2, batch_size=3, queue_depth=2)
    seen = []
    for batch in stream:
        assert batch.pixels.shape == (len(batch.tiles), 256, 256, 3) and batch.pixels.dtype == np.uint8
        assert len(batch.tiles) <= 3
        for tile, pixels in zip(batch.tiles, batch.pixels, strict=True):
            assert pixels[0, 0, 0] == tile.x % 251 and pixels[0, 0, 1] == tile.y % 251
            assert pixels[-1, -1, 0] == (tile.x + 255) % 251
            seen.append(tile.index)
    assert seen == list(range(len(stream.plan)))
    assert stream.stats.tiles == len(stream.plan) and stream.stats.wall_seconds > 0


def test_a_slide_smaller_than_a_tile_is_padded_white() -> None:
    slide = fake_slide(100, 80, PatternReader())
    batches = list(stream_for(slide, threads=1, batch_size=4, queue_depth=1))
    assert len(batches) == 1 and len(batches[0].tiles) == 1
    pixels = batches[0].pixels[0]
    assert (pixels[80:] == 255).all() and (pixels[:, 100:] == 255).all()
    assert pixels[79, 99, 0] == 99


def test_readers_never_run_ahead_of_the_queue_depth() -> None:
    reader = PatternReader()
    slide = fake_slide(4000, 4000, reader)
    stream = stream_for(slide, threads=2, batch_size=2, queue_depth=3)
    consumed = 0
    for batch in stream:
        time.sleep(0.01)  # a slow consumer
        consumed += len(batch.tiles)
        assert reader.reads <= consumed + 3 * 2 + 2  # queued batches + a batch being filled per thread
    assert stream.stats.peak_batches_in_memory <= 3


def test_memory_is_bounded_by_batches_not_by_slide_size() -> None:
    def peak_for(size: int) -> int:
        slide = fake_slide(size, size, PatternReader())
        tracemalloc.start()
        for batch in stream_for(slide, threads=2, batch_size=2, queue_depth=2):
            del batch
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    small, large = peak_for(1200), peak_for(6000)  # 25 vs 625 tiles
    batch_bytes = 2 * 256 * 256 * 3
    assert large < 10 * batch_bytes
    assert large < small * 1.5 + batch_bytes


def test_cancel_stops_the_stream_and_its_threads() -> None:
    slide = fake_slide(6000, 6000, PatternReader(delay_s=0.002))
    stream = stream_for(slide, threads=2, batch_size=2, queue_depth=2)
    got = 0
    with pytest.raises(StreamCancelled, match="cancelled"):
        for _batch in stream:
            got += 1
            if got == 3:
                stream.cancel()
    assert stream.cancelled and got == 3
    assert not any(t.name.startswith("edge-tile-reader") for t in threading.enumerate())


def test_an_external_cancel_event_stops_it_too() -> None:
    event = threading.Event()
    slide = fake_slide(6000, 6000, PatternReader(delay_s=0.002))
    stream = stream_for(slide, cancel_event=event, threads=2, batch_size=2, queue_depth=2)
    iterator = iter(stream)
    next(iterator)
    event.set()
    with pytest.raises(StreamCancelled):
        for _ in iterator:
            pass


def test_a_read_failing_half_way_reaches_the_caller_and_leaks_nothing() -> None:
    slide = fake_slide(4000, 4000, PatternReader(fail_after=20))
    stream = stream_for(slide, threads=2, batch_size=2, queue_depth=2)
    delivered = 0
    with pytest.raises(TileDecodeError, match="failed to decode"):
        for batch in stream:
            delivered += len(batch.tiles)
    assert 0 < delivered <= 20


def test_leaving_the_loop_early_stops_the_readers() -> None:
    slide = fake_slide(4000, 4000, PatternReader())
    with stream_for(slide, threads=2, batch_size=1, queue_depth=2) as stream:
        for _batch in stream:
            break


def test_stream_of_a_synthetic_slide_matches_region_reads(synth_slide: SynthFactory) -> None:
    config = Config(tiling=TilingConfig(tile_size=512, overlap=32))
    with open_slide(synth_slide()) as slide:
        sp = plan_slide(slide, config)
        assert 0 < len(sp.plan) <= sp.plan.grid_size and sp.tissue_area_mm2 > 0
        n = 0
        with open_stream(slide, sp, config) as stream:
            for batch in stream:
                for tile, pixels in zip(batch.tiles, batch.pixels, strict=True):
                    expected = slide.read_region(tile.x0, tile.y0, tile.width, tile.height, sp.scale)
                    np.testing.assert_array_equal(pixels[: tile.height, : tile.width], expected)
                    n += 1
        assert n == len(sp.plan)
