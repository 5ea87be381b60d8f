"""`mitosis-edge serve --check`: everything `serve` needs, checked at once, every problem listed.

Each check returns a `Check` (what was checked, whether it is fine, and what to do when not);
nothing is started and nothing is written except a probe file in the data folder, removed again.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge.config import Config
from edge.errors import EdgeError

__all__ = ["Check", "preflight"]


@dataclass(frozen=True)
class Check:
    """One thing `serve` needs: ``name``, ``ok``, and ``detail`` (what was found, or what to do)."""

    name: str
    ok: bool
    detail: str


def preflight(config: Config) -> list[Check]:
    """Every check, in the order `serve` would meet them; a check that crashes is reported as failed."""
    checks: list[tuple[str, Callable[[Config], str]]] = [
        ("gRPC transport", _transport),
        ("TLS certificate and key", _tls),
        ("tokens file", _tokens),
        ("watch folders", _watch_folders),
        ("data folder", _data_folder),
        ("disk space", _disk_space),
        ("export group", _export_group),
        ("model bundle", _bundle),
        ("gRPC port", lambda c: _port_free("server.listen (--listen)", c.server.listen if c.server.enabled else "")),
        ("metrics port", lambda c: _port_free("daemon.metrics_listen (--metrics)", c.daemon.metrics_listen)),
    ]
    results = []
    for name, check in checks:
        try:
            results.append(Check(name, True, check(config)))
        except (EdgeError, OSError, ValueError, ssl.SSLError) as exc:
            results.append(Check(name, False, str(exc)))
    return results


class _Problem(ValueError):
    """A check that failed; the message says what to do."""


def _transport(config: Config) -> str:
    server = config.server
    if not server.enabled:
        return "gRPC API off (server.enabled = false)"
    server.validate()
    if not server.tls and not server.insecure:
        raise _Problem("neither TLS (server.tls_cert, server.tls_key) nor server.insecure = true is set: choose one")
    if server.insecure:
        return f"plain text on {server.listen} (server.insecure)"
    return f"TLS on {server.listen}" + (" with client certificates" if server.tls_client_ca else "")


def _tls(config: Config) -> str:
    server = config.server
    if not server.enabled or not server.tls:
        return "not used"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for setting, path in (("server.tls_cert", server.tls_cert), ("server.tls_key", server.tls_key)):
        _readable(setting, path)
    try:
        context.load_cert_chain(server.tls_cert, server.tls_key)
    except ssl.SSLError as exc:
        raise _Problem(
            f"server.tls_key {server.tls_key} does not belong to server.tls_cert {server.tls_cert}, or one is not "
            f"PEM ({exc.reason or exc}); issue them again as a pair"
        ) from None
    if server.tls_client_ca:
        _readable("server.tls_client_ca", server.tls_client_ca)
        try:
            context.load_verify_locations(server.tls_client_ca)
        except ssl.SSLError as exc:
            raise _Problem(f"server.tls_client_ca {server.tls_client_ca} is not a PEM CA certificate ({exc})") from None
    return f"{server.tls_cert} and its key match"


def _tokens(config: Config) -> str:
    from edge.service.server.auth import load_tokens

    path = config.server.tokens_file
    if not config.server.enabled:
        return "not used"
    if not path:
        return "none: every caller may submit and cancel (set server.tokens_file for a lab network)"
    _readable("server.tokens_file", path)
    mode = stat.S_IMODE(Path(path).expanduser().stat().st_mode)
    tokens = load_tokens(path)  # raises with every bad line named
    if mode & 0o077:
        raise _Problem(f"server.tokens_file {path} has mode {mode:04o}: other users can read the tokens; chmod 600 it")
    return f"{len(tokens)} token(s), mode {mode:04o}"


def _watch_folders(config: Config) -> str:
    folders = config.watch.all_folders
    if not folders:
        return "none: slides come only from SubmitSlide"
    missing = [f for f in folders if not Path(f).is_dir()]
    unreadable = [f for f in folders if f not in missing and not os.access(f, os.R_OK | os.X_OK)]
    if missing or unreadable:
        parts = [f"{f} does not exist or is not a folder" for f in missing]
        parts += [f"{f} cannot be read by this user" for f in unreadable]
        raise _Problem("; ".join(parts) + " (watch.folders / --watch)")
    return ", ".join(folders)


def _data_folder(config: Config) -> str:
    folder = config.daemon.data_path
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise _Problem(f"daemon.data_dir {folder}: {existing} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".mitosis-edge-check-"):
            pass
    except OSError as exc:
        raise _Problem(
            f"daemon.data_dir {folder} is not writable by this user ({exc.strerror}); fix its owner or choose another"
        ) from None
    return f"{folder} writable" + ("" if folder.exists() else " (will be created)")


def _disk_space(config: Config) -> str:
    folder = _nearest_existing(config.daemon.data_path)
    free_mb = shutil.disk_usage(folder).free / 2**20
    need = config.daemon.min_free_disk_mb
    if free_mb < need:
        raise _Problem(
            f"{free_mb:.0f} MB free under {folder}, daemon.min_free_disk_mb = {need}: no job would start; free space"
        )
    return f"{free_mb / 1024:.1f} GB free (at least {need} MB needed)"


def _export_group(config: Config) -> str:
    from edge.service.daemon import export_group_id

    mode = f"files {config.daemon.export_file_mode:04o}"
    if not config.daemon.export_group:
        return mode
    export_group_id(config.daemon.export_group)
    return f"{mode}, group {config.daemon.export_group}"


def _bundle(config: Config) -> str:
    from edge.engines import load_bundle

    bundle = load_bundle(config.engines.bundle)
    return f"{bundle.name} {bundle.version}; intended use: {bundle.intended_use}"


def _port_free(setting: str, listen: str) -> str:
    if not listen:
        return "off"
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if int(port) == 0:
        return f"{listen}: any free port"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, int(port)))
        except OSError as exc:
            raise _Problem(
                f"{setting} = {listen!r} cannot be bound: {exc.strerror or exc} (another program or daemon uses it, "
                "or the host is not an address of this machine)"
            ) from None
    return f"{listen} free"


def _readable(setting: str, path: str) -> None:
    try:
        with Path(path).expanduser().open("rb"):
            pass
    except OSError as exc:
        raise _Problem(f"{setting} {path} cannot be read by this user: {exc.strerror or exc}") from None


def _nearest_existing(folder: Path) -> Path:
    path = folder.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
