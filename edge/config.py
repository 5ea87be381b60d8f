"""Settings: frozen dataclasses loaded from TOML plus command-line overrides, validated with clear messages.

Every setting has a default, so mitosis-edge runs without a config file. A TOML file may set any
subset; unknown sections or keys are refused (a typo must not silently keep a default).

Example::

    [slide]
    target_mpp = 0.25
    mpp_override = 0.2527     # only for slides that record no pixel size

    [tiling]
    tile_size = 1024
    overlap = 64
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from edge.errors import ConfigError
from edge.vocab import SLIDE_EXTENSIONS, BackendName, OnMissingPlan, PrecisionName

ReaderName = Literal["auto", "tiffslide", "openslide"]
RegionReaderName = Literal["auto", "tiles", "pyvips", "library"]

DEFAULT_TARGET_MPP = 0.25  # µm/px, the resolution the paper's models were trained at
DEFAULT_MPP_TOLERANCE = 0.03  # a level within 3% of the target is read as is, without resampling


@dataclass(frozen=True)
class SlideConfig:
    """How slides are opened and read.

    >>> SlideConfig(target_mpp=0.25, reader="auto").mpp_override is None
    True
    """

    reader: ReaderName = "auto"  # which library opens the slide; auto chooses by format
    region_reader: RegionReaderName = "auto"  # auto: decode stored TIFF tiles directly when possible
    target_mpp: float = DEFAULT_TARGET_MPP
    mpp_tolerance: float = DEFAULT_MPP_TOLERANCE
    mpp_override: float | None = None  # µm/px, used when (and only when) given
    tile_cache_mb: int = 64  # decoded stored tiles kept for reuse by overlapping reads (a strip's worth)
    # Plausibility, checked before any pixel is read: a larger slide is refused as implausible (a "bomb").
    max_level0_megapixels: float = 30000.0  # 30 gigapixels: a whole 75 x 25 mm slide at 0.25 µm/px is ~24
    max_tiles: int = 40000  # tiles in the tile plan (tissue only); a full 24-gigapixel slide plans ~30000

    def validate(self) -> None:
        _positive("slide.target_mpp", self.target_mpp)
        if not 0.0 <= self.mpp_tolerance < 0.5:
            raise ConfigError(f"slide.mpp_tolerance={self.mpp_tolerance} must be in [0, 0.5)")
        if self.mpp_override is not None:
            _positive("slide.mpp_override", self.mpp_override)
        if self.tile_cache_mb < 1:
            raise ConfigError(f"slide.tile_cache_mb={self.tile_cache_mb} must be at least 1")
        _positive("slide.max_level0_megapixels", self.max_level0_megapixels)
        if self.max_tiles < 1:
            raise ConfigError(f"slide.max_tiles={self.max_tiles} must be at least 1")


@dataclass(frozen=True)
class TissueConfig:
    """Tissue detection on a low-resolution thumbnail. Sizes are physical, so independent of mpp."""

    thumbnail_mpp: float = 8.0  # µm/px of the thumbnail the mask is computed on
    max_thumbnail_megapixels: float = 4.0  # a bigger slide gets a coarser thumbnail, so memory stays flat
    saturation_threshold: float = 0.07  # HSV saturation above which a pixel is stained
    optical_density_threshold: float = 0.15  # summed RGB optical density against the glass: above is tissue
    grey_saturation: float = 0.02  # dense pixels greyer than this are dust, dirt or pencil, not stain
    closing_radius_um: float = 24.0  # bridges small gaps inside tissue
    opening_radius_um: float = 8.0  # removes dust-sized specks
    min_object_area_mm2: float = 0.001  # pieces smaller (~36 µm across) are dust; a few cells are kept
    fill_holes: bool = True

    def thumbnail_mpp_for(self, width_um: float, height_um: float) -> float:
        """The thumbnail mpp for a slide of this physical size: ``thumbnail_mpp``, or coarser when the
        thumbnail would exceed ``max_thumbnail_megapixels``.

        >>> TissueConfig().thumbnail_mpp_for(10_000, 10_000)  # a 1 cm² scan: 1250² px at 8 µm/px
        8.0
        >>> round(TissueConfig().thumbnail_mpp_for(25_000, 50_000), 1)  # a whole 25 x 50 mm scan area
        17.7
        """
        floor = float((width_um * height_um / (self.max_thumbnail_megapixels * 1e6)) ** 0.5)
        return max(self.thumbnail_mpp, floor)

    def validate(self) -> None:
        _positive("tissue.thumbnail_mpp", self.thumbnail_mpp)
        _positive("tissue.max_thumbnail_megapixels", self.max_thumbnail_megapixels)
        _fraction("tissue.saturation_threshold", self.saturation_threshold)
        _non_negative("tissue.optical_density_threshold", self.optical_density_threshold)
        _fraction("tissue.grey_saturation", self.grey_saturation)
        _non_negative("tissue.closing_radius_um", self.closing_radius_um)
        _non_negative("tissue.opening_radius_um", self.opening_radius_um)
        _non_negative("tissue.min_object_area_mm2", self.min_object_area_mm2)


@dataclass(frozen=True)
class TilingConfig:
    """The tile grid at the target mpp."""

    tile_size: int = 1024  # px at target mpp, the detector's input size
    overlap: int = 64  # px shared by neighbouring tiles, so a figure on an edge is whole in one tile
    strip_columns: int = 8  # tiles are read in vertical strips this many columns wide (decode-cache reuse)
    layout: Literal["fit", "grid"] = "fit"  # fit: tiles placed at the tissue's own edges; grid: fixed grid


    def validate(self) -> None:
        if self.tile_size < 16:
            raise ConfigError(f"tiling.tile_size={self.tile_size} must be at least 16 px")
        if not 0 <= self.overlap < self.tile_size // 2:
            raise ConfigError(f"tiling.overlap={self.overlap} must be in [0, tile_size/2) = [0, {self.tile_size // 2})")
        if self.layout not in ("fit", "grid"):
            raise ConfigError(f"tiling.layout={self.layout!r} must be 'fit' or 'grid'")


@dataclass(frozen=True)
class StreamConfig:
    """Reader threads and batching of the tile stream."""

    reader_threads: int = 0  # 0 = one per CPU core
    batch_size: int = 4
    queue_depth: int = 4  # batches read ahead; with batch_size this bounds the stream's memory

    def validate(self) -> None:
        if self.reader_threads < 0:
            raise ConfigError(f"stream.reader_threads={self.reader_threads} must be >= 0 (0 = one per core)")
        if self.batch_size < 1:
            raise ConfigError(f"stream.batch_size={self.batch_size} must be at least 1")
        if self.queue_depth < 1:
            raise ConfigError(f"stream.queue_depth={self.queue_depth} must be at least 1")

    @property
    def threads(self) -> int:
        """Reader threads actually used."""
        return self.reader_threads or (os.cpu_count() or 1)


def default_plan_cache() -> str:
    """Where TensorRT plans are kept: ``$XDG_CACHE_HOME/mitosis-edge/plans`` (``~/.cache/...``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "mitosis-edge" / "plans")


