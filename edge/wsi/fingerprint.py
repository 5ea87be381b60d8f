"""Identity of a slide on disk: size, mtime and a hash of sampled blocks (or of every byte).

A slide is one file, or an ``.mrxs`` file plus its companion folder, or a folder of DICOM ``.dcm``
files. The fingerprint's :attr:`Fingerprint.key` leaves out the mtime and the path, so a touch or a
rename of the same bytes keeps the key while a changed file gets a new one.

The quick fingerprint hashes each file's first and last MiB and a 4 KiB sample every MiB in
between (at most MAX_SAMPLES samples, evenly spread: files over ~2 GiB are sampled more sparsely).
So any change of at least 1 MiB anywhere in a file up to 2 GiB is seen, and of at least
size/2048 beyond; a smaller change in the middle of a file whose size and ends stay the same can go
unseen (a scanner rewrites a whole file, so this is rare); ``watch.fingerprint = "full"`` hashes
every byte. Reading 2048 samples of 4 KiB costs a few ms on local disks and about a second on NFS.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edge.errors import SlideNotFoundError, SlideReadError
from edge.fileio import special_file_kind

DEFAULT_BLOCK = 1 << 20  # bytes hashed at each end of every file of a quick fingerprint
SAMPLE_BYTES = 4096  # bytes hashed at each sample between the ends
SAMPLE_STRIDE = 1 << 20  # a sample every MiB between the ends ...
MAX_SAMPLES = 2048  # ... but at most this many per file (8 MiB read)
READ_CHUNK = 1 << 22  # bytes read at once for a full hash

__all__ = ["DEFAULT_BLOCK", "Fingerprint", "fingerprint_slide", "sample_offsets", "slide_files"]


@dataclass(frozen=True)
class Fingerprint:
    """What identifies one version of a slide's bytes.

    >>> fp = Fingerprint(size=10, mtime_ns=1, head_tail_sha256="ab" * 32, full_sha256=None)
    >>> fp.key == Fingerprint(10, 99, "ab" * 32, None).key   # a touch keeps the key
    True
    >>> fp.key.startswith("sha256:")
    True
    """

    size: int  # bytes, summed over every file of the slide
    mtime_ns: int  # newest modification time among the slide's files
    head_tail_sha256: str
    full_sha256: str | None = None  # only when a full hash was asked for
    samples_sha256: str | None = None  # the blocks sampled between head and tail; None: no file had a middle

    @property
    def key(self) -> str:
        """``sha256:<hex>`` of size and content hashes: the same bytes under any name or mtime share it."""
        return _key(self.size, self.head_tail_sha256, self.samples_sha256, self.full_sha256)

    @property
    def legacy_key(self) -> str:
        """The key versions before the sampled middle gave the same bytes (head and tail only). Equal to
        ``key`` for slides without a middle; the daemon treats a job stored under it as the same slide."""
        return _key(self.size, self.head_tail_sha256, None, self.full_sha256)

    def to_json_dict(self) -> dict[str, object]:
        return {
            "key": self.key,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "head_tail_sha256": self.head_tail_sha256,
            "samples_sha256": self.samples_sha256,
            "full_sha256": self.full_sha256,
        }


def _key(size: int, head_tail: str, samples: str | None, full: str | None) -> str:
    text = f"{size}:{head_tail}"
    if samples is not None:
        text += f":samples:{samples}"
    if full is not None:
        text += f":{full}"
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def sample_offsets(size: int, block: int, *, stride: int = SAMPLE_STRIDE, max_samples: int = MAX_SAMPLES) -> list[int]:
    """Where the quick fingerprint samples a file of ``size`` bytes between its head and tail blocks: evenly,
    at most ``stride`` apart (further apart only past ``max_samples``).

    >>> sample_offsets(8, 4), sample_offsets(20, 4, stride=4)
    ([], [4, 8, 12])
    """
    middle = size - 2 * block
    if middle <= 0:
        return []
    count = min(max_samples, -(-middle // stride))
    return [block + (middle * k) // count for k in range(count)]


def mrxs_companion(path: Path) -> Path:
    """The companion folder of an MRXS slide: ``X.mrxs`` -> ``X/``."""
    return path.with_suffix("")


def slide_files(path: Path) -> list[tuple[str, Path]]:
    """The files making up a slide, each with the name it is hashed under, in a stable order.

    A plain file is hashed under the empty name (so a rename keeps its key); the files of an MRXS
    companion folder and of a DICOM folder under their path inside that folder.
    Raises :class:`SlideNotFoundError` when the slide is gone.
    """
    try:
        if path.is_dir():
            dcm = sorted(p.name for p in path.iterdir() if p.suffix.lower() == ".dcm" and p.is_file())
            if not dcm:
                raise SlideReadError(path, "is a folder without .dcm files; not a DICOM slide (yet)")
            return [(name, path / name) for name in dcm]
        if not path.is_file():
            if path.exists() and (kind := special_file_kind(path.stat().st_mode)) is not None:
                raise SlideReadError(path, f"is {kind}, not a regular file; only slide files are read")
            raise SlideNotFoundError(path, "no such file; it was removed or renamed")
        files = [("", path)]
        if path.suffix.lower() == ".mrxs":
            folder = mrxs_companion(path)
            if folder.is_dir():
                files += sorted((p.relative_to(folder).as_posix(), p) for p in _walk_files(folder))
        return files
    except SlideReadError:
        raise
    except OSError as exc:
        raise SlideReadError(path, f"listing its files failed: {exc}") from exc


def _walk_files(folder: Path) -> Iterator[Path]:
    for root, _dirs, names in os.walk(folder):
        for name in names:
            yield Path(root, name)


def fingerprint_slide(
    path: Path,
    *,
    full: bool = False,
    block: int = DEFAULT_BLOCK,
    sample: int = SAMPLE_BYTES,
    stride: int = SAMPLE_STRIDE,
) -> Fingerprint:
    """Fingerprint a slide: every file's size, its first and last ``block`` bytes and ``sample`` bytes every
    ``stride`` bytes in between (see ``sample_offsets``); all bytes too if ``full``.

    Files no larger than two blocks are hashed whole even in the quick mode.
    Raises :class:`SlideReadError` (:class:`SlideNotFoundError` if it vanished) when a file cannot be read.
    """
    if block < 1:
        raise ValueError(f"block={block} must be at least 1 byte")
    path = Path(path)
    head_tail = hashlib.sha256()
    samples = hashlib.sha256()
    sampled = False
    whole = hashlib.sha256() if full else None
    size = 0
    mtime_ns = 0
    for name, file in slide_files(path):
        try:
            with file.open("rb") as fh:
                st = os.fstat(fh.fileno())
                size += st.st_size
                mtime_ns = max(mtime_ns, st.st_mtime_ns)
                head_tail.update(f"{name}\0{st.st_size}\0".encode())
                head_tail.update(fh.read(block))
                if st.st_size > block:
                    fh.seek(max(block, st.st_size - block))
                    head_tail.update(fh.read(block))
                for offset in sample_offsets(st.st_size, block, stride=stride):
                    fh.seek(offset)
                    samples.update(fh.read(sample))
                    sampled = True
                if whole is not None:
                    whole.update(f"{name}\0{st.st_size}\0".encode())
                    fh.seek(0)
                    while chunk := fh.read(READ_CHUNK):
                        whole.update(chunk)
        except FileNotFoundError as exc:
            raise SlideNotFoundError(path, f"{file} vanished while fingerprinting; it was removed or renamed") from exc
        except OSError as exc:
            raise SlideReadError(path, f"reading {file} for its fingerprint failed: {exc}") from exc
    return Fingerprint(
        size=size,
        mtime_ns=mtime_ns,
        head_tail_sha256=head_tail.hexdigest(),
        full_sha256=whole.hexdigest() if whole is not None else None,
        samples_sha256=samples.hexdigest() if sampled else None,
    )
