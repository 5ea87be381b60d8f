"""The folder watcher: which files are slides, the stability gate, identity, and the observers at work.

Gate behaviour is driven with a fake clock through ``SlideWatcher.check``; a few tests run the real
observers (native and polling) with short quiet periods. ``python -m tests.test_watcher`` prints the
pick-up latency after the quiet period (measured, never asserted: speed targets are benchmarks).
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from edge.config import WatchConfig
from edge.errors import ConfigError, CorruptSlideError, NotASlideError
from edge.service.watcher import (
    SlideWatcher,
    StabilityGate,
    choose_observer,
    default_opener,
    filesystem_type,
    is_ignored,
    slide_unit,
    unit_snapshot,
)
from edge.vocab import SLIDE_EXTENSIONS
from edge.wsi.fingerprint import Fingerprint, fingerprint_slide
from edge.wsi.slide import OPENSLIDE_ONLY_EXTENSIONS
from tests.conftest import SynthFactory, data_file

MAGIC = b"SLIDE"  # what the fake opener wants at the start of a slide file


def fake_opener(path: Path) -> None:
    """Opens what starts with MAGIC (or a folder with .dcm files), like a reader that checks the header."""
    if path.is_dir():
        if not any(p.suffix == ".dcm" for p in path.iterdir()):
            raise NotASlideError(path, "folder without .dcm files")
        return
    with path.open("rb") as fh:
        head = fh.read(len(MAGIC))
    if head != MAGIC:
        raise CorruptSlideError(path, f"bad magic {head!r}")


class Recorder:
    """Collects on_ready / on_failed calls from the watcher's thread."""

    def __init__(self) -> None:
        self.ready: list[tuple[Path, Fingerprint]] = []
        self.failed: list[tuple[Path, str]] = []
        self.ready_at: list[float] = []
        self._lock = threading.Lock()

    def on_ready(self, path: Path, fp: Fingerprint) -> None:
        with self._lock:
            self.ready.append((path, fp))
            self.ready_at.append(time.monotonic())

    def on_failed(self, path: Path, reason: str) -> None:
        with self._lock:
            self.failed.append((path, reason))

    @property
    def ready_paths(self) -> list[Path]:
        with self._lock:
            return [p for p, _ in self.ready]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _config(folder: Path, **kw: object) -> WatchConfig:
    values: dict[str, object] = {
        "folders": (str(folder),),
        "quiet_period_s": 1.0,
        "settle_timeout_s": 5.0,
        "poll_interval_s": 0.5,
    }
    values.update(kw)
    return WatchConfig(**values)  # type: ignore[arg-type]


def _slide(path: Path, size: int = 100, fill: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(MAGIC + fill * (size - len(MAGIC)))
    return path


def gated(
    folder: Path, opener: Callable[[Path], None] = fake_opener, **kw: object
) -> tuple[SlideWatcher, Recorder, FakeClock]:
    """A watcher that is not started: the test drives it with scan() and check() on a fake clock."""
    rec, clock = Recorder(), FakeClock()
    watcher = SlideWatcher(_config(folder, **kw), rec.on_ready, rec.on_failed, opener=opener, clock=clock)
    return watcher, rec, clock


def look(watcher: SlideWatcher, clock: FakeClock, *times: float) -> None:
    """Re-scan (like a change event for every file) and look at each of the given times."""
    for t in times:
        clock.now = t
        watcher.scan()
        watcher.check()


@contextmanager
def running(
    folder: Path, opener: Callable[[Path], None] = fake_opener, **kw: object
) -> Iterator[tuple[SlideWatcher, Recorder]]:
    rec = Recorder()
    cfg = _config(folder, **{"quiet_period_s": 0.3, "poll_interval_s": 0.2, **kw})
    watcher = SlideWatcher(cfg, rec.on_ready, rec.on_failed, opener=opener)
    watcher.start()
    try:
        yield watcher, rec
    finally:
        watcher.stop()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# --- which paths are slides ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "unit"),
    [
        ("a.svs", "a.svs"),
        ("sub/b.NDPI", "sub/b.NDPI"),
        ("c.mrxs", "c.mrxs"),
        ("c/Data0003.dat", "c.mrxs"),
        ("c/Slidedat.ini", "c.mrxs"),
        ("dicom1/0001.dcm", "dicom1"),
        ("a.svs.part", None),
        ("a.svs.tmp", None),
        ("~a.svs", None),
        (".a.svs", None),
        ("a.svs~", None),
        ("notes.txt", None),
        ("a.jpg", None),
        (".hidden/0001.dcm", None),
    ],
)
def test_a_changed_path_maps_to_its_slide(name: str, unit: str | None) -> None:
    root = Path("/scans")
    assert slide_unit(root / name) == (root / unit if unit else None)


