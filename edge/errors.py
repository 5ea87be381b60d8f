"""The one error hierarchy of mitosis-edge; ``edge`` exports every class (``from edge import ConfigError``).

Every error a user can cause says what was wrong, with the value, and what to do.

    EdgeError
    ├── ConfigError (ValueError)            a bad setting in TOML or on the command line
    ├── StreamCancelled                     a tile stream or job was cancelled on request
    ├── SlideReadError (OSError)            anything that goes wrong opening or reading a slide
    │   ├── SlideNotFoundError (FileNotFoundError)
    │   ├── NotASlideError                  the file is no whole-slide image (or a DICOM label)
    │   ├── UnsupportedFormatError          a format no installed reader handles
    │   ├── MissingMppError                 no pixel size recorded and none given
    │   ├── CorruptSlideError               truncated or damaged file
    │   │   └── TileDecodeError             one tile failed to decode during a read
    │   ├── ImplausibleSlideError           declares more pixels or tiles than its bytes or the limits allow
    │   ├── SlideTimeLimitError             the analysis ran past the per-slide time limit
    │   └── SlideChangedError   [retryable] the file changed or vanished while it was analysed
    ├── EngineError                         anything about model bundles and inference engines
    │   ├── ManifestError (ValueError)      a bundle's manifest disagrees with itself or its ONNX files
    │   ├── EngineInputError (ValueError)   a batch of the wrong shape or dtype was given to an engine
    │   ├── BackendUnavailableError         the backend is not installed, or no GPU is usable
    │   └── PlanError                       a TensorRT plan is missing, stale or built for other hardware
    ├── StoreError                          anything about the job store (SQLite)
    │   ├── JobNotFoundError (KeyError)     no job with that id
    │   ├── ResultNotFoundError (KeyError)  no result (yet) for that job or fingerprint
    │   ├── JobStateError                   the job is in a state that does not allow the change
    │   ├── StoreCorruptError               not a mitosis-edge store, or a newer schema than this version
    │   └── StoreBusyError      [retryable] another process held the store's lock past the busy timeout
    ├── ReviewError (ValueError)            a pathologist's review that cannot be stored (unknown figure or decision)
    ├── QcError                             scan QC could not measure something (too little stain, ...)
    ├── DiskFullError (OSError)             too little free space where the daemon writes exports
    ├── AnalysisCrashed (RuntimeError)      the daemon's analysis process died on a slide
    ├── MissingExtraError (ImportError)     an optional extra (cohort: Ray, lifelines) is not installed
    ├── RequestRefused                      the gRPC server refuses a call (``code``: the gRPC status name)
    └── EdgeClientError                     a call of the Python client failed (``code``, ``address``)
        └── ServerUnavailableError (ConnectionError)  the server could not be reached after every retry

Retryable or deterministic: each class says whether the same work may succeed later (``retryable``,
see :func:`is_retryable`). The daemon retries only retryable failures (an engine or store hiccup,
a full disk, a crashed analysis process, a slide that changed under it) and fails a deterministic
one at once (an unreadable file, a decode error at the same tile, a bomb, a bad setting): its
reason says which. Retryable by class: EngineError (but not ManifestError, EngineInputError,
BackendUnavailableError, PlanError), StoreError (but not its not-found, state and corrupt
subclasses), DiskFullError, AnalysisCrashed, SlideChangedError.
"""

from __future__ import annotations

from pathlib import Path


class EdgeError(Exception):
    """Base of every error mitosis-edge raises on purpose.

    ``retryable``: True when the same work may succeed if tried again later (the cause is outside
    the input: a busy GPU, a full disk, a file still being written); False when the same input
    fails the same way every time.
    """

    retryable: bool = False


def is_retryable(exc: BaseException) -> bool:
    """Whether a failure may go away by itself. Errors of this hierarchy say so; of the others, an OS
    error (I/O, a network file system) and running out of memory are transient, anything else (a bug,
    an input the code does not handle) fails the same way each time.

    >>> is_retryable(DiskFullError("disk full")), is_retryable(CorruptSlideError("a.svs", "truncated"))
    (True, False)
    >>> is_retryable(MemoryError()), is_retryable(ValueError("need at least one array"))
    (True, False)
    """
    if isinstance(exc, EdgeError):
        return exc.retryable
    return isinstance(exc, (OSError, MemoryError))


class ConfigError(EdgeError, ValueError):
    """A setting is missing, of the wrong type or out of range."""


class QcError(EdgeError):
    """Scan QC could not measure something on this slide (e.g. too little stain for stain vectors)."""


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


class ImplausibleSlideError(SlideReadError):
    """The file declares a slide its bytes cannot hold (a "bomb"), or more pixels or tiles than the
    configured limits (``slide.max_level0_megapixels``, ``slide.max_tiles``)."""


