"""Watch folders for whole-slide images and hand each one over once, when the scanner has finished it.

The pure core maps a changed path to the slide it belongs to (:func:`slide_unit`), sums a slide's
size and mtime over its files (:func:`unit_snapshot`) and decides when a slide has been quiet long
enough, or has been closed after writing and stayed unchanged for a short settle time
(:class:`StabilityGate`). :class:`SlideWatcher` is the thin shell around it: watchdog
observers (native or polling per folder), one gate thread, the opener and the callbacks.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any, Literal

from edge.config import DEFAULT_IGNORE_PATTERNS, DEFAULT_SLIDE_EXTENSIONS, WatchConfig
from edge.errors import ConfigError, NotASlideError, SlideReadError, UnsupportedFormatError
from edge.fileio import real_path_inside, special_file_kind
from edge.service.status import WaitingSlide
from edge.wsi.dicom import DicomInstance, series_in_folder
from edge.wsi.fingerprint import Fingerprint, fingerprint_slide, mrxs_companion, slide_files

log = logging.getLogger(__name__)

__all__ = [
    "NETWORK_FILESYSTEMS",
    "SlideWatcher",
    "StabilityGate",
    "choose_observer",
    "default_opener",
    "filesystem_type",
    "slide_unit",
    "unit_snapshot",
]

DEFAULT_GATE_TICK = 0.5  # seconds; the gate looks at pending slides at least this often
CLOSE_GATE_TICK = 0.05  # seconds; how often it looks while a closed slide is settling
MOUNTS_FILE = "/proc/self/mounts"
# file systems that deliver no (or not all) native change events: watched by polling
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs", "nfs4", "cifs", "smb3", "smbfs", "smb2", "ncpfs", "afs", "9p", "virtiofs", "vboxsf",
        "ceph", "glusterfs", "lustre", "gpfs", "beegfs", "davfs", "fuse.sshfs", "fuse.glusterfs",
        "fuse.cephfs", "fuse.rclone", "fuse.s3fs", "fuse.davfs2", "fuse.vmhgfs-fuse", "fuse.smbnetfs",
    }
)  # fmt: skip
_READ_ONLY_EVENTS = frozenset({"opened", "closed_no_write"})  # a reader (our own opener too): no change
MRXS_COMPANION_SUFFIXES = frozenset({".dat", ".ini"})  # Slidedat.ini, Index.dat, Data0000.dat, ...

Snapshot = tuple[int, int]  # (bytes summed over the slide's files, newest mtime_ns among them and its folders)
StatFn = Callable[[str], os.stat_result]
ObserverKind = Literal["native", "polling"]


# --- pure core -----------------------------------------------------------------------------------


def is_ignored(name: str, patterns: Iterable[str]) -> bool:
    """Whether a file name matches one of the temporary-name patterns (case-insensitive).

    >>> is_ignored("x.svs.part", ("*.part",)), is_ignored("x.svs", ("*.part",))
    (True, False)
    """
    low = name.lower()
    return any(fnmatch.fnmatchcase(low, p.lower()) for p in patterns)


def slide_unit(
    path: Path,
    *,
    extensions: Collection[str] = DEFAULT_SLIDE_EXTENSIONS,
    ignore_patterns: Sequence[str] = DEFAULT_IGNORE_PATTERNS,
    roots: Collection[str] = (),
) -> Path | None:
    """The slide a changed file belongs to, or None when it belongs to none.

    A slide file is its own slide; a ``.dcm`` file belongs to its folder (a DICOM slide; whether the
    folder holds one series is decided by content when it settles), except directly in a watched folder
    (``roots``), where it is a single-file slide: a watched folder is never a slide. A file of an MRXS
    companion folder ``X/`` belongs to ``X.mrxs``. Temporary names and other extensions: None.

    >>> slide_unit(Path("/scans/a.svs")), slide_unit(Path("/scans/a.svs.part"))
    (PosixPath('/scans/a.svs'), None)
    >>> slide_unit(Path("/scans/d1/0001.dcm")), slide_unit(Path("/scans/X/Data0001.dat"))
    (PosixPath('/scans/d1'), PosixPath('/scans/X.mrxs'))
    >>> slide_unit(Path("/scans/loose.dcm"), roots=("/scans",))
    PosixPath('/scans/loose.dcm')
    """
    if is_ignored(path.name, ignore_patterns):
        return None
    suffix = path.suffix.lower()
    if suffix == ".dcm":
        in_root = any(os.path.normpath(r) == os.path.normpath(path.parent) for r in roots)
        unit = (path if in_root else path.parent) if ".dcm" in extensions else None
    elif suffix in extensions:
        unit = path
    elif suffix in MRXS_COMPANION_SUFFIXES and ".mrxs" in extensions and path.parent.name:
        unit = path.parent.parent / (path.parent.name + ".mrxs")
    else:
        unit = None
    if unit is None or is_ignored(unit.name, ignore_patterns):
        return None
    return unit


def unit_snapshot(unit: Path, *, stat: StatFn = os.stat, scandir: Callable[[str], Any] = os.scandir) -> Snapshot | None:
    """(size, mtime_ns) of a slide summed / maxed over its files (and companion folder); None if it is gone.

    A DICOM folder without ``.dcm`` files is no slide (yet): None.
    """
    try:
        st = stat(str(unit))
    except (FileNotFoundError, NotADirectoryError):
        return None
    if os.path.isdir(unit):  # DICOM folder: its .dcm files
        size, mtime, count = 0, st.st_mtime_ns, 0
        for name, fsize, fmtime in _stat_entries(unit, stat, scandir, recursive=False):
            if name.lower().endswith(".dcm") and fsize >= 0:
                size += fsize
                mtime = max(mtime, fmtime)
                count += 1
        return (size, mtime) if count else None
    size, mtime = st.st_size, st.st_mtime_ns
    if unit.suffix.lower() == ".mrxs":
        folder = mrxs_companion(unit)
        try:
            mtime = max(mtime, stat(str(folder)).st_mtime_ns)
        except (FileNotFoundError, NotADirectoryError):
            return (size, mtime)
        for _name, fsize, fmtime in _stat_entries(folder, stat, scandir, recursive=True):
            size += max(fsize, 0)
            mtime = max(mtime, fmtime)
    return (size, mtime)


def _stat_entries(
    folder: Path, stat: StatFn, scandir: Callable[[str], Any], *, recursive: bool
) -> Iterator[tuple[str, int, int]]:
    """(name, size, mtime_ns) of every file under a folder; with recursion each sub-folder's own mtime
    too (as a 0-byte entry named ""), so a file added or removed there counts as a change."""
    try:
        with scandir(str(folder)) as entries:
            listed = list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in listed:
        try:
            if entry.is_dir(follow_symlinks=False):
                if recursive:
                    yield ("", 0, stat(entry.path).st_mtime_ns)
                    yield from _stat_entries(Path(entry.path), stat, scandir, recursive=True)
                continue
            st = stat(entry.path)
        except FileNotFoundError:  # removed between listing and stat: the next look sees the change
            continue
        # a FIFO or device is no part of a slide: size -1 marks it (it changes nothing and is never read)
        yield (entry.name, st.st_size if S_ISREG(st.st_mode) else -1, st.st_mtime_ns)


def filesystem_type(path: str | Path, mounts: str) -> str:
    """The file system type of the mount that holds ``path``, from the text of ``/proc/self/mounts``.

    >>> filesystem_type("/mnt/share/scans", "/dev/sda1 / ext4 rw 0 0\\nsrv:/x /mnt/share nfs4 rw 0 0\\n")
    'nfs4'
    """
    target = os.path.realpath(path)
    best, best_type = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape_mount(fields[1])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, fields[2]
    return best_type


def _unescape_mount(text: str) -> str:
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        text = text.replace(code, char)
    return text


def choose_observer(folder: str | Path, mode: str, mounts: str | None = None) -> ObserverKind:
    """Which observer watches a folder: the configured one, or for ``auto`` polling on network file systems.

    >>> choose_observer("/mnt/s", "auto", "s:/x /mnt/s cifs rw 0 0\\n"), choose_observer("/mnt/s", "native", "")
    ('polling', 'native')
    """
    if mode in ("native", "polling"):
        return mode  # type: ignore[return-value]
    if mounts is None:
        try:
            mounts = Path(MOUNTS_FILE).read_text(encoding="utf-8", errors="replace")
        except OSError:
            mounts = ""
    return "polling" if filesystem_type(folder, mounts) in NETWORK_FILESYSTEMS else "native"


@dataclass
class _Candidate:
    first_seen: float
    changed_at: float
    snapshot: Snapshot
    retry_at: float = 0.0
    last_error: str = ""
    unreadable_since: float | None = None  # stable but not opening since then (None: opened, or changed since)
    closed_at: float | None = None  # a writer closed the file then, and it has not changed since


class StabilityGate:
    """Decides when a slide has stopped changing. A pure state machine: the caller brings stats and time.

    >>> gate = StabilityGate(quiet_period_s=10, settle_timeout_s=60)
    >>> gate.observe(Path("a.svs"), (100, 1), now=0.0); gate.due(now=5.0)
    []
    >>> gate.observe(Path("a.svs"), (200, 2), now=5.0); gate.due(now=14.0)
    []
    >>> gate.due(now=15.0)
    [PosixPath('a.svs')]

    A slide its writer has closed is due ``close_settle_s`` after the close if it did not change since:

    >>> gate = StabilityGate(quiet_period_s=10, settle_timeout_s=60, close_settle_s=1)
    >>> gate.observe(Path("b.svs"), (100, 1), now=0.0); gate.closed(Path("b.svs"), (200, 2), at=3.0)
    >>> gate.due(now=3.5), gate.due(now=4.0)
    ([], [PosixPath('b.svs')])
    """

    def __init__(
        self, quiet_period_s: float, settle_timeout_s: float, unreadable_timeout_s: float | None = None,
        close_settle_s: float = 0.0,
    ) -> None:
        self.quiet_period_s = quiet_period_s
        self.settle_timeout_s = settle_timeout_s
        self.unreadable_timeout_s = settle_timeout_s if unreadable_timeout_s is None else unreadable_timeout_s
        self.close_settle_s = close_settle_s
        self._candidates: dict[Path, _Candidate] = {}

    def __len__(self) -> int:
        return len(self._candidates)

    def __contains__(self, unit: object) -> bool:
        return unit in self._candidates

    def units(self) -> list[Path]:
        return list(self._candidates)

    def snapshot(self, unit: Path) -> Snapshot | None:
        cand = self._candidates.get(unit)
        return cand.snapshot if cand else None

    def observe(self, unit: Path, snapshot: Snapshot, now: float) -> None:
        """Record the slide's current size and mtime; a new slide or a change restarts its quiet period."""
        cand = self._candidates.get(unit)
        if cand is None:
            self._candidates[unit] = _Candidate(first_seen=now, changed_at=now, snapshot=snapshot)
        elif cand.snapshot != snapshot:
            cand.snapshot = snapshot
            cand.changed_at = now
            cand.unreadable_since = None  # still being written: the long settle timeout applies again
            cand.closed_at = None  # written to again (a writer that reopened the file): wait for its next close

    def closed(self, unit: Path, snapshot: Snapshot, at: float) -> None:
        """A writer closed the slide's file at ``at`` and it then had ``snapshot``. Does nothing when
        close events are off (``close_settle_s`` 0)."""
        if self.close_settle_s <= 0:
            return
        self.observe(unit, snapshot, at)
        self._candidates[unit].closed_at = at

    def _is_due(self, c: _Candidate, now: float) -> bool:
        if now < c.retry_at:
            return False
        if now - c.changed_at >= self.quiet_period_s:
            return True
        return c.closed_at is not None and now - c.closed_at >= self.close_settle_s

    def due(self, now: float) -> list[Path]:
        """Slides unchanged for the quiet period, or closed and unchanged for ``close_settle_s`` (and past
        any retry wait), oldest first."""
        ready = [(c.first_seen, u) for u, c in self._candidates.items() if self._is_due(c, now)]
        return [u for _, u in sorted(ready)]

    def settling_closed(self) -> bool:
        """Whether a closed slide is waiting out its settle time (the gate then looks more often)."""
        return any(c.closed_at is not None for c in self._candidates.values())

    def defer(self, unit: Path, reason: str, now: float) -> bool:
        """A due (stable) slide did not open or could not be handed over: try again after another quiet
        period. True the first time it fails since it last changed, or when the reason is new."""
        cand = self._candidates.get(unit)
        if cand is None:
            return False
        news = cand.unreadable_since is None or cand.last_error != reason
        cand.last_error = reason
        cand.retry_at = now + self.quiet_period_s
        if cand.unreadable_since is None:
            cand.unreadable_since = now
        return news

    def waiting(self, now: float) -> list[tuple[Path, str, float, float]]:
        """Stable slides that do not open: (slide, reason, seconds since first seen, seconds until they fail)."""
        return [
            (u, c.last_error, now - c.first_seen, max(0.0, self._fails_at(c) - now))
            for u, c in self._candidates.items()
            if c.unreadable_since is not None
        ]

    def _fails_at(self, c: _Candidate) -> float:
        at = c.first_seen + self.settle_timeout_s
        if c.unreadable_since is not None:
            at = min(at, c.unreadable_since + self.unreadable_timeout_s)
        return at

    def discard(self, unit: Path) -> None:
        self._candidates.pop(unit, None)

    def expired(self, now: float) -> list[tuple[Path, str]]:
        """Remove and return the slides that did not settle and open within the settle timeout, with why."""
        out = []
        for unit, c in list(self._candidates.items()):
            if now < self._fails_at(c):
                continue
            del self._candidates[unit]
            limit = f"settle_timeout_s={self.settle_timeout_s:g}"
            if c.unreadable_since is not None and now - c.unreadable_since >= self.unreadable_timeout_s:
                reason = (
                    f"did not open within unreadable_timeout_s={self.unreadable_timeout_s:g} after it stopped "
                    f"changing: {c.last_error}"
                )
            elif c.last_error and now - c.changed_at >= self.quiet_period_s:
                reason = f"did not open within {limit}: {c.last_error}"
            else:
                reason = (
                    f"still being written after {limit} (size {c.snapshot[0]} bytes, last change "
                    f"{now - c.changed_at:.1f} s ago); the copy never finished"
                )
                if c.last_error:
                    reason += f"; last error: {c.last_error}"
            out.append((unit, reason))
        return out


