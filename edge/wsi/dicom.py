"""Which DICOM files make up one whole-slide image, decided by their content.

A DICOM WSI is the instances of one series (SeriesInstanceUID): a folder of files, or a single
multi-frame file. A label or overview instance alone is no slide. Only headers are read (pydicom,
pixels skipped), and only of regular files: a FIFO or device named ``*.dcm`` is never opened.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DicomInstance", "read_instance", "series_in_folder"]

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "ImageType")


@dataclass(frozen=True)
class DicomInstance:
    """One DICOM file's identity: its series and what its image is (VOLUME, LABEL, OVERVIEW, ...)."""

    path: Path
    study_uid: str
    series_uid: str
    sop_class_uid: str
    image_flavor: str  # ImageType value 3: VOLUME, THUMBNAIL, LABEL, OVERVIEW ("" when absent)

    @property
    def is_wsi_volume(self) -> bool:
        return self.sop_class_uid == WSI_SOP_CLASS and self.image_flavor in ("VOLUME", "THUMBNAIL", "")


def read_instance(path: Path) -> DicomInstance | None:
    """The header of a regular DICOM file, or None when it is not one (yet: a copy may be under way)."""
    import pydicom

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_TAGS))
    except Exception:  # noqa: BLE001 - pydicom raises many kinds on a partial or foreign file
        return None
    image_type = ds.get("ImageType") or []
    flavor = str(image_type[2]).upper() if len(image_type) > 2 else ""
    series = str(ds.get("SeriesInstanceUID") or "")
    if not series:
        return None
    return DicomInstance(path, str(ds.get("StudyInstanceUID") or ""), series, str(ds.get("SOPClassUID") or ""),
                         flavor)


def series_in_folder(folder: Path) -> dict[str, list[DicomInstance]]:
    """The readable ``.dcm`` files of a folder (not below it) by SeriesInstanceUID, each list sorted by name."""
    groups: dict[str, list[DicomInstance]] = {}
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return groups
    for name in names:
        if not name.lower().endswith(".dcm"):
            continue
        instance = read_instance(folder / name)
        if instance is not None:
            groups.setdefault(instance.series_uid, []).append(instance)
    return groups
