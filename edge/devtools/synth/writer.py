"""Writing a synthetic slide: a JPEG-tiled pyramidal TIFF (or OME-TIFF), level 0 streamed strip by strip.

The reduced levels are kept at 1/4 size in memory. The file appears under its name only when
complete and synced (:func:`edge.fileio.atomic_file`), so a folder watcher never sees half a slide
and a crash leaves none.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import tifffile
from numpy.typing import NDArray

from edge.devtools.synth.model import SlideModel
from edge.devtools.synth.section import _Nuclei

UInt8Array = NDArray[np.uint8]

PYRAMID_FACTOR = 4  # like Aperio
PYRAMID_MIN_SIDE = 2048  # px: stop once a level's longer side is below this
RENDER_THREADS = 2


def pyramid_shapes(height: int, width: int) -> list[tuple[int, int]]:
    """(height, width) of each level: /4 per level until the longer side is < 2048."""
    shapes = [(height, width)]
    while max(shapes[-1]) >= PYRAMID_MIN_SIDE:
        h, w = shapes[-1]
        shapes.append((-(-h // PYRAMID_FACTOR), -(-w // PYRAMID_FACTOR)))
    return shapes


def write_pyramid(path: Path, name: str, model: SlideModel, progress: Callable[[int, int], None] | None) -> None:
    params = model.params
    ts = params.tile_size
    shapes = pyramid_shapes(params.height, params.width)
    level1 = np.empty((*shapes[1], 3), np.uint8) if len(shapes) > 1 else None
    ome = params.fmt == "ome"
    # Classic TIFF offsets are 32-bit; JPEG keeps a slide far below its raw size, but a
    # raw size over 2 GiB is where a big slide could pass 4 GiB compressed in the worst case.
    bigtiff = params.width * params.height * 3 > (1 << 31)
    common: dict[str, Any] = {
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": params.jpeg_quality},
        "tile": (ts, ts),
        "resolutionunit": "CENTIMETER",
    }
    with tifffile.TiffWriter(path, bigtiff=bigtiff, ome=ome) as writer:
        if ome:
            metadata: dict[str, Any] | None = {
                "axes": "YXS",
                "Name": name,
                "PhysicalSizeX": params.mpp,
                "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": params.mpp,
                "PhysicalSizeYUnit": "µm",
                # tifffile would draw a time-based UUID; derive one so output is reproducible.
                "UUID": str(uuid.uuid5(uuid.NAMESPACE_URL, f"mitosis-edge-synth:{name}:{params!r}")),
            }
            description = None
        else:
            metadata = None
            description = f"mitosis-edge synthetic H&E slide; seed={params.seed}; mpp={params.mpp}"
        writer.write(
            _level0_jpeg_tiles(model, level1, progress),
            shape=(params.height, params.width, 3),
            dtype=np.uint8,
            resolution=(1e4 / params.mpp, 1e4 / params.mpp),
            subifds=len(shapes) - 1 if ome else None,
            metadata=metadata,
            description=description,
            **common,
        )
        level = level1
        for index in range(1, len(shapes)):
            assert level is not None
            level_mpp = params.mpp * (params.width / shapes[index][1])
            writer.write(
                level,
                resolution=(1e4 / level_mpp, 1e4 / level_mpp),
                subfiletype=1,
                metadata=None,
                maxworkers=RENDER_THREADS,
                **common,
            )
            if index + 1 < len(shapes):
                level = _downsample(level, shapes[index + 1])


def _level0_jpeg_tiles(
    model: SlideModel,
    level1: UInt8Array | None,
    progress: Callable[[int, int], None] | None,
) -> Iterator[bytes]:
    """JPEG tiles of level 0 in TIFF order, rendered and encoded by a small thread pool.

    Encoding here, next to rendering, keeps both cores busy; the bytes are exactly what
    tifffile would produce for photometric="rgb", compression="jpeg" (YCbCr 4:2:0).
    """
    params = model.params
    ts = params.tile_size
    height, width = params.height, params.width
    n_strips = -(-height // ts)
    block_width = ts * max(1, 1024 // ts)
    block_starts = list(range(0, width, block_width))
    pending: deque[tuple[int, list[Future[tuple[list[bytes], UInt8Array]]]]] = deque()

    def encode_block(y0: int, x0: int, nuclei: _Nuclei) -> tuple[list[bytes], UInt8Array]:
        w = min(block_width, -(-(width - x0) // ts) * ts)
        rgb = model.render(y0, x0, ts, w, nuclei)
        tiles: list[bytes] = [
            imagecodecs.jpeg_encode(  # type: ignore[misc]  # stubs say bytes | bytearray; it is bytes
                np.ascontiguousarray(rgb[:, i : i + ts]),
                level=params.jpeg_quality,
                colorspace="RGB",
                outcolorspace="YCBCR",
                subsampling=(2, 2),
            )
            for i in range(0, w, ts)
        ]
        return tiles, _downsample_block(rgb)

    with ThreadPoolExecutor(RENDER_THREADS, thread_name_prefix="synth") as pool:

        def submit(strip: int) -> None:
            y0 = strip * ts
            nuclei = model.nuclei_for_rows(y0, y0 + ts)
            pending.append((strip, [pool.submit(encode_block, y0, x0, nuclei) for x0 in block_starts]))

        for strip in range(min(2, n_strips)):
            submit(strip)
        next_strip = len(pending)
        while pending:
            strip, futures = pending.popleft()
            y0 = strip * ts
            strip_tiles: list[bytes] = []
            for x0, future in zip(block_starts, futures, strict=True):
                tiles, small = future.result()
                if level1 is not None:
                    ys, xs = y0 // PYRAMID_FACTOR, x0 // PYRAMID_FACTOR
                    h = min(small.shape[0], level1.shape[0] - ys)
                    w = min(small.shape[1], level1.shape[1] - xs)
                    level1[ys : ys + h, xs : xs + w] = small[:h, :w]
                strip_tiles.extend(tiles)
            if next_strip < n_strips:
                submit(next_strip)
                next_strip += 1
            # Before yielding: tifffile stops pulling after the last tile, so code after
            # the final yield would never run.
            if progress is not None:
                progress(min(y0 + ts, height), height)
            yield from strip_tiles


def _downsample_block(rgb: UInt8Array) -> UInt8Array:
    """4x4 box mean of a block whose sides are multiples of 4 (cheap slicing sums)."""
    f = PYRAMID_FACTOR
    rows = rgb[0::f].astype(np.uint16)
    for k in range(1, f):
        rows += rgb[k::f]
    cols = rows.reshape(rows.shape[0], rows.shape[1] // f, f, 3)
    total = cols[:, :, 0].copy()
    for k in range(1, f):
        total += cols[:, :, k]
    total += (f * f) // 2
    total //= f * f
    return total.astype(np.uint8)


def _downsample(level: UInt8Array, shape: tuple[int, int]) -> UInt8Array:
    """The next pyramid level: 4x4 box mean, edges padded by replication, in row chunks."""
    f = PYRAMID_FACTOR
    out = np.empty((*shape, 3), np.uint8)
    chunk = 256 * f
    for y0 in range(0, level.shape[0], chunk):
        part = level[y0 : y0 + chunk]
        pad_h = -part.shape[0] % f
        pad_w = -part.shape[1] % f
        if pad_h or pad_w:
            part = np.pad(part, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        small = _downsample_block(part)
        out[y0 // f : y0 // f + small.shape[0]] = small[:, : shape[1]]
    return out
