"""Writing files so that a reader never sees half of one and a crash leaves none behind; paths kept inside roots."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a synced temporary file in the same folder and a rename.

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "sub" / "a.txt"
    >>> atomic_write(target, b"done")
    >>> target.read_bytes(), sorted(p.name for p in target.parent.iterdir())
    (b'done', ['a.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise



@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A hidden temporary path beside ``path`` for a writer that needs a file name (and too much data to
    hold in memory for :func:`atomic_write`); when the block ends it is synced and renamed onto ``path``,
    and removed if the block raises. Created like ``open(path, "w")`` would (mode 0o666 less the umask).

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "slide.tiff"
    >>> with atomic_file(target) as tmp:
    ...     _ = tmp.write_bytes(b"pixels")
    ...     (tmp.name.startswith(".slide.tiff."), target.exists())
    (True, False)
    >>> target.read_bytes(), sorted(p.name for p in target.parent.iterdir())
    (b'pixels', ['slide.tiff'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

def real_path_inside(path: str | Path, roots: Iterable[str | Path]) -> Path | None:
    """The real path of ``path`` (symlinks and ``..`` resolved) if it lies under one of ``roots``
    (resolved likewise), else None. Nothing is opened; a missing file resolves as far as it exists.

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> (root / "link.svs").symlink_to("/etc/hostname")
    >>> inside = real_path_inside(root / "a.svs", [root])
    >>> inside == root.resolve() / "a.svs", real_path_inside(root / "link.svs", [root])
    (True, None)
    """
    real = Path(os.path.realpath(path))
    for root in roots:
        if real.is_relative_to(os.path.realpath(os.path.expanduser(str(root)))):
            return real
    return None


def special_file_kind(mode: int) -> str | None:
    """What a non-regular, non-folder file is ("a named pipe (FIFO)", ...); None for a file or folder.

    >>> import stat
    >>> special_file_kind(stat.S_IFIFO | 0o644), special_file_kind(stat.S_IFREG | 0o644)
    ('a named pipe (FIFO)', None)
    """
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    for test, kind in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"
