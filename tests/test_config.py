"""Settings load from TOML with defaults, refuse typos and bad values, and take command-line overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.config import Config, load_config
from edge.errors import ConfigError, EdgeError


def test_defaults_need_no_file() -> None:
    config = load_config()
    assert config == Config()
    assert config.slide.target_mpp == 0.25
    assert config.tiling.tile_size == 1024 and config.tiling.overlap == 64
    assert config.stream.threads >= 1


def test_toml_sets_a_subset(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text("[slide]\nmpp_override = 0.5\n[tiling]\noverlap = 32\n")
    config = load_config(path)
    assert config.slide.mpp_override == 0.5
    assert config.tiling.overlap == 32
    assert config.tiling.tile_size == 1024


def test_overrides_win_and_none_keeps_the_file(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text("[stream]\nbatch_size = 8\n")
    config = load_config(path, {"stream.batch_size": None, "slide.mpp_override": 0.25})
    assert config.stream.batch_size == 8
    assert config.slide.mpp_override == 0.25


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[slide]\nmpp_overide = 0.5\n", "unknown setting slide.mpp_overide"),
        ("[slid]\n", "unknown config section [slid]"),
        ("[slide]\ntarget_mpp = -1\n", "slide.target_mpp=-1.0 must be greater than 0"),
        ('[slide]\nreader = "bioformats"\n', "slide.reader='bioformats' is not one of"),
        ("[tiling]\noverlap = 600\n", "tiling.overlap=600 must be in [0, tile_size/2)"),
        ('[stream]\nbatch_size = "4"\n', "stream.batch_size='4' must be an integer"),
        ("[slide\n", "is not valid TOML"),
    ],
)
def test_bad_settings_are_named(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)
    assert isinstance(info.value, EdgeError) and isinstance(info.value, ValueError)


def test_missing_config_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
