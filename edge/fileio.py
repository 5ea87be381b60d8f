"""Writing files so that a reader never sees half of one and a crash leaves none behind; paths kept inside roots."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
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
