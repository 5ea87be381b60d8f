"""The deployment files stay true to the code: the sample config sets every setting with a comment,
and the systemd unit starts a command line the CLI accepts and waits longer than the shutdown grace."""

from __future__ import annotations

import configparser
import dataclasses
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from edge.cli.daemon import cmd_serve
from edge.cli.main import build_parser
from edge.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "deploy" / "edge.toml"
UNIT = ROOT / "deploy" / "mitosis-edge.service"

# Settings whose default is empty and that the sample sets to a lab's value instead.
LAB_VALUES = {
    "watch.folders",
    "daemon.data_dir",
    "engines.plan_cache",
    "server.tls_cert",
    "server.tls_key",
    "server.tokens_file",
}
SECTION_LINE = re.compile(r"^\[(\w+)\]\s*(#.*)?$")
SETTING_LINE = re.compile(r"^(#\s*)?(\w+)\s*=")


def _settings() -> list[tuple[str, dataclasses.Field[object]]]:
    """(section, field) for every setting of every section of Config."""
    return [
        (section.name, setting)
        for section in dataclasses.fields(Config)
        for setting in dataclasses.fields(section.default_factory())  # type: ignore[misc]
    ]


def _default(setting: dataclasses.Field[object]) -> object:
    if setting.default is not dataclasses.MISSING:
        return setting.default
    return setting.default_factory()  # type: ignore[misc]


def _sample_lines() -> list[tuple[str, int, str, bool]]:
    """(section, index, key, commented_out) for each assignment line of the sample, and its lines."""
    found = []
    section = ""
    for index, line in enumerate(SAMPLE.read_text(encoding="utf-8").splitlines()):
        if match := SECTION_LINE.match(line):
            section = match.group(1)
            continue
        match = SETTING_LINE.match(line)
        if match and section:
            found.append((section, index, match.group(2), bool(match.group(1))))
    return found


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    return parser


def test_sample_config_loads() -> None:
    config = load_config(SAMPLE)
    assert config.watch.folders == ("/srv/scanner/out",)
    assert config.daemon.data_dir == "/var/lib/mitosis-edge"
    assert config.server.tls  # the lab sample serves TLS, not plain text


@pytest.mark.parametrize(("section", "name"), [(s, f.name) for s, f in _settings()])
def test_sample_config_sets_every_setting(section: str, name: str) -> None:
    raw = tomllib.loads(SAMPLE.read_text(encoding="utf-8"))
    setting = next(f for s, f in _settings() if s == section and f.name == name)
    if _default(setting) is None:
        # TOML cannot say "unset": a setting whose default is None is shown as a commented-out line
        assert (section, name, True) in {(s, k, c) for s, _, k, c in _sample_lines()}, (
            f"deploy/edge.toml lacks a commented-out '# {name} = ...' line in [{section}]"
        )
        assert name not in raw.get(section, {})
        return
    assert name in raw.get(section, {}), f"deploy/edge.toml does not set {section}.{name}; add it with a comment"


def test_sample_config_keeps_the_defaults() -> None:
    """Every value is the built-in default, except the few empty ones a lab must fill in."""
    config = load_config(SAMPLE)
    for section, setting in _settings():
        dotted = f"{section}.{setting.name}"
        value = getattr(getattr(config, section), setting.name)
        if dotted in LAB_VALUES:
            assert value and not _default(setting), f"{dotted}: a lab value where the default is empty"
        else:
            assert value == _default(setting), f"deploy/edge.toml: {dotted}={value!r}, default {_default(setting)!r}"


def test_every_sample_setting_has_a_comment_right_above() -> None:
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    entries = _sample_lines()
    assert entries
    for section, index, key, _ in entries:
        above = lines[index - 1].strip()
        assert above.startswith("#") and not SETTING_LINE.match(above), (
            f"deploy/edge.toml line {index + 1}: {section}.{key} needs a comment line right above it"
        )


def test_sample_sections_follow_config() -> None:
    raw = tomllib.loads(SAMPLE.read_text(encoding="utf-8"))
    assert list(raw) == [f.name for f in dataclasses.fields(Config)]


def test_unit_starts_serve_with_flags_the_cli_accepts() -> None:
    exec_start = _unit()["Service"]["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0].endswith("/mitosis-edge")
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"mitosis-edge refuses the unit's ExecStart arguments {argv[1:]} (see the usage above)")
    assert args.handler is cmd_serve
    assert args.config == "/etc/mitosis-edge/edge.toml"


def test_unit_waits_longer_than_the_shutdown_grace() -> None:
    service = _unit()["Service"]
    grace = load_config(SAMPLE).daemon.shutdown_grace_s
    assert float(service["TimeoutStopSec"]) > grace
    assert service["KillSignal"] == "SIGTERM"
    assert service["Type"] == "simple"  # the daemon sends no sd_notify


def test_unit_writes_where_the_sample_config_keeps_data() -> None:
    service = _unit()["Service"]
    config = load_config(SAMPLE)
    writable = service["ReadWritePaths"].split()
    assert config.daemon.data_dir in writable
    assert any(config.engines.plan_cache.startswith(path + "/") for path in writable)
    read_only = service["ReadOnlyPaths"].split()
    assert set(config.watch.all_folders) <= set(read_only)
