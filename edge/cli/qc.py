"""`mitosis-edge qc report`: scan QC per scanner over time, from the daemon's store.

Part of the command-line shell (it prints); the work happens in ``edge.service.qc_report``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edge.cli._common import config_from_args, usage_handler
from edge.errors import ConfigError
from edge.vocab import ExitCode


def register(sub: Any) -> None:
    """Add the `qc` command (with `report`) to the top-level parser's subcommands."""
    p = sub.add_parser("qc", help="scan QC: per-scanner drift report from the daemon's store")
    qc_sub = p.add_subparsers(dest="qc_command", metavar="COMMAND")
    r = qc_sub.add_parser(
        "report", help="plots of stain vectors, focus and MF density per scanner with the baseline band"
    )
    r.add_argument("--data", metavar="DIR", help="the daemon's data folder holding edge.db (daemon.data_dir)")
    r.add_argument("--scanner", metavar="ID", help="only this scanner id (as in result.json slide.scanner.id)")
    r.add_argument("--since", metavar="DATE", help="only slides stored since this date (YYYY-MM-DD[THH:MM], UTC)")
    r.add_argument("--out", required=True, metavar="DIR", help="where the PNGs and qc_report.json go")
    r.add_argument("--json", action="store_true", help="print the report as one JSON object")
    r.set_defaults(handler=cmd_qc_report)
    p.set_defaults(handler=usage_handler(p))



def cmd_qc_report(args: argparse.Namespace) -> int:
    from edge.service.daemon import STORE_NAME
    from edge.service.qc_report import parse_since, write_report
    from edge.service.store import Store

    config = config_from_args(args)
    path = config.daemon.data_path / STORE_NAME
    if not path.is_file():
        raise ConfigError(f"no store at {path}: pass --data with the daemon's data folder (daemon.data_dir)")
    with Store.open(path) as store:
        report = write_report(store, Path(args.out), config.qc, scanner=args.scanner, since=parse_since(args.since))
    if args.json:
        print(json.dumps(report, indent=1))
        return ExitCode.OK
    for name, entry in report["scanners"].items():
        verdicts = ", ".join(f"{v} {n}" for v, n in entry["verdicts"].items())
        print(f"scanner {name}: {entry['slides']} slides ({verdicts}); plot {entry['plot']}")
        for message in entry["drift_events"]:
            print(f"  drift: {message}")
    print(f"report {Path(args.out) / 'qc_report.json'}")
    return ExitCode.OK
