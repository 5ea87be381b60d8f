"""Prometheus metrics of the daemon: jobs by state, queue depth, slides per hour, tiles/s, stage latencies, failures.

One registry per daemon (tests start several in one process). Job counts and the queue depth are
read from the store when Prometheus scrapes, so they are never out of step with it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from edge.errors import EdgeError
from edge.service.store import failure_reason
from edge.vocab import JobState

if TYPE_CHECKING:
    from edge.analysis.pipeline import StageTimes
    from edge.analysis.scoring import SlideResult
    from edge.service.store import QcRecord, Store, StoredReview

FRACTION_BUCKETS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
PICKUP_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)
HOUR_S = 3600.0
class AnalysedSlide(Protocol):
    """What the metrics read of one analysed slide: the pipeline's Analysis in the daemon's process, the
    worker's Outcome from a child process."""

    @property
    def result(self) -> SlideResult: ...

    @property
    def tiles(self) -> int: ...

    @property
    def times(self) -> StageTimes: ...


class _StoreCollector(Collector):
    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("mitosis_edge_jobs", "Jobs in the store by state", labels=["state"])
        try:
            counts = self.store.counts_by_state()
        except EdgeError:  # a closed store during shutdown: report nothing rather than fail the scrape
            return
        for state, n in counts.items():
            jobs.add_metric([state], n)
        yield jobs
        yield GaugeMetricFamily("mitosis_edge_queue_depth", "Jobs waiting to run", value=counts.get(JobState.QUEUED, 0))
        try:
            stats = self.store.review_agreement()
        except EdgeError:
            return
        yield GaugeMetricFamily("mitosis_edge_reviewed_jobs", "Jobs with a signed review (the newest per job)",
                                value=stats["reviews"])
        if stats["reviews"]:
            yield GaugeMetricFamily(
                "mitosis_edge_review_count_agreement",
                "Share of signed reviews whose hotspot mitotic count equals the automatic one",
                value=stats["count_agreement"],
            )
        if stats["figures_judged"]:
            yield GaugeMetricFamily(
                "mitosis_edge_review_figure_agreement",
                "Share of hotspot figures (added ones included) the reviewers left as the model classed them",
                value=stats["figures_agreed"] / stats["figures_judged"],
            )


class DaemonMetrics:
    """The daemon's counters; ``serve`` exposes them at http://HOST:PORT/metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.slides_done = Counter("mitosis_edge_slides_done", "Slides analysed and stored", registry=r)
        self.reviews_signed = Counter("mitosis_edge_reviews_signed", "Reviews signed on the review page",
                                      registry=r)
        self.tiles = Counter("mitosis_edge_tiles", "Tiles through the detector", registry=r)
        self.failures = Counter("mitosis_edge_failures", "Failed attempts by reason", ["reason"], registry=r)
        self.tiles_per_s = Gauge("mitosis_edge_tiles_per_second", "End-to-end tiles/s of the last slide", registry=r)
        self.slides_per_hour = Gauge("mitosis_edge_slides_per_hour", "Slides finished in the last hour", registry=r)
        self.running_slides = Gauge("mitosis_edge_running_slides", "Slides being analysed now", registry=r)
        self.slides_waiting = Gauge(
            "mitosis_edge_slides_waiting", "Slides that stopped changing but do not open (yet)", registry=r
        )
        self.ready = Gauge("mitosis_edge_ready", "1 while the daemon scores slides (the health status), else 0",
                           registry=r)
        self.stage_seconds = Histogram("mitosis_edge_stage_seconds", "Seconds per pipeline stage and slide",
                                       ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.slide_seconds = Histogram("mitosis_edge_slide_seconds", "Seconds per slide, claim to stored",
                                       buckets=STAGE_BUCKETS, registry=r)
        self.pickup_seconds = Histogram("mitosis_edge_pickup_seconds",
                                        "Seconds from a slide's last write to its job (includes the quiet period)",
                                        buckets=PICKUP_BUCKETS, registry=r)
        self.qc_verdicts = Counter("mitosis_edge_qc_verdicts", "Scan QC verdicts (pass, review, rescan)",
                                   ["verdict"], registry=r)
        self.qc_out_of_focus = Histogram("mitosis_edge_qc_out_of_focus_fraction",
                                         "Share of each slide's tissue that is out of focus", buckets=FRACTION_BUCKETS,
                                         registry=r)
        self.qc_drift = Counter("mitosis_edge_qc_drift", "Drift events by scanner and what moved",
                                ["scanner", "measure"], registry=r)
        self.qc_outside_baseline = Counter("mitosis_edge_qc_outside_baseline",
                                           "Slides outside their scanner's baseline", ["scanner"], registry=r)
        self._finished: list[float] = []
        self._lock = threading.Lock()

    def attach_store(self, store: Store) -> None:
        self.registry.register(_StoreCollector(store))

    def serve(self, host: str, port: int) -> tuple[Any, threading.Thread]:
        """Start the /metrics HTTP endpoint; returns (server, thread) for shutdown."""
        server, thread = start_http_server(port, addr=host or "127.0.0.1", registry=self.registry)
        return server, thread

    @contextmanager
    def running(self) -> Iterator[None]:
        self.running_slides.inc()
        try:
            yield
        finally:
            self.running_slides.dec()

    def picked_up(self, seconds: float) -> None:
        self.pickup_seconds.observe(max(0.0, seconds))

    def reviewed(self, review: StoredReview) -> None:
        self.reviews_signed.inc()

    def failed(self, error: str) -> None:
        self.failures.labels(failure_reason(error)).inc()

    def qc(self, records: Iterable[QcRecord]) -> None:
        """Count one slide's stored scan QC (``Store.qc_history(job_id=...)``: zero or one record)."""
        for record in records:
            self.qc_verdicts.labels(record.verdict).inc()
            fraction = record.measures.get("out_of_focus_fraction")
            if fraction is not None:
                self.qc_out_of_focus.observe(float(fraction))
            if not record.in_band:
                self.qc_outside_baseline.labels(record.scanner).inc()
            if record.assessment.get("drift"):
                for measure in record.assessment.get("moved", {}):
                    self.qc_drift.labels(record.scanner, measure).inc()

    def done(self, analysis: AnalysedSlide, seconds: float) -> None:
        self.slides_done.inc()
        self.tiles.inc(analysis.tiles)
        self.slide_seconds.observe(seconds)
        if analysis.times.total > 0:
            self.tiles_per_s.set(analysis.tiles / analysis.times.total)
        for stage, value in analysis.times.to_dict().items():
            if stage != "total":
                self.stage_seconds.labels(stage).observe(value)
        now = time.monotonic()
        with self._lock:
            self._finished = [t for t in self._finished if now - t < HOUR_S] + [now]
            self.slides_per_hour.set(len(self._finished))
