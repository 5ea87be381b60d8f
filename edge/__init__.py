"""mitosis-edge: scan-time mitotic-figure detection for whole-slide images.

The public surface is small: open a slide, plan its tiles, stream them.
"""

from edge.errors import (
    BackendUnavailableError,
    ConfigError,
    CorruptSlideError,
    EdgeError,
    EngineError,
    EngineInputError,
    ImplausibleSlideError,
    ManifestError,
    MissingMppError,
    NotASlideError,
    PlanError,
    SlideChangedError,
    SlideNotFoundError,
    SlideReadError,
    SlideTimeLimitError,
    StreamCancelled,
    TileDecodeError,
    UnsupportedFormatError,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ConfigError",
    "CorruptSlideError",
    "EdgeError",
    "EngineError",
    "EngineInputError",
    "ImplausibleSlideError",
    "ManifestError",
    "MissingMppError",
    "NotASlideError",
    "PlanError",
    "SlideChangedError",
    "SlideNotFoundError",
    "SlideReadError",
    "SlideTimeLimitError",
    "StreamCancelled",
    "TileDecodeError",
    "UnsupportedFormatError",
    "__version__",
]
