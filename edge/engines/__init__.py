"""Model bundles and inference engines.

A bundle (``engines/<name>/manifest.toml`` plus ONNX files) names one detector and a classifier
ensemble. Engines run those models behind one protocol (:class:`Engine`), on ONNX Runtime (the
CPU default) or TensorRT. Heavy imports (onnxruntime, tensorrt, cuda) happen lazily in one
module each.
"""

from __future__ import annotations

from edge.engines.base import Engine, Outputs, Pending, TensorSpec
from edge.engines.engineset import EngineSet, default_max_batch, open_engines
from edge.engines.fake import FakeEngine
from edge.engines.manifest import (
    Bundle,
    ClassifierSpec,
    DecisionSpec,
    DetectorSpec,
    HeadSpec,
    ModelSpec,
    Normalisation,
    find_bundle,
    list_bundles,
    load_bundle,
)

__all__ = [
    "Bundle",
    "ClassifierSpec",
    "DecisionSpec",
    "DetectorSpec",
    "Engine",
    "EngineSet",
    "FakeEngine",
    "HeadSpec",
    "ModelSpec",
    "Normalisation",
    "Outputs",
    "Pending",
    "TensorSpec",
    "default_max_batch",
    "find_bundle",
    "list_bundles",
    "load_bundle",
    "open_engines",
]
