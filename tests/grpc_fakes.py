"""Helpers for the gRPC tests: a small DaemonControl over a real Store, results to complete jobs with,
and servers started on port 0."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from edge.analysis.provenance import BundleProvenance, Provenance
from edge.analysis.scoring import Figure, SlideResult, score_slide
from edge.config import ServerConfig
from edge.service.server import RunningServer, start_server
from edge.service.store import Job, Store

READ_TOKEN = "read-token-0123456789abcdef"
SUBMIT_TOKEN = "submit-token-0123456789abcdef"


class FakeControl:
    """What edge.service.daemon.Daemon offers the server, over a real store; no engines, no workers."""

    def __init__(self, store: Store, *, ready: bool = True, watch_folders: Sequence[str] = ()) -> None:
        self.store = store
        self.ready = ready
        self.watch_folders = list(watch_folders)
        self.started = time.monotonic()
        self.submitted: list[Path] = []

    def submit_slide(
        self,
        path: Path,
        *,
        priority: int,
        mpp_override: float | None,
        bundle: str | None,
        submitted_by: str | None = None,
        accession: str | None = None,
        labels: tuple[str, ...] = (),
    ) -> Job:
        self.submitted.append(path)
        job, _ = self.store.add_job(
            str(path), source="submit", priority=priority, mpp_override=mpp_override, bundle=bundle, dedupe=False,
            submitted_by=submitted_by, accession=accession, labels=labels,
        )
        return job

    def cancel_job(self, job_id: int, *, cancelled_by: str | None = None) -> Job:
        return self.store.cancel_job(job_id, cancelled_by=cancelled_by)

    def server_status(self) -> dict[str, Any]:
        return {
            "version": "0.1.0",
            "backend": "onnxruntime",
            "gpu": "",
            "engines": [{"name": "detector", "role": "detector", "cache_key": ""},
                        {"name": "densenet", "role": "mitotic", "cache_key": "sha256:abc"}],
            "queue_depth": self.store.queue_depth(),
            "running": self.store.counts_by_state()["running"],
            "uptime_s": time.monotonic() - self.started,
            "watch_folders": self.watch_folders,
            "bundle": "demo 1.0.0",
        }

    def is_ready(self) -> bool:
        return self.ready


def figures() -> list[Figure]:
    """Five candidates: two normal, one atypical, one uncertain mitotic figure and a look-alike."""
    def fig(x: float, p: float, mitotic: bool, subtype: Any, p_atypical: float | None) -> Figure:
        return Figure(x * 4, 400.0, x, 100.0, 40.0, 40.0, 0.8, p, p_atypical, mitotic, subtype, {"mitotic:m": p})

    return [
        fig(100.0, 0.95, True, "normal", 0.02),
        fig(120.0, 0.90, True, "normal", 0.05),
        fig(140.0, 0.97, True, "atypical", 0.96),
        fig(160.0, 0.80, True, "uncertain", 0.5),
        fig(180.0, 0.30, False, None, None),
    ]


def slide_result(slide_path: str, figs: Sequence[Figure] | None = None) -> SlideResult:
    figs = list(figures() if figs is None else figs)
    return SlideResult(
        slide_path=slide_path,
        slide={"width": 4000, "height": 3000, "mpp_x": 0.25, "mpp_y": 0.25, "format": "tiff", "vendor": "generic"},
        scores=score_slide(figs, tissue_area_mm2=4.0),
        figures=tuple(figs),
        provenance=Provenance(
            version="0.1.0", created_at="2026-01-01T00:00:00Z", bundle=BundleProvenance("demo", "1.0.0"),
            backend="onnxruntime",
        ).to_json_dict(),
    )


def process_next(store: Store, *, fail: bool = False, figs: Sequence[Figure] | None = None) -> Job | None:
    """Claim the next queued job and finish it (done with a result, or failed)."""
    job = store.claim_next_job()
    if job is None:
        return None
    if fail:
        return store.fail_job(job.job_id, "CorruptSlideError: truncated file")
    folder = store.path.parent / "results" / str(job.job_id)
    exports = {"result": str(folder / "result.json"), "csv": str(folder / "detections.csv")}
    return store.complete_job(job.job_id, slide_result(job.slide_path, figs), exports)


def insecure_config(roots: Sequence[str | Path] = (), **overrides: Any) -> ServerConfig:
    config = ServerConfig(listen="127.0.0.1:0", insecure=True, allowed_roots=tuple(str(r) for r in roots))
    return replace(config, **overrides)


def serve(control: FakeControl, config: ServerConfig, **kwargs: Any) -> RunningServer:
    return start_server(config, control, **kwargs)


def write_tokens(path: Path) -> Path:
    path.write_text(f"# test tokens\n{READ_TOKEN} read viewer\n{SUBMIT_TOKEN} submit lis\n", encoding="utf-8")
    path.chmod(0o600)
    return path
