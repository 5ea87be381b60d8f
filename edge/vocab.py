"""The project's vocabulary, each word defined once; other modules, CLI choices and the store derive from it.

Pure (stdlib only), so every layer may import it.
"""

from __future__ import annotations

# --- jobs and the event stream (edge.service, edge.client) ----------------------------------


# --- slides and detections (edge.wsi, edge.analysis) -----------------------------------------


# --- engines (edge.engines: backends, TensorRT) ----------------------------------------------


# --- the command line (edge.cli) -------------------------------------------------------------
