#!/usr/bin/env python3
"""Compare ways of reading overlapping 1024² tiles from one slide, in one run.

This is the measurement behind the stream's reader choice (docs/architecture.md, "The read
path"): the decode floor, mitosis-edge's direct tile reader, pyvips Region.fetch with and without
a tile cache, and tiffslide's read_region, each with the same threads over the same tile grid.

    python tools/compare_readers.py SLIDE.tiff [--threads 2] [--tile 1024] [--overlap 64] [--json]

Only level 0 of a tiled TIFF is used; make a slide with `mitosis-edge synth` if you have none.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edge.config import SlideConfig
from edge.wsi.slide import direct_reader, open_slide
from edge.wsi.tiling import grid_starts


def timed(fn: Callable[[Any], Any], items: list[Any], threads: int) -> float:
    """Seconds to map ``fn`` over ``items`` with a pool of ``threads``."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(fn, items):
            pass
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("slide")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import pyvips
    import tiffslide

    size, stride = args.tile, args.tile - args.overlap
    results: dict[str, float] = {}
    with open_slide(args.slide, SlideConfig()) as slide:
        reader = direct_reader(slide)
        if reader is None:
            print("this slide's level 0 is not a tiled TIFF page; nothing to compare", file=sys.stderr)
            return 2
        w, h = slide.info.width, slide.info.height
        coords = [(x, y) for y in grid_starts(h, size, stride) for x in grid_starts(w, size, stride)]
        stored = sorted(
            {i for x, y in coords for i in reader.stored_tiles(0, x, y, min(size, w - x), min(size, h - y))}
        )
        results["floor"] = timed(lambda i: reader.decode_tile(0, i), stored, args.threads)
        results["edge_direct"] = timed(lambda c: slide.read_level(0, c[0], c[1], size, size), coords, args.threads)

    def vips_fetch(cache_tiles: int | None) -> Callable[[tuple[int, int]], Any]:
        image = pyvips.Image.new_from_file(args.slide, access="random")
        if cache_tiles:
            tw = slide.info.levels[0].tile_width or 256
            th = slide.info.levels[0].tile_height or 256
            image = image.tilecache(tile_width=tw, tile_height=th, max_tiles=cache_tiles, threaded=True)
        local = threading.local()

        def fetch(c: tuple[int, int]) -> Any:
            if not hasattr(local, "region"):
                local.region = pyvips.Region.new(image)
            return local.region.fetch(c[0], c[1], min(size, w - c[0]), min(size, h - c[1]))

        return fetch

    results["pyvips_region"] = timed(vips_fetch(None), coords, args.threads)
    results["pyvips_tilecache"] = timed(vips_fetch(400), coords, args.threads)
    ts = tiffslide.TiffSlide(args.slide)
    results["tiffslide"] = timed(lambda c: ts.read_region(c, 0, (size, size), as_array=True), coords, args.threads)
    ts.close()

    rows = {
        name: {"seconds": s, "tiles_per_s": len(coords) / s, "ratio_to_floor": results["floor"] / s}
        for name, s in results.items()
    }
    if args.json:
        summary = {"tiles": len(coords), "stored_tiles": len(stored), "threads": args.threads, "readers": rows}
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"{len(coords)} tiles of {size} px (overlap {args.overlap}), "
            f"{len(stored)} stored tiles, {args.threads} threads"
        )
        for name, row in rows.items():
            print(f"{name:18} {row['tiles_per_s']:8.1f} tiles/s   {row['ratio_to_floor']:.2f} of the floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
