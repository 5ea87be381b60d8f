"""Who may call the gRPC API and which slides it may submit: bearer tokens with roles, allowed roots.

Pure Python (no grpc import): the interceptor in ``edge.service.server.servicer`` asks `TokenTable.check`,
SubmitSlide asks `resolve_submit_path`, and the web UI (edge.service.web) checks its tokens here too.
Tokens file, one per line::

    # TOKEN                                      ROLE    NAME (optional, for the log)
    4f9c1e0b7d2a48c6a1f3e5d7b9c0a2e4f6b8d0c2     submit  lis
    8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b     read    viewer

ROLE is ``read`` (every read call), ``submit`` (read calls too, plus SubmitSlide, and CancelJob of
the jobs this token submitted) or ``admin`` (submit, and CancelJob of any job, the watcher's too).
NAME identifies the caller in the log and in the jobs it submits or cancels.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edge.errors import ConfigError, RequestRefused
from edge.fileio import real_path_inside
from edge.logsafe import untrusted

__all__ = [
    "FIELD_LIMITS",
    "MIN_TOKEN_CHARS",
    "PUBLIC_SERVICES",
    "SUBMIT_METHODS",
    "AuthDecision",
    "RequestRefused",
    "Role",
    "TokenTable",
    "check_lengths",
    "load_tokens",
    "parse_tokens",
    "required_role",
    "resolve_submit_path",
]

log = logging.getLogger(__name__)

# "review" (issue 19): view and sign reviews on the review page (edge.service.web); admin implies every role.
Role = Literal["read", "submit", "review", "admin"]
ROLES: tuple[Role, ...] = ("read", "submit", "review", "admin")
SUBMIT_ROLES: tuple[Role, ...] = ("submit", "admin")
REVIEW_ROLES: tuple[Role, ...] = ("review", "admin")
MIN_TOKEN_CHARS = 16  # shorter tokens are guessable; `python -c "import secrets; print(secrets.token_hex(20))"`
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux
MAX_NAME_BYTES = 255  # NAME_MAX: the longest file or folder name in a path
# The longest value each string field of a request may have (docs/api.md); longer is INVALID_ARGUMENT.
FIELD_LIMITS = {
    "slide_path": MAX_PATH_CHARS,
    "slide_path_contains": MAX_PATH_CHARS,
    "bundle": 64,
    "request_id": 128,
    "fingerprint": 128,
    "page_token": 256,
    "accession": 64,
    "label": 64,
}
SERVICE = "mitosis.edge.v1.EdgeService"
# Methods that change state; every other method of the service needs a read token.
SUBMIT_METHODS = frozenset({f"/{SERVICE}/SubmitSlide", f"/{SERVICE}/CancelJob"})
# Probes and grpcurl's discovery work without a token: they reveal nothing about slides or jobs.
PUBLIC_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                   "/grpc.reflection.v1.ServerReflection/")


def required_role(method: str) -> Role | None:
    """The role a method needs: None for public probes (health, reflection).

    >>> required_role("/mitosis.edge.v1.EdgeService/SubmitSlide"), required_role("/grpc.health.v1.Health/Check")
    ('submit', None)
    """
    if method.startswith(PUBLIC_SERVICES):
        return None
    return "submit" if method in SUBMIT_METHODS else "read"


@dataclass(frozen=True)
class _Token:
    digest: bytes  # sha256 of the token: compared in constant time, whatever the lengths
    role: Role
    name: str


@dataclass(frozen=True)
class AuthDecision:
    """The outcome of checking one call: `code` is "" when allowed, else the gRPC code's name."""

    code: str
    message: str
    caller: str = ""  # the token's NAME
    role: Role | None = None  # the token's role when allowed; None for public methods

    @property
    def allowed(self) -> bool:
        return not self.code


