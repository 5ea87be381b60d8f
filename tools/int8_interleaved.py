"""FP32 and INT8 detector tiles/s with the two sessions interleaved in one process, so both see the same load.

    python tools/int8_interleaved.py FP32_BUNDLE INT8_BUNDLE [--rounds 16] [--batch 4]

A check beside `mitosis-edge bench engine` (which times one bundle per run) on a machine shared with other
work: the engine settings of every run (edge.engines.onnxrt.new_session), random uint8 tiles, best and
median of the rounds after one warm-up.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from edge.engines import load_bundle
from edge.engines.onnxrt import new_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fp32")
    parser.add_argument("int8")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    specs = [load_bundle(folder).detector for folder in (args.fp32, args.int8)]
    size = specs[0].size
    batch = np.random.default_rng(0).integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8)
    sessions = [new_session(spec.path) for spec in specs]
    times: list[list[float]] = [[], []]
    for _ in range(args.rounds + 1):
        for i, (spec, session) in enumerate(zip(specs, sessions, strict=True)):
            t0 = time.perf_counter()
            session.run(None, {spec.input_name: batch})
            times[i].append(time.perf_counter() - t0)
    best = [args.batch / min(t[1:]) for t in times]
    median = [args.batch / float(np.median(t[1:])) for t in times]
    print(f"FP32 {best[0]:.1f} INT8 {best[1]:.1f} tiles/s best = {best[1] / best[0]:.2f}x;"
          f" median {median[0]:.1f} / {median[1]:.1f} = {median[1] / median[0]:.2f}x")


if __name__ == "__main__":
    main()
