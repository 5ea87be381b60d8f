"""The `mitosis-edge` command: `main` parses and dispatches, one module per command group."""

from edge.cli.main import main

__all__ = ["main"]