# --- shell ---------------------------------------------------------------------------------------


def default_opener(path: Path) -> None:
    """Open the slide with the project's reader and close it again. Raises SlideReadError."""
    from edge.logs import slide_context
    from edge.wsi.slide import open_slide

    with slide_context(path):
        open_slide(path).close()


class _EventHandler:
    """Receives watchdog events on the observer threads and queues the changed paths for the gate."""

    def __init__(self, watcher: SlideWatcher) -> None:
        self._watcher = watcher

    def dispatch(self, event: Any) -> None:
        try:
            kind = event.event_type
            if event.is_directory:
                # a folder created, or moved in or within: every slide below it (a DICOM folder, a tree
                # of slides). A folder's "modified" only says an entry changed; that entry has its own event.
                if kind in ("created", "moved"):
                    self._watcher._enqueue(os.fsdecode(event.dest_path or event.src_path), is_dir=True)
                return
            if kind in _READ_ONLY_EVENTS:
                return
            self._watcher._enqueue(os.fsdecode(event.src_path), is_dir=False)
            if kind == "closed":  # inotify IN_CLOSE_WRITE: a writer closed the file
                self._watcher._enqueue_close(os.fsdecode(event.src_path))
            if event.dest_path:
                self._watcher._enqueue(os.fsdecode(event.dest_path), is_dir=False)
        except Exception:  # an observer thread must survive whatever one event holds
            log.exception("watch event %r could not be queued", event)


