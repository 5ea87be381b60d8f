#!/usr/bin/env python3
"""Train the demo bundle (``engines/demo``): a tiny YOLO-style detector and two tiny classifiers.

For demonstration and tests only: the models learn the figures that ``edge.devtools.synth`` draws, never
real tissue, and must not be used for diagnosis.

    pip install -e ".[train]"
    python tools/train_demo_models.py --out engines/demo [--work DIR] [--seed 0] [--quick]

Steps, all seeded:

1. synthesise training, validation and test slides (fixed seeds, cached in ``--work``);
2. train the detector on 256 px crops of the training slides (fully convolutional, so it runs on
   1024 px tiles unchanged);
3. run it over the training slides and keep its false positives as hard negatives;
4. train two classifiers of different architectures (DenseNet-like, EfficientNet-like), each with a
   mitotic-figure head and an atypical head, on 96 px crops;
5. export each to ONNX (float NCHW, dynamic batch, opset 17) and wrap it with
   ``edge.engines.wrap.wrap_model`` so the bundle's files take uint8 NHWC RGB;
6. run the wrapped files with ONNX Runtime over the held-out slides, tile by tile as the pipeline
   reads them (``edge.wsi.stream``), and choose there the detector's score threshold, the ensemble
   weights and the mitotic threshold (as the paper does); measure the test slide with them;
7. write ``manifest.toml``, ``MODEL_CARD.md`` and ``training_report.json``; check the bundle
   with ``edge.engines.manifest.load_bundle``.

Detector output (``yolo_raw``, C=1 class "mitotic_figure", sigmoid applied inside the graph):
the backbone has stride 16, so a 1024 px tile gives a 64x64 grid and ``N = 4096`` rows; row
``n = gy * 64 + gx`` belongs to grid cell (gx, gy) and holds, in input pixels (pixel j spans
[j, j+1))::

    cx = (gx + 0.5 + 2 * tanh(t0)) * 16      # the centre may lie up to 2 cells away
    cy = (gy + 0.5 + 2 * tanh(t1)) * 16
    w  = 128 * sigmoid(t2),  h = 128 * sigmoid(t3)
    objectness = sigmoid(t4)   # a mitosis-like figure (MF or imposter) is centred near this cell
    p_mf       = sigmoid(t5)   # P(mitotic figure | figure)

The candidate score is ``objectness * p_mf`` (the YOLOv5 convention); candidates at or above the
manifest's ``score_threshold`` go through NMS, and the classifiers decide. Imposters are trained
as objects on purpose: the detector proposes everything that looks mitosis-like, and its class
score only ranks them, so a low threshold keeps the recall high.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.stats import rankdata

from edge.config import Config
from edge.devtools.synth import SynthParams, default_truth_path, generate_slide, load_truth
from edge.engines.manifest import Normalisation, load_bundle, sha256_file
from edge.wsi.slide import BACKGROUND, open_slide
from edge.wsi.stream import open_stream, plan_slide

log = logging.getLogger("train_demo_models")

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "engines" / "demo"
BUNDLE_VERSION = "0.1.0"
MPP = 0.25  # µm/px of every model input
TILE = 1024  # detector input side, px
STRIDE = 16  # detector grid cell, px
OFFSET_CELLS = 2.0  # a cell's predicted centre lies within ± this many cells of it
MAX_BOX = 128.0  # px: the largest box side the detector can say
CROP = 96  # classifier input side, px (24 µm: the largest figure plus its halo and some context)
MATCH_RADIUS_PX = 30.0  # 7.5 µm: a detection this close to a planted MF finds it (the evaluation's rule)
POS_RADIUS_PX = 14.0  # detector cells whose centre is this close to a figure are trained as positives
IGNORE_RADIUS_PX = 28.0  # cells between POS and this radius are left out of the objectness loss
NEGATIVE_CLEARANCE_PX = 40.0  # a negative crop centre is at least this far from any planted object
NMS_IOU = 0.45
MAX_DETECTIONS = 300
RECALL_MARGIN = 1.5  # see choose_score_threshold
TARGET_RECALL = 0.99  # validation recall the detector threshold keeps (with the margin)
F1_TIE = 0.005  # validation F1 differences below this (about one figure in 100) count as ties
CLASSIFY_FLOOR = 0.05  # validation classifies every candidate scoring at least this (or the threshold, if lower)
MERGE_RADIUS_UM = 6.0  # planted objects are >= 20 µm apart; duplicates of one figure are much closer
ORT_THREADS = 2
TORCH_THREADS = 2

DETECTOR_CLASSES = ("mitotic_figure",)
# Pixel conventions of the float models (baked into the ONNX graph by the wrap step).
DETECTOR_NORM = Normalisation(scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
DENSENET_NORM = Normalisation(scale=1 / 255, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
# The EfficientNet-like classifier is trained on BGR pixels, as many OpenCV-fed models are: the
# bundle then exercises the wrap step's channel reordering end to end.
EFFNET_NORM = Normalisation(scale=1 / 127.5, mean=(1.0, 1.0, 1.0), std=(1.0, 1.0, 1.0))

CLASS_CODES = {"normal": 0, "atypical": 1, "imposter": 2}


# --------------------------------------------------------------------------------------------
# run plan


@dataclass(frozen=True)
class SlideSpec:
    name: str
    role: Literal["train", "val", "test"]
    params: SynthParams


@dataclass(frozen=True)
class RunPlan:
    """Everything that differs between a full run and a ``--quick`` smoke run."""

    quick: bool
    slides: tuple[SlideSpec, ...]
    detector_steps: int
    detector_batch: int
    detector_crop: int
    classifier_steps: int
    classifier_batch: int
    speed_repeats: int

    def role(self, role: str) -> list[SlideSpec]:
        return [s for s in self.slides if s.role == role]


# Training slides: (mpp, stain_jitter, blur_sigma, noise_sigma, jpeg_quality). They vary staining,
# focus, noise, compression and scanner resolution (0.5 and 0.23 µm/px slides are read resampled
# to 0.25, as the pipeline reads them), so the models see more than the generator's defaults.
TRAIN_VARIANTS = (
    (0.25, 0.08, 0.0, 3.0, 85),  # the generator's defaults
    (0.25, 0.14, 0.5, 5.0, 75),
    (0.25, 0.20, 0.0, 6.0, 70),
    (0.25, 0.10, 1.2, 3.0, 90),
    (0.50, 0.12, 0.0, 3.0, 85),
    (0.25, 0.08, 0.0, 3.0, 85),
    (0.25, 0.16, 0.8, 4.0, 80),
    (0.23, 0.10, 0.3, 3.0, 85),
    (0.25, 0.12, 0.0, 5.0, 70),
    (0.50, 0.08, 0.5, 3.0, 90),
)
TRAIN_SIDE_UM = 2048.0  # each training slide is 2048 µm square (8192 px at 0.25 µm/px)


def side_px(side_um: float, mpp: float) -> int:
    """Level-0 pixels for a side of ``side_um`` at ``mpp``, a multiple of 16 (the generator's tiles)."""
    return round(side_um / mpp / 16) * 16


def make_plan(quick: bool) -> RunPlan:
    """Slides and training lengths. Seeds 1001+ train, 2001+ validate, 3001+ test: none is used elsewhere."""
    if quick:
        train = tuple(
            SlideSpec(f"train-{seed}", "train", SynthParams(width=2048, height=2048, seed=seed, mitoses=12,
                                                             imposters=12, atypical_fraction=0.45))
            for seed in (1001, 1002)
        )
        tiny_val = SlideSpec("val-2001", "val", SynthParams(width=2048, height=2048, seed=2001, mitoses=10,
                                                            imposters=10))
        return RunPlan(True, (*train, tiny_val), detector_steps=25, detector_batch=8, detector_crop=256,
                       classifier_steps=25, classifier_batch=32, speed_repeats=2)
    train = tuple(
        SlideSpec(f"train-{1001 + i}", "train", SynthParams(
            width=side_px(TRAIN_SIDE_UM, mpp), height=side_px(TRAIN_SIDE_UM, mpp), seed=1001 + i, mpp=mpp,
            mitoses=100, imposters=80, atypical_fraction=0.45, cluster_fraction=0.3, stain_jitter=jitter,
            blur_sigma=blur, noise_sigma=noise, jpeg_quality=quality))
        for i, (mpp, jitter, blur, noise, quality) in enumerate(TRAIN_VARIANTS)
    )
    val: tuple[SlideSpec, ...] = (
        SlideSpec("val-2001", "val", SynthParams(width=12288, height=12288, seed=2001, mitoses=60, imposters=60)),
        SlideSpec("val-2002", "val", SynthParams(width=16384, height=16384, seed=2002)),  # a real slide's density
        SlideSpec("val-2003", "val", SynthParams(width=6144, height=6144, seed=2003, mpp=0.5, mitoses=40,
                                                 imposters=40, stain_jitter=0.15, blur_sigma=0.5)),
    )
    test = (
        SlideSpec("test-3001", "test", SynthParams(width=16384, height=16384, seed=3001, mitoses=40, imposters=40)),
        SlideSpec("test-3002", "test", SynthParams(width=side_px(3072, 0.23), height=side_px(3072, 0.23), seed=3002,
                                                   mpp=0.23, mitoses=40, imposters=40, stain_jitter=0.18,
                                                   noise_sigma=5.0, jpeg_quality=75)),
    )
    return RunPlan(False, train + val + test, detector_steps=1500, detector_batch=24, detector_crop=256,
                   classifier_steps=1500, classifier_batch=64, speed_repeats=10)


# --------------------------------------------------------------------------------------------
# slides


@dataclass
class SlideData:
    """A slide's path and truth. Coordinates are "model px": 0.25 µm/px from the slide's top-left
    (pixel j spans [j, j+1)), the grid the models see whatever the slide's own mpp; ``pixels``, the
    slide read at 0.25 µm/px, only for training slides."""

    spec: SlideSpec
    path: Path
    xy: np.ndarray  # (K, 2) float: planted object centres
    cls: np.ndarray  # (K,) int: CLASS_CODES
    radius_px: np.ndarray  # (K,) float
    pixels: np.ndarray | None = None
    negatives: np.ndarray = field(default_factory=lambda: np.empty((0, 2)))  # random nucleus-like points
    hard_negatives: np.ndarray = field(default_factory=lambda: np.empty((0, 2)))  # detector false positives

    @property
    def mitoses(self) -> np.ndarray:
        return self.xy[self.cls != CLASS_CODES["imposter"]]

    @property
    def imposters(self) -> np.ndarray:
        return self.xy[self.cls == CLASS_CODES["imposter"]]


def ensure_slide(work: Path, spec: SlideSpec) -> Path:
    """The slide's TIFF in ``work``, generated unless a copy made with the same parameters is there."""
    path = work / f"{spec.name}.tiff"
    truth_path = default_truth_path(path)
    if path.is_file() and truth_path.is_file():
        try:
            cached = json.loads(truth_path.read_text(encoding="utf-8"))["params"]
        except (OSError, ValueError, KeyError):
            cached = None
        if cached == asdict(spec.params):
            log.info("using cached %s", path)
            return path
    generate_slide(path, spec.params, truth_path)
    return path


def load_slide(work: Path, spec: SlideSpec, with_pixels: bool) -> SlideData:
    path = ensure_slide(work, spec)
    truth = load_truth(default_truth_path(path))
    with open_slide(path) as slide:
        scale = slide.read_scale(MPP)  # a slide within 3% of 0.25 µm/px is read as it is
        um = np.array([(o.x_um, o.y_um) for o in truth.objects], dtype=np.float64).reshape(-1, 2)
        xy = um / (scale.mpp_x, scale.mpp_y)
        cls = np.array([CLASS_CODES[o.object_class] for o in truth.objects], dtype=np.int64)
        radius = np.array([o.radius_um / scale.mpp_x for o in truth.objects], dtype=np.float64)
        data = SlideData(spec, path, xy, cls, radius)
        if with_pixels:
            width = int(slide.info.width / scale.px0_per_out_x)
            height = int(slide.info.height / scale.px0_per_out_y)
            pixels = np.empty((height, width, 3), np.uint8)
            for y in range(0, height, 1024):
                h = min(1024, height - y)
                slide.read_region(0, y * scale.px0_per_out_y, width, h, scale, out=pixels[y : y + h])
            data.pixels = pixels
    return data


def read_crop(pixels: np.ndarray, x0: int, y0: int, size: int) -> np.ndarray:
    """A (size, size, 3) window of an in-memory slide; outside it is white glass."""
    h, w = pixels.shape[:2]
    out = np.full((size, size, 3), BACKGROUND, np.uint8)
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + size, w), min(y0 + size, h)
    if xb > xa and yb > ya:
        out[ya - y0 : yb - y0, xa - x0 : xb - x0] = pixels[ya:yb, xa:xb]
    return out