@dataclass(frozen=True)
class EnginesConfig:
    """Which model bundle runs, on which backend, and how TensorRT plans are built and cached."""

    bundle: str = ""  # a bundle folder, or the name of an installed bundle; "" = the demo bundle
    backend: BackendName = "onnxruntime"  # onnxruntime = CPU, the embedded default
    intra_op_threads: int = 0  # ONNX Runtime threads per session; 0 = one per core
    classifier_batch: int = 32  # candidate crops per classifier batch
    in_flight: int = 2  # batches an engine keeps in flight (GPU: copies overlap compute)
    plan_cache: str = ""  # TensorRT plans; "" = $XDG_CACHE_HOME/mitosis-edge/plans
    precision: PrecisionName = "fp16"  # TensorRT build precision
    max_batch: int = 0  # TensorRT profile maximum; 0 = detector 8, classifiers 64
    workspace_gb: float = 4.0  # TensorRT builder workspace
    timing_cache: str = ""  # TensorRT timing cache file reused across builds; "" = inside plan_cache
    on_missing_plan: OnMissingPlan = "build"  # at start: build a missing plan, or stop and say how
    cuda_graphs: bool = False  # capture one CUDA graph per batch shape (TensorRT)
    # Bundle names SubmitSlide may choose (never a path); () = every bundle on the search path and engines.bundle
    allowed_bundles: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.intra_op_threads < 0:
            raise ConfigError(f"engines.intra_op_threads={self.intra_op_threads} must be >= 0 (0 = one per core)")
        if self.classifier_batch < 1:
            raise ConfigError(f"engines.classifier_batch={self.classifier_batch} must be at least 1")
        if not 1 <= self.in_flight <= 8:
            raise ConfigError(f"engines.in_flight={self.in_flight} must be between 1 and 8")
        if self.max_batch < 0:
            raise ConfigError(f"engines.max_batch={self.max_batch} must be >= 0 (0 = per model role)")
        _positive("engines.workspace_gb", self.workspace_gb)

    @property
    def plan_cache_dir(self) -> Path:
        return Path(self.plan_cache or default_plan_cache()).expanduser()