@pytest.mark.parametrize("ext", SLIDE_EXTENSIONS)
def test_every_slide_extension_is_watched_by_default(ext: str) -> None:
    extensions = WatchConfig().extensions
    if ext == ".dcm":  # a DICOM slide is its folder, or a single file directly in a watched folder
        assert slide_unit(Path("/scans/d1/0001.dcm"), extensions=extensions) == Path("/scans/d1")
        assert slide_unit(Path("/scans/0001.dcm"), extensions=extensions, roots=("/scans",)) == Path("/scans/0001.dcm")
    else:
        assert slide_unit(Path(f"/scans/a{ext}"), extensions=extensions) == Path(f"/scans/a{ext}")
        assert slide_unit(Path(f"/scans/A{ext.upper()}"), extensions=extensions) == Path(f"/scans/A{ext.upper()}")


def test_a_real_slide_under_each_readable_extension_becomes_ready(tmp_path: Path, synth_slide: SynthFactory) -> None:
    """The watcher with its real opener (edge.wsi.slide): every name the vocabulary lists that a plain TIFF or
    a DICOM file can carry is picked up, opened and handed on (.ndpi and the OpenSlide-only formats need files
    of their own kind: tests/test_slide.py checks the opener knows their names)."""
    source = synth_slide(width=2048, height=1536)
    names = {f"s{ext}": source for ext in SLIDE_EXTENSIONS if ext not in OPENSLIDE_ONLY_EXTENSIONS | {".ndpi", ".dcm"}}
    names["0001.dcm"] = data_file("wsi/camelyon-multiframe.dcm")  # directly in the watched folder: one file
    for name, src in names.items():
        shutil.copy(src, tmp_path / name)
    watcher, rec, clock = gated(tmp_path, opener=default_opener, extensions=WatchConfig().extensions)
    look(watcher, clock, 0.0, 1.5, 3.0)
    assert sorted(p.name for p, _ in rec.ready) == sorted(names) and rec.failed == []


def test_the_extension_allow_list_and_ignore_patterns_are_configurable() -> None:
    assert slide_unit(Path("/s/a.svs"), extensions=(".ndpi",)) is None
    assert slide_unit(Path("/s/d/1.dcm"), extensions=(".svs",)) is None
    assert slide_unit(Path("/s/X/Data0000.dat"), extensions=(".svs",)) is None
    assert slide_unit(Path("/s/a.svs.incoming"), ignore_patterns=("*.incoming",)) is None
    assert slide_unit(Path("/s/.a.svs"), ignore_patterns=("*.incoming",)) == Path("/s/.a.svs")
    assert is_ignored("SCAN.TMP", ("*.tmp",))


def test_a_snapshot_sums_a_file_and_its_mrxs_companion_folder(tmp_path: Path) -> None:
    mrxs = _slide(tmp_path / "X.mrxs", 10)
    assert unit_snapshot(mrxs) == (10, mrxs.stat().st_mtime_ns)
    _slide(tmp_path / "X" / "Data0000.dat", 30)
    first = unit_snapshot(mrxs)
    assert first is not None and first[0] == 40
    _slide(tmp_path / "X" / "sub" / "Data0001.dat", 5)
    second = unit_snapshot(mrxs)
    assert second is not None and second[0] == 45


