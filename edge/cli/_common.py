"""Internal to the CLI: command-line flags to settings (one table for every subcommand, so a flag means the
same everywhere) and the help a command group prints when no subcommand was given."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from edge.config import Config, load_config
from edge.vocab import ExitCode

# argparse destination -> dotted setting; a subcommand without the flag leaves the setting alone
FLAG_SETTINGS = {
    "mpp": "slide.mpp_override",
    "reader": "slide.reader",
    "region_reader": "slide.region_reader",
    "target_mpp": "slide.target_mpp",
    "threads": "stream.reader_threads",
    "batch_size": "stream.batch_size",
    "bundle": "engines.bundle",
    "backend": "engines.backend",
    "intra_op_threads": "engines.intra_op_threads",
    "precision": "engines.precision",
    "max_batch": "engines.max_batch",
    "plan_cache": "engines.plan_cache",
    "workspace_gb": "engines.workspace_gb",
    "timing_cache": "engines.timing_cache",
    "data": "daemon.data_dir",
    "workers": "daemon.workers",
    "listen": "server.listen",
    "server_insecure": "server.insecure",
}


def config_from_args(args: argparse.Namespace) -> Config:
    """The ``--config`` file (or the defaults) with every flag the user gave applied on top."""
    overrides = {setting: getattr(args, dest, None) for dest, setting in FLAG_SETTINGS.items()}
    return load_config(getattr(args, "config", None), overrides)


def usage_handler(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], ExitCode]:
    """The handler of a command group called without a subcommand: print its help, exit with USAGE."""

    def handler(args: argparse.Namespace) -> ExitCode:
        parser.print_help()
        return ExitCode.USAGE

    return handler
