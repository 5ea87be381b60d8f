"""A pathologist's review of the hotspot (issue 19): decisions on figures to reviewed counts. Pure.

Each candidate in the hotspot starts with the model's class ("normal", "atypical", "uncertain" or
"non_mitotic"). The reviewer's decisions:

- ``confirm``: the model's class is right (for a rejected look-alike: it is indeed not mitotic);
- ``reject``: not a mitotic figure;
- ``normal`` / ``atypical``: a mitotic figure of that subtype (changes the subtype, or accepts a look-alike);
- ``add``: a mitotic figure the model missed, at (x_px, y_px) level-0 pixels, subtype normal, atypical
  or uncertain.

Figures without a decision keep the model's class. The reviewed counts follow the automatic result's
rules: MC = normal + atypical + uncertain; the AMF/NMF ratio is atypical / normal (None when no normal).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edge.errors import ReviewError
from edge.vocab import DetectionClass

__all__ = ["DECISIONS", "MAX_CHANGES", "Change", "agreement", "parse_changes", "reviewed_class", "reviewed_counts"]

DECISIONS = ("confirm", "reject", "normal", "atypical", "add")
MITOTIC = tuple(c.value for c in DetectionClass if c is not DetectionClass.NON_MITOTIC)  # MF subtypes
MAX_CHANGES = 5000


@dataclass(frozen=True)
class Change:
    """One decision: on a stored detection (`detection_id`), or an added figure (`x_px`, `y_px`, `subtype`)."""

    decision: str
    detection_id: int | None = None
    x_px: float | None = None
    y_px: float | None = None
    subtype: str | None = None

    def to_json_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def parse_changes(raw: Any, known_ids: Mapping[int, str]) -> list[Change]:
    """Check a review's decisions (JSON from the page) against the figures on review (id -> model class).

    >>> parse_changes([{"decision": "reject", "detection_id": 3}], {3: "normal"})
    [Change(decision='reject', detection_id=3, x_px=None, y_px=None, subtype=None)]
    """
    if not isinstance(raw, list):
        raise ReviewError("changes must be a list of decisions")
    if len(raw) > MAX_CHANGES:
        raise ReviewError(f"{len(raw)} decisions are more than {MAX_CHANGES}; sign fewer at a time")
    changes: list[Change] = []
    decided: set[int] = set()
    for index, item in enumerate(raw):
        where = f"decision {index + 1}"
        if not isinstance(item, dict) or item.get("decision") not in DECISIONS:
            raise ReviewError(f"{where}: 'decision' must be one of {', '.join(DECISIONS)}")
        decision = str(item["decision"])
        if decision == "add":
            x, y, subtype = item.get("x_px"), item.get("y_px"), item.get("subtype", "normal")
            if not all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in (x, y)):
                raise ReviewError(f"{where}: an added figure needs x_px and y_px, level-0 pixels of 0 or more")
            if subtype not in MITOTIC:
                raise ReviewError(f"{where}: an added figure's subtype must be one of {', '.join(MITOTIC)}")
            changes.append(Change("add", x_px=float(x), y_px=float(y), subtype=str(subtype)))  # type: ignore[arg-type]
            continue
        detection_id = item.get("detection_id")
        if not isinstance(detection_id, int) or isinstance(detection_id, bool) or detection_id not in known_ids:
            raise ReviewError(f"{where}: detection {detection_id!r} is not a figure of this hotspot")
        if detection_id in decided:
            raise ReviewError(f"{where}: detection {detection_id} has two decisions; keep one")
        decided.add(detection_id)
        changes.append(Change(decision, detection_id=detection_id))
    return changes


def reviewed_class(model_class: str, decision: str | None) -> str:
    """The class after a decision: "normal", "atypical", "uncertain" or "non_mitotic".

    >>> reviewed_class("non_mitotic", "atypical"), reviewed_class("uncertain", "confirm")
    ('atypical', 'uncertain')
    """
    if decision in (None, "confirm"):
        return model_class
    if decision == "reject":
        return DetectionClass.NON_MITOTIC.value
    return str(decision)


def reviewed_counts(figures: Mapping[int, str], changes: Sequence[Change]) -> dict[str, Any]:
    """Hotspot counts after the decisions; `figures` maps each detection id in the hotspot to its model class.

    >>> reviewed_counts({1: "normal", 2: "atypical", 3: "non_mitotic"},
    ...                 [Change("reject", 2), Change("normal", 3), Change("add", x_px=1, y_px=1, subtype="atypical")])
    {'mitotic': 3, 'atypical': 1, 'normal': 2, 'uncertain': 0, 'atypical_ratio': 0.5}
    """
    decisions = {c.detection_id: c.decision for c in changes if c.detection_id is not None}
    classes = [reviewed_class(kind, decisions.get(i)) for i, kind in figures.items()]
    classes += [str(c.subtype) for c in changes if c.decision == "add"]
    return counts_of(classes)


def counts_of(classes: Sequence[str]) -> dict[str, Any]:
    normal, atypical, uncertain = (sum(1 for c in classes if c == kind) for kind in MITOTIC)
    return {
        "mitotic": normal + atypical + uncertain,
        "atypical": atypical,
        "normal": normal,
        "uncertain": uncertain,
        "atypical_ratio": atypical / normal if normal else None,
    }


def agreement(figures: Mapping[int, str], changes: Sequence[Change]) -> tuple[int, int]:
    """(figures the reviewer left as the model said, figures judged in all, added ones included).

    >>> agreement({1: "normal", 2: "atypical"}, [Change("reject", 2), Change("add", x_px=0, y_px=0, subtype="normal")])
    (1, 3)
    """
    decisions = {c.detection_id: c.decision for c in changes if c.detection_id is not None}
    kept = sum(1 for i, kind in figures.items() if reviewed_class(kind, decisions.get(i)) == kind)
    added = sum(1 for c in changes if c.decision == "add")
    return kept, len(figures) + added