def test_a_snapshot_of_a_dicom_folder_counts_only_dcm_files(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    assert unit_snapshot(folder) is None  # no .dcm yet: no slide
    _slide(folder / "1.dcm", 20)
    _slide(folder / "notes.txt", 7)
    snap = unit_snapshot(folder)
    assert snap is not None and snap[0] == 20


def test_a_snapshot_of_a_missing_slide_is_none_and_stat_can_be_injected(tmp_path: Path) -> None:
    assert unit_snapshot(tmp_path / "gone.svs") is None
    fake = os.stat_result((0o100644, 0, 0, 1, 0, 0, 1234, 0, 0, 0))
    assert unit_snapshot(Path("/nowhere/a.svs"), stat=lambda _p: fake)[0] == 1234  # type: ignore[index]


# --- which observer ------------------------------------------------------------------------------

MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
server:/export /mnt/share nfs4 rw 0 0
//nas/scans /mnt/my\\040scans cifs rw 0 0
tmpfs /mnt/share2 tmpfs rw 0 0
"""


def test_the_file_system_type_comes_from_the_longest_mount_point() -> None:
    assert filesystem_type("/data/scans", MOUNTS) == "ext4"
    assert filesystem_type("/mnt/share/a/b", MOUNTS) == "nfs4"
    assert filesystem_type("/mnt/share2/a", MOUNTS) == "tmpfs"
    assert filesystem_type("/mnt/my scans/x", MOUNTS) == "cifs"


def test_auto_polls_network_shares_and_uses_native_events_elsewhere() -> None:
    assert choose_observer("/mnt/share/scans", "auto", MOUNTS) == "polling"
    assert choose_observer("/mnt/my scans", "auto", MOUNTS) == "polling"
    assert choose_observer("/data", "auto", MOUNTS) == "native"
    assert choose_observer("/mnt/share", "native", MOUNTS) == "native"
    assert choose_observer("/data", "polling", MOUNTS) == "polling"


# --- the stability gate (pure) -------------------------------------------------------------------


def test_the_gate_releases_a_slide_after_its_quiet_period() -> None:
    gate = StabilityGate(quiet_period_s=2.0, settle_timeout_s=60.0)
    a = Path("a.svs")
    gate.observe(a, (10, 1), now=0.0)
    gate.observe(a, (10, 1), now=1.9)
    assert gate.due(1.9) == []
    assert gate.due(2.0) == [a]


def test_a_change_restarts_the_quiet_period() -> None:
    gate = StabilityGate(quiet_period_s=2.0, settle_timeout_s=60.0)
    a = Path("a.svs")
    gate.observe(a, (10, 1), now=0.0)
    gate.observe(a, (20, 2), now=1.5)  # grew
    gate.observe(a, (20, 3), now=3.0)  # only mtime
    assert gate.due(4.9) == []
    assert gate.due(5.0) == [a]


def test_due_slides_come_oldest_first() -> None:
    gate = StabilityGate(quiet_period_s=1.0, settle_timeout_s=60.0)
    gate.observe(Path("b.svs"), (1, 1), now=0.0)
    gate.observe(Path("a.svs"), (1, 1), now=0.5)
    assert gate.due(5.0) == [Path("b.svs"), Path("a.svs")]


def test_a_slide_that_does_not_open_waits_another_quiet_period() -> None:
    gate = StabilityGate(quiet_period_s=1.0, settle_timeout_s=60.0)
    a = Path("a.svs")
    gate.observe(a, (1, 1), now=0.0)
    gate.defer(a, "truncated", now=1.0)
    assert gate.due(1.5) == []
    assert gate.due(2.0) == [a]


def test_expired_slides_leave_the_gate_with_the_reason() -> None:
    gate = StabilityGate(quiet_period_s=1.0, settle_timeout_s=10.0)
    growing, broken = Path("growing.svs"), Path("broken.svs")
    gate.observe(growing, (1, 1), now=0.0)
    gate.observe(broken, (1, 1), now=0.0)
    gate.defer(broken, "bad magic", now=1.0)
    gate.observe(growing, (2, 2), now=9.5)
    assert gate.expired(9.9) == []
    reasons = dict(gate.expired(10.0))
    assert "still being written after settle_timeout_s=10" in reasons[growing]
    assert reasons[broken] == "did not open within settle_timeout_s=10: bad magic"
    assert len(gate) == 0


# --- the watcher, driven by a fake clock ---------------------------------------------------------


def test_a_slide_becomes_ready_once_after_its_quiet_period(tmp_path: Path) -> None:
    slide = _slide(tmp_path / "a.svs")
    watcher, rec, clock = gated(tmp_path)
    look(watcher, clock, 0.0, 0.5)
    assert rec.ready == [] and watcher.pending() == 1
    look(watcher, clock, 1.0)
    assert [(p, fp.key) for p, fp in rec.ready] == [(slide, fingerprint_slide(slide).key)]
    assert watcher.pending() == 0


def test_duplicate_events_and_a_touch_do_not_hand_a_slide_over_again(tmp_path: Path) -> None:
    slide = _slide(tmp_path / "a.svs")
    watcher, rec, clock = gated(tmp_path)
    look(watcher, clock, 0.0, 1.0, 2.0, 3.0)  # every look re-announces every file
    st = slide.stat()
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touch
    look(watcher, clock, 4.0, 5.0, 6.0)
    assert len(rec.ready) == 1 and watcher.pending() == 0


def test_the_same_bytes_settling_again_are_handed_over_again_when_the_daemon_asks_for_them(tmp_path: Path) -> None:
    slide = _slide(tmp_path / "a.svs")
    rec, clock = Recorder(), FakeClock()
    asked: list[tuple[Path, str]] = []

    def again(path: Path, key: str) -> bool:  # the daemon: its last job failed for a transient reason
        asked.append((path, key))
        return True

    watcher = SlideWatcher(_config(tmp_path), rec.on_ready, rec.on_failed, opener=fake_opener, clock=clock, again=again)
    look(watcher, clock, 0.0, 1.0)
    st = slide.stat()
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # dropped again: only the mtime differs
    look(watcher, clock, 2.0, 3.0)
    assert [p for p, _ in rec.ready] == [slide, slide] and rec.ready[0][1].key == rec.ready[1][1].key
    assert asked == [(slide, rec.ready[0][1].key)]


def test_changed_content_is_handed_over_again_with_a_new_key(tmp_path: Path) -> None:
    slide = _slide(tmp_path / "a.svs")
    watcher, rec, clock = gated(tmp_path)
    look(watcher, clock, 0.0, 1.0)
    _slide(slide, 300, fill=b"y")
    look(watcher, clock, 2.0, 3.0)
    assert [p for p, _ in rec.ready] == [slide, slide]
    assert rec.ready[0][1].key != rec.ready[1][1].key


def test_a_renamed_slide_is_handed_over_under_its_new_name_with_the_same_key(tmp_path: Path) -> None:
    slide = _slide(tmp_path / "a.svs")
    watcher, rec, clock = gated(tmp_path)
    look(watcher, clock, 0.0, 1.0)
    moved = slide.rename(tmp_path / "b.svs")
    look(watcher, clock, 2.0, 3.0)
    assert [p for p, _ in rec.ready] == [slide, moved]
    assert rec.ready[0][1].key == rec.ready[1][1].key  # the store's dedupe decides by this key


def test_temporary_names_and_other_extensions_are_ignored(tmp_path: Path) -> None:
    for name in ("a.svs.part", "a.tmp", "~a.svs", ".a.svs", "notes.txt", "a.svs.crdownload"):
        _slide(tmp_path / name)
    upper = _slide(tmp_path / "B.SVS")
    watcher, rec, clock = gated(tmp_path)
    look(watcher, clock, 0.0, 1.0, 2.0)
    assert rec.ready_paths == [upper]
    assert rec.failed == []


def test_changes_in_an_mrxs_companion_folder_delay_readiness(tmp_path: Path) -> None:
    mrxs = _slide(tmp_path / "X.mrxs", 50)
    data = _slide(tmp_path / "X" / "Data0000.dat", 50)
    watcher, rec, clock = gated(tmp_path)
    look(watcher, clock, 0.0)
    with data.open("ab") as fh:
        fh.write(b"z" * 10)
    look(watcher, clock, 0.5, 1.0, 1.4)
    assert rec.ready == []
    look(watcher, clock, 1.5)
    assert rec.ready_paths == [mrxs]
    assert rec.ready[0][1].size == 110


def test_a_dicom_folder_is_one_slide(tmp_path: Path) -> None:
    folder = tmp_path / "case1"
    for i in range(3):
        _slide(folder / f"{i:04d}.dcm", 40)
    watcher, rec, clock = gated(tmp_path)
    look(watcher, clock, 0.0, 1.0, 2.0)
    assert rec.ready_paths == [folder]
    assert rec.ready[0][1].size == 120


def test_a_slide_that_never_settles_fails_after_the_settle_timeout(tmp_path: Path) -> None:
    slide = _slide(tmp_path / "a.svs")
    watcher, rec, clock = gated(tmp_path, quiet_period_s=1.0, settle_timeout_s=5.0)
    t = 0.0
    while t <= 6.0:
        with slide.open("ab") as fh:
            fh.write(b"more")
        look(watcher, clock, t)
        t += 0.5
    assert rec.ready == []
    assert len(rec.failed) == 1
    path, reason = rec.failed[0]
    assert path == slide and "still being written after settle_timeout_s=5" in reason


def test_a_slide_that_never_opens_fails_with_the_readers_reason(tmp_path: Path) -> None:
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"GARBAGE" * 10)
    calls: list[Path] = []

    def opener(path: Path) -> None:
        calls.append(path)
        fake_opener(path)

    watcher, rec, clock = gated(tmp_path, opener=opener)
    look(watcher, clock, *[i * 0.5 for i in range(13)])
    assert rec.ready == []
    assert len(calls) >= 2  # tried again after each quiet period: a file being written may not open yet
    [(path, reason)] = rec.failed
    assert path == broken
    assert "did not open within settle_timeout_s=5" in reason and "bad magic b'GARBA'" in reason
    look(watcher, clock, 7.0, 8.0, 20.0)  # the same unchanged file does not fail again and again
    assert len(rec.failed) == 1


def test_a_slide_that_opens_on_a_later_try_is_handed_over(tmp_path: Path) -> None:
    slide = _slide(tmp_path / "a.svs")
    tries: list[float] = []

    def opener(path: Path) -> None:
        tries.append(path.stat().st_size)
        if len(tries) == 1:
            raise CorruptSlideError(path, "truncated tile table")

    watcher, rec, clock = gated(tmp_path, opener=opener)
    look(watcher, clock, 0.0, 1.0, 1.5, 2.0)
    assert len(tries) == 2 and rec.ready_paths == [slide]


def test_a_slide_that_changes_while_it_is_opened_waits_again(tmp_path: Path) -> None:
    slide = _slide(tmp_path / "a.svs")

    def opener(path: Path) -> None:
        if path.stat().st_size < 200:
            with path.open("ab") as fh:  # the scanner writes on while we look
                fh.write(b"w" * 150)

    watcher, rec, clock = gated(tmp_path, opener=opener)
    look(watcher, clock, 0.0, 1.0)
    assert rec.ready == []
    look(watcher, clock, 1.5, 2.0)
    assert rec.ready_paths == [slide] and rec.ready[0][1].size == 250


def test_a_deleted_candidate_is_forgotten(tmp_path: Path) -> None:
    slide = _slide(tmp_path / "a.svs")
    watcher, rec, clock = gated(tmp_path)
    look(watcher, clock, 0.0)
    assert watcher.pending() == 1
    slide.unlink()
    look(watcher, clock, 0.5, 10.0)
    assert watcher.pending() == 0 and rec.ready == [] and rec.failed == []


def test_callbacks_that_raise_are_logged_and_the_slide_is_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    slide = _slide(tmp_path / "a.svs")
    calls: list[Path] = []

    def on_ready(path: Path, fp: Fingerprint) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise RuntimeError("store is locked")

    clock = FakeClock()
    watcher = SlideWatcher(_config(tmp_path), on_ready, Recorder().on_failed, opener=fake_opener, clock=clock)
    with caplog.at_level(logging.ERROR, logger="edge.service.watcher"):
        look(watcher, clock, 0.0, 1.0, 1.5, 2.0, 3.0)
    assert calls == [slide, slide]
    assert any(str(slide) in r.getMessage() and r.exc_info for r in caplog.records)


def test_an_on_failed_that_raises_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "broken.svs").write_bytes(b"GARBAGE")

    def on_failed(path: Path, reason: str) -> None:
        raise RuntimeError("disk full")

    clock = FakeClock()
    watcher = SlideWatcher(_config(tmp_path), Recorder().on_ready, on_failed, opener=fake_opener, clock=clock)
    with caplog.at_level(logging.ERROR, logger="edge.service.watcher"):
        look(watcher, clock, 0.0, 1.0, 6.0)
    assert any("broken.svs" in r.getMessage() and r.exc_info for r in caplog.records)


def test_the_default_opener_fails_a_file_that_is_no_slide(tmp_path: Path) -> None:
    (tmp_path / "junk.svs").write_bytes(b"no slide here" * 10)
    rec, clock = Recorder(), FakeClock()
    watcher = SlideWatcher(_config(tmp_path), rec.on_ready, rec.on_failed, clock=clock)
    look(watcher, clock, 0.0, 1.0, 6.0)
    [(path, reason)] = rec.failed
    assert path == tmp_path / "junk.svs" and "did not open" in reason and "junk.svs" in reason


def test_a_missing_watch_folder_is_a_config_error(tmp_path: Path) -> None:
    watcher = SlideWatcher(_config(tmp_path / "nope"), Recorder().on_ready, Recorder().on_failed)
    with pytest.raises(ConfigError, match="does not exist"):
        watcher.start()


def test_an_invalid_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="settle_timeout_s"):
        SlideWatcher(_config(tmp_path, quiet_period_s=5.0, settle_timeout_s=2.0), Recorder().on_ready,
                     Recorder().on_failed)  # fmt: skip


# --- the watcher with real observers -------------------------------------------------------------


def test_a_slow_copy_is_not_picked_up_before_it_is_finished(tmp_path: Path) -> None:
    target = tmp_path / "slow.svs"
    with running(tmp_path, quiet_period_s=1.0, settle_timeout_s=30.0) as (_watcher, rec):
        with target.open("wb") as fh:
            fh.write(MAGIC)
            for _ in range(10):  # ~5 s of writing, pauses shorter than the quiet period
                fh.write(os.urandom(4096))
                fh.flush()
                last_write = time.monotonic()
                time.sleep(0.5)
                assert rec.ready == [], "picked up while still being copied"
        assert wait_until(lambda: len(rec.ready) == 1)
    [(path, fp)] = rec.ready
    assert path == target and fp.size == len(MAGIC) + 10 * 4096
    assert rec.ready_at[0] - last_write >= 1.0  # never before the quiet period after the last write


def test_rename_into_place_gives_exactly_one_slide(tmp_path: Path) -> None:
    part = tmp_path / "x.svs.part"
    with running(tmp_path) as (_watcher, rec):
        with part.open("wb") as fh:
            for _ in range(5):
                fh.write(MAGIC + os.urandom(1000))
                fh.flush()
                time.sleep(0.05)
        final = part.rename(tmp_path / "x.svs")
        assert wait_until(lambda: len(rec.ready) == 1)
        time.sleep(0.8)  # events still in flight must not produce a second call
    assert rec.ready_paths == [final] and rec.failed == []


def test_the_polling_observer_finds_new_slides(tmp_path: Path) -> None:
    with running(tmp_path, observer="polling", scan_on_start=False) as (watcher, rec):
        assert watcher.observer_kinds == {str(tmp_path): "polling"}
        slide = _slide(tmp_path / "sub" / "a.svs")
        assert wait_until(lambda: len(rec.ready) == 1)
    assert rec.ready_paths == [slide]


def test_polling_folders_are_always_polled(tmp_path: Path) -> None:
    native, share = tmp_path / "local", tmp_path / "share"
    native.mkdir()
    share.mkdir()
    with running(native, observer="native", polling_folders=(str(share),), scan_on_start=False) as (watcher, rec):
        assert watcher.observer_kinds == {str(native): "native", str(share): "polling"}
        a, b = _slide(native / "a.svs"), _slide(share / "b.svs")
        assert wait_until(lambda: len(rec.ready) == 2)
    assert sorted(rec.ready_paths) == [a, b]


def test_without_native_events_the_watcher_falls_back_to_polling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import watchdog.observers

    class NoInotify(watchdog.observers.polling.PollingObserver):
        def start(self) -> None:
            raise OSError(28, "inotify watch limit reached")

    monkeypatch.setattr(watchdog.observers, "Observer", NoInotify)
    with running(tmp_path, observer="native", scan_on_start=False) as (watcher, rec):
        assert watcher.observer_kinds == {str(tmp_path): "polling"}
        slide = _slide(tmp_path / "a.svs")
        assert wait_until(lambda: len(rec.ready) == 1)
    assert rec.ready_paths == [slide]


def test_slides_present_at_start_are_picked_up_only_with_scan_on_start(tmp_path: Path) -> None:
    (tmp_path / "on").mkdir()
    (tmp_path / "off").mkdir()
    on, off = _slide(tmp_path / "on" / "a.svs"), _slide(tmp_path / "off" / "a.svs")
    with running(tmp_path / "on", scan_on_start=True) as (_w, rec_on):
        assert wait_until(lambda: len(rec_on.ready) == 1)
    with running(tmp_path / "off", scan_on_start=False) as (_w, rec_off):
        time.sleep(0.8)
    assert rec_on.ready_paths == [on] and rec_off.ready == []
    assert off.exists()


def test_two_hundred_slides_dropped_at_once_are_each_handed_over_once(tmp_path: Path) -> None:
    with running(tmp_path, scan_on_start=False) as (watcher, rec):
        paths = [_slide(tmp_path / f"slide-{i:03d}.svs", 64 + i) for i in range(200)]
        assert wait_until(lambda: len(rec.ready) >= 200, timeout=20.0)
        time.sleep(0.6)
        assert watcher.pending() == 0
    assert sorted(rec.ready_paths) == paths
    assert len({fp.key for _, fp in rec.ready}) == 200


def test_a_real_slide_is_opened_with_the_default_reader(tmp_path: Path, synth_slide: Callable[..., Path]) -> None:
    source = synth_slide(width=2048, height=1536, seed=3)
    with running(tmp_path, opener=default_opener) as (_w, rec):
        part = tmp_path / "scan.tiff.part"
        shutil.copyfile(source, part)
        final = part.rename(tmp_path / "scan.tiff")
        assert wait_until(lambda: len(rec.ready) == 1)
    [(path, fp)] = rec.ready
    assert path == final and fp.size == source.stat().st_size and rec.failed == []


# --- measurement (not a test: speed targets belong to benchmarks) --------------------------------


# --- issue 11: loose DICOM files, FIFOs, unreadable files ------------------------------------------

def test_a_loose_dicom_file_in_the_watched_folder_is_its_own_slide_never_the_folder(tmp_path: Path) -> None:
    loose = tmp_path / "highdicom-sm-50px.dcm"
    shutil.copy(data_file("wsi/highdicom-sm-50px.dcm"), loose)
    watcher, rec, clock = gated(tmp_path, opener=default_opener)
    look(watcher, clock, 0.0, 1.0, 2.0)
    assert rec.ready_paths == [loose] and rec.failed == []


def test_a_folder_of_one_dicom_series_is_one_slide(tmp_path: Path) -> None:
    case = tmp_path / "case1"
    case.mkdir()
    shutil.copy(data_file("wsi/highdicom-sm-50px.dcm"), case / "level0.dcm")
    watcher, rec, clock = gated(tmp_path, opener=default_opener)
    look(watcher, clock, 0.0, 1.0, 2.0)
    assert rec.ready_paths == [case]


def test_a_folder_mixing_dicom_series_is_not_one_slide_each_series_is(tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(data_file("wsi/highdicom-sm-50px.dcm"), mixed / "a.dcm")
    shutil.copy(data_file("wsi/camelyon-multiframe.dcm"), mixed / "b.dcm")
    watcher, rec, clock = gated(tmp_path, opener=default_opener)
    look(watcher, clock, 0.0, 1.0, 2.0, 3.0, 4.0)
    assert sorted(rec.ready_paths) == [mixed / "a.dcm", mixed / "b.dcm"] and rec.failed == []
    look(watcher, clock, 5.0, 6.0, 7.0)  # looked at again: nothing new
    assert len(rec.ready) == 2


def test_a_dicom_label_in_a_subfolder_fails_at_once_with_the_reason(tmp_path: Path) -> None:
    labels = tmp_path / "labels"
    labels.mkdir()
    shutil.copy(data_file("wsi/dicom-label-not-wsi.dcm"), labels / "label.dcm")
    watcher, rec, clock = gated(tmp_path, opener=default_opener, settle_timeout_s=3600.0)
    look(watcher, clock, 0.0, 1.0, 2.0)
    [(path, reason)] = rec.failed
    assert path == labels and "LABEL" in reason and "no whole-slide image" in reason
    assert watcher.pending() == 0


def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def test_a_fifo_named_like_a_slide_fails_at_once_and_the_watcher_goes_on(tmp_path: Path) -> None:
    in_root = _fifo(tmp_path / "x.svs")
    in_folder = _fifo(tmp_path / "sub" / "x.dcm")
    good = _slide(tmp_path / "good.svs")
    watcher, rec, clock = gated(tmp_path, opener=default_opener)
    done = threading.Event()

    def drive() -> None:
        look(watcher, clock, 0.0, 1.0, 2.0)
        done.set()

    threading.Thread(target=drive, daemon=True).start()
    assert done.wait(20), "the watcher hung on a FIFO"
    failed = dict(rec.failed)
    assert set(failed) == {in_root, in_folder}, rec.failed
    assert all("named pipe (FIFO)" in reason for reason in failed.values())
    assert good not in failed  # MAGIC is no real slide: it waits as unreadable, it does not hang either
    look(watcher, clock, 3.0, 4.0)
    assert len(rec.failed) == 2  # each FIFO fails once


def test_an_open_that_blocks_is_given_up_after_the_open_timeout(tmp_path: Path) -> None:
    _slide(tmp_path / "hung.svs")
    release = threading.Event()

    def blocking_opener(path: Path) -> None:
        release.wait(30)

    watcher, _rec, clock = gated(tmp_path, opener=blocking_opener, open_timeout_s=0.3)
    started = time.monotonic()
    look(watcher, clock, 0.0, 1.0)
    assert time.monotonic() - started < 5
    [waiting] = watcher.waiting()
    assert "open_timeout_s=0.3" in waiting["reason"]
    release.set()


def test_a_stable_unreadable_file_shows_up_at_once_and_fails_after_the_unreadable_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"GARBAGE" * 10)
    watcher, rec, clock = gated(tmp_path, settle_timeout_s=3600.0, unreadable_timeout_s=10.0)
    with caplog.at_level(logging.INFO, logger="edge.service.watcher"):
        look(watcher, clock, 0.0, 1.0)
    [waiting] = watcher.waiting()
    assert waiting["slide_path"] == str(broken) and "bad magic" in waiting["reason"]
    assert waiting["fails_in_s"] == pytest.approx(10.0)
    assert any("does not open" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    look(watcher, clock, 5.0, 10.5)
    assert rec.failed == []
    look(watcher, clock, 11.0)
    [(path, reason)] = rec.failed
    assert path == broken and "unreadable_timeout_s=10" in reason and "bad magic" in reason
    assert watcher.waiting() == []


def test_a_growing_file_keeps_the_long_settle_timeout(tmp_path: Path) -> None:
    growing = tmp_path / "growing.svs"
    growing.write_bytes(b"GARBAGE")
    watcher, rec, clock = gated(tmp_path, settle_timeout_s=60.0, unreadable_timeout_s=3.0)
    t = 0.0
    while t <= 20.0:
        if t % 2 < 0.5:  # grows every 2 s: it never stays unreadable and stable for 3 s
            with growing.open("ab") as fh:
                fh.write(b"more")
        look(watcher, clock, t)
        t += 0.5
    assert rec.failed == []




# --- close-write pickup --------------------------------------------------------------------------


def test_a_closed_slide_is_due_after_the_settle_time_unless_it_changes_again() -> None:
    gate = StabilityGate(quiet_period_s=10, settle_timeout_s=60, close_settle_s=1)
    a, b = Path("a.svs"), Path("b.svs")
    gate.closed(a, (100, 1), at=0.0)
    gate.closed(b, (100, 1), at=0.0)
    gate.observe(b, (150, 2), now=0.5)  # reopened and written to: the close no longer counts
    assert gate.due(now=0.9) == [] and gate.due(now=1.0) == [a]
    assert gate.due(now=9.0) == [a] and gate.due(now=10.5) == [a, b]  # b: the quiet period is its rule again


def test_close_events_do_nothing_when_switched_off() -> None:
    gate = StabilityGate(quiet_period_s=10, settle_timeout_s=60, close_settle_s=0)
    gate.closed(Path("a.svs"), (100, 1), at=0.0)
    assert gate.due(now=5.0) == [] and not gate.settling_closed()


def test_quiet_only_folders_must_be_watched(tmp_path: Path) -> None:
    watcher, _rec, _clock = gated(tmp_path, quiet_only_folders=(str(tmp_path / "elsewhere"),))
    with pytest.raises(ConfigError, match="quiet_only_folders"):
        watcher.start()


def _write_and_close(path: Path, chunks: int = 4, pause: float = 0.05) -> float:
    """Write a slide in chunks and close it; the clock before the last write (a lower bound of both
    the last byte written and the close)."""
    with path.open("wb") as fh:
        fh.write(MAGIC)
        for _ in range(chunks):
            time.sleep(pause)
            last = time.monotonic()
            fh.write(os.urandom(4096))
            fh.flush()
    return last


def test_a_slide_closed_after_writing_starts_after_the_settle_time_not_the_quiet_period(tmp_path: Path) -> None:
    with running(tmp_path, observer="native", quiet_period_s=20.0, settle_timeout_s=60.0, close_settle_s=0.5,
                 scan_on_start=False) as (watcher, rec):  # fmt: skip
        assert watcher.trusts_close_events(tmp_path / "a.svs")
        last_write = _write_and_close(tmp_path / "a.svs")
        assert wait_until(lambda: len(rec.ready) == 1, timeout=10.0), "not started on close"
    assert 0.5 <= rec.ready_at[0] - last_write < 5.0  # after the settle time, long before the 20 s quiet period
    assert rec.ready[0][1].size == len(MAGIC) + 4 * 4096


def test_a_writer_that_closes_and_reopens_mid_write_is_never_started_early(tmp_path: Path) -> None:
    target = tmp_path / "scanner.svs"
    with running(tmp_path, observer="native", quiet_period_s=20.0, settle_timeout_s=60.0, close_settle_s=0.6,
                 scan_on_start=False) as (_watcher, rec):  # fmt: skip
        with target.open("wb") as fh:
            fh.write(MAGIC + os.urandom(4096))
        for _ in range(6):  # closes after every stripe, reopens within the settle time and appends
            time.sleep(0.3)
            assert rec.ready == [], "started while the scanner was still writing"
            last_write = time.monotonic()
            with target.open("ab") as fh:
                fh.write(os.urandom(4096))
        assert wait_until(lambda: len(rec.ready) == 1, timeout=10.0)
    assert rec.ready_at[0] - last_write >= 0.6
    assert rec.ready[0][1].size == len(MAGIC) + 7 * 4096  # the whole file, not a stripe of it


def test_in_a_quiet_only_folder_a_close_does_not_start_a_slide(tmp_path: Path) -> None:
    target = tmp_path / "reopens.svs"
    with running(tmp_path, observer="native", quiet_period_s=3.0, settle_timeout_s=60.0, close_settle_s=0.3,
                 quiet_only_folders=(str(tmp_path) + "/",), scan_on_start=False) as (watcher, rec):  # fmt: skip
        assert not watcher.trusts_close_events(target)
        _write_and_close(target)
        time.sleep(1.0)  # a pause longer than the settle time, then the scanner reopens and writes on
        assert rec.ready == []
        last_write = _write_and_close(target)
        assert wait_until(lambda: len(rec.ready) == 1, timeout=15.0)
    assert rec.ready_at[0] - last_write >= 3.0  # the quiet period after the last write


def test_with_the_polling_observer_the_quiet_period_stays_the_rule(tmp_path: Path) -> None:
    with running(tmp_path, observer="polling", quiet_period_s=2.0, settle_timeout_s=60.0, close_settle_s=0.2,
                 scan_on_start=False) as (watcher, rec):  # fmt: skip
        assert not watcher.trusts_close_events(tmp_path / "p.svs")
        last_write = _write_and_close(tmp_path / "p.svs")
        assert wait_until(lambda: len(rec.ready) == 1, timeout=15.0)
    assert rec.ready_at[0] - last_write >= 2.0


def test_a_dicom_folder_waits_for_its_quiet_period_whatever_closes(tmp_path: Path) -> None:
    watcher, _rec, _clock = gated(tmp_path, observer="native")
    watcher.observer_kinds[str(tmp_path)] = "native"
    assert watcher.trusts_close_events(tmp_path / "a.svs")
    assert not watcher.trusts_close_events(tmp_path / "dicom1")
    assert not watcher.trusts_close_events(tmp_path / "x.mrxs")


def measure_pickup_latency(slides: int = 20, quiet_period_s: float = 1.0, observer: str = "native") -> list[float]:
    """Seconds from (last write + quiet period) to on_ready, for slides written one after another."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rec = Recorder()
        cfg = _config(folder, quiet_period_s=quiet_period_s, settle_timeout_s=quiet_period_s + 60,
                      observer=observer, scan_on_start=False)  # fmt: skip
        written: list[float] = []
        with SlideWatcher(cfg, rec.on_ready, rec.on_failed, opener=fake_opener):
            for i in range(slides):
                _slide(folder / f"s{i}.svs", 1000 + i)
                written.append(time.monotonic())
                time.sleep(0.1)
            wait_until(lambda: len(rec.ready) == slides, timeout=quiet_period_s + 30)
        by_path = {p.name: t for (p, _), t in zip(rec.ready, rec.ready_at, strict=True)}
        return [by_path[f"s{i}.svs"] - written[i] - quiet_period_s for i in range(slides) if f"s{i}.svs" in by_path]


if __name__ == "__main__":
    for kind in ("native", "polling"):
        lat = measure_pickup_latency(observer=kind)
        print(f"{kind}: pick-up after the quiet period: median {statistics.median(lat):.2f} s, max {max(lat):.2f} s")


def test_a_symlink_out_of_the_watch_folders_fails_without_being_opened(tmp_path: Path) -> None:
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    target = _slide(outside / "slide.svs")
    inbox.mkdir()
    (inbox / "link.svs").symlink_to(target)
    opened: list[Path] = []

    def opener(path: Path) -> None:
        opened.append(path)
        fake_opener(path)

    watcher, rec, clock = gated(inbox, opener=opener)
    look(watcher, clock, 0.0, 1.0, 2.0, 3.0)
    assert rec.ready == [] and opened == []
    [(path, reason)] = rec.failed
    assert path == inbox / "link.svs" and "outside the watch folders" in reason and "watch.symlink_roots" in reason
    assert str(outside) not in reason  # where it leads is for the daemon's log only


def test_a_symlink_into_a_watch_folder_or_symlink_root_is_followed(tmp_path: Path) -> None:
    inbox, share = tmp_path / "inbox", tmp_path / "share"
    inside = _slide(inbox / "archive" / "a.svs", fill=b"a")
    shared = _slide(share / "b.svs", fill=b"b")
    (inbox / "a-link.svs").symlink_to(inside)
    (inbox / "b-link.svs").symlink_to(shared)
    watcher, rec, clock = gated(inbox, symlink_roots=(str(share),))
    look(watcher, clock, 0.0, 1.0)
    assert {p.name for p in rec.ready_paths} == {"a.svs", "a-link.svs", "b-link.svs"} and rec.failed == []
