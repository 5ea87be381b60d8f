"""Issue 12's attacks in a bounded loop against a fresh `mitosis-edge serve` (TLS, tokens, loopback only);
prints a JSON report of the daemon's RSS and GetServerStatus p99 in the first and last third of the run.

    python tools/attack_loop.py --seconds 60 [--threads 3] [--keep DIR]

Every attack must get its documented code with a message that leaks nothing (tests/attack_box.py);
the figures must stay flat: RSS in the last third at most 10% + 20 MB above the first third's, and
GetServerStatus p99 at most twice the first third's (or 50 ms). Exit status 0 when both hold.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from tests.attack_box import attack_loop, flat, start_box  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the attacks loop (default 60)")
    parser.add_argument("--threads", type=int, default=3, help="attacking threads (default 3)")
    parser.add_argument("--keep", metavar="DIR", help="run in DIR and keep it (the daemon's log is DIR/serve.log)")
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= 600:
        parser.error("--seconds must be between 1 and 600 (the loop is bounded)")
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="attack-loop-"))
    box = start_box(folder)
    try:
        report = attack_loop(box, args.seconds, threads=args.threads)
    finally:
        box.stop()
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    problems = flat(report) + ([f"{report['wrong_count']} wrong answer(s)"] if report["wrong_count"] else [])
    report["problems"] = problems
    print(json.dumps(report, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
