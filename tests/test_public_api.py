"""The package's public surface: what `edge` exports and the one error hierarchy."""

from __future__ import annotations

import pickle

import edge
from edge import errors


def test_all_matches_what_the_package_exports() -> None:
    public = {name for name in vars(edge) if not name.startswith("_") and name not in {"errors", "annotations"}}
    modules = {name for name in public if type(getattr(edge, name)).__name__ == "module"}
    assert set(edge.__all__) == (public - modules) | {"__version__"}


def test_every_error_is_an_edge_error_and_slide_errors_are_os_errors() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert all(issubclass(c, errors.EdgeError) for c in classes)
    assert issubclass(errors.SlideReadError, OSError)
    assert issubclass(errors.SlideNotFoundError, FileNotFoundError)
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.TileDecodeError, errors.CorruptSlideError)


def test_slide_errors_name_the_path_and_survive_pickling() -> None:
    err = errors.TileDecodeError("/scans/a.svs", "level 0 tile 7 failed to decode")
    assert str(err) == "/scans/a.svs: level 0 tile 7 failed to decode"
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is errors.TileDecodeError and back.path == err.path and back.reason == err.reason
