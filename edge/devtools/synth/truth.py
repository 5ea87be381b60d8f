"""The truth of a synthetic slide: every planted object, the hotspot and the scan faults, and its JSON form."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from scipy.spatial import cKDTree

from edge.analysis.scoring import BOUNDARY_TOLERANCE, Hotspot, find_hotspot
from edge.devtools.synth import faults as synth_faults
from edge.devtools.synth.params import SynthParams

TRUTH_SCHEMA = "mitosis-edge/synth-truth/1"

Float64Array = NDArray[np.float64]


@dataclass(frozen=True)
class PlantedObject:
    """One planted figure: a mitosis (normal or atypical) or an imposter that resembles one."""

    id: int
    object_class: Literal["normal", "atypical", "imposter"]
    shape: str
    x_px: float
    y_px: float
    x_um: float
    y_um: float
    radius_um: float

    @property
    def is_mitosis(self) -> bool:
        return self.object_class != "imposter"

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "class": self.object_class,
            "shape": self.shape,
            "x_px": self.x_px,
            "y_px": self.y_px,
            "x_um": self.x_um,
            "y_um": self.y_um,
            "radius_um": self.radius_um,
        }


@dataclass(frozen=True)
class SynthTruth:
    """What was planted in a synthetic slide, and its hotspot (µm, from `find_hotspot`)."""

    slide: str
    width: int
    height: int
    mpp: float
    seed: int
    params: SynthParams
    objects: tuple[PlantedObject, ...]
    hotspot: Hotspot
    faults: synth_faults.PlantedFaults = dataclasses.field(default_factory=synth_faults.PlantedFaults)

    def mitotic_points_um(self) -> Float64Array:
        """(N, 2) x, y in µm of the normal and atypical figures."""
        points = [(o.x_um, o.y_um) for o in self.objects if o.is_mitosis]
        return np.array(points, dtype=np.float64).reshape(-1, 2)

    def count(self, object_class: str) -> int:
        return sum(1 for o in self.objects if o.object_class == object_class)

    def counts(self) -> dict[str, int]:
        """Planted objects per class: {"normal": .., "atypical": .., "imposter": ..}."""
        return {name: self.count(name) for name in ("normal", "atypical", "imposter")}

    def to_json_dict(self) -> dict[str, Any]:
        hotspot = self.hotspot
        centred = math.isfinite(hotspot.center_x_um)
        return {
            "schema": TRUTH_SCHEMA,
            "slide": self.slide,
            "width": self.width,
            "height": self.height,
            "mpp": self.mpp,
            "seed": self.seed,
            "params": asdict(self.params),
            "objects": [o.to_json_dict() for o in self.objects],
            "hotspot": {
                "area_mm2": hotspot.area_mm2,
                "radius_um": hotspot.radius_um,
                "center_x_px": hotspot.center_x_um / self.mpp if centred else None,
                "center_y_px": hotspot.center_y_um / self.mpp if centred else None,
                "center_x_um": hotspot.center_x_um if centred else None,
                "center_y_um": hotspot.center_y_um if centred else None,
                "mitotic_count": hotspot.mitotic_count,
            },
            "faults": self.faults.to_json_dict(),
        }

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> SynthTruth:
        if data.get("schema") != TRUTH_SCHEMA:
            raise ValueError(f"schema={data.get('schema')!r}, expected {TRUTH_SCHEMA!r}")
        known = {f.name for f in fields(SynthParams)}
        params = SynthParams(**{k: v for k, v in data["params"].items() if k in known})
        objects = tuple(
            PlantedObject(
                id=int(o["id"]),
                object_class=o["class"],
                shape=str(o["shape"]),
                x_px=float(o["x_px"]),
                y_px=float(o["y_px"]),
                x_um=float(o["x_um"]),
                y_um=float(o["y_um"]),
                radius_um=float(o["radius_um"]),
            )
            for o in data["objects"]
        )
        spot = data["hotspot"]
        hotspot = Hotspot(
            center_x_um=math.nan if spot["center_x_um"] is None else float(spot["center_x_um"]),
            center_y_um=math.nan if spot["center_y_um"] is None else float(spot["center_y_um"]),
            radius_um=float(spot["radius_um"]),
            mitotic_count=int(spot["mitotic_count"]),
        )
        return cls(
            slide=str(data["slide"]),
            width=int(data["width"]),
            height=int(data["height"]),
            mpp=float(data["mpp"]),
            seed=int(data["seed"]),
            params=params,
            objects=objects,
            hotspot=hotspot,
            faults=synth_faults.PlantedFaults.from_json_dict(data.get("faults")),
        )


def default_truth_path(out_path: str | Path) -> Path:
    """Where the truth JSON goes: "x/slide.tiff" -> "x/slide.truth.json".

    Only the last suffix goes ("x/slide.ome.tiff" -> "x/slide.ome.truth.json"), so a TIFF
    and an OME-TIFF of the same name never share a truth file.
    """
    path = Path(out_path)
    return path.with_name(path.stem + ".truth.json")


def load_truth(path: str | Path) -> SynthTruth:
    """Read a truth JSON written by `generate_slide`."""
    with open(path, encoding="utf-8") as fh:
        return SynthTruth.from_json_dict(json.load(fh))


def truth_hotspot(points_um: Float64Array, radius_um: float) -> Hotspot:
    """`find_hotspot`, with ties going to the circle best centred on the figures it holds.

    Without it an equal-count circle may hang off the slide's edge (lowest y wins), which
    is a correct count but a poor field to show a pathologist.
    """
    if len(points_um) == 0:
        return find_hotspot(points_um, radius_um)
    tree = cKDTree(points_um)
    counting_radius = radius_um * (1.0 + BOUNDARY_TOLERANCE)

    def centred(centres: Float64Array) -> Float64Array:
        members = tree.query_ball_point(centres, counting_radius)
        means = np.array([points_um[m].mean(axis=0) for m in members])
        return np.asarray(-np.hypot(*(means - centres).T), dtype=np.float64)

    return find_hotspot(points_um, radius_um, tie_break=centred)
