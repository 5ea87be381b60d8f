"""Synthetic H&E-like whole-slide images with planted mitotic figures, and their truth.

`generate_slide` writes a JPEG-tiled pyramidal TIFF (or OME-TIFF) that tiffslide, OpenSlide
and tifffile read, strip by strip in bounded memory, plus a JSON truth file beside it:

.. code-block:: json

    {"schema": "mitosis-edge/synth-truth/1",
     "slide": "slide.tiff",            // file name of the slide, relative to the JSON
     "width": 40000, "height": 40000,  // level-0 pixels
     "mpp": 0.25, "seed": 0,
     "params": {...},                  // every SynthParams field
     "objects": [{"id": 0,
                  "class": "normal" | "atypical" | "imposter",
                  "shape": "metaphase" | "anaphase" | "prophase"            (normal)
                         | "tripolar" | "lagging" | "ring" | "asymmetric"  (atypical)
                         | "apoptotic" | "pyknotic",                       (imposter)
                  "x_px": 1234.5, "y_px": 987.5,   // level-0 pixels; pixel (i, j) covers
                  "x_um": 308.625, "y_um": 246.875, //   [i, i+1) x [j, j+1); µm = px * mpp
                  "radius_um": 6.1}],               // extent of the chromatin / body
     "hotspot": {"area_mm2": 2.0, "radius_um": 797.88,
                 "center_x_px": ..., "center_y_px": ..., "center_x_um": ..., "center_y_um": ...,
                 "mitotic_count": 17}}            // centre null when there are no mitoses

The hotspot is `edge.analysis.scoring.find_hotspot` over the normal and atypical figures (never the
imposters). Everything is drawn from numpy Generators seeded by `SynthParams.seed`, so the
same parameters give the same bytes.

The package, by concern: ``params`` (what to synthesise), ``section`` (the tissue: stains, smooth
fields, textures, ordinary nuclei), ``sprites`` (nuclei and figures drawn at the slide's mpp),
``figures`` (which figures go where), ``faults`` (blur, folds, pen, stain shift), ``model`` (all of it
rendered block by block), ``truth`` (the JSON above) and ``writer`` (the pyramidal TIFF).
:func:`generate_slide` ties them together; both files appear only complete and synced.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge.analysis.scoring import hotspot_radius_um
from edge.devtools.synth.model import SlideModel
from edge.devtools.synth.params import ATYPICAL_SHAPES, IMPOSTER_SHAPES, NORMAL_SHAPES, SynthParams
from edge.devtools.synth.truth import (
    TRUTH_SCHEMA,
    PlantedObject,
    SynthTruth,
    default_truth_path,
    load_truth,
    truth_hotspot,
)
from edge.devtools.synth.writer import pyramid_shapes, write_pyramid
from edge.fileio import atomic_file

__all__ = [
    "ATYPICAL_SHAPES",
    "IMPOSTER_SHAPES",
    "NORMAL_SHAPES",
    "TRUTH_SCHEMA",
    "PlantedObject",
    "SynthParams",
    "SynthTruth",
    "default_truth_path",
    "generate_slide",
    "load_truth",
    "pyramid_shapes",
]

logger = logging.getLogger(__name__)


def generate_slide(
    out_path: str | Path,
    params: SynthParams,
    truth_path: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SynthTruth:
    """Write a synthetic slide to `out_path` and its truth JSON; return the truth.

    The slide and the truth appear under their names only when complete and synced (written to a
    hidden temporary file and renamed), so a folder watcher never sees half a slide and a crash
    leaves neither half written. `progress(done_rows, total_rows)`
    is called after each strip of level-0 tile rows.
    """
    params.validate()
    out = Path(out_path)
    truth_file = default_truth_path(out) if truth_path is None else Path(truth_path)
    started = time.perf_counter()
    model = SlideModel(params)
    truth = SynthTruth(
        slide=out.name,
        width=params.width,
        height=params.height,
        mpp=params.mpp,
        seed=params.seed,
        params=params,
        objects=tuple(p.truth for p in model.planted),
        hotspot=truth_hotspot(
            np.array(
                [(p.truth.x_um, p.truth.y_um) for p in model.planted if p.truth.is_mitosis],
                dtype=np.float64,
            ).reshape(-1, 2),
            hotspot_radius_um(params.hotspot_area_mm2),
        ),
        faults=model.faults,
    )
    logger.info(
        "synthesising %dx%d px at %.3f µm/px: %d mitoses, %d imposters (planned in %.1f s)",
        params.width,
        params.height,
        params.mpp,
        truth.count("normal") + truth.count("atypical"),
        truth.count("imposter"),
        time.perf_counter() - started,
    )
    with atomic_file(out) as partial:
        write_pyramid(partial, out.name, model, progress)
    with atomic_file(truth_file) as partial_truth:
        partial_truth.write_bytes((json.dumps(truth.to_json_dict(), indent=1) + "\n").encode("utf-8"))
    logger.info("wrote %s in %.1f s", out, time.perf_counter() - started)
    return truth
