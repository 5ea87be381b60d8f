"""The `mitosis-edge` command: `main` parses and dispatches, one module per command group.

Internal: the command line is the interface (flags, output, exit codes: edge.vocab.ExitCode), not these
modules. The top layer: it may import every other part of the package; only ``python -m edge`` imports it.
"""

from edge.cli.main import main

__all__ = ["main"]
