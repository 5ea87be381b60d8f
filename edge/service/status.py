"""What the daemon says about itself: the shapes GetServerStatus, `mitosis-edge daemon status` and the
tests read. Built in one place (``Daemon.server_status``, ``engine_info``, ``Watcher.waiting``) and
converted to protobuf in one place (``edge.service.server.convert.status_to_pb``).

TypedDicts rather than dataclasses: the status is JSON-able as it is and callers index it by key.
"""

from __future__ import annotations

from typing import TypedDict

__all__ = ["EngineInfo", "ServerStatus", "WaitingSlide"]


class EngineInfo(TypedDict):
    """One loaded engine: its model name, role ("detector", "mitotic", ...), cache key (a TensorRT plan's,
    or the ONNX file's sha256) and bundle ("name version")."""

    name: str
    role: str
    cache_key: str
    bundle: str


class WaitingSlide(TypedDict):
    """A slide that stopped changing but does not open (yet): why, for how long, and when it fails."""

    slide_path: str
    reason: str
    waiting_s: float
    fails_in_s: float


class ServerStatus(TypedDict):
    """The daemon's status (``Daemon.server_status``); every key is always present."""

    version: str  # the mitosis-edge version
    backend: str  # engines.backend as configured
    gpu: str  # the GPU's name, "" on CPU
    engines: list[EngineInfo]
    bundle: str  # "name version" of the default bundle
    queue_depth: int
    running: int
    uptime_s: float
    watch_folders: list[str]
    ready: bool
    engine_error: str
    not_ready_reason: str  # "" when ready (or while the engines load)
    waiting_slides: list[WaitingSlide]
    intended_use: str