class TokenTable:
    """Bearer tokens and their roles. `check` compares against every token in constant time."""

    def __init__(self, entries: Iterable[tuple[str, Role, str]]) -> None:
        self._tokens = tuple(_Token(_digest(token), role, name) for token, role, name in entries)
        if not self._tokens:
            raise ConfigError(
                "the tokens file holds no token; add a line 'TOKEN ROLE [NAME]' or unset server.tokens_file"
            )

    def __len__(self) -> int:
        return len(self._tokens)

    def identify(self, token: str) -> tuple[str, Role] | None:
        """The (name, role) of a bearer token, in constant time over the table; None for an unknown token."""
        digest = _digest(token.strip())
        found: _Token | None = None
        for entry in self._tokens:
            if hmac.compare_digest(entry.digest, digest):
                found = entry
        return None if found is None else (found.name, found.role)

    def check(self, authorization: str | None, method: str) -> AuthDecision:
        """Decide on a call to `method` with this ``authorization`` metadata value."""
        need = required_role(method)
        if need is None:
            return AuthDecision("", "", "public")
        if authorization is not None and len(authorization) > 1024:
            return AuthDecision("UNAUTHENTICATED", "the authorization metadata is too long to hold a bearer token")
        if not authorization:
            return AuthDecision(
                "UNAUTHENTICATED", "missing bearer token: send metadata 'authorization: Bearer <token>'"
            )
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return AuthDecision(
                "UNAUTHENTICATED", "the authorization metadata must be 'Bearer <token>' (another scheme was sent)"
            )
        digest = _digest(token.strip())
        found: _Token | None = None
        for entry in self._tokens:  # no early exit: every call costs the same, whichever token matches
            if hmac.compare_digest(entry.digest, digest):
                found = entry
        if found is None:
            return AuthDecision("UNAUTHENTICATED", "unknown bearer token; check the token file the client uses")
        if need == "submit" and found.role not in SUBMIT_ROLES:
            name = method.rsplit("/", 1)[-1]
            return AuthDecision(
                "PERMISSION_DENIED",
                f"token {found.name!r} has role {found.role}; {name} needs a token with role submit",
                found.name,
            )
        return AuthDecision("", "", found.name, found.role)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def parse_tokens(text: str, source: str = "tokens file") -> TokenTable:
    """Parse "TOKEN ROLE [NAME]" lines ('#' starts a comment). Every bad line is named in the error.

    >>> len(parse_tokens("0123456789abcdef0123 submit lis\\n# a comment\\nfedcba9876543210fedc read"))
    2
    """
    entries: list[tuple[str, Role, str]] = []
    problems: list[str] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) not in (2, 3):
            problems.append(f"line {number}: expected 'TOKEN ROLE [NAME]', got {len(parts)} field(s)")
            continue
        token, role = parts[0], parts[1]
        name = parts[2] if len(parts) == 3 else f"line {number}"
        if role not in ROLES:
            problems.append(f"line {number}: role {role!r} must be 'read', 'submit', 'review' or 'admin'")
            continue
        if len(token) < MIN_TOKEN_CHARS:
            problems.append(
                f"line {number}: token of {len(token)} characters is too short (at least {MIN_TOKEN_CHARS}); make one "
                "with: python -c \"import secrets; print(secrets.token_hex(20))\""
            )
            continue
        if token in seen:
            problems.append(f"line {number}: the same token appears twice")
            continue
        seen.add(token)
        entries.append((token, role, name))  # role checked against ROLES above
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    try:
        return TokenTable(entries)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_tokens(path: str | Path) -> TokenTable:
    """Read a tokens file (server.tokens_file). Warns when other users can read it."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"server.tokens_file={str(path)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"server.tokens_file={str(path)!r} cannot be read: {exc.strerror or exc}") from None
    if os.name == "posix" and mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("tokens file %s can be read by other users; chmod 600 it", p)
    return parse_tokens(text, f"server.tokens_file {p}")


def check_lengths(**fields: str) -> None:
    """Refuse (INVALID_ARGUMENT) a request field longer than its documented maximum (`FIELD_LIMITS`).

    >>> check_lengths(request_id="r-1", bundle="demo")
    >>> try:
    ...     check_lengths(bundle="x" * 65)
    ... except RequestRefused as exc:
    ...     print(exc.code, exc)
    INVALID_ARGUMENT bundle has 65 characters; at most 64 are accepted
    """
    for name, value in fields.items():
        limit = FIELD_LIMITS[name]
        if len(value) > limit:
            raise RequestRefused(
                "INVALID_ARGUMENT", f"{name} has {len(value)} characters; at most {limit} are accepted"
            )


def resolve_submit_path(slide_path: str, roots: Sequence[str | Path]) -> Path:
    """The real path of a slide submitted over the API, if it lies under one of the allowed roots.

    Symlinks and ``..`` are resolved first (in the path and in the roots), so neither can lead
    outside. Raises RequestRefused: INVALID_ARGUMENT (empty, relative, absurd), PERMISSION_DENIED
    (outside every root; said before whether the file exists, so nothing leaks), FAILED_PRECONDITION
    (no roots configured) or NOT_FOUND (inside but missing). Messages quote the path as sent and the
    roots as configured, never what the path resolved to (that goes to the server log).
    """
    if not slide_path:
        raise RequestRefused("INVALID_ARGUMENT", "slide_path is empty; give the absolute path of the slide")
    check_lengths(slide_path=slide_path)
    shown = untrusted(slide_path)
    if "\x00" in slide_path or any(len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES
                                   for part in slide_path.split("/")):
        raise RequestRefused(
            "INVALID_ARGUMENT",
            f"slide_path {shown} is not a usable path (a NUL byte, or a name longer than {MAX_NAME_BYTES} bytes)",
        )
    if not os.path.isabs(slide_path):
        raise RequestRefused(
            "INVALID_ARGUMENT", f"slide_path {shown} is relative; give an absolute path as the daemon sees it"
        )
    if not roots:
        raise RequestRefused(
            "FAILED_PRECONDITION",
            "this server accepts no submitted slides: no allowed roots; set server.allowed_roots (or watch folders)",
        )
    real = real_path_inside(slide_path, roots)
    if real is None:
        raise RequestRefused(
            "PERMISSION_DENIED",
            f"slide_path {shown} is outside the allowed roots ({', '.join(str(r) for r in roots)}), "
            "or a symlink or '..' in it leads outside them",
            f"it resolves to {untrusted(os.path.realpath(slide_path))}",
        )
    try:
        found = real.exists()
        detail = ""
    except OSError as exc:
        found, detail = False, f"looking it up failed: {exc}"
    if not found:
        raise RequestRefused("NOT_FOUND", f"slide_path {shown} does not exist on the server", detail)
    return real
