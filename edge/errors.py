"""The one error hierarchy of mitosis-edge.

Every error a user can cause says what was wrong, with the value, and what to do.

    EdgeError
    ├── ConfigError (ValueError)            a bad setting in TOML or on the command line
    ├── StreamCancelled                     a tile stream or job was cancelled on request
    └── SlideReadError (OSError)            anything that goes wrong opening or reading a slide
        ├── SlideNotFoundError (FileNotFoundError)
        ├── NotASlideError                  the file is no whole-slide image (or a DICOM label)
        ├── UnsupportedFormatError          a format no installed reader handles
        ├── MissingMppError                 no pixel size recorded and none given
        └── CorruptSlideError               truncated or damaged file
            └── TileDecodeError             one tile failed to decode during a read
"""

from __future__ import annotations

from pathlib import Path


class EdgeError(Exception):
    """Base of every error mitosis-edge raises on purpose."""


class ConfigError(EdgeError, ValueError):
    """A setting is missing, of the wrong type or out of range."""


class StreamCancelled(EdgeError):
    """The work was cancelled on request; nothing is wrong with the slide."""


class SlideReadError(EdgeError, OSError):
    """A slide could not be opened or read. Names the path and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    def __reduce__(self) -> tuple[type[SlideReadError], tuple[str, str]]:
        return (type(self), (self.path, self.reason))


class SlideNotFoundError(SlideReadError, FileNotFoundError):
    """The path does not exist."""


class NotASlideError(SlideReadError):
    """The file exists but holds no whole-slide image."""


class UnsupportedFormatError(SlideReadError):
    """The file may be a slide, but no installed reader handles its format."""


class MissingMppError(SlideReadError):
    """The slide records no pixel size and no override was given."""


class CorruptSlideError(SlideReadError):
    """The file is truncated or damaged."""


class TileDecodeError(CorruptSlideError):
    """A stored tile failed to decode in the middle of a read."""
