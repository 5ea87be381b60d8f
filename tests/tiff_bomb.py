"""A "bomb" TIFF for tests: declares a huge tissue-like level 0 in a few hundred KB, every tile entry
pointing at the same stored tile (what a crafted or broken file does to a reader that trusts it)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

TILE = 1024


def tissue_tile(side: int = TILE) -> np.ndarray:
    """Pink stroma with purple blobs: tissue to a tissue detector, cheap to compress."""
    y, x = np.mgrid[0:side, 0:side]
    tile = np.empty((side, side, 3), np.uint8)
    tile[...] = (225, 150, 190)
    blobs = ((x % 97 - 48) ** 2 + (y % 89 - 44) ** 2) < 15**2
    tile[blobs] = (90, 60, 150)
    return tile


def write_bomb(path: Path, width: int = 200_000, height: int = 200_000, mpp: float = 0.25) -> Path:
    """A classic little-endian tiled RGB TIFF (deflate) of ``width`` x ``height`` px whose tiles all share
    one stored tile."""
    data = zlib.compress(tissue_tile().tobytes(), 9)
    n = -(-width // TILE) * -(-height // TILE)
    data_at = 8
    offsets_at = data_at + len(data) + (len(data) & 1)
    counts_at = offsets_at + 4 * n
    extra_at = counts_at + 4 * n  # BitsPerSample values, then the two resolutions
    ifd_at = extra_at + 6 + 16
    per_cm = round(1e4 / mpp)
    tags = [  # (tag, type, count, value or offset): 3 SHORT, 4 LONG, 5 RATIONAL
        (256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, extra_at), (259, 3, 1, 8), (262, 3, 1, 2),
        (277, 3, 1, 3), (282, 5, 1, extra_at + 6), (283, 5, 1, extra_at + 14), (284, 3, 1, 1), (296, 3, 1, 3),
        (322, 4, 1, TILE), (323, 4, 1, TILE), (324, 4, n, offsets_at), (325, 4, n, counts_at),
    ]
    with open(path, "wb") as fh:
        fh.write(b"II" + struct.pack("<HI", 42, ifd_at))
        fh.write(data + b"\0" * (len(data) & 1))
        fh.write(np.full(n, data_at, "<u4").tobytes())
        fh.write(np.full(n, len(data), "<u4").tobytes())
        fh.write(struct.pack("<3H", 8, 8, 8) + struct.pack("<4I", per_cm, 1, per_cm, 1))
        fh.write(struct.pack("<H", len(tags)))
        for tag, kind, count, value in tags:
            fh.write(struct.pack("<HHI", tag, kind, count) + struct.pack("<I" if kind != 3 or count > 2 else "<HH",
                                                                           *((value,) if kind != 3 or count > 2
                                                                             else (value, 0))))
        fh.write(struct.pack("<I", 0))
    return path
