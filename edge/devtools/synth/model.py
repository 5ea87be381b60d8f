"""The slide model: a tissue section, the planted figures and the scan faults, rendered block by block.

:class:`SlideModel` decides everything from the seed before a pixel is rendered; ``render`` then gives
any block's RGB pixels, the same whichever way the slide is cut into blocks (the render margin covers
the widest blur).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from edge.analysis.scoring import hotspot_radius_um
from edge.devtools.synth import faults as synth_faults
from edge.devtools.synth.figures import plan_objects, stamp_objects
from edge.devtools.synth.params import SynthParams
from edge.devtools.synth.section import _E_MAX, _H_MAX, Section, _Nuclei
from edge.devtools.synth.truth import truth_hotspot

Float32Array = NDArray[np.float32]
Float64Array = NDArray[np.float64]
UInt8Array = NDArray[np.uint8]

MAX_FAULT_SIGMA_PX = 16.0  # a planted blur's sigma at most (the render margin is 3 sigma)
STREAM_FAULTS = 8  # random stream (see section.py for the others)


class SlideModel:
    """Everything about one synthetic slide that is decided before rendering a pixel."""

    def __init__(self, params: SynthParams) -> None:
        self.params = params
        self.mpp = params.mpp
        ts = params.tile_size
        fault_sigma = MAX_FAULT_SIGMA_PX if params.blur_regions or params.blur_hotspot else 0.0
        widest = max(params.blur_sigma, fault_sigma)
        self.margin = math.ceil(3.0 * widest) if widest > 0 else 0
        self.max_block = (ts + 2 * self.margin, ts * max(1, 1024 // ts) + 2 * self.margin)
        self.section = Section(params, self.margin, self.max_block)
        self.planted = plan_objects(self.section)
        self._planted_boxes = np.array(
            [(p.top, p.left, p.bottom, p.right) for p in self.planted], dtype=np.int64
        ).reshape(-1, 4)
        self.section.keep_nuclei_away(
            np.array([(p.truth.y_px, p.truth.x_px) for p in self.planted], dtype=np.float64).reshape(-1, 2),
            np.array([p.exclusion_um / self.mpp for p in self.planted], dtype=np.float64),
        )
        self.faults = self._plan_faults()

    def nuclei_for_rows(self, y0: int, y1: int) -> _Nuclei:
        """The ordinary nuclei that may touch rows [y0, y1); called from one thread only."""
        return self.section.nuclei_for_rows(y0, y1)

    def _plan_faults(self) -> synth_faults.PlantedFaults:
        """Blurred discs (one over the hotspot if asked), folds and pen strokes, plus the slide's stain vectors."""
        params = self.params
        section = self.section
        h_od, e_od = section.stain_od
        stains = synth_faults.PlantedFaults(
            stain_shift_deg=params.stain_shift,
            hematoxylin_od=tuple(float(v) for v in h_od),
            eosin_od=tuple(float(v) for v in e_od),
        )
        if not (params.blur_regions or params.blur_hotspot or params.folds or params.pen_strokes):
            return stains
        rng = np.random.default_rng([params.seed, STREAM_FAULTS])
        margin = 0.1 * min(params.width, params.height)

        def tissue_point() -> tuple[float, float]:
            ys = rng.uniform(margin, params.height - margin, 256)
            xs = rng.uniform(margin, params.width - margin, 256)
            well_inside = section.tissue_threshold + section.tissue_softness
            inside = np.flatnonzero(section.tissue_value_at(ys, xs) > well_inside)
            i = int(inside[0]) if len(inside) else 0
            return float(ys[i]), float(xs[i])

        hotspot_px = None
        if params.blur_hotspot:
            points = np.array([(p.truth.x_um, p.truth.y_um) for p in self.planted if p.truth.is_mitosis]).reshape(-1, 2)
            spot = truth_hotspot(points, hotspot_radius_um(params.hotspot_area_mm2))
            if math.isfinite(spot.center_x_um):
                radius_um = min(0.5 * spot.radius_um, 0.3 * min(params.width, params.height) * self.mpp)
                hotspot_px = (spot.center_x_um / self.mpp, spot.center_y_um / self.mpp, radius_um / self.mpp)
        planned = synth_faults.plan_faults(
            rng, width=params.width, height=params.height, mpp=self.mpp, blur_regions=params.blur_regions,
            folds=params.folds, pen_strokes=params.pen_strokes, tissue_point=tissue_point, hotspot_px=hotspot_px,
            max_sigma_px=MAX_FAULT_SIGMA_PX,
        )
        return dataclasses.replace(
            planned,
            stain_shift_deg=stains.stain_shift_deg,
            hematoxylin_od=stains.hematoxylin_od,
            eosin_od=stains.eosin_od,
        )

    def render(self, y0: int, x0: int, h: int, w: int, nuclei: _Nuclei) -> UInt8Array:
        """RGB pixels of level-0 rows [y0, y0+h) and columns [x0, x0+w). Thread-safe."""
        m = self.margin
        ry, rx, rh, rw = y0 - m, x0 - m, h + 2 * m, w + 2 * m
        if rh > self.max_block[0] or rw > self.max_block[1]:
            raise ValueError(f"block {h}x{w} larger than {self.max_block} less the blur margin")
        section = self.section
        t = section.textures
        fields_ = section.block_fields(ry, rx, rh, rw)
        coarse_tissue = section.tissue[fields_.iy, fields_.ix]
        edge_reach = section.tissue_wiggle * section.tissue_edge_max + section.tissue_softness
        low, high = float(coarse_tissue.min()), float(coarse_tissue.max())
        if high + edge_reach < section.tissue_threshold and not self._objects_in(ry, rx, rh, rw):
            return self._finish(None, None, y0, x0, h, w)

        py, px = ry % t.period, rx % t.period
        if low - edge_reach > section.tissue_threshold:
            alpha: Float32Array | float = 1.0
        else:
            value = fields_.sample(section.tissue)
            value += section.tissue_wiggle * t.tissue_edge[py : py + rh, px : px + rw]
            value -= section.tissue_threshold
            value *= 1.0 / section.tissue_softness
            value += 0.5
            alpha = np.clip(value, 0.0, 1.0, out=value)

        # Eosin: fibrous stroma blended into granular cytoplasm where cells are dense.
        orientation = fields_.sample(section.orientation)
        cellularity = fields_.sample(section.cellularity)
        fibre_b = t.fibre_b[py : py + rh, px : px + rw]
        eosin = t.fibre_a[py : py + rh, px : px + rw] - fibre_b
        eosin *= orientation
        eosin += fibre_b
        cytoplasm = t.cytoplasm[py : py + rh, px : px + rw] - eosin
        cytoplasm *= cellularity
        eosin += cytoplasm
        # Haematoxylin background: faint in stroma, bluish cytoplasm in cellular sheets.
        hematoxylin = cellularity * np.float32(0.12)
        hematoxylin += np.float32(0.05)
        hematoxylin *= t.cytoplasm[py : py + rh, px : px + rw]
        if not isinstance(alpha, float):
            eosin *= alpha
            hematoxylin *= alpha

        section.stamp_nuclei(hematoxylin, eosin, ry, rx, nuclei)
        stamp_objects(self.planted, self._planted_boxes, hematoxylin, eosin, ry, rx)
        hematoxylin *= fields_.sample(section.hematoxylin_level)
        eosin *= fields_.sample(section.eosin_level)
        if self.faults.folds:
            synth_faults.fold_block(hematoxylin, eosin, self.faults.folds, ry, rx)
        if self.faults.blur:
            synth_faults.blur_block(hematoxylin, eosin, self.faults.blur, ry, rx)
        if self.params.blur_sigma > 0:
            sigma = self.params.blur_sigma
            hematoxylin = ndimage.gaussian_filter(hematoxylin, sigma, mode="nearest")
            eosin = ndimage.gaussian_filter(eosin, sigma, mode="nearest")
        if m:
            hematoxylin, eosin = hematoxylin[m:-m, m:-m], eosin[m:-m, m:-m]
        return self._finish(hematoxylin, eosin, y0, x0, h, w)

    def _objects_in(self, y: int, x: int, h: int, w: int) -> bool:
        boxes = self._planted_boxes
        return bool(np.any((boxes[:, 0] < y + h) & (boxes[:, 2] > y) & (boxes[:, 1] < x + w) & (boxes[:, 3] > x)))

    def _finish(
        self,
        hematoxylin: Float32Array | None,
        eosin: Float32Array | None,
        y0: int,
        x0: int,
        h: int,
        w: int,
    ) -> UInt8Array:
        """Stain amounts -> RGB through the look-up table, then sensor noise."""
        if hematoxylin is None or eosin is None:
            rgb = np.empty((h, w, 3), np.uint8)
            rgb[:] = self.section.background_rgb
        else:
            hematoxylin *= np.float32(255.0 / _H_MAX)
            eosin *= np.float32(255.0 / _E_MAX)
            np.clip(hematoxylin, 0.0, 255.0, out=hematoxylin)
            np.clip(eosin, 0.0, 255.0, out=eosin)
            index = hematoxylin.astype(np.uint16)
            index <<= 8
            index |= eosin.astype(np.uint16)
            rgb = np.take(self.section.lut, index, axis=0)
        t = self.section.textures
        if t.noise is not None:
            ny, nx = y0 % t.noise_period, x0 % t.noise_period
            noisy = rgb.astype(np.int16)
            noisy += t.noise[ny : ny + h, nx : nx + w]
            np.clip(noisy, 0, 255, out=noisy)
            rgb = noisy.astype(np.uint8)
        if self.faults.pen:
            rgb = synth_faults.pen_block(rgb, self.faults.pen, y0, x0)
        return rgb
