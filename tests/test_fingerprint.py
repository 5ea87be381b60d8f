"""Slide fingerprints: what a touch or a rename keeps, what a content change alters, multi-file slides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge.errors import SlideNotFoundError, SlideReadError
from edge.wsi.fingerprint import Fingerprint, fingerprint_slide, slide_files

BLOCK = 16  # small blocks so that tiny files have a middle the quick fingerprint does not read


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_a_fingerprint_records_size_mtime_and_head_tail_hash(tmp_path: Path) -> None:
    slide = _write(tmp_path / "a.svs", b"x" * 100)
    os.utime(slide, ns=(1_000, 2_000))
    fp = fingerprint_slide(slide, block=BLOCK)
    assert (fp.size, fp.mtime_ns) == (100, 2_000)
    assert len(fp.head_tail_sha256) == 64
    assert fp.full_sha256 is None
    assert fp.key.startswith("sha256:")


def test_a_touch_keeps_the_key_and_changes_the_mtime(tmp_path: Path) -> None:
    slide = _write(tmp_path / "a.svs", os.urandom(200))
    before = fingerprint_slide(slide, block=BLOCK)
    os.utime(slide, ns=(before.mtime_ns + 10**9, before.mtime_ns + 10**9))
    after = fingerprint_slide(slide, block=BLOCK)
    assert after.mtime_ns != before.mtime_ns
    assert after.key == before.key


def test_a_rename_keeps_the_key(tmp_path: Path) -> None:
    slide = _write(tmp_path / "a.svs", os.urandom(200))
    before = fingerprint_slide(slide, block=BLOCK)
    moved = slide.rename(tmp_path / "renamed.svs")
    assert fingerprint_slide(moved, block=BLOCK).key == before.key


def test_changed_head_tail_or_size_gives_a_new_key(tmp_path: Path) -> None:
    data = bytearray(os.urandom(200))
    slide = _write(tmp_path / "a.svs", bytes(data))
    key = fingerprint_slide(slide, block=BLOCK).key
    keys = {key}
    for change in (0, len(data) - 1):
        changed = bytearray(data)
        changed[change] ^= 0xFF
        slide.write_bytes(bytes(changed))
        keys.add(fingerprint_slide(slide, block=BLOCK).key)
    slide.write_bytes(bytes(data) + b"\0")
    keys.add(fingerprint_slide(slide, block=BLOCK).key)
    assert len(keys) == 4


def test_quick_mode_samples_the_middle_full_mode_reads_every_byte(tmp_path: Path) -> None:
    data = bytearray(os.urandom(200))
    slide = _write(tmp_path / "a.svs", bytes(data))
    quick = fingerprint_slide(slide, block=BLOCK, sample=4, stride=32)
    full = fingerprint_slide(slide, full=True, block=BLOCK)
    data[110] ^= 0xFF  # the middle, between two samples (4 bytes at 16, 44, 72, 100, 128, 156)
    slide.write_bytes(bytes(data))
    quick2 = fingerprint_slide(slide, block=BLOCK, sample=4, stride=32)
    full2 = fingerprint_slide(slide, full=True, block=BLOCK)
    assert quick2.key == quick.key  # a change shorter than the stride between samples can go unseen
    assert full.full_sha256 is not None and full2.full_sha256 != full.full_sha256
    assert full2.key != full.key


def test_a_megabyte_changed_in_the_middle_of_a_large_file_gives_a_new_key(tmp_path: Path) -> None:
    size = 64 * 2**20
    slide = tmp_path / "a.svs"
    with slide.open("wb") as fh:  # sparse: zeros cost no disk
        fh.truncate(size)
    before = fingerprint_slide(slide)
    with slide.open("r+b") as fh:
        fh.seek(size // 2 - 2**19 + 12345)
        fh.write(b"\x01" * 2**20)
    after = fingerprint_slide(slide)
    assert after.size == before.size and after.head_tail_sha256 == before.head_tail_sha256  # the ends did not change
    assert after.key != before.key


def test_the_key_of_a_slide_without_a_middle_did_not_change_with_sampling(tmp_path: Path) -> None:
    small = fingerprint_slide(_write(tmp_path / "a.svs", os.urandom(30)), block=BLOCK)
    assert small.samples_sha256 is None and small.key == small.legacy_key
    large = fingerprint_slide(_write(tmp_path / "b.svs", os.urandom(200)), block=BLOCK)
    assert large.samples_sha256 is not None and large.key != large.legacy_key
    assert large.legacy_key == Fingerprint(large.size, 0, large.head_tail_sha256).key  # what older versions stored


def test_small_files_are_hashed_whole_in_quick_mode(tmp_path: Path) -> None:
    slide = _write(tmp_path / "a.svs", b"abcdefghij" * 3)  # 30 bytes < 2 blocks
    key = fingerprint_slide(slide, block=BLOCK).key
    slide.write_bytes(b"abcdefghij" * 2 + b"abcdeXghij")
    assert fingerprint_slide(slide, block=BLOCK).key != key


def test_an_mrxs_slide_includes_its_companion_folder(tmp_path: Path) -> None:
    mrxs = _write(tmp_path / "X.mrxs", b"[GENERAL]\n")
    _write(tmp_path / "X" / "Slidedat.ini", b"[GENERAL]\nSLIDE_VERSION=1\n")
    data = _write(tmp_path / "X" / "Data0000.dat", b"d" * 50)
    names = [name for name, _ in slide_files(mrxs)]
    assert names == ["", "Data0000.dat", "Slidedat.ini"]
    fp = fingerprint_slide(mrxs, block=BLOCK)
    assert fp.size == mrxs.stat().st_size + 50 + len(b"[GENERAL]\nSLIDE_VERSION=1\n")
    data.write_bytes(b"e" * 50)
    assert fingerprint_slide(mrxs, block=BLOCK).key != fp.key


def test_an_mrxs_slide_renamed_with_its_folder_keeps_the_key(tmp_path: Path) -> None:
    mrxs = _write(tmp_path / "X.mrxs", b"[GENERAL]\n")
    _write(tmp_path / "X" / "Data0000.dat", os.urandom(64))
    key = fingerprint_slide(mrxs, block=BLOCK).key
    (tmp_path / "X").rename(tmp_path / "Y")
    moved = mrxs.rename(tmp_path / "Y.mrxs")
    assert fingerprint_slide(moved, block=BLOCK).key == key


def test_a_dicom_folder_is_every_dcm_file_in_it(tmp_path: Path) -> None:
    folder = tmp_path / "dicom"
    for i in range(3):
        _write(folder / f"{i:04d}.dcm", os.urandom(40))
    _write(folder / "readme.txt", b"not part of the slide")
    assert [name for name, _ in slide_files(folder)] == ["0000.dcm", "0001.dcm", "0002.dcm"]
    fp = fingerprint_slide(folder, block=BLOCK)
    assert fp.size == 120
    (folder / "readme.txt").write_text("changed")
    assert fingerprint_slide(folder, block=BLOCK).key == fp.key
    _write(folder / "0003.dcm", b"more")
    assert fingerprint_slide(folder, block=BLOCK).key != fp.key


def test_a_folder_without_dcm_files_is_no_slide(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlideReadError, match=r"without \.dcm files"):
        fingerprint_slide(tmp_path / "empty")


def test_a_missing_slide_raises_slide_not_found(tmp_path: Path) -> None:
    with pytest.raises(SlideNotFoundError, match=r"gone\.svs"):
        fingerprint_slide(tmp_path / "gone.svs")


def test_a_block_size_below_one_byte_is_refused(tmp_path: Path) -> None:
    slide = _write(tmp_path / "a.svs", b"x")
    with pytest.raises(ValueError, match="block=0"):
        fingerprint_slide(slide, block=0)


def test_the_key_leaves_out_mtime_but_not_the_full_hash() -> None:
    a = Fingerprint(size=1, mtime_ns=1, head_tail_sha256="00" * 32)
    assert a.key == Fingerprint(size=1, mtime_ns=2, head_tail_sha256="00" * 32).key
    assert a.key != Fingerprint(size=2, mtime_ns=1, head_tail_sha256="00" * 32).key
    assert a.key != Fingerprint(size=1, mtime_ns=1, head_tail_sha256="00" * 32, full_sha256="11" * 32).key
    assert a.to_json_dict()["key"] == a.key