DEFAULT_SLIDE_EXTENSIONS = SLIDE_EXTENSIONS
# names scanners and copy tools write before the final rename: never a job
DEFAULT_IGNORE_PATTERNS = (
    "*.tmp", "*.temp", "*.part", "*.partial", "*.crdownload", "*.filepart", "*.copying", "~*", ".*", "*~",
)
ObserverName = Literal["auto", "native", "polling"]


def default_data_dir() -> str:
    """Where the daemon keeps its store and exports: ``$XDG_DATA_HOME/mitosis-edge`` (``~/.local/share/...``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "mitosis-edge")


@dataclass(frozen=True)
class WatchConfig:
    """Folders the daemon watches for new slides, and when a file counts as finished.

    >>> WatchConfig(folders=("/scans",), polling_folders=("/mnt/share",)).all_folders
    ('/scans', '/mnt/share')
    """

    folders: tuple[str, ...] = ()  # watched recursively with the observer chosen by `observer`
    polling_folders: tuple[str, ...] = ()  # always polled: network shares (NFS, SMB) send no native events
    observer: ObserverName = "auto"  # auto: polling on network file systems, native (inotify) elsewhere
    poll_interval_s: float = 2.0  # how often the polling observer and the stability gate look again
    recursive: bool = True
    extensions: tuple[str, ...] = DEFAULT_SLIDE_EXTENSIONS  # lower case, with the dot; ".dcm" = a DICOM folder
    ignore_patterns: tuple[str, ...] = DEFAULT_IGNORE_PATTERNS  # fnmatch patterns on the file name
    quiet_period_s: float = 10.0  # size and mtime unchanged this long (and the reader opens it) = finished
    close_settle_s: float = 1.0  # closed after writing (inotify) and unchanged this long = finished; 0 = off
    quiet_only_folders: tuple[str, ...] = ()  # close events not trusted here (scanners that reopen files)
    settle_timeout_s: float = 3600.0  # a file still changing or unreadable after this long ends as failed
    unreadable_timeout_s: float = 300.0  # a file that stopped changing but does not open fails after this long
    open_timeout_s: float = 60.0  # opening a settled slide (in a thread) is given up after this long
    fingerprint: Literal["quick", "full"] = "quick"  # quick: size, mtime, sha256 of head and tail; full: whole file
    on_duplicate: Literal["skip", "reprocess"] = "skip"  # the same slide (same fingerprint) seen again
    scan_on_start: bool = True  # slides already in the folders at start-up become jobs (once each)
    # A symlink in a watch folder is followed only into the watch folders and these folders; others fail
    symlink_roots: tuple[str, ...] = ()
    # regex searched in a watched slide's path; its group "accession" is the case's accession number
    accession_pattern: str = ""
    # "FOLDER=MPP": slides found under FOLDER are read at MPP µm/px (a scanner that records none)
    folder_mpp: tuple[str, ...] = ()

    def validate(self) -> None:
        _positive("watch.poll_interval_s", self.poll_interval_s)
        _non_negative("watch.quiet_period_s", self.quiet_period_s)
        _positive("watch.settle_timeout_s", self.settle_timeout_s)
        _positive("watch.unreadable_timeout_s", self.unreadable_timeout_s)
        _positive("watch.open_timeout_s", self.open_timeout_s)
        _non_negative("watch.close_settle_s", self.close_settle_s)
        if self.settle_timeout_s <= self.quiet_period_s:
            raise ConfigError(
                f"watch.settle_timeout_s={self.settle_timeout_s} must be longer than "
                f"watch.quiet_period_s={self.quiet_period_s}"
            )
        if self.accession_pattern:
            accession_regex(self.accession_pattern)
        _ = self.folder_mpps
        for ext in self.extensions:
            if not ext.startswith(".") or ext != ext.lower():
                raise ConfigError(
                    f"watch.extensions entry {ext!r} must be lower case and start with a dot, e.g. '.svs'"
                )

    @property
    def folder_mpps(self) -> tuple[tuple[Path, float], ...]:
        """`folder_mpp` parsed: (folder, µm/px), the longest folder first (the most specific rule wins).

        >>> WatchConfig(folder_mpp=("/scans/old-20x=0.5",)).folder_mpps
        ((PosixPath('/scans/old-20x'), 0.5),)
        """
        rules = []
        for entry in self.folder_mpp:
            folder, sep, value = entry.rpartition("=")
            try:
                mpp = float(value)
            except ValueError:
                mpp = math.nan
            if not sep or not folder.startswith("/") or not 0.01 <= mpp <= 100:
                raise ConfigError(
                    f"watch.folder_mpp entry {entry!r} must be \"FOLDER=MPP\" with an absolute folder and µm/px "
                    "between 0.01 and 100, e.g. \"/srv/scanner/out/old-20x=0.5\""
                )
            rules.append((Path(folder), mpp))
        return tuple(sorted(rules, key=lambda rule: -len(rule[0].parts)))

    def mpp_for(self, path: Path) -> float | None:
        """The µm/px `folder_mpp` gives a slide at ``path``; None when no rule covers it."""
        return next((mpp for folder, mpp in self.folder_mpps if Path(path).is_relative_to(folder)), None)

    @property
    def all_folders(self) -> tuple[str, ...]:
        return self.folders + tuple(f for f in self.polling_folders if f not in self.folders)


@dataclass(frozen=True)
class DaemonConfig:
    """The scan-time daemon: its store, workers, retries, shutdown and retention."""

    data_dir: str = ""  # store (edge.db) and exports (results/<job>/); "" = $XDG_DATA_HOME/mitosis-edge
    workers: int = 1  # slides analysed at once; each has its own reader threads
    max_attempts: int = 3  # a slide that keeps failing ends as failed with the last error
    retry_backoff_s: float = 30.0  # wait before the 2nd attempt; doubled for each further attempt
    retry_backoff_max_s: float = 3600.0
    shutdown_grace_s: float = 60.0  # SIGTERM: the running slide may finish this long, else it is re-queued
    # A slide still analysed after this long fails (deterministic, not retried) and the worker moves on;
    # 0 = derived from its tile plan: up to 300 s to plan its tiles, then seconds_per_tile x tiles + 60 s.
    max_slide_seconds: float = 0.0
    seconds_per_tile: float = 1.0  # the derived limit's allowance per planned tile (CPU inference: ~0.1 s)
    min_free_disk_mb: int = 1024  # a job starts only with this much free space where exports are written
    export_retention_days: float = 0.0  # exports older than this are deleted (results stay); 0 = keep
    isolation: Literal["process", "thread"] = "process"  # process: a slide that crashes a library kills a child only
    analysis_nice: int = 10  # niceness of the analysis (engines, readers): the API answers first; 0 = equal
    metrics_listen: str = "127.0.0.1:9464"  # Prometheus /metrics; "" = off
    log_format: Literal["text", "json"] = "text"
    export_mode: str = "0640"  # octal permissions of export files (folders get x where r is set)
    export_group: str = ""  # group given to export folders and files; "" = the daemon user's group

    def validate(self) -> None:
        _ = self.export_file_mode  # parses and checks the octal text
        if self.workers < 1:
            raise ConfigError(f"daemon.workers={self.workers} must be at least 1")
        if self.max_attempts < 1:
            raise ConfigError(f"daemon.max_attempts={self.max_attempts} must be at least 1")
        _non_negative("daemon.retry_backoff_s", self.retry_backoff_s)
        _non_negative("daemon.retry_backoff_max_s", self.retry_backoff_max_s)
        _non_negative("daemon.shutdown_grace_s", self.shutdown_grace_s)
        _non_negative("daemon.max_slide_seconds", self.max_slide_seconds)
        _positive("daemon.seconds_per_tile", self.seconds_per_tile)
        if self.min_free_disk_mb < 0:
            raise ConfigError(f"daemon.min_free_disk_mb={self.min_free_disk_mb} must be 0 or more")
        _non_negative("daemon.export_retention_days", self.export_retention_days)
        if not 0 <= self.analysis_nice <= 19:
            raise ConfigError(f"daemon.analysis_nice={self.analysis_nice} must be between 0 and 19")
        if self.metrics_listen:
            _host_port("daemon.metrics_listen", self.metrics_listen)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir or default_data_dir()).expanduser()

    @property
    def export_file_mode(self) -> int:
        """`export_mode` as a number.

        >>> oct(DaemonConfig(export_mode="0644").export_file_mode)
        '0o644'
        """
        try:
            mode = int(self.export_mode, 8)
        except ValueError:
            mode = -1
        if not 0 <= mode <= 0o777 or mode & 0o600 != 0o600:
            raise ConfigError(
                f"daemon.export_mode={self.export_mode!r} must be octal permissions that let the daemon read "
                "and write its files, e.g. \"0640\" (group may read) or \"0644\" (everyone may read)"
            )
        return mode


@dataclass(frozen=True)
class ServerConfig:
    """The gRPC API for lab software: address, TLS, tokens and the roots SubmitSlide may read from."""

    enabled: bool = True
    listen: str = "127.0.0.1:50051"  # HOST:PORT; port 0 picks a free one
    insecure: bool = False  # plain text without TLS: only when set explicitly
    tls_cert: str = ""  # server certificate chain (PEM)
    tls_key: str = ""  # its private key (PEM)
    tls_client_ca: str = ""  # set = mutual TLS: clients must present a certificate signed by this CA
    # bearer tokens, one "TOKEN ROLE [NAME]" per line, ROLE = read | submit | review | admin; "" = no auth
    tokens_file: str = ""
    allowed_roots: tuple[str, ...] = ()  # SubmitSlide accepts paths under these; () = the watched folders
    max_workers: int = 16  # RPC threads for unary calls
    max_streams: int = 128  # WatchEvents/ListDetections streams at once, each on a thread of its own
    max_streams_per_caller: int = 100  # streams one token (or client) may hold; the rest stay for the others
    max_message_mb: int = 16
    subscriber_buffer: int = 1000  # events a WatchEvents subscriber may lag before its stream ends
    max_page_size: int = 1000
    max_export_mb: int = 512  # GetExport refuses files larger than this (RESOURCE_EXHAUSTED)

    def validate(self) -> None:
        _host_port("server.listen", self.listen)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("server.tls_cert and server.tls_key must be given together")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("server.tls_client_ca (mutual TLS) needs server.tls_cert and server.tls_key too")
        if self.insecure and self.tls_cert:
            raise ConfigError("server.insecure=true and server.tls_cert are contradictory; choose one")
        for name in ("max_workers", "max_streams", "max_streams_per_caller", "max_message_mb", "subscriber_buffer",
                     "max_page_size", "max_export_mb"):
            if getattr(self, name) < 1:
                raise ConfigError(f"server.{name}={getattr(self, name)} must be at least 1")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)


@dataclass(frozen=True)
class WebConfig:
    """The pathologist's review page (issue 19): served by `mitosis-edge serve` beside the gRPC API.

    TLS (and client certificates) from [server]; tokens from server.tokens_file (read views, review signs).
    """

    listen: str = ""  # HOST:PORT, e.g. 127.0.0.1:8443; "" = no review page
    session_hours: float = 8.0  # a login lasts this long
    field_mpp: float = 0.5  # µm/px of the rendered hotspot field
    crop_px: int = 96  # gallery crops: px at 0.25 µm/px (the classifier's view)
    review_subjects: tuple[str, ...] = ()  # client-certificate subjects that may sign (mutual TLS); others view

    def validate(self) -> None:
        if self.listen:
            _host_port("web.listen", self.listen)
        _positive("web.session_hours", self.session_hours)
        _positive("web.field_mpp", self.field_mpp)
        if not 16 <= self.crop_px <= 512:
            raise ConfigError(f"web.crop_px={self.crop_px} must be between 16 and 512")


@dataclass(frozen=True)
class QcConfig:
    """[qc]: scan quality measured in the tile stream, the verdict's thresholds and drift per scanner.

    Used by edge.analysis.qc.
    """

    enabled: bool = True  # off: no qc section, the scores are exactly as without QC
    focus_mpp: float = 0.5  # µm/px focus is measured at (tiles binned): above JPEG and sensor noise
    cell_um: float = 32.0  # side of a QC cell; focus is pooled over 3x3 cells (~100 µm)
    min_cell_tissue: float = 0.5  # a cell is tissue when this share of its pixels is stained
    tissue_od: float = 0.3  # summed RGB optical density above which a QC pixel is stained
    focus_threshold: float = 0.44  # blur above which a cell is out of focus (sharp synthetic ~0.27, real ~0.2)
    focus_grow_threshold: float = 0.33  # an out-of-focus region extends through neighbours above this
    fold_od_ratio: float = 1.5  # this many times denser than the slide and its surroundings: folded (doubled ~2x)
    fold_eosin_ratio: float = 1.38  # and its eosin this many times the slide's median eosin (stroma sets that)
    fold_density_ratio: float = 1.0  # and its density this many times the slide's median (over light stroma: ~1.2x)
    fold_window_um: float = 600.0  # the surroundings of a fold (without its own pixels): wider than a fold (60-140 µm)
    pen_off_plane_deg: float = 14.0  # colour this far off the slide's H-E plane is ink, not stain (stains vary ~5°)
    pen_outside_cone_deg: float = 8.0  # this far outside the H-E cone (blue ink alone is ~30° past haematoxylin)
    pen_min_od: float = 0.6  # pen and dirt are dense: summed OD above this
    dark_od: float = 1.2  # OD above this in every channel: black ink, dirt, debris
    min_region_mm2: float = 0.002  # folds and pen smaller than this (about 45 µm square) are ignored
    stain_samples_per_tile: int = 2000  # OD pixels per tile kept for the stain estimate
    stain_min_blue_per_red: float = 0.4  # stain pixels absorb this much blue per red: H&E do (>=0.44), blue ink not
    stain_samples_max: int = 100_000
    next_fields: int = 2  # next-best fields checked besides the hotspot
    hotspot_excludes_blur: bool = False  # also report the best field among sharp tissue (qc.sharp_hotspot)
    review_out_of_focus_fraction: float = 0.02  # of tissue; a few fields, worth a look
    rescan_out_of_focus_fraction: float = 0.10  # of tissue; enough to hide figures and bias density
    hotspot_out_of_focus_fraction: float = 0.20  # of the hotspot's tissue: the count is not trustworthy
    hotspot_fold_fraction: float = 0.25  # of the hotspot's tissue: its count may include doubled tissue
    review_fold_fraction: float = 0.05  # of tissue; smaller folds are still reported and outlined
    review_pen_fraction: float = 0.002  # any real stroke on tissue; dust specks are removed by size
    review_saturated_fraction: float = 0.05
    baseline_slides: int = 20  # drift: a scanner's rolling baseline is its last N in-band slides
    baseline_min_slides: int = 8  # no drift call before a scanner has this many
    drift_run: int = 3  # drift is judged on the mean of the last N slides (one event when it leaves the band)
    drift_stain_deg: float = 4.0  # the band for stain vectors: at least this many degrees
    drift_focus: float = 0.06  # the band for the median focus (Crete units)
    drift_sigmas: float = 3.0  # the band: this many baseline standard deviations, if wider

    def validate(self) -> None:
        for name in ("focus_mpp", "cell_um", "fold_od_ratio", "fold_eosin_ratio", "fold_density_ratio",
                     "fold_window_um", "pen_off_plane_deg", "pen_outside_cone_deg", "pen_min_od", "dark_od",
                     "drift_stain_deg", "drift_focus", "drift_sigmas", "tissue_od", "stain_min_blue_per_red"):
            _positive(f"qc.{name}", getattr(self, name))
        for name in ("min_cell_tissue", "focus_threshold", "focus_grow_threshold",
                     "review_out_of_focus_fraction", "rescan_out_of_focus_fraction", "hotspot_out_of_focus_fraction",
                     "hotspot_fold_fraction", "review_fold_fraction", "review_pen_fraction",
                     "review_saturated_fraction"):
            _fraction(f"qc.{name}", getattr(self, name))
        _non_negative("qc.min_region_mm2", self.min_region_mm2)
        for name in ("stain_samples_per_tile", "stain_samples_max", "baseline_slides", "baseline_min_slides",
                     "drift_run"):
            _positive(f"qc.{name}", getattr(self, name))
        _non_negative("qc.next_fields", self.next_fields)
        if self.review_out_of_focus_fraction > self.rescan_out_of_focus_fraction:
            raise ConfigError(
                f"qc.review_out_of_focus_fraction={self.review_out_of_focus_fraction} must not exceed "
                f"qc.rescan_out_of_focus_fraction={self.rescan_out_of_focus_fraction}"
            )


@dataclass(frozen=True)
class Config:
    """All settings. Sections match the TOML tables."""

    slide: SlideConfig = field(default_factory=SlideConfig)
    tissue: TissueConfig = field(default_factory=TissueConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    engines: EnginesConfig = field(default_factory=EnginesConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    qc: QcConfig = field(default_factory=QcConfig)
    web: WebConfig = field(default_factory=WebConfig)

    def validate(self) -> Config:
        for f in fields(self):
            getattr(self, f.name).validate()
        return self

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """Return a copy with dotted keys replaced, e.g. ``{"slide.mpp_override": 0.5}``.

        None values are ignored, so unset command-line flags keep the file's value.
        """
        sections: dict[str, dict[str, Any]] = {}
        for dotted, value in overrides.items():
            if value is None:
                continue
            section, _, key = dotted.partition(".")
            sections.setdefault(section, {})[key] = value
        return _build(sections, base=self).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load a TOML file (or the defaults when path is None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist; pass an existing file to --config") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    config = _build(raw, base=Config()).validate()
    return config.with_overrides(overrides or {})


def _build(raw: dict[str, Any], base: Config) -> Config:
    known = {f.name: f for f in fields(Config)}
    updated: dict[str, Any] = {}
    for section, values in raw.items():
        if section not in known:
            raise ConfigError(f"unknown config section [{section}]; known sections: {', '.join(sorted(known))}")
        if not isinstance(values, dict):
            raise ConfigError(f"config [{section}] must be a table, got {values!r}")
        current = getattr(base, section)
        updated[section] = _replace_checked(section, current, values)
    return dataclasses.replace(base, **updated)


def _replace_checked(section: str, current: Any, values: dict[str, Any]) -> Any:
    hints = get_type_hints(type(current))
    names = {f.name for f in fields(current)}
    clean: dict[str, Any] = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown setting {section}.{key}; known: {', '.join(sorted(names))}")
        clean[key] = _coerce(f"{section}.{key}", hints[key], value)
    return dataclasses.replace(current, **clean)


def _coerce(name: str, hint: Any, value: Any) -> Any:
    origin = get_origin(hint)
    args = get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}={value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if type(None) in args:  # Optional[X]
        if value is None:
            return None
        inner = next(a for a in args if a is not type(None))
        return _coerce(name, inner, value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}={value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name}={value!r} must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}={value!r} must be a string")
        return value
    if origin is tuple:  # tuple[str, ...]: a TOML array of strings (one string is taken as a list of one)
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{name}={value!r} must be a list of strings")
        return tuple(items)
    return value


def accession_regex(pattern: str) -> re.Pattern[str]:
    """watch.accession_pattern compiled; it must have a named group ``accession``.

    >>> accession_regex(r"(?P<accession>S\\d{2}-\\d+)").search("/scans/S24-0042_HE.svs")["accession"]
    'S24-0042'
    """
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"watch.accession_pattern={pattern!r} is not a valid regular expression: {exc}") from None
    if "accession" not in regex.groupindex:
        raise ConfigError(
            f"watch.accession_pattern={pattern!r} needs a named group (?P<accession>...) around the accession number"
        )
    return regex


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name}={value} must be greater than 0")


def _non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"{name}={value} must be 0 or more")


def _fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}={value} must be between 0 and 1")


def _host_port(name: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name}={value!r} must be HOST:PORT, e.g. 127.0.0.1:50051 or [::]:50051")