def nucleus_points(data: SlideData, rng: np.random.Generator, count: int) -> np.ndarray:
    """Centres of dark spots (mostly ordinary nuclei) away from planted objects: plain negatives."""
    assert data.pixels is not None
    h, w = data.pixels.shape[:2]
    tree = cKDTree(data.xy) if len(data.xy) else None
    points = []
    for _ in range(count * 4):
        x0, y0 = int(rng.integers(0, w - 64)), int(rng.integers(0, h - 64))
        grey = ndimage.uniform_filter(data.pixels[y0 : y0 + 64, x0 : x0 + 64].mean(axis=2), 7)
        if grey.min() > 235:  # glass
            continue
        r, c = np.unravel_index(int(np.argmin(grey)), grey.shape)
        point = (x0 + c + 0.5, y0 + r + 0.5)
        if tree is not None and tree.query(point)[0] < NEGATIVE_CLEARANCE_PX:
            continue
        points.append(point)
        if len(points) == count:
            break
    return np.array(points, dtype=np.float64).reshape(-1, 2)


# --------------------------------------------------------------------------------------------
# augmentation


def rotate_flip(image: np.ndarray, points: np.ndarray, k: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rotate a square (S, S, 3) image by k quarter turns (np.rot90) and maybe mirror it; move
    continuous (x, y) points with it (pixel j spans [j, j+1))."""
    size = image.shape[0]
    pts = points.copy()
    for _ in range(k % 4):
        image = np.rot90(image)
        pts = np.stack([pts[:, 1], size - pts[:, 0]], axis=1)
    if flip:
        image = image[:, ::-1]
        pts[:, 0] = size - pts[:, 0]
    return np.ascontiguousarray(image), pts


def colour_jitter(batch: Any, rng: np.random.Generator, strength: float = 1.0) -> Any:
    """Mild per-image gain, per-channel tint, contrast and brightness on a float (B, 3, H, W) batch in 0..255."""
    import torch

    n = batch.shape[0]
    gain = torch.from_numpy(rng.uniform(1 - 0.06 * strength, 1 + 0.06 * strength, (n, 3, 1, 1)).astype(np.float32))
    contrast = torch.from_numpy(rng.uniform(1 - 0.12 * strength, 1 + 0.12 * strength, (n, 1, 1, 1)).astype(np.float32))
    shift = torch.from_numpy(rng.uniform(-10 * strength, 10 * strength, (n, 1, 1, 1)).astype(np.float32))
    mean = batch.mean(dim=(1, 2, 3), keepdim=True)
    out = (batch - mean) * contrast + mean
    return (out * gain + shift).clamp(0.0, 255.0)


def normalise(batch: Any, norm: Normalisation, bgr: bool = False) -> Any:
    """float (B, 3, H, W) RGB in 0..255 -> what the float model takes (the wrap step does the same in the graph)."""
    import torch

    if bgr:
        batch = batch.flip(1)
    mean = torch.tensor(norm.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float32).view(1, 3, 1, 1)
    order = [2, 1, 0] if bgr else [0, 1, 2]
    return (batch * norm.scale - mean[:, order]) / std[:, order]


def to_nchw(images: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float()


# --------------------------------------------------------------------------------------------
# models


def build_models() -> dict[str, Any]:
    """The three architectures (defined here so torch is imported only when training)."""
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, k: int = 3, s: int = 1, d: int = 1, groups: int = 1,
                act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, k, s, padding=(k // 2) * d, dilation=d, groups=groups, bias=False),
            nn.BatchNorm2d(cout), act())

    class TinyYolo(nn.Module):
        """Anchor-free, one scale (stride 16): centre offsets, box size, objectness, class per cell."""

        def __init__(self, widths: Sequence[int] = (16, 24, 48, 64)) -> None:
            super().__init__()
            w0, w1, w2, w3 = widths
            self.body = nn.Sequential(
                conv_bn(3, w0, s=2), conv_bn(w0, w1, s=2), conv_bn(w1, w2, s=2), conv_bn(w2, w2),
                conv_bn(w2, w3, s=2), conv_bn(w3, w3), conv_bn(w3, w3, d=2), conv_bn(w3, w3, d=4))
            self.head = nn.Conv2d(w3, 5 + len(DETECTOR_CLASSES), 1)
            assert self.head.bias is not None
            nn.init.constant_(self.head.bias[4:], -4.0)  # few cells hold a figure

        def raw(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))

        def decode(self, raw: torch.Tensor) -> torch.Tensor:
            _, _, h, w = raw.shape
            gy = (torch.arange(h, dtype=raw.dtype) + 0.5).view(1, h, 1)
            gx = (torch.arange(w, dtype=raw.dtype) + 0.5).view(1, 1, w)
            cx = (gx + OFFSET_CELLS * torch.tanh(raw[:, 0])) * STRIDE
            cy = (gy + OFFSET_CELLS * torch.tanh(raw[:, 1])) * STRIDE
            wh = MAX_BOX * torch.sigmoid(raw[:, 2:4])
            scores = torch.sigmoid(raw[:, 4:])
            rows = torch.cat([cx.unsqueeze(1), cy.unsqueeze(1), wh, scores], dim=1)  # (B, 5+C, H, W)
            return rows.flatten(2).transpose(1, 2)  # (B, H*W, 5+C), row = gy * W + gx

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.decode(self.raw(x))

    class TwoHeads(nn.Module):
        """Pooled features -> a mitotic-figure logit and an atypical logit, each (B, 1)."""

        def __init__(self, features: int) -> None:
            super().__init__()
            self.drop = nn.Dropout(0.2)
            self.mitotic = nn.Linear(features, 1)
            self.atypical = nn.Linear(features, 1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = self.drop(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
            return self.mitotic(x), self.atypical(x)

    class DenseLayer(nn.Module):
        def __init__(self, cin: int, growth: int) -> None:
            super().__init__()
            self.f = nn.Sequential(
                nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 4 * growth, 1, bias=False),
                nn.BatchNorm2d(4 * growth), nn.ReLU(), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, self.f(x)], 1)

    class TinyDenseNet(nn.Module):
        """DenseNet-BC in miniature: dense blocks of bottleneck layers joined by 1x1 + average-pool transitions."""

        def __init__(self, stem: int = 32, growth: int = 16, layers: Sequence[int] = (4, 4, 4)) -> None:
            super().__init__()
            # As DenseNet's stem: stride 2 and a max-pool, so the dense blocks run at 24, 12 and 6 px.
            blocks: list[nn.Module] = [conv_bn(3, stem, 3, 2), nn.MaxPool2d(2)]
            ch = stem
            for i, n in enumerate(layers):
                for _ in range(n):
                    blocks.append(DenseLayer(ch, growth))
                    ch += growth
                if i < len(layers) - 1:
                    out = ch // 2
                    blocks += [nn.BatchNorm2d(ch), nn.ReLU(), nn.Conv2d(ch, out, 1, bias=False), nn.AvgPool2d(2)]
                    ch = out
            blocks += [nn.BatchNorm2d(ch), nn.ReLU()]
            self.features = nn.Sequential(*blocks)
            self.heads = TwoHeads(ch)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.heads(self.features(x))

    class SqueezeExcite(nn.Module):
        def __init__(self, ch: int, reduced: int) -> None:
            super().__init__()
            self.f = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(ch, reduced, 1), nn.SiLU(),
                                   nn.Conv2d(reduced, ch, 1), nn.Sigmoid())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.f(x)

    class MBConv(nn.Module):
        """EfficientNet's inverted residual: expand 1x1, depthwise kxk, squeeze-excite, project 1x1."""

        def __init__(self, cin: int, cout: int, expand: int, k: int, s: int) -> None:
            super().__init__()
            mid = cin * expand
            layers: list[nn.Module] = []
            if expand != 1:
                layers.append(conv_bn(cin, mid, 1, act=nn.SiLU))
            layers += [conv_bn(mid, mid, k, s, groups=mid, act=nn.SiLU), SqueezeExcite(mid, max(4, cin // 4)),
                       nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.f = nn.Sequential(*layers)
            self.residual = s == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.f(x)
            return x + y if self.residual else y

    class TinyEfficientNet(nn.Module):
        """EfficientNet-B0's layout in miniature: MBConv stages with SiLU and squeeze-excite."""

        def __init__(self) -> None:
            super().__init__()
            # (expand, channels, repeats, stride, kernel)
            # Strides as EfficientNet's first stages but one step earlier: 96 px crops end at 6x6.
            stages = ((1, 16, 1, 2, 3), (4, 24, 2, 2, 3), (4, 40, 2, 1, 5), (4, 64, 2, 2, 3), (4, 96, 1, 1, 3))
            layers: list[nn.Module] = [conv_bn(3, 24, 3, 2, act=nn.SiLU)]  # 96 -> 48
            ch = 24
            for expand, out, repeats, stride, k in stages:
                for r in range(repeats):
                    layers.append(MBConv(ch, out, expand, k, stride if r == 0 else 1))
                    ch = out
            layers.append(conv_bn(ch, 192, 1, act=nn.SiLU))
            self.features = nn.Sequential(*layers)
            self.heads = TwoHeads(192)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.heads(self.features(x))

    return {"detector": TinyYolo, "densenet_tiny": TinyDenseNet, "efficientnet_tiny": TinyEfficientNet}


@dataclass(frozen=True)
class ClassifierRecipe:
    name: str
    norm: Normalisation
    channel_order: Literal["RGB", "BGR"]
    description: str


CLASSIFIERS = (
    ClassifierRecipe("densenet_tiny", DENSENET_NORM, "RGB",
                     "DenseNet-BC-like: stem conv, three dense blocks of 4 bottleneck layers (growth 16), transitions"),
    ClassifierRecipe("efficientnet_tiny", EFFNET_NORM, "BGR",
                     "EfficientNet-like: MBConv stages (expand 4, depthwise 3x3/5x5, squeeze-excite, SiLU)"),
)


def parameter_count(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# --------------------------------------------------------------------------------------------
# detector training


def detector_targets(points: list[np.ndarray], classes: list[np.ndarray], radii: list[np.ndarray],
                     grid: int) -> dict[str, np.ndarray]:
    """Per-cell targets for a batch: objectness (1 / 0), its loss mask, class, offsets and size."""
    n = len(points)
    obj = np.zeros((n, grid, grid), np.float32)
    counted = np.ones((n, grid, grid), np.float32)
    mf = np.zeros((n, grid, grid), np.float32)
    offset = np.zeros((n, 2, grid, grid), np.float32)
    size = np.zeros((n, grid, grid), np.float32)
    centres = (np.arange(grid) + 0.5) * STRIDE
    for b in range(n):
        best = np.full((grid, grid), np.inf)
        for (x, y), c, r in zip(points[b], classes[b], radii[b], strict=True):
            dist = np.hypot(centres[None, :] - x, centres[:, None] - y)
            counted[b][(dist <= IGNORE_RADIUS_PX) & (obj[b] == 0)] = 0.0
            pos = (dist <= POS_RADIUS_PX) & (dist < best)
            best = np.where(pos, dist, best)
            obj[b][pos] = 1.0
            counted[b][pos] = 1.0
            mf[b][pos] = float(c != CLASS_CODES["imposter"])
            offset[b, 0][pos] = (x - centres[None, :].repeat(grid, 0)[pos]) / STRIDE
            offset[b, 1][pos] = (y - centres[:, None].repeat(grid, 1)[pos]) / STRIDE
            size[b][pos] = min(2.0 * (r + 2.0 / MPP) / MAX_BOX, 0.95)  # the figure plus 2 µm each side
    return {"obj": obj, "counted": counted, "mf": mf, "offset": offset, "size": size}


def sample_detector_batch(slides: list[SlideData], rng: np.random.Generator, batch: int,
                          crop: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    images = np.empty((batch, crop, crop, 3), np.uint8)
    points, classes, radii = [], [], []
    for i in range(batch):
        data = slides[int(rng.integers(len(slides)))]
        assert data.pixels is not None
        h, w = data.pixels.shape[:2]
        if rng.random() < 0.6 and len(data.xy):
            x, y = data.xy[int(rng.integers(len(data.xy)))] + rng.uniform(-crop / 2 + 20, crop / 2 - 20, 2)
            x0, y0 = round(x - crop / 2), round(y - crop / 2)
        else:
            x0 = int(rng.integers(-crop // 4, w - crop + crop // 4))
            y0 = int(rng.integers(-crop // 4, h - crop + crop // 4))
        centre = np.array([x0 + crop / 2, y0 + crop / 2])
        near = (np.abs(data.xy - centre) < crop / 2 + 40).all(axis=1)
        image, pts = rotate_flip(read_crop(data.pixels, x0, y0, crop), data.xy[near] - (x0, y0),
                                 int(rng.integers(4)), bool(rng.random() < 0.5))
        images[i] = image
        points.append(pts)
        classes.append(data.cls[near])
        radii.append(data.radius_px[near])
    return images, detector_targets(points, classes, radii, crop // STRIDE)


def detector_loss(raw: Any, targets: dict[str, Any]) -> tuple[Any, dict[str, float]]:
    """Focal loss on objectness; BCE on the class, smooth L1 on offsets and size, at positive cells."""
    import torch
    import torch.nn.functional as F

    obj_t, counted = targets["obj"], targets["counted"]
    positives = obj_t > 0
    n_pos = max(float(positives.sum()), 1.0)
    logit = raw[:, 4]
    p = torch.sigmoid(logit)
    ce = F.binary_cross_entropy_with_logits(logit, obj_t, reduction="none")
    p_t = p * obj_t + (1 - p) * (1 - obj_t)
    alpha = 0.25 * obj_t + 0.75 * (1 - obj_t)
    focal = (alpha * (1 - p_t) ** 2 * ce * counted).sum() / n_pos
    if positives.any():
        cls = F.binary_cross_entropy_with_logits(raw[:, 5][positives], targets["mf"][positives])
        offsets = OFFSET_CELLS * torch.tanh(raw[:, 0:2])
        off = F.smooth_l1_loss(offsets.permute(0, 2, 3, 1)[positives], targets["offset"].permute(0, 2, 3, 1)[positives])
        size = F.smooth_l1_loss(torch.sigmoid(raw[:, 2:4]).permute(0, 2, 3, 1)[positives],
                                targets["size"][positives].unsqueeze(1).expand(-1, 2), beta=0.05)
    else:
        cls = off = size = raw.sum() * 0.0
    total = 4.0 * focal + cls + off + 2.0 * size
    parts = {"obj": focal, "cls": cls, "offset": off, "size": size}
    return total, {k: float(v.detach()) for k, v in parts.items()}


def train_detector(slides: list[SlideData], plan: RunPlan, rng: np.random.Generator) -> tuple[Any, float]:
    import torch

    model = build_models()["detector"]()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=plan.detector_steps, pct_start=0.1)
    started = time.perf_counter()
    model.train()
    running: dict[str, float] = {}
    for step in range(plan.detector_steps):
        images, targets = sample_detector_batch(slides, rng, plan.detector_batch, plan.detector_crop)
        x = normalise(colour_jitter(to_nchw(images), rng), DETECTOR_NORM)
        loss, parts = detector_loss(model.raw(x), {k: torch.from_numpy(v) for k, v in targets.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        for k, v in parts.items():
            running[k] = 0.98 * running.get(k, v) + 0.02 * v
        if (step + 1) % max(1, plan.detector_steps // 10) == 0:
            log.info("detector step %d/%d: %s (%.0f s)", step + 1, plan.detector_steps,
                     ", ".join(f"{k} {v:.3f}" for k, v in running.items()), time.perf_counter() - started)
    model.eval()
    return model, time.perf_counter() - started


# --------------------------------------------------------------------------------------------
# decoding (the pipeline's own decoder lives in edge; this is the tool's reference, in numpy)


def tile_candidates(rows: np.ndarray, score_floor: float, nms_iou: float = NMS_IOU,
                    max_detections: int = MAX_DETECTIONS) -> np.ndarray:
    """(K, 3) x, y, score in tile px from one tile's (N, 6) rows: score = objectness * p_mf, greedy NMS."""
    score = rows[:, 4] * rows[:, 5]
    keep = np.flatnonzero(score >= score_floor)
    keep = keep[np.argsort(-score[keep], kind="stable")]
    boxes = np.stack([rows[keep, 0] - rows[keep, 2] / 2, rows[keep, 1] - rows[keep, 3] / 2,
                      rows[keep, 0] + rows[keep, 2] / 2, rows[keep, 1] + rows[keep, 3] / 2], axis=1)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    chosen: list[int] = []
    alive = np.ones(len(keep), bool)
    for i in range(len(keep)):
        if not alive[i]:
            continue
        chosen.append(i)
        if len(chosen) == max_detections:
            break
        ix = np.clip(np.minimum(boxes[i, 2], boxes[i + 1 :, 2]) - np.maximum(boxes[i, 0], boxes[i + 1 :, 0]), 0, None)
        iy = np.clip(np.minimum(boxes[i, 3], boxes[i + 1 :, 3]) - np.maximum(boxes[i, 1], boxes[i + 1 :, 1]), 0, None)
        inter = ix * iy
        iou = inter / np.maximum(area[i] + area[i + 1 :] - inter, 1e-9)
        alive[i + 1 :] &= iou <= nms_iou
    idx = keep[chosen]
    return np.stack([rows[idx, 0], rows[idx, 1], score[idx]], axis=1).reshape(-1, 3)


def merge_candidates(candidates: np.ndarray, radius_px: float) -> np.ndarray:
    """Greedy by score: a candidate within ``radius_px`` of a stronger kept one is the same figure."""
    if len(candidates) == 0:
        return candidates.reshape(0, 3)
    order = np.argsort(-candidates[:, 2], kind="stable")
    cand = candidates[order]
    tree = cKDTree(cand[:, :2])
    alive = np.ones(len(cand), bool)
    for i in range(len(cand)):
        if alive[i]:
            for j in tree.query_ball_point(cand[i, :2], radius_px):
                if j > i:
                    alive[j] = False
    return cand[alive]


def match_count(points: np.ndarray, truth: np.ndarray, radius: float = MATCH_RADIUS_PX) -> int:
    """One-to-one matches of points to truth within radius, greedy by distance (MIDOG-style)."""
    if len(points) == 0 or len(truth) == 0:
        return 0
    d = np.hypot(points[:, None, 0] - truth[None, :, 0], points[:, None, 1] - truth[None, :, 1])
    pairs = np.argwhere(d <= radius)
    pairs = pairs[np.argsort(d[pairs[:, 0], pairs[:, 1]], kind="stable")]
    used_p, used_t = set(), set()
    for p, t in pairs:
        if p not in used_p and t not in used_t:
            used_p.add(int(p))
            used_t.add(int(t))
    return len(used_p)


def near(points: np.ndarray, targets: np.ndarray, radius: float = MATCH_RADIUS_PX) -> np.ndarray:
    """For each point: is any target within radius?"""
    if len(targets) == 0 or len(points) == 0:
        return np.zeros(len(points), bool)
    return cKDTree(targets[:, :2]).query(points[:, :2])[0] <= radius


# --------------------------------------------------------------------------------------------
# classifiers


def mine_hard_negatives(model: Any, slides: list[SlideData], floor: float) -> None:
    """Run the detector over each training slide; its candidates away from planted objects become negatives."""
    import torch

    for data in slides:
        assert data.pixels is not None
        h, w = data.pixels.shape[:2]
        found = []
        origins = [(x, y) for y in range(0, h, TILE - 64) for x in range(0, w, TILE - 64)]
        for i in range(0, len(origins), 4):
            batch = origins[i : i + 4]
            images = np.stack([read_crop(data.pixels, x, y, TILE) for x, y in batch])
            with torch.no_grad():
                rows = model(normalise(to_nchw(images), DETECTOR_NORM)).numpy()
            for (x, y), r in zip(batch, rows, strict=True):
                c = tile_candidates(r, floor)
                found.append(c + np.array([x, y, 0.0]))
        cand = merge_candidates(np.concatenate(found), MERGE_RADIUS_UM / MPP)
        far = ~near(cand, data.xy, NEGATIVE_CLEARANCE_PX)
        data.hard_negatives = cand[far, :2]
        log.info("%s: %d detector candidates, %d of them false positives kept as hard negatives",
                 data.spec.name, len(cand), len(data.hard_negatives))


def sample_classifier_batch(slides: list[SlideData], rng: np.random.Generator,
                            batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crops (B, CROP, CROP, 3), mitotic labels (B,), atypical labels (B,) with -1 where not an MF."""
    kinds = ("normal", "atypical", "imposter", "hard", "random")
    weights = np.array([0.2, 0.2, 0.25, 0.2, 0.15])
    images = np.empty((batch, CROP, CROP, 3), np.uint8)
    mitotic = np.zeros(batch, np.float32)
    atypical = np.full(batch, -1.0, np.float32)
    for i in range(batch):
        data = slides[int(rng.integers(len(slides)))]
        assert data.pixels is not None
        kind = kinds[int(rng.choice(len(kinds), p=weights))]
        if kind in ("normal", "atypical", "imposter"):
            pool = data.xy[data.cls == CLASS_CODES[kind]]
        else:
            pool = data.hard_negatives if kind == "hard" and len(data.hard_negatives) else data.negatives
        if len(pool) == 0:
            pool, kind = data.negatives, "random"
        x, y = pool[int(rng.integers(len(pool)))] + np.clip(rng.normal(0, 4.0, 2), -10, 10)
        crop = read_crop(data.pixels, round(x - CROP / 2), round(y - CROP / 2), CROP)
        images[i], _ = rotate_flip(crop, np.empty((0, 2)), int(rng.integers(4)), bool(rng.random() < 0.5))
        if kind in ("normal", "atypical"):
            mitotic[i] = 1.0
            atypical[i] = float(kind == "atypical")
    return images, mitotic, atypical


def train_classifier(recipe: ClassifierRecipe, slides: list[SlideData], plan: RunPlan,
                     rng: np.random.Generator) -> tuple[Any, float]:
    import torch
    import torch.nn.functional as F

    model = build_models()[recipe.name]()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=plan.classifier_steps, pct_start=0.1)
    started = time.perf_counter()
    model.train()
    running: dict[str, float] = {}
    for step in range(plan.classifier_steps):
        images, mitotic, atypical = sample_classifier_batch(slides, rng, plan.classifier_batch)
        x = normalise(colour_jitter(to_nchw(images), rng), recipe.norm, bgr=recipe.channel_order == "BGR")
        mf_logit, aty_logit = model(x)
        y_mf = torch.from_numpy(mitotic)
        y_aty = torch.from_numpy(atypical)
        loss_mf = F.binary_cross_entropy_with_logits(mf_logit[:, 0], y_mf)
        is_mf = y_aty >= 0
        loss_aty = (F.binary_cross_entropy_with_logits(aty_logit[is_mf, 0], y_aty[is_mf]) if is_mf.any()
                    else aty_logit.sum() * 0.0)
        loss = loss_mf + 0.5 * loss_aty
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        for k, v in (("mitotic", float(loss_mf.detach())), ("atypical", float(loss_aty.detach()))):
            running[k] = 0.98 * running.get(k, v) + 0.02 * v
        if (step + 1) % max(1, plan.classifier_steps // 10) == 0:
            log.info("%s step %d/%d: %s (%.0f s)", recipe.name, step + 1, plan.classifier_steps,
                     ", ".join(f"{k} {v:.3f}" for k, v in running.items()), time.perf_counter() - started)
    model.eval()
    return model, time.perf_counter() - started


# --------------------------------------------------------------------------------------------
# export


def export_wrapped(model: Any, size: int, outputs: Sequence[str], norm: Normalisation,
                   channel_order: Literal["RGB", "BGR"], target: Path, work: Path) -> str:
    """Export a float NCHW model to ONNX, wrap it to take uint8 NHWC RGB, write it; return its sha256."""
    import onnx
    import torch

    from edge.engines.wrap import wrap_model

    float_path = work / f"{target.stem}.float.onnx"
    dummy = torch.zeros(2, 3, size, size)
    with warnings.catch_warnings():
        # torch 2.9+ calls the TorchScript exporter legacy; it needs no onnxscript and handles these nets.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (dummy,), str(float_path), input_names=["image"], output_names=list(outputs),
            dynamic_axes={"image": {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
            opset_version=17, do_constant_folding=True, dynamo=False,
        )
    wrapped = wrap_model(onnx.load(str(float_path)), input_name="image", size=size, layout="NCHW",
                         channel_order=channel_order, normalisation=norm)
    wrapped.producer_name = "mitosis-edge tools/train_demo_models.py"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    onnx.save(wrapped, str(partial))
    partial.replace(target)
    return sha256_file(target)


def ort_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = ORT_THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_export(model: Any, session: Any, images: np.ndarray, norm: Normalisation, bgr: bool) -> float:
    """Largest absolute difference between the torch model and the wrapped ONNX file on the same uint8 images."""
    import torch

    with torch.no_grad():
        expected = model(normalise(to_nchw(images), norm, bgr=bgr))
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    got = session.run(None, {"image": images})
    return float(max(np.abs(e.numpy() - g).max() for e, g in zip(expected, got, strict=True)))


# --------------------------------------------------------------------------------------------
# validation with the wrapped ONNX files, slide by slide as the pipeline reads them


@dataclass
class SlideRun:
    """Detector candidates (merged, level-0 px) at the score floor and classifier scores for them."""

    data: SlideData
    tiles: int
    candidates: np.ndarray  # (K, 3) x, y, score
    mitotic_logits: dict[str, np.ndarray] = field(default_factory=dict)
    atypical_logits: dict[str, np.ndarray] = field(default_factory=dict)


def detect_slide(data: SlideData, detector: Any, floor: float) -> SlideRun:
    config = Config()
    found = []
    with open_slide(data.path) as slide:
        slide_plan = plan_slide(slide, config)
        with open_stream(slide, slide_plan, config) as stream:
            for batch in stream:
                rows = detector.run(None, {"image": batch.pixels})[0]
                for tile, r in zip(batch.tiles, rows, strict=True):
                    c = tile_candidates(r, floor)
                    c[:, 0] += tile.x
                    c[:, 1] += tile.y
                    found.append(c)
    merged = merge_candidates(np.concatenate(found) if found else np.empty((0, 3)), MERGE_RADIUS_UM / MPP)
    return SlideRun(data, len(slide_plan.plan.tiles), merged)


def classify_candidates(run: SlideRun, sessions: dict[str, Any], points: np.ndarray | None = None) -> tuple[
        dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Mitotic and atypical logits of each classifier for crops centred on ``points`` (default: the candidates)."""
    pts = run.candidates[:, :2] if points is None else points
    mitotic = {name: np.empty(len(pts), np.float32) for name in sessions}
    atypical = {name: np.empty(len(pts), np.float32) for name in sessions}
    with open_slide(run.data.path) as slide:
        scale = slide.read_scale(MPP)
        for i in range(0, len(pts), 64):
            chunk = pts[i : i + 64]
            crops = np.stack([slide.read_region((x - CROP / 2) * scale.px0_per_out_x,
                                                (y - CROP / 2) * scale.px0_per_out_y, CROP, CROP, scale)
                              for x, y in chunk])
            for name, session in sessions.items():
                mf, aty = session.run(["mitotic", "atypical"], {"image": crops})
                mitotic[name][i : i + len(chunk)] = mf[:, 0]
                atypical[name][i : i + len(chunk)] = aty[:, 0]
    return mitotic, atypical


def classify_run(run: SlideRun, sessions: dict[str, Any], min_score: float) -> None:
    """Keep the candidates scoring at least ``min_score`` and classify them."""
    run.candidates = run.candidates[run.candidates[:, 2] >= min_score]
    run.mitotic_logits, run.atypical_logits = classify_candidates(run, sessions)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); nan without both classes."""
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    rank = rankdata(np.concatenate([pos, neg]))
    return float((rank[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def detector_metrics(runs: list[SlideRun], threshold: float) -> dict[str, float]:
    mitoses = found = tiles = false = imposters_proposed = candidates = 0
    for run in runs:
        cand = run.candidates[run.candidates[:, 2] >= threshold]
        mf = run.data.mitoses
        mitoses += len(mf)
        found += int(near(mf, cand).sum())
        tiles += run.tiles
        candidates += len(cand)
        not_mf = ~near(cand, mf)
        false += int(not_mf.sum())
        imposters_proposed += int((not_mf & near(cand, run.data.imposters)).sum())
    return {
        "threshold": threshold, "mitoses": mitoses, "recall": found / max(mitoses, 1), "tiles": tiles,
        "candidates_per_tile": candidates / max(tiles, 1), "false_candidates_per_tile": false / max(tiles, 1),
        "false_candidates_on_imposters_per_tile": imposters_proposed / max(tiles, 1),
    }


def choose_score_threshold(runs: list[SlideRun], target_recall: float,
                           margin: float = RECALL_MARGIN) -> tuple[float, list[dict[str, float]]]:
    """The highest threshold t whose validation recall would still reach the target at ``margin * t``.

    The margin keeps the recall on slides a little unlike the validation ones: every validation
    mitosis could score ``margin`` times lower and still be proposed. Without a threshold that
    reaches the target, the one with the best recall.
    """
    grid = [round(float(t), 3) for t in np.arange(0.02, 0.501, 0.02)]
    table = [detector_metrics(runs, t) for t in grid]
    safe = [t for t in grid if detector_metrics(runs, min(margin * t, 1.0))["recall"] >= target_recall]
    if safe:
        return max(safe), table
    best = max(m["recall"] for m in table)
    return min(m["threshold"] for m in table if m["recall"] == best), table


def ensemble_scores(run: SlideRun, weights: dict[str, float], head: str = "mitotic") -> np.ndarray:
    logits = run.mitotic_logits if head == "mitotic" else run.atypical_logits
    total = sum(weights.values())
    mean = sum(w * sigmoid(logits[name]) for name, w in weights.items()) / total
    return np.asarray(mean, dtype=np.float64)


def f1_at(runs: list[SlideRun], score_threshold: float, weights: dict[str, float], mitotic_threshold: float) -> dict[
        str, float]:
    tp = fp = fn = 0
    for run in runs:
        keep = run.candidates[:, 2] >= score_threshold
        p = ensemble_scores(run, weights)[keep] if keep.any() else np.empty(0)
        positives = run.candidates[keep][p >= mitotic_threshold]
        mf = run.data.mitoses
        hits = match_count(positives[:, :2], mf)
        tp += hits
        fp += len(positives) - hits
        fn += len(mf) - hits
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    f1 = 2 * tp / max(2 * tp + fp + fn, 1)
    return {"f1": f1, "precision": precision, "recall": recall, "tp": tp, "fp": fp, "fn": fn}


def choose_ensemble(runs: list[SlideRun], score_threshold: float, names: Sequence[str]) -> tuple[
        dict[str, float], float, dict[str, float]]:
    """Ensemble weights and mitotic threshold, on validation, as the paper does.

    Weights (w, 1 - w, w in 0.1..0.9): the best two-stage F1 at the chosen detector threshold;
    F1 within ``F1_TIE`` of the best counts as a tie, and ties go to the most even weights (an
    ensemble generalises best when both members count: on slides unlike the training ones each
    model errs where the other does not). Threshold: the middle of the range of thresholds that
    give the best F1 for those weights (robust when a whole range does).
    """
    thresholds = [round(float(t), 3) for t in np.arange(0.05, 0.976, 0.025)]
    splits = [round(float(w), 2) for w in np.arange(0.1, 0.91, 0.1)] if len(names) == 2 else [1.0]
    options = []
    for w in splits:
        weights = {names[0]: w, names[1]: round(1 - w, 2)} if len(names) == 2 else dict.fromkeys(names, 1.0)
        options.append((w, weights, [f1_at(runs, score_threshold, weights, t) for t in thresholds]))
    best_f1 = max(m["f1"] for _, _, scores in options for m in scores)
    tied = [o for o in options if max(m["f1"] for m in o[2]) >= best_f1 - F1_TIE]
    _, weights, scores = min(tied, key=lambda o: abs(o[0] - 0.5))
    top = max(m["f1"] for m in scores)
    plateau = [t for t, m in zip(thresholds, scores, strict=True) if m["f1"] >= top - 1e-9]
    middle = (min(plateau) + max(plateau)) / 2
    threshold = min(plateau, key=lambda t: (abs(t - middle), t))
    return weights, threshold, scores[thresholds.index(threshold)]


def classifier_metrics(runs: list[SlideRun], score_threshold: float, weights: dict[str, float],
                       mitotic_threshold: float) -> dict[str, Any]:
    """Per model and ensemble: accuracy and AUC on the detector's candidates (MF vs not, within 7.5 µm)."""
    labels: list[np.ndarray] = []
    per_model: dict[str, list[np.ndarray]] = {name: [] for name in weights}
    ens: list[np.ndarray] = []
    for run in runs:
        keep = run.candidates[:, 2] >= score_threshold
        labels.append(near(run.candidates[keep], run.data.mitoses))
        for name in weights:
            per_model[name].append(sigmoid(run.mitotic_logits[name][keep]))
        ens.append(ensemble_scores(run, weights)[keep])
    y = np.concatenate(labels)
    out: dict[str, Any] = {"min_score": score_threshold, "candidates": len(y), "mitotic_candidates": int(y.sum())}
    for name, parts in per_model.items():
        p = np.concatenate(parts)
        out[name] = {"accuracy@0.5": float(((p >= 0.5) == y).mean()) if len(y) else math.nan, "auc": auc(p, y)}
    p = np.concatenate(ens)
    out["ensemble"] = {"accuracy@threshold": float(((p >= mitotic_threshold) == y).mean()) if len(y) else math.nan,
                       "auc": auc(p, y)}
    return out


def planted_metrics(runs: list[SlideRun], sessions: dict[str, Any], weights: dict[str, float],
                    decision: tuple[float, float]) -> dict[str, Any]:
    """On crops centred on the planted objects: MF vs imposter AUC, and the atypical head on true MFs."""
    normal_below, atypical_above = decision
    mf_scores: dict[str, list[np.ndarray]] = {n: [] for n in weights}
    aty_scores: dict[str, list[np.ndarray]] = {n: [] for n in weights}
    is_mf, is_aty = [], []
    for run in runs:
        mitotic, atypical = classify_candidates(run, sessions, run.data.xy)
        for n in weights:
            mf_scores[n].append(sigmoid(mitotic[n]))
            aty_scores[n].append(sigmoid(atypical[n]))
        is_mf.append(run.data.cls != CLASS_CODES["imposter"])
        is_aty.append(run.data.cls == CLASS_CODES["atypical"])
    y_mf = np.concatenate(is_mf)
    y_aty = np.concatenate(is_aty)[y_mf]
    out: dict[str, Any] = {"objects": len(y_mf), "mitoses": int(y_mf.sum()), "atypical": int(y_aty.sum())}
    for n in weights:
        p = np.concatenate(mf_scores[n])
        a = np.concatenate(aty_scores[n])[y_mf]
        out[n] = {"mf_vs_imposter_auc": auc(p, y_mf), "mf_vs_imposter_accuracy@0.5": float(((p >= 0.5) == y_mf).mean()),
                  "atypical_auc": auc(a, y_aty), "atypical_accuracy@0.5": float(((a >= 0.5) == y_aty).mean())}
    # The decision averages the atypical heads (all classifiers, equal weight) and keeps confident cases.
    a = np.mean([np.concatenate(aty_scores[n]) for n in weights], axis=0)[y_mf]
    confident = (a > atypical_above) | (a < normal_below)
    out["atypical_heads_mean"] = {
        "auc": auc(a, y_aty),
        "fraction_uncertain": float(1 - confident.mean()) if len(a) else math.nan,
        "accuracy_on_confident": float(((a[confident] > atypical_above) == y_aty[confident]).mean())
        if confident.any() else math.nan,
        "confident": int(confident.sum()),
    }
    return out


def measure_speed(detector_path: Path, tiles: np.ndarray, repeats: int) -> float:
    """Tiles per second of the wrapped detector in ONNX Runtime, batch 4 of 1024² uint8 tiles, 2 threads."""
    session = ort_session(detector_path)
    batch = np.ascontiguousarray(tiles[:4])
    for _ in range(2):
        session.run(None, {"image": batch})
    started = time.perf_counter()
    for _ in range(repeats):
        session.run(None, {"image": batch})
    return 4 * repeats / (time.perf_counter() - started)


def measure_float_speed(float_path: Path, tiles: np.ndarray, repeats: int) -> float:
    """The same for the float model before wrapping (float32 NCHW input): the cost of the wrap's prefix."""
    session = ort_session(float_path)
    batch = np.ascontiguousarray(((tiles[:4].astype(np.float32) / 255 - 0.45) / 0.225).transpose(0, 3, 1, 2))
    for _ in range(2):
        session.run(None, {"image": batch})
    started = time.perf_counter()
    for _ in range(repeats):
        session.run(None, {"image": batch})
    return 4 * repeats / (time.perf_counter() - started)


def sample_tiles(data: SlideData, count: int, rng: np.random.Generator) -> np.ndarray:
    """Tiles around planted objects (so they hold tissue), for the export check and the speed test."""
    with open_slide(data.path) as slide:
        scale = slide.read_scale(MPP)
        w, h = slide.info.width / scale.px0_per_out_x, slide.info.height / scale.px0_per_out_y
        out = []
        for _ in range(count):
            x, y = data.xy[int(rng.integers(len(data.xy)))] if len(data.xy) else (w / 2, h / 2)
            x0 = float(np.clip(x - TILE / 2, 0, max(w - TILE, 0)))
            y0 = float(np.clip(y - TILE / 2, 0, max(h - TILE, 0)))
            out.append(slide.read_region(x0 * scale.px0_per_out_x, y0 * scale.px0_per_out_y, TILE, TILE, scale))
    return np.stack(out)


# --------------------------------------------------------------------------------------------
# the bundle's text files


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        return repr(value)  # exact: the normalisation must be what the models were trained with
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} to TOML")


def norm_table(norm: Normalisation) -> dict[str, Any]:
    return {"scale": norm.scale, "mean": list(norm.mean), "std": list(norm.std)}


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    lines = ["# The demo bundle: trained on synthetic slides by tools/train_demo_models.py.",
             "# For demonstration and tests only - NOT for diagnosis. See MODEL_CARD.md.", ""]
    for table in ("bundle", "detector"):
        lines.append(f"[{table}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in manifest[table].items()]
        lines.append("")
    for entry in manifest["classifier"]:
        lines.append("[[classifier]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in entry.items()]
        lines.append("")
    lines.append("[decision]")
    lines += [f"{k} = {toml_value(v)}" for k, v in manifest["decision"].items()]
    (out / "manifest.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _stage_rows(block: dict[str, Any]) -> list[list[str]]:
    det, f1 = block["detector"], block["two_stage"]
    return [
        [f"detector recall (an MF within 7.5 µm of a candidate scoring ≥ {fmt(det['threshold'], 2)})",
         f"{fmt(det['recall'])} of {det['mitoses']}"],
        ["candidates per tile", fmt(det["candidates_per_tile"], 2)],
        ["false candidates per tile (not within 7.5 µm of an MF)", fmt(det["false_candidates_per_tile"], 2)],
        ["… of which on planted imposters", fmt(det["false_candidates_on_imposters_per_tile"], 2)],
        ["two-stage F1 (precision / recall)",
         f"{fmt(f1['f1'])} ({fmt(f1['precision'])} / {fmt(f1['recall'])}; "
         f"TP {f1['tp']}, FP {f1['fp']}, FN {f1['fn']})"],
    ]


def _model_rows(block: dict[str, Any], names: Sequence[str]) -> list[list[str]]:
    c, p = block["candidates_all"], block["planted"]
    rows = [[name, fmt(c[name]["accuracy@0.5"]), fmt(c[name]["auc"]), fmt(p[name]["mf_vs_imposter_auc"]),
             fmt(p[name]["atypical_auc"]), fmt(p[name]["atypical_accuracy@0.5"])] for name in names]
    rows.append(["ensemble", f"{fmt(c['ensemble']['accuracy@threshold'])} (at the mitotic threshold)",
                 fmt(c["ensemble"]["auc"]), "", fmt(p["atypical_heads_mean"]["auc"]) + " (mean of the heads)", ""])
    return rows


def _measured(title: str, block: dict[str, Any], names: Sequence[str]) -> list[str]:
    c = block["candidates_all"]
    a = block["planted"]["atypical_heads_mean"]
    return [
        title, "",
        *_table(("measure", "value"), _stage_rows(block)), "",
        *_table(("model", "candidate accuracy @0.5", "candidate AUC (MF vs not)", "planted MF vs imposter AUC",
                 "atypical AUC (planted MFs)", "atypical accuracy @0.5"), _model_rows(block, names)), "",
        f"Candidate columns: the {c['candidates']} detector candidates scoring ≥ {fmt(c['min_score'], 2)}"
        f" ({c['mitotic_candidates']} of them MFs),",
        "more than the threshold lets through, so that hard cases count too. Planted columns: crops",
        "centred on every planted object.",
        "",
        f"Atypical subtype (mean of the atypical heads, on the {block['planted']['mitoses']} planted MFs): "
        f"{fmt(100 * a['fraction_uncertain'], 1)}% uncertain (0.1 ≤ p ≤ 0.9); accuracy on the "
        f"{a['confident']} confident ones {fmt(a['accuracy_on_confident'])}.",
        "",
    ]


def write_model_card(out: Path, report: dict[str, Any]) -> None:
    """MODEL_CARD.md from the training report (the same figures as training_report.json)."""
    m, arch, names = report["manifest"], report["architectures"], report["classifier_names"]
    slides, training, timing = report["slides"], report["training"], report["timing"]
    machine = report["machine"]
    role_names = {role: ", ".join(s["name"] for s in slides if s["role"] == role) for role in ("val", "test")}
    models = [["detector", "detector.onnx", arch["detector"]["description"], f"{arch['detector']['parameters']:,}",
               f"uint8 [B, {TILE}, {TILE}, 3] RGB", "RGB, (x/255 − ImageNet mean) / ImageNet std"]]
    models += [[c["name"], c["file"], c["description"], f"{c['parameters']:,}", f"uint8 [B, {CROP}, {CROP}, 3] RGB",
                f"{c['channel_order']}, (x·{fmt(c['normalisation']['scale'], 5)} − {c['normalisation']['mean']})"
                f" / {c['normalisation']['std']}"] for c in arch["classifiers"]]
    slide_rows = [[s["name"], s["seed"], f"{s['width']}x{s['height']}", s["mpp"], s["normal"], s["atypical"],
                   s["imposter"], s["notes"]] for s in slides]
    choice_rows = [
        ["detector.score_threshold", m["detector"]["score_threshold"],
         f"highest t whose validation recall stays ≥ {report['target_recall']} even at {RECALL_MARGIN:g}·t (a margin)"],
        ["detector.nms_iou / max_detections", f"{m['detector']['nms_iou']} / {m['detector']['max_detections']}", ""],
        ["detector.merge_radius_um", m["detector"]["merge_radius_um"], "planted figures are ≥ 20 µm apart"],
        *[[f"classifier {c['name']} weight", c["weight"],
           f"best validation F1 (w ∈ 0.1..0.9; within {F1_TIE} is a tie: most even)"] for c in m["classifier"]],
        ["decision.mitotic_threshold", m["decision"]["mitotic_threshold"], "middle of the range with the best F1"],
        ["decision.atypical_above / normal_below",
         f"{m['decision']['atypical_above']} / {m['decision']['normal_below']}", "the paper's"],
    ]
    sizes = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in report["file_sizes"].items())
    classifier_times = ", ".join(f"{k} {fmt(v, 0)} s" for k, v in timing["classifiers_s"].items())
    lines = [
        "# Model card: the `demo` bundle",
        "",
        "**Trained on synthetic data only. For demonstration and tests - NOT for diagnosis.** These models",
        "have never seen a real slide. They learnt the figures that `edge.devtools.synth` draws (metaphase, anaphase,",
        "prophase; tripolar, lagging, ring, asymmetric; apoptotic bodies and pyknotic nuclei as imposters)",
        "and say nothing meaningful about real tissue. They exist so that the pipeline, the engines, the",
        "exports and the tests run end to end on any machine.",
        "",
        f"Bundle version {m['bundle']['version']}, made {report['created']} by `tools/train_demo_models.py`"
        f" (seed {report['seed']}) on {machine}.",
        "",
        "## Models",
        "",
        "The method of Fick, Bertram & Aubreville in miniature: a YOLO-type detector proposes candidates on",
        "1024 px tiles at 0.25 µm/px; an ensemble of two classifiers of different architectures (the paper:",
        "DenseNet201 + EfficientNet-B4) refines them; a second head subtypes each mitotic figure (MF) as",
        "normal or atypical.",
        "",
        *_table(("model", "file", "architecture", "parameters", "input (wrapped)", "float model's pixels"), models),
        "",
        "Every ONNX file (opset 17, dynamic batch) takes uint8 NHWC RGB: the cast, normalisation, channel",
        "order and transpose were prepended by `edge.engines.wrap.wrap_model`.",
        f"Sizes: {sizes}.",
        "",
        "**Detector output** (`yolo_raw`, one class `mitotic_figure`, probabilities):"
        f" `[B, {(TILE // STRIDE) ** 2}, 6]`,",
        f"one row per cell of the stride-{STRIDE} grid (row = gy·{TILE // STRIDE} + gx): cx, cy, w, h in tile",
        "pixels, objectness (a mitosis-like figure - MF or imposter - is centred near the cell) and",
        "p(MF | figure). The candidate score is objectness × p(MF) (the YOLOv5 convention); the docstring of",
        "`tools/train_demo_models.py` gives the exact decoding.",
        "",
        "**Classifiers**: outputs `mitotic` and `atypical`, logits `[B, 1]`. The mitotic head separates MFs",
        "from imposters and other candidates; the atypical head was trained on MFs only (atypical vs normal).",
        "",
        "## Training data",
        "",
        "Synthetic slides from `edge.devtools.synth.generate_slide` (0.25 µm/px, JPEG-tiled pyramidal TIFF). Seeds",
        "1001+ train, 2001+ validate (the operating point is chosen there), 3001+ test (measured once, with",
        "the chosen values). Training slides hold far more figures per mm² than a real slide and vary stain",
        "strength, blur, noise, JPEG quality and scanner resolution (slides at 0.5 and 0.23 µm/px are read",
        "resampled to 0.25 µm/px, as the pipeline reads them). One validation and one test slide are off the",
        "training distribution on purpose (other resolution, stronger stain variation).",
        "",
        *_table(("slide", "seed", "level-0 px", "µm/px", "normal", "atypical", "imposters", "notes"), slide_rows),
        "",
        f"Detector: {training['detector_steps']} steps of {training['detector_batch']} crops of"
        f" {training['detector_crop']} px (60% placed on a planted object, 40% anywhere),",
        "rot90/flip and colour jitter; focal loss on objectness (positives: cells within"
        f" {POS_RADIUS_PX:g} px of a figure),",
        "BCE on the class (MF 1, imposter 0), smooth L1 on centre offsets and box size.",
        "",
        f"Classifiers: {training['classifier_steps']} steps of {training['classifier_batch']} crops of {CROP} px"
        " each - normal and atypical MFs, imposters, the",
        f"detector's {training['hard_negatives']} false positives on the training slides (score ≥ 0.05) and dark",
        "spots (ordinary nuclei) away from planted objects - centred with a jitter of σ = 4 px, rot90/flip and",
        "colour jitter; BCE on the mitotic head plus 0.5 × BCE on the atypical head (MF crops only).",
        "AdamW with a one-cycle schedule throughout.",
        "",
        f"Training time on {machine}, {TORCH_THREADS} torch threads, the CPUs shared with other work:",
        f"detector {fmt(timing['detector_s'], 0)} s, {classifier_times}; the whole run (slides, mining,",
        f"export, validation) {fmt(timing['total_s'], 0)} s.",
        "",
        "## Operating point (chosen on the validation slides)",
        "",
        *_table(("manifest field", "value", "how"), choice_rows),
        "",
        "## Measured",
        "",
        *_measured(f"Validation ({role_names['val']}; the operating point was chosen here):", report["validation"],
                   names),
    ]
    if report.get("test"):
        lines += _measured(f"Test ({role_names['test']}; unseen seeds, measured once with the values above):",
                           report["test"], names)
    lines += [
        f"Detector speed: {fmt(report['detector']['tiles_per_s'], 1)} tiles/s - ONNX Runtime"
        f" {report['versions']['onnxruntime']} on the CPU, {ORT_THREADS} intra-op threads,",
        f"batches of 4 uint8 1024² tiles, the wrapped file, on {machine}. The float model before",
        f"wrapping (float32 NCHW input) runs at {fmt(report['detector']['float_model_tiles_per_s'], 1)} tiles/s;"
        " the difference is the uint8 → float",
        "prefix that the wrap step prepends (cast, normalise, transpose of 3 M values per tile).",
        "",
        "## Limitations",
        "",
        "- Synthetic data only: the figures, imposters and tissue are drawn by `edge.devtools.synth`; real mitoses,",
        "  staining, scanners and artefacts were never seen.",
        "- The false candidates that remain are mostly pairs of parallel stromal nuclei (which look like an",
        "  anaphase) and overlapping nuclei, more so on slides read upsampled from 0.5 µm/px.",
        "- The atypical head is asked only where it is confident (p < 0.1 or p > 0.9); the uncertain share",
        "  above is left out of atypical ratios, as in the paper.",
        "",
        "All figures come from synthetic slides drawn by the same generator as the training data: they say",
        "the demo works, not that it would on real tissue.",
        "",
        "## Reproduce",
        "",
        "```",
        'pip install -e ".[train]" && python tools/train_demo_models.py --out engines/demo',
        "```",
        "",
        "The run is seeded (numpy Generators, `torch.manual_seed`, deterministic torch algorithms) and caches",
        "its slides in `--work`; the same machine and library versions give the same models. Versions used:",
        ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
    ]
    (out / "MODEL_CARD.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# main


def run(out: Path, work: Path, seed: int, quick: bool, target_recall: float = TARGET_RECALL) -> dict[str, Any]:
    import onnxruntime
    import torch

    started = time.perf_counter()
    torch.manual_seed(seed)
    torch.set_num_threads(TORCH_THREADS)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(seed)
    plan = make_plan(quick)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    models_dir = work / "models"
    models_dir.mkdir(exist_ok=True)

    train = [load_slide(work, s, with_pixels=True) for s in plan.role("train")]
    val = [load_slide(work, s, with_pixels=False) for s in plan.role("val")]
    test = [load_slide(work, s, with_pixels=False) for s in plan.role("test")]
    slides_s = time.perf_counter() - started
    log.info("slides ready in %.0f s: %d training, %d validation, %d test", slides_s, len(train), len(val), len(test))

    detector, detector_s = train_detector(train, plan, rng)
    mine_hard_negatives(detector, train, floor=0.05)
    for data in train:
        data.negatives = nucleus_points(data, rng, 60 if quick else 1500)
    classifiers: dict[str, Any] = {}
    classifier_s: dict[str, float] = {}
    for recipe in CLASSIFIERS:
        classifiers[recipe.name], classifier_s[recipe.name] = train_classifier(recipe, train, plan, rng)

    # export, wrap, and check each file against its torch model
    probe = sample_tiles(val[0], 4, rng)
    files: dict[str, tuple[Path, str]] = {}
    path = out / "detector.onnx"
    files["detector"] = (path, export_wrapped(detector, TILE, ["output"], DETECTOR_NORM, "RGB", path, models_dir))
    diffs = {"detector": check_export(detector, ort_session(path), probe[:2], DETECTOR_NORM, bgr=False)}
    crops = np.ascontiguousarray(probe[:, TILE // 2 - CROP // 2 : TILE // 2 + CROP // 2,
                                       TILE // 2 - CROP // 2 : TILE // 2 + CROP // 2])
    for recipe in CLASSIFIERS:
        path = out / f"classifier_{recipe.name}.onnx"
        files[recipe.name] = (path, export_wrapped(classifiers[recipe.name], CROP, ["mitotic", "atypical"], recipe.norm,
                                                   recipe.channel_order, path, models_dir))
        diffs[recipe.name] = check_export(classifiers[recipe.name], ort_session(path), crops, recipe.norm,
                                          bgr=recipe.channel_order == "BGR")
    log.info("wrapped ONNX vs torch, largest difference: %s", ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    for name, diff in diffs.items():
        if diff > 1e-2:
            raise RuntimeError(
                f"exported {name} differs from its torch model by {diff:.3g}: the export or the wrap is wrong")

    # validate with the wrapped files, as the pipeline would run them
    detector_session = ort_session(files["detector"][0])
    sessions = {r.name: ort_session(files[r.name][0]) for r in CLASSIFIERS}
    floor = 0.01
    val_runs = [detect_slide(d, detector_session, floor) for d in val]
    score_threshold, table = choose_score_threshold(val_runs, target_recall)
    # The classifiers see more than the threshold lets through, so their figures cover hard cases too.
    classify_floor = min(CLASSIFY_FLOOR, score_threshold)
    for run_ in val_runs:
        classify_run(run_, sessions, classify_floor)
    names = [r.name for r in CLASSIFIERS]
    weights, mitotic_threshold, _ = choose_ensemble(val_runs, score_threshold, names)
    decision = (0.1, 0.9)

    def measured(runs: list[SlideRun]) -> dict[str, Any]:
        return {
            "detector": detector_metrics(runs, score_threshold),
            "two_stage": f1_at(runs, score_threshold, weights, mitotic_threshold),
            "candidates": classifier_metrics(runs, score_threshold, weights, mitotic_threshold),
            "candidates_all": classifier_metrics(runs, classify_floor, weights, mitotic_threshold),
            "planted": planted_metrics(runs, sessions, weights, decision),
        }

    validation = {**measured(val_runs), "detector_thresholds": table}
    test_block = None
    if test:
        test_runs = [detect_slide(d, detector_session, floor) for d in test]
        for run_ in test_runs:
            classify_run(run_, sessions, classify_floor)
        test_block = measured(test_runs)
    tiles_per_s = measure_speed(files["detector"][0], probe, plan.speed_repeats)
    float_tiles_per_s = measure_float_speed(models_dir / "detector.float.onnx", probe, plan.speed_repeats)

    recipes = {r.name: r for r in CLASSIFIERS}
    manifest = {
        "bundle": {
            "name": "demo",
            "version": BUNDLE_VERSION,
            "intended_use": "demonstration and tests only; trained on synthetic slides; NOT for diagnosis",
            "description": ("Tiny YOLO-style detector (stride 16, anchor-free) and a two-model classifier ensemble "
                            "(DenseNet-like + EfficientNet-like, mitotic and atypical heads), trained by "
                            f"tools/train_demo_models.py (seed {seed}) on edge.devtools.synth slides."
                            + (" QUICK SMOKE RUN: not a usable model." if quick else "")),
            "model_card": "MODEL_CARD.md",
        },
        "detector": {
            "file": "detector.onnx", "sha256": files["detector"][1], "input": "image", "size": TILE, "mpp": MPP,
            "layout": "NCHW", "channel_order": "RGB", "normalisation": norm_table(DETECTOR_NORM), "output": "output",
            "output_format": "yolo_raw", "classes": list(DETECTOR_CLASSES), "candidate_classes": list(DETECTOR_CLASSES),
            "scores": "probabilities", "score_threshold": float(score_threshold), "nms_iou": NMS_IOU,
            "max_detections": MAX_DETECTIONS, "merge_radius_um": MERGE_RADIUS_UM,
        },
        "classifier": [
            {"name": name, "file": files[name][0].name, "sha256": files[name][1], "input": "image", "size": CROP,
             "mpp": MPP, "layout": "NCHW", "channel_order": recipes[name].channel_order,
             "normalisation": norm_table(recipes[name].norm), "weight": weights[name], "mitotic_output": "mitotic",
             "atypical_output": "atypical", "scores": "logits"}
            for name in names
        ],
        "decision": {"mitotic_threshold": float(mitotic_threshold), "atypical_above": decision[1],
                     "normal_below": decision[0], "atypical_heads": names, "hotspot_area_mm2": 2.0},
    }
    write_manifest(out, manifest)
    report: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%d"),
        "seed": seed,
        "quick": quick,
        "machine": machine_name(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
        "target_recall": target_recall,
        "slides": [
            {"name": d.spec.name, "role": d.spec.role, "seed": d.spec.params.seed, "width": d.spec.params.width,
             "height": d.spec.params.height, "mpp": d.spec.params.mpp, "normal": int((d.cls == 0).sum()),
             "atypical": int((d.cls == 1).sum()), "imposter": int((d.cls == 2).sum()),
             "notes": (f"stain_jitter {d.spec.params.stain_jitter}, blur {d.spec.params.blur_sigma} px, "
                       f"noise {d.spec.params.noise_sigma}, JPEG {d.spec.params.jpeg_quality}")}
            for d in (*train, *val, *test)
        ],
        "training": {"detector_steps": plan.detector_steps, "detector_batch": plan.detector_batch,
                     "detector_crop": plan.detector_crop, "classifier_steps": plan.classifier_steps,
                     "classifier_batch": plan.classifier_batch,
                     "hard_negatives": int(sum(len(d.hard_negatives) for d in train))},
        "architectures": {
            "detector": {"description": ("8 conv-BN-ReLU layers (3x3; four stride 2, two dilated), 1x1 head; "
                                         "stride 16, anchor-free"), "parameters": parameter_count(detector)},
            "classifiers": [{"name": r.name, "file": files[r.name][0].name, "description": r.description,
                             "parameters": parameter_count(classifiers[r.name]), "channel_order": r.channel_order,
                             "normalisation": norm_table(r.norm)} for r in CLASSIFIERS],
        },
        "classifier_names": names,
        "file_sizes": {p.name: p.stat().st_size for p, _ in files.values()},
        "export_max_abs_diff": diffs,
        "detector": {"tiles_per_s": tiles_per_s, "float_model_tiles_per_s": float_tiles_per_s},
        "timing": {"slides_s": slides_s, "detector_s": detector_s, "classifiers_s": classifier_s,
                   "total_s": time.perf_counter() - started},
        "validation": validation,
        "test": test_block,
        "manifest": manifest,
    }
    write_model_card(out, report)
    (out / "training_report.json").write_text(json.dumps(report, indent=1, default=float) + "\n", encoding="utf-8")
    bundle = load_bundle(out)  # raises ManifestError listing every problem
    log.info("bundle %s %s loads cleanly from %s", bundle.name, bundle.version, out)
    return report


def machine_name() -> str:
    """The CPU, for the model card: "Intel(R) Xeon(R) Processor (x86_64, 2 CPUs)"."""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model or platform.system()} ({platform.machine()}, {os.cpu_count()} CPUs)"


def summary(report: dict[str, Any]) -> str:
    """The run's figures in a few lines, for the log."""
    lines = ["summary (the operating point was chosen on the validation slides):"]

    def block(name: str, b: dict[str, Any]) -> None:
        det, f1, cands = b["detector"], b["two_stage"], b["candidates_all"]
        lines.append(f"  {name}: detector recall {det['recall']:.3f} at score >= {det['threshold']:.2f}, "
                     f"{det['candidates_per_tile']:.2f} candidates/tile, "
                     f"{det['false_candidates_per_tile']:.2f} false/tile "
                     f"({det['false_candidates_on_imposters_per_tile']:.2f} on imposters)")
        lines.append(f"  {name}: two-stage F1 {f1['f1']:.3f} (P {f1['precision']:.3f}, R {f1['recall']:.3f}; "
                     f"TP {f1['tp']}, FP {f1['fp']}, FN {f1['fn']})")
        lines.append(f"  {name}: classifiers on {cands['candidates']} candidates scoring >= "
                     f"{cands['min_score']:.2f} ({cands['mitotic_candidates']} MFs) and on the planted objects:")
        for n in report["classifier_names"]:
            c, p = cands[n], b["planted"][n]
            lines.append(f"  {name}:   {n}: candidate acc {fmt(c['accuracy@0.5'])}, AUC {fmt(c['auc'])}; "
                         f"MF vs imposter AUC {fmt(p['mf_vs_imposter_auc'])}; atypical AUC {fmt(p['atypical_auc'])}")
        e = cands["ensemble"]
        a = b["planted"]["atypical_heads_mean"]
        lines.append(f"  {name}:   ensemble: candidate acc {fmt(e['accuracy@threshold'])}, AUC {fmt(e['auc'])}; "
                     f"atypical: {fmt(100 * a['fraction_uncertain'], 1)}% uncertain, "
                     f"accuracy on confident {fmt(a['accuracy_on_confident'])}")

    block("val", report["validation"])
    if report["test"]:
        block("test", report["test"])
    m = report["manifest"]
    weights = {c["name"]: c["weight"] for c in m["classifier"]}
    lines.append(f"  manifest: score_threshold {m['detector']['score_threshold']}, weights {weights}, "
                 f"mitotic_threshold {m['decision']['mitotic_threshold']}")
    lines.append(f"  detector speed {report['detector']['tiles_per_s']:.1f} tiles/s "
                 f"(ONNX Runtime, {ORT_THREADS} threads, batch 4; the float model before wrapping "
                 f"{report['detector']['float_model_tiles_per_s']:.1f} tiles/s)")
    lines.append(f"  training: detector {report['timing']['detector_s']:.0f} s, "
                 + ", ".join(f"{k} {v:.0f} s" for k, v in report["timing"]["classifiers_s"].items())
                 + f"; total {report['timing']['total_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="bundle folder to write (default: engines/demo)")
    ap.add_argument("--work", type=Path, default=None,
                    help="folder for the synthetic slides and float ONNX files (kept for reruns; default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every random draw in training (default 0)")
    ap.add_argument("--quick", action="store_true", help="a tiny run for a smoke test: small slides, few steps")
    ap.add_argument("--target-recall", type=float, default=TARGET_RECALL,
                    help=f"validation recall the detector's score threshold must keep (default {TARGET_RECALL})")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pyvips").setLevel(logging.WARNING)  # libvips reports every resample at INFO
    try:
        import onnx  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        log.error("training needs torch and onnx: pip install -e \".[train]\" (%s)", exc)
        return 2
    if args.work is None:
        with tempfile.TemporaryDirectory(prefix="mitosis-edge-train-") as tmp:
            report = run(args.out, Path(tmp), args.seed, args.quick, args.target_recall)
    else:
        report = run(args.out, args.work, args.seed, args.quick, args.target_recall)
    log.info("%s", summary(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
