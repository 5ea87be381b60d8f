"""The project's vocabulary, each word defined once; other modules, CLI choices and the store derive from it.

Pure (stdlib only), so every layer may import it.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Literal, get_args

# --- jobs and the event stream (edge.service, edge.client) ----------------------------------

class JobState(StrEnum):
    """Where a job stands; the store's ``jobs.state`` CHECK, the proto's ``JobState`` and the CLI's
    ``--state`` choices list exactly these. A StrEnum: ``JobState.DONE == "done"``.

    >>> [str(s) for s in JobState if s.terminal]
    ['done', 'failed', 'cancelled']
    """

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True when the job will not change by itself any more (done, failed for good, cancelled)."""
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


JOB_STATES: tuple[str, ...] = tuple(state.value for state in JobState)
TERMINAL_JOB_STATES: tuple[str, ...] = tuple(state.value for state in JobState if state.terminal)
# Trailing metadata of an ended WatchEvents stream: the last sequence sent, where the client resumes.
LAST_SEQUENCE_KEY = "mitosis-edge-last-sequence"



# --- slides and detections (edge.wsi, edge.analysis) -----------------------------------------

# File names the watcher queues, cohort folders list and the slide opener knows (lower case, with the
# dot). Each is read: TIFF-based ones (.svs .tif .tiff .ndpi .scn .bif .qptiff) by tifffile, the
# others (.vms .vmu .mrxs .svslide .czi, and DICOM .dcm, a file or a folder of one series) by OpenSlide
# 4. The config's `watch.extensions` defaults to all of them.
SLIDE_EXTENSIONS: tuple[str, ...] = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".qptiff", ".dcm",
    ".czi",
)


class DetectionClass(StrEnum):
    """What a candidate turned out to be: a mitotic figure (MF) by subtype, or not mitotic (a look-alike).

    The values are what the store, result files, gRPC clients and the review page use.
    """

    NORMAL = "normal"
    ATYPICAL = "atypical"
    UNCERTAIN = "uncertain"  # an MF whose atypical head was not confident either way
    NON_MITOTIC = "non_mitotic"  # a rejected candidate: a mitotic-figure look-alike


# A mitotic figure's subtype: "uncertain" where the atypical head was not confident either way (the
# paper's p > 0.9 / p < 0.1 rule). The same words as the DetectionClass of a mitotic figure.
Subtype = Literal["normal", "atypical", "uncertain"]
SUBTYPES: tuple[Subtype, ...] = get_args(Subtype)


def detection_class(is_mitotic: bool, subtype: str | None) -> DetectionClass:
    """The class of a candidate from its decisions: not mitotic, else its subtype when one was decided.

    >>> [str(detection_class(*d)) for d in ((False, "normal"), (True, "atypical"), (True, ""))]
    ['non_mitotic', 'atypical', 'uncertain']
    """
    if not is_mitotic:
        return DetectionClass.NON_MITOTIC
    if subtype == DetectionClass.NORMAL:
        return DetectionClass.NORMAL
    if subtype == DetectionClass.ATYPICAL:
        return DetectionClass.ATYPICAL
    return DetectionClass.UNCERTAIN


# --- engines (edge.engines: backends, TensorRT) ----------------------------------------------
BackendName = Literal["onnxruntime", "onnxruntime-cuda", "tensorrt"]  # onnxruntime = CPU, the default
BACKENDS: tuple[BackendName, ...] = get_args(BackendName)
QuantizeTarget = Literal["onnxruntime", "tensorrt"]  # whose int8 scheme `engines quantize` writes
QUANTIZE_TARGETS: tuple[QuantizeTarget, ...] = get_args(QuantizeTarget)
PrecisionName = Literal["fp32", "fp16", "int8"]  # TensorRT build precision
PRECISIONS: tuple[PrecisionName, ...] = get_args(PrecisionName)
HardwareCompat = Literal["none", "ampere+"]  # ampere+: one plan runs on any Ampere or newer GPU
HARDWARE_COMPAT: tuple[HardwareCompat, ...] = get_args(HardwareCompat)
AMPERE_PLUS: HardwareCompat = "ampere+"
OnMissingPlan = Literal["build", "fail"]  # a missing TensorRT plan at start: build it, or stop and say how
ON_MISSING_PLAN: tuple[OnMissingPlan, ...] = get_args(OnMissingPlan)


# --- the command line (edge.cli) -------------------------------------------------------------


class ExitCode(IntEnum):
    """What `mitosis-edge` returns to the shell."""

    OK = 0
    ERROR = 1  # the slide, the job or the work failed (or a check did not pass); the message says why
    USAGE = 2  # bad arguments or configuration
    INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C
    BROKEN_PIPE = 141  # 128 + SIGPIPE: what a Unix tool reports when its reader closed the pipe
