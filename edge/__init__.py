"""mitosis-edge: scan-time mitotic-figure detection for whole-slide images.

The public surface, everything listed in ``__all__`` (tests/test_public_api.py holds it to that list):

    >>> import edge
    >>> config = edge.load_config(None)                                    # the defaults; or a TOML path
    >>> analysis = edge.analyze_slide("/scans/S24-042.svs", config)        # doctest: +SKIP
    >>> analysis.result.scores.mitotic_count                               # doctest: +SKIP
    >>> with edge.open_slide("/scans/S24-042.svs") as slide: ...           # doctest: +SKIP
    >>> with edge.EdgeClient("127.0.0.1:50051", token="...") as client: ...  # doctest: +SKIP

and every error of the one hierarchy (``edge.errors`` draws it). ``import edge`` stays light: the slide
reader (numpy, tifffile, OpenSlide), the pipeline (ONNX Runtime) and the client (gRPC) are imported on
first use of ``open_slide``, ``analyze_slide`` or ``EdgeClient``. The sub-packages (``edge.wsi``,
``edge.analysis``, ``edge.engines``, ``edge.service``, ``edge.devtools``, ``edge.cli``) are the
implementation: importable, but not the promised interface; ``edge.client`` is the documented import
path for the client, and stays one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from edge.config import Config, load_config
from edge.errors import (
    AnalysisCrashed,
    BackendUnavailableError,
    ConfigError,
    CorruptSlideError,
    DiskFullError,
    EdgeClientError,
    EdgeError,
    EngineError,
    EngineInputError,
    ImplausibleSlideError,
    JobNotFoundError,
    JobStateError,
    ManifestError,
    MissingExtraError,
    MissingMppError,
    NotASlideError,
    PlanError,
    QcError,
    RequestRefused,
    ResultNotFoundError,
    ReviewError,
    ServerUnavailableError,
    SlideChangedError,
    SlideNotFoundError,
    SlideReadError,
    SlideTimeLimitError,
    StoreBusyError,
    StoreCorruptError,
    StoreError,
    StreamCancelled,
    TileDecodeError,
    UnsupportedFormatError,
)

if TYPE_CHECKING:  # the lazy names, for type checkers and editors
    from edge.analysis.pipeline import analyze_slide
    from edge.client import EdgeClient
    from edge.wsi.slide import open_slide

__version__ = "0.1.0"

# name -> module that defines it; imported on first access (PEP 562), so `import edge` stays light
_LAZY = {
    "analyze_slide": "edge.analysis.pipeline",
    "open_slide": "edge.wsi.slide",
    "EdgeClient": "edge.client",
}

__all__ = [
    "AnalysisCrashed",
    "BackendUnavailableError",
    "Config",
    "ConfigError",
    "CorruptSlideError",
    "DiskFullError",
    "EdgeClient",
    "EdgeClientError",
    "EdgeError",
    "EngineError",
    "EngineInputError",
    "ImplausibleSlideError",
    "JobNotFoundError",
    "JobStateError",
    "ManifestError",
    "MissingExtraError",
    "MissingMppError",
    "NotASlideError",
    "PlanError",
    "QcError",
    "RequestRefused",
    "ResultNotFoundError",
    "ReviewError",
    "ServerUnavailableError",
    "SlideChangedError",
    "SlideNotFoundError",
    "SlideReadError",
    "SlideTimeLimitError",
    "StoreBusyError",
    "StoreCorruptError",
    "StoreError",
    "StreamCancelled",
    "TileDecodeError",
    "UnsupportedFormatError",
    "__version__",
    "analyze_slide",
    "load_config",
    "open_slide",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
