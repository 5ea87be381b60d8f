"""The package's public surface: what `edge` exports, that `import edge` stays light, and the one error
hierarchy."""

from __future__ import annotations

import inspect
import json
import pickle
import subprocess
import sys

import pytest

import edge
from edge import errors

INTENDED = {
    "__version__",
    # analyse a slide, read a slide, settings
    "analyze_slide",
    "open_slide",
    "load_config",
    "Config",
    # lab software's client
    "EdgeClient",
    # every error a caller may catch
    "EdgeError",
    "ConfigError",
    "QcError",
    "StreamCancelled",
    "SlideReadError",
    "SlideNotFoundError",
    "NotASlideError",
    "UnsupportedFormatError",
    "MissingMppError",
    "CorruptSlideError",
    "TileDecodeError",
    "ImplausibleSlideError",
    "SlideTimeLimitError",
    "SlideChangedError",
    "EngineError",
    "ManifestError",
    "EngineInputError",
    "BackendUnavailableError",
    "PlanError",
    "StoreError",
    "JobNotFoundError",
    "ResultNotFoundError",
    "JobStateError",
    "StoreCorruptError",
    "StoreBusyError",
    "ReviewError",
    "DiskFullError",
    "AnalysisCrashed",
    "MissingExtraError",
    "RequestRefused",
    "EdgeClientError",
    "ServerUnavailableError",
}
HEAVY = ("numpy", "scipy", "onnxruntime", "onnx", "grpc", "google.protobuf", "tifffile", "openslide", "PIL", "pyvips")


def test_all_is_exactly_the_intended_public_names() -> None:
    assert sorted(edge.__all__) == edge.__all__
    assert set(edge.__all__) == INTENDED


@pytest.mark.parametrize("name", sorted(INTENDED - {"__version__"}))
def test_each_exported_name_resolves_to_its_defining_module(name: str) -> None:
    value = getattr(edge, name)
    assert value.__module__.startswith("edge.") and value.__name__ == name
    assert name in dir(edge)


def test_every_error_class_of_the_hierarchy_is_exported() -> None:
    classes = {n for n, c in vars(errors).items() if inspect.isclass(c) and issubclass(c, BaseException)}
    public = {n for n in classes if not n.startswith("_")}
    assert public <= set(edge.__all__), f"errors not exported by edge: {sorted(public - set(edge.__all__))}"
    for name in INTENDED:
        value = getattr(edge, name)
        if inspect.isclass(value) and issubclass(value, BaseException):
            assert issubclass(value, errors.EdgeError), name


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'analyse_slide'"):
        edge.analyse_slide


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, timeout=120)
    return set(json.loads(out.stdout.splitlines()[-1]))


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


def test_import_edge_is_light() -> None:
    modules = _modules_after("import edge; edge.load_config(None); edge.ConfigError; edge.SlideReadError")
    assert _heavy(modules) == []
    assert not any(m.startswith(("edge.wsi", "edge.analysis", "edge.engines", "edge.service", "edge.client"))
                   for m in modules)


def test_the_heavy_names_load_on_first_use() -> None:
    modules = _modules_after("import edge; edge.open_slide")
    assert "edge.wsi.slide" in modules and "numpy" in modules
    assert "grpc" not in modules and "onnxruntime" not in modules  # reading a slide needs neither
    modules = _modules_after("import edge; edge.EdgeClient")
    assert "grpc" in modules and "onnxruntime" not in modules


def test_every_error_is_an_edge_error_and_slide_errors_are_os_errors() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert all(issubclass(c, errors.EdgeError) for c in classes)
    assert issubclass(errors.SlideReadError, OSError)
    assert issubclass(errors.SlideNotFoundError, FileNotFoundError)
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.TileDecodeError, errors.CorruptSlideError)


def test_the_drawn_tree_names_every_error_class() -> None:
    doc = errors.__doc__ or ""
    classes = [n for n, c in vars(errors).items() if inspect.isclass(c) and issubclass(c, BaseException)]
    assert [n for n in classes if not n.startswith("_") and n not in doc] == []


def test_slide_errors_name_the_path_and_survive_pickling() -> None:
    err = errors.TileDecodeError("/scans/a.svs", "level 0 tile 7 failed to decode")
    assert str(err) == "/scans/a.svs: level 0 tile 7 failed to decode"
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is errors.TileDecodeError and back.path == err.path and back.reason == err.reason