class SlideWatcher:
    """Watches the configured folders and calls ``on_ready(path, fingerprint)`` once per finished slide.

    ``on_failed(path, reason)`` is called for a slide that did not settle and open within
    ``settle_timeout_s``. Both are called from the watcher's gate thread; what they raise is logged.
    A slide that settles again with the same content (a touch, the same bytes dropped again) is handed
    over again only when ``again(path, key)`` says so (the daemon: its last job failed for a transient
    reason).
    """

    def __init__(
        self,
        config: WatchConfig,
        on_ready: Callable[[Path, Fingerprint], None],
        on_failed: Callable[[Path, str], None],
        *,
        opener: Callable[[Path], None] = default_opener,
        clock: Callable[[], float] = time.monotonic,
        stat: StatFn = os.stat,
        again: Callable[[Path, str], bool] | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self._on_ready = on_ready
        self._again = again or (lambda path, key: False)
        self._on_failed = on_failed
        self._opener = opener
        self._clock = clock
        self._stat = stat
        self._tick = min(config.poll_interval_s, DEFAULT_GATE_TICK)
        self._gate = StabilityGate(config.quiet_period_s, config.settle_timeout_s, config.unreadable_timeout_s,
                                   close_settle_s=config.close_settle_s)
        self._waiting: list[WaitingSlide] = []  # what waiting() shows; replaced whole after each look
        self._opening: dict[Path, threading.Thread] = {}  # slide -> an open that outlived watch.open_timeout_s
        self._lock = threading.Lock()  # guards _incoming
        self._gate_lock = threading.Lock()  # one look at a time
        self._incoming: dict[str, bool] = {}  # path -> is a folder; filled by observer threads
        # path -> (clock, snapshot) when a writer closed it; filled by observer threads
        self._closes: dict[str, tuple[float, Snapshot | None]] = {}
        self._handed: dict[Path, tuple[Snapshot, str]] = {}  # slide -> (snapshot, fingerprint key) handed over
        self._failed: dict[Path, Snapshot] = {}  # slide -> snapshot it failed with
        self._stop = threading.Event()
        self._observers: list[Any] = []
        self._thread: threading.Thread | None = None
        self.observer_kinds: dict[str, ObserverKind] = {}

    # public ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the observers and the gate thread (which first scans the folders if ``scan_on_start``)."""
        if self._thread is not None:
            raise RuntimeError("SlideWatcher.start() was called twice")
        cfg = self.config
        for folder in cfg.all_folders:
            if not os.path.isdir(folder):
                raise ConfigError(
                    f"watch folder {folder!r} does not exist or is not a folder; create it or fix watch.folders"
                )
        watched = {os.path.normpath(f) for f in cfg.all_folders}
        unknown = [f for f in cfg.quiet_only_folders if os.path.normpath(f) not in watched]
        if unknown:
            raise ConfigError(
                f"watch.quiet_only_folders {unknown} are not watched; list each in watch.folders or "
                "watch.polling_folders (or serve --watch) too"
            )
        for folder in cfg.folders:
            self.observer_kinds[folder] = choose_observer(folder, cfg.observer)
        for folder in cfg.polling_folders:
            self.observer_kinds[folder] = "polling"
        native = [f for f, kind in self.observer_kinds.items() if kind == "native"]
        polling = [f for f, kind in self.observer_kinds.items() if kind == "polling"]
        try:
            if native:
                try:
                    self._start_observer("native", native)
                except OSError as exc:  # e.g. the inotify watch limit: polling still works
                    log.warning(
                        "native file events unavailable for %s (%s); polling every %g s instead "
                        "(raise fs.inotify.max_user_watches to use native events)",
                        ", ".join(native), exc, cfg.poll_interval_s,
                    )  # fmt: skip
                    polling = native + polling
                    for f in native:
                        self.observer_kinds[f] = "polling"
            if polling:
                self._start_observer("polling", polling)
        except BaseException:
            self._stop_observers(timeout=5.0)
            raise
        for folder, kind in self.observer_kinds.items():
            log.info("watching %s (%s observer, recursive=%s)", folder, kind, cfg.recursive)
        self._thread = threading.Thread(target=self._run, name="edge-watch-gate", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the observers and the gate thread and join them."""
        self._stop.set()
        self._stop_observers(timeout)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the watcher's gate thread did not stop within %g s", timeout)

    def pending(self) -> int:
        """Slides seen and waiting to settle (or to open)."""
        with self._lock:
            return len(self._gate) + len(self._incoming)

    def waiting(self) -> list[WaitingSlide]:
        """Slides that stopped changing but do not open: slide_path, reason, waiting_s, fails_in_s."""
        return list(self._waiting)

    def scan(self) -> None:
        """Look at every file in the watched folders at the gate's next look (done at start if ``scan_on_start``)."""
        for folder in self.config.all_folders:
            self._enqueue(folder, is_dir=True)

    def check(self, now: float | None = None) -> None:
        """One look of the gate: take queued changes, re-stat pending slides, hand over the due ones and
        fail the expired. The gate thread calls it every tick; tests call it with a fake clock."""
        now = self._clock() if now is None else now
        with self._gate_lock:
            self._check(now)

    def __enter__(self) -> SlideWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # observers -------------------------------------------------------------------------------------

    def _start_observer(self, kind: ObserverKind, folders: Sequence[str]) -> None:
        if kind == "native":
            from watchdog.observers import Observer

            observer: Any = Observer()
        else:
            from watchdog.observers.polling import PollingObserver

            observer = PollingObserver(timeout=self.config.poll_interval_s)
        observer.name = f"edge-watch-{kind}"
        handler = _EventHandler(self)
        for folder in folders:
            observer.schedule(handler, folder, recursive=self.config.recursive)
        try:
            observer.start()
        except BaseException:
            _stop_observer(observer, timeout=5.0)
            raise
        self._observers.append(observer)

    def _stop_observers(self, timeout: float) -> None:
        for observer in self._observers:
            _stop_observer(observer, timeout)
        self._observers.clear()

    def _enqueue(self, path: str, *, is_dir: bool) -> None:
        with self._lock:
            self._incoming[path] = self._incoming.get(path, False) or is_dir

    def _enqueue_close(self, path: str) -> None:
        at = self._clock()
        snap = self._snapshot(Path(path))  # as closed: a write after this (a reopened file) disarms the close
        with self._lock:
            self._closes[path] = (at, snap)

    def trusts_close_events(self, unit: Path) -> bool:
        """Whether a close event may start this slide: a one-file slide in a folder watched natively
        (inotify) and not listed in ``quiet_only_folders``. A DICOM folder or an MRXS slide has many
        files, so one file's close says nothing about the slide: the quiet period is its rule."""
        if self.config.close_settle_s <= 0 or unit.suffix.lower() in (".mrxs", ".dcm") or unit.suffix == "":
            return False
        folder = self._folder_of(unit)
        if folder is None or self.observer_kinds.get(folder) != "native":
            return False
        return os.path.normpath(folder) not in {os.path.normpath(f) for f in self.config.quiet_only_folders}

    def _folder_of(self, unit: Path) -> str | None:
        """The watched folder that holds ``unit`` (the deepest, when folders nest)."""
        best: str | None = None
        for folder in self.config.all_folders:
            root = folder.rstrip("/") + "/"
            if str(unit).startswith(root) and (best is None or len(folder) > len(best)):
                best = folder
        return best

    # gate thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        if self.config.scan_on_start:
            self.scan()
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:  # never let one bad slide end the watching
                log.exception("the watcher's gate step failed; going on")
            self._stop.wait(CLOSE_GATE_TICK if self._gate.settling_closed() else self._tick)

    def _check(self, now: float) -> None:
        self._look(now)
        self._waiting = [
            WaitingSlide(slide_path=str(u), reason=r, waiting_s=w, fails_in_s=f)
            for u, r, w, f in self._gate.waiting(now)
        ]

    def _look(self, now: float) -> None:
        for unit in self._take_incoming():
            snap = self._snapshot(unit)
            if snap is None:
                self._forget(unit)
            elif (kind := _special_kind(unit)) is not None:
                if self._failed.get(unit) != snap:  # never opened (it could block forever): failed at once
                    self._fail_now(unit, snap, f"{unit} is {kind}, not a regular file; only slide files and "
                                               "folders of them are read: remove it")
            elif unit in self._gate:
                self._gate.observe(unit, snap, now)
            elif self._handed.get(unit, (None,))[0] == snap or self._failed.get(unit) == snap:
                continue  # a duplicate event: nothing changed since it was handed over (or failed)
            else:
                self._failed.pop(unit, None)
                self._gate.observe(unit, snap, now)
        self._take_closes()
        for unit in self._gate.units():
            snap = self._snapshot(unit)
            if snap is None:
                self._forget(unit)
            else:
                self._gate.observe(unit, snap, now)
        for unit in self._gate.due(now):
            if self._stop.is_set():
                return
            self._try_hand_over(unit, now)
        for unit, reason in self._gate.expired(self._clock()):
            self._fail_now(unit, self._snapshot(unit), reason)

    def _fail_now(self, unit: Path, snap: Snapshot | None, reason: str) -> None:
        self._gate.discard(unit)
        if snap is not None:
            self._failed[unit] = snap
        log.warning("slide %s failed: %s", unit, reason)
        try:
            self._on_failed(unit, reason)
        except Exception:
            log.exception("on_failed for %s raised; the failure is logged only", unit)

    def _try_hand_over(self, unit: Path, now: float) -> None:
        before = self._gate.snapshot(unit)
        roots = (*self.config.all_folders, *self.config.symlink_roots)
        try:  # a symlink is followed only into the watch folders and watch.symlink_roots
            outside = [f for _, f in slide_files(unit) if real_path_inside(f, roots) is None]
        except SlideReadError:
            outside = []  # not complete yet: the opener below says so
        if outside:
            reason = ("is a symlink (or holds one) leading outside the watch folders; it was not opened: add the "
                      "target's folder to watch.symlink_roots if it is meant to be analysed")
            log.warning("slide %s leads to %s, outside the watch folders and watch.symlink_roots; not opened",
                        unit, os.path.realpath(outside[0]))
            self._gate.discard(unit)
            self._failed[unit] = before if before is not None else (-1, -1)
            try:
                self._on_failed(unit, reason)
            except Exception:
                log.exception("on_failed for %s raised; the failure is logged only", unit)
            return
        try:
            fp = self._open_timed(unit)
        except (NotASlideError, UnsupportedFormatError) as exc:  # its content says: no slide. Waiting cannot help
            self._fail_now(unit, before, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - still being written, maybe: wait, then fail with this reason
            reason = str(exc) if isinstance(exc, SlideReadError) else f"{type(exc).__name__}: {exc}"
            if self._gate.defer(unit, reason, now):
                log.info("slide %s has stopped changing but does not open: %s; it fails in %g s unless it opens",
                         unit, reason, self.config.unreadable_timeout_s)
            return
        if isinstance(fp, dict):
            self._split_dicom_folder(unit, fp, before, now)
            return
        after = self._snapshot(unit)
        if after is None:
            self._forget(unit)
            return
        if after != before:  # changed while being opened: not finished after all
            self._gate.observe(unit, after, self._clock())
            return
        previous = self._handed.get(unit)
        if previous is not None and previous[1] == fp.key and not self._again(unit, fp.key):
            log.info("slide %s changed only its mtime; same content, not handed over again", unit)
        else:
            log.info("slide ready: %s (%s, %d bytes)", unit, fp.key, fp.size)
            try:
                self._on_ready(unit, fp)
            except Exception as exc:
                log.exception("on_ready for %s raised; trying again after the quiet period", unit)
                self._gate.defer(unit, f"handing the slide over failed: {type(exc).__name__}: {exc}", now)
                return
        self._gate.discard(unit)
        self._handed[unit] = (after, fp.key)

    def _open_timed(self, unit: Path) -> Fingerprint | dict[str, list[DicomInstance]]:
        """Open the slide and fingerprint it in a thread of its own, given up after watch.open_timeout_s: a
        read that blocks (a hung network share) never stalls the gate. A stuck open is not started twice.
        A DICOM folder holding several series is not opened: its series come back instead."""
        stuck = self._opening.get(unit)
        if stuck is not None and stuck.is_alive():
            raise SlideReadError(unit, "an earlier open is still blocked: the file system does not answer")
        outcome: dict[str, Any] = {}

        def open_and_fingerprint() -> None:
            try:
                if os.path.isdir(unit) and len(series := series_in_folder(unit)) > 1:
                    outcome["result"] = series
                    return
                self._opener(unit)
                outcome["result"] = fingerprint_slide(unit, full=self.config.fingerprint == "full")
            except BaseException as exc:  # noqa: BLE001 - handed to the gate thread below
                outcome["error"] = exc

        thread = threading.Thread(target=open_and_fingerprint, name="edge-watch-open", daemon=True)
        thread.start()
        deadline = time.monotonic() + self.config.open_timeout_s
        while thread.is_alive() and time.monotonic() < deadline and not self._stop.is_set():
            thread.join(0.1)
        if thread.is_alive():
            self._opening[unit] = thread
            raise SlideReadError(
                unit, f"opening it did not finish within watch.open_timeout_s={self.config.open_timeout_s:g} s "
                "(a hung network share?)",
            )
        self._opening.pop(unit, None)
        if "error" in outcome:
            raise outcome["error"]
        result: Fingerprint | dict[str, list[DicomInstance]] = outcome["result"]
        return result

    def _split_dicom_folder(
        self, folder: Path, groups: dict[str, list[DicomInstance]], snap: Snapshot | None, now: float
    ) -> None:
        """A settled folder of ``.dcm`` files from several series is not one slide: each series becomes a
        slide of its own, named by its first file (the reader finds the rest of the series beside it)."""
        self._gate.discard(folder)
        if snap is not None:
            self._handed[folder] = (snap, "split")
        log.info("%s mixes %d DICOM series: each series is a slide of its own", folder, len(groups))
        for instances in groups.values():
            part = instances[0].path
            part_snap = self._snapshot(part)
            if part_snap is not None and part not in self._gate and self._handed.get(part, (None,))[0] != part_snap:
                self._gate.observe(part, part_snap, now)

    def _take_closes(self) -> None:
        """Arm the close-write path for the slides whose writer closed them (where close events are trusted)."""
        with self._lock:
            closes, self._closes = self._closes, {}
        for path, (at, at_close) in closes.items():
            unit = Path(path)
            if unit in self._gate and self.trusts_close_events(unit):
                snap = self._snapshot(unit)
                if snap is not None and snap == at_close:  # else written again since: wait for the next close
                    self._gate.closed(unit, snap, at)

    def _take_incoming(self) -> list[Path]:
        with self._lock:
            raw, self._incoming = self._incoming, {}
        units: dict[Path, None] = {}
        for path, is_dir in raw.items():
            for unit in self._units_for(Path(path), is_dir):
                units[unit] = None
        return list(units)

    def _units_for(self, path: Path, is_dir: bool) -> Iterator[Path]:
        cfg = self.config
        files = [path]
        if is_dir:
            # a folder moved or copied in, or the start-up scan: every slide below it
            files += _walk(path, recursive=cfg.recursive)
        for file in files:
            unit = slide_unit(file, extensions=cfg.extensions, ignore_patterns=cfg.ignore_patterns,
                              roots=cfg.all_folders)
            if unit is not None and unit != file and _special_kind(file) is not None:
                unit = file  # a FIFO named *.dcm is no part of a DICOM folder: it fails on its own
            if unit is not None:
                yield unit

    def _snapshot(self, unit: Path) -> Snapshot | None:
        try:
            return unit_snapshot(unit, stat=self._stat)
        except OSError as exc:  # e.g. permission denied: the opener will say so with the path
            log.debug("stat of %s failed: %s", unit, exc)
            return (-1, -1)

    def _forget(self, unit: Path) -> None:
        self._gate.discard(unit)
        self._handed.pop(unit, None)
        self._failed.pop(unit, None)


def _special_kind(path: Path) -> str | None:
    """What a path is when it is neither a regular file nor a folder (a FIFO, a device), else None."""
    try:
        return special_file_kind(os.stat(path).st_mode)
    except OSError:
        return None


def _walk(folder: Path, *, recursive: bool) -> Iterator[Path]:
    """Files below a folder; without recursion its own files and those of its direct sub-folders
    (a DICOM folder or an MRXS companion folder is part of a slide, not a deeper level)."""
    for root, dirs, names in os.walk(folder):
        for name in names:
            yield Path(root, name)
        if not recursive:
            for d in dirs:
                sub = Path(root, d)
                try:
                    yield from (sub / n for n in os.listdir(sub))
                except OSError:
                    continue
            return


def _stop_observer(observer: Any, timeout: float) -> None:
    try:
        observer.stop()
        if observer.is_alive():
            observer.join(timeout)
    except Exception:
        log.exception("stopping the %s failed", observer.name)