class SlideTimeLimitError(SlideReadError):
    """The analysis took longer than the per-slide limit (``daemon.max_slide_seconds``)."""


class SlideChangedError(SlideReadError):
    """The slide's file changed or vanished while it was analysed (overwritten, still being copied):
    not the slide's fault, so it is retried, and queued again when it is dropped again."""

    retryable = True


class EngineError(EdgeError):
    """A model bundle or an inference engine could not be loaded or run."""

    retryable = True  # e.g. the GPU ran out of memory while another process used it


class ManifestError(EngineError, ValueError):
    """A bundle's manifest is invalid or disagrees with its ONNX files. Lists every problem at once."""

    retryable = False

    def __init__(self, path: str | Path, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = list(problems)
        super().__init__(self.path, self.problems)

    def __str__(self) -> str:
        lines = "\n".join(f"  - {p}" for p in self.problems)
        n = len(self.problems)
        return f"{self.path}: {n} problem{'s' if n != 1 else ''} in the engine bundle:\n{lines}"

    def __reduce__(self) -> tuple[type[ManifestError], tuple[str, list[str]]]:
        return (type(self), (self.path, self.problems))


class EngineInputError(EngineError, ValueError):
    """A batch given to an engine has the wrong shape, dtype or size."""

    retryable = False


class BackendUnavailableError(EngineError, RuntimeError):
    """The requested backend cannot run here: a package is missing or no GPU is usable."""

    retryable = False


class PlanError(EngineError):
    """A TensorRT plan is missing, fails to load, or was built for another GPU or TensorRT version.

    ``command`` is the exact command that (re)builds it.
    """

    retryable = False

    def __init__(self, message: str, command: str = "") -> None:
        self.message = message
        self.command = command
        super().__init__(message, command)

    def __str__(self) -> str:
        return f"{self.message}; rebuild with: {self.command}" if self.command else self.message

    def __reduce__(self) -> tuple[type[PlanError], tuple[str, str]]:
        return (type(self), (self.message, self.command))


class StoreError(EdgeError):
    """The job store could not do what was asked. Names the store or job and what to do."""

    retryable = True  # e.g. the database was locked or its disk full for a moment


class _StoreKeyError(StoreError, KeyError):
    retryable = False

    # KeyError.__str__ quotes its message; a store error reads as a sentence.
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class JobNotFoundError(_StoreKeyError):
    """No job with that id exists in the store."""


class ResultNotFoundError(_StoreKeyError):
    """The job (or fingerprint) has no stored result: unknown, not done yet, or failed."""


class JobStateError(StoreError):
    """The job's state does not allow the change, e.g. cancelling a job that is already done."""

    retryable = False


class StoreCorruptError(StoreError):
    """The file is not a mitosis-edge store, is damaged, or has a newer schema than this version knows."""

    retryable = False


class ReviewError(EdgeError, ValueError):
    """A pathologist's review that cannot be stored: an unknown figure, an unknown decision, a job with no result."""


class DiskFullError(EdgeError, OSError):
    """Too little free space where the exports are written, or writing them failed."""

    retryable = True


class AnalysisCrashed(EdgeError, RuntimeError):
    """The analysis process died while it worked on a slide (a crash in a reader or an engine library).

    Retryable: the kernel may have killed it for memory other work held; ``daemon.max_attempts`` bounds a
    slide that crashes it every time."""

    retryable = True


class MissingExtraError(EdgeError, ImportError):
    """A command needs an optional extra that is not installed; the message says what to install."""


class StoreBusyError(StoreError):
    """Another process (a CLI command, a second daemon) held the store's write lock longer than the busy
    timeout; the same call succeeds once it lets go."""

    retryable = True


class RequestRefused(EdgeError):
    """A request the gRPC server refuses; `code` is the gRPC status code's name, e.g. "PERMISSION_DENIED".

    `message` goes to the caller; `detail` (what a path resolved to, why a bundle does not load) only to
    the server's log.
    """

    def __init__(self, code: str, message: str, detail: str = "") -> None:
        self.code = code
        self.message = message
        self.detail = detail
        super().__init__(code, message, detail)

    def __str__(self) -> str:
        return self.message


class EdgeClientError(EdgeError):
    """A call of the Python client (edge.client) failed. `code` is the gRPC status name ("NOT_FOUND", ...),
    `address` the server."""

    def __init__(self, code: str, message: str, address: str = "") -> None:
        self.code = code
        self.message = message
        self.address = address
        super().__init__(code, message, address)

    def __str__(self) -> str:
        return f"{self.message} ({self.code} from {self.address})" if self.address else f"{self.message} ({self.code})"


class ServerUnavailableError(EdgeClientError, ConnectionError):
    """The client could not reach the server (or it is stopping) after every retry."""
