"""The gRPC API for lab software: service `mitosis.edge.v1.EdgeService`, auth, health and reflection.

`start_server` returns a started, bound server (port 0 picks a free one). The package, one module per
concern:

- ``servicer``  the RPC methods, the token interceptor, failures as gRPC statuses
- ``events``    the broadcaster that fans the store's event log out to WatchEvents subscribers
- ``convert``   store records (jobs, results, events, status) to protobuf messages
- ``auth``      tokens and roles, allowed roots, request field limits (pure Python; the web UI uses it too)
- here          the factory: TLS, options, health, reflection, start and stop
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edge.config import ServerConfig
from edge.errors import ConfigError

try:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from edge._proto import edge_pb2_grpc as pb_grpc
except ImportError as _exc:  # pragma: no cover - grpcio is a dependency
    raise ImportError(
        f"the gRPC server needs grpcio, grpcio-health-checking and grpcio-reflection ({_exc}); "
        "reinstall mitosis-edge: pip install mitosis-edge"
    ) from _exc

from edge.service.server.auth import load_tokens
from edge.service.server.events import EventBroadcaster
from edge.service.server.servicer import SERVICE_NAME, AuthInterceptor, DaemonControl, EdgeServicer, RefusalLog
from edge.vocab import LAST_SEQUENCE_KEY

__all__ = [
    "LAST_SEQUENCE_KEY",
    "SERVICE_NAME",
    "DaemonControl",
    "EventBroadcaster",
    "RunningServer",
    "check_certificate",
    "start_server",
]

log = logging.getLogger(__name__)

CERT_WARN_DAYS = 30  # a server certificate expiring sooner is warned about at start


class RunningServer:
    """A started gRPC server. `stop` ends streams (UNAVAILABLE, clients resume) and joins every thread."""

    def __init__(
        self,
        server: grpc.Server,
        executor: ThreadPoolExecutor,
        servicer: EdgeServicer,
        health_servicer: health.HealthServicer,
        broadcaster: EventBroadcaster,
        host: str,
        port: int,
    ) -> None:
        self._server = server
        self._executor = executor
        self._servicer = servicer
        self._health = health_servicer
        self._broadcaster = broadcaster
        self._serving_override: bool | None = None
        self._serving: bool | None = None
        self._stopped = False
        self._lock = threading.Lock()
        self.host = host
        self.port = port

    @property
    def address(self) -> str:
        """HOST:PORT a client connects to (IPv6 hosts in brackets)."""
        host = self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"

    @property
    def subscribers(self) -> int:
        """WatchEvents streams receiving live events now."""
        return self._broadcaster.subscriber_count()

    def set_serving(self, serving: bool) -> None:
        """Force the health status (SERVING / NOT_SERVING); until called it follows control.is_ready()."""
        with self._lock:
            self._serving_override = serving
        self._apply_health(serving)

    def _follow_readiness(self) -> None:
        with self._lock:
            override = self._serving_override
        serving = override if override is not None else bool(self._servicer.control.is_ready())
        self._apply_health(serving)

    def _apply_health(self, serving: bool) -> None:
        with self._lock:
            if self._stopped or serving == self._serving:
                return
            self._serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            self._health.set(service, status)
        log.info("gRPC health: %s", "SERVING" if serving else "NOT_SERVING (not ready, or stopping)")

    def stop(self, grace: float = 5.0) -> None:
        """Stop taking calls, end streams, wait up to `grace` s for unary calls, join every thread. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._health.enter_graceful_shutdown()
        self._servicer.stopping.set()
        self._server.stop(grace).wait()
        self._broadcaster.stop()
        self._executor.shutdown(wait=True)
        log.info("gRPC server on %s stopped", self.address)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    config: ServerConfig,
    control: DaemonControl,
    *,
    watch_folders: Sequence[str] = (),
    export_root: Path | None = None,
) -> RunningServer:
    """Start the gRPC API on ``config.listen``. Raises ConfigError naming the setting when it cannot.

    TLS when ``tls_cert``/``tls_key`` are set (mutual TLS with ``tls_client_ca``); plain text only
    with ``insecure = true``. SubmitSlide accepts paths under ``allowed_roots`` (default: the watch folders).
    """
    config.validate()
    if not config.tls and not config.insecure:
        raise ConfigError(
            "the gRPC server needs TLS or an explicit choice of plain text: set server.tls_cert and "
            "server.tls_key (plus server.tls_client_ca for mutual TLS), or server.insecure = true (serve --insecure)"
        )
    credentials = _server_credentials(config) if config.tls else None
    tokens = load_tokens(config.tokens_file) if config.tokens_file else None
    host = config.listen.rpartition(":")[0]
    bare_host = host.strip("[]")
    if config.insecure and not _is_loopback(bare_host):
        log.warning(
            "gRPC API on %s without TLS: tokens and results cross the network in plain text; "
            "set server.tls_cert/tls_key or listen on 127.0.0.1", config.listen
        )
    if tokens is None:  # on loopback only this machine's users can call: worth a note, not a warning
        log.log(
            logging.INFO if _is_loopback(bare_host) else logging.WARNING,
            "gRPC API without tokens (server.tokens_file unset): every caller%s may submit and cancel",
            " on this machine" if _is_loopback(bare_host) else "",
        )
    roots = tuple(config.allowed_roots) or tuple(str(f) for f in watch_folders)
    size = config.max_message_mb * 1024 * 1024
    options = [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.so_reuseport", 0),  # a second daemon on the same port must fail, not share it
    ]
    # Streams have threads of their own on top of max_workers, so unary calls always find one.
    refusals = RefusalLog()
    executor = ThreadPoolExecutor(max_workers=config.max_workers + config.max_streams, thread_name_prefix="edge-grpc")
    server = grpc.server(
        executor,
        interceptors=[AuthInterceptor(tokens, refusals)] if tokens is not None else [],
        options=options,
        maximum_concurrent_rpcs=config.max_workers * 4 + config.max_streams,
    )
    broadcaster_holder: list[RunningServer] = []
    broadcaster = EventBroadcaster(
        control.store, on_tick=lambda: broadcaster_holder[0]._follow_readiness() if broadcaster_holder else None
    )
    servicer = EdgeServicer(
        config, control, broadcaster, roots, started_at=time.monotonic(), tokens=tokens, refusals=refusals,
        export_root=export_root,
    )
    pb_grpc.add_EdgeServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call, unused-ignore]
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        if credentials is not None:
            port = server.add_secure_port(config.listen, credentials)
        else:
            port = server.add_insecure_port(config.listen)
    except RuntimeError as exc:
        port = 0
        reason = str(exc)
    else:
        reason = "is the port in use, or the host not an address of this machine?"
    if not port:
        server.stop(None)
        executor.shutdown(wait=True)
        raise ConfigError(f"cannot listen on server.listen={config.listen!r}: {reason}")
    running = RunningServer(server, executor, servicer, health_servicer, broadcaster, bare_host, port)
    running._follow_readiness()
    broadcaster_holder.append(running)
    server.start()
    broadcaster.start()
    log.info(
        "gRPC API on %s (%s, %s); SubmitSlide roots: %s",
        running.address,
        "mutual TLS" if config.tls_client_ca else "TLS" if config.tls else "plain text",
        f"{len(tokens)} token(s)" if tokens is not None else "no tokens",
        ", ".join(roots) or "none",
    )
    return running


def _server_credentials(config: ServerConfig) -> grpc.ServerCredentials:
    cert = _read_pem("server.tls_cert", config.tls_cert)
    key = _read_pem("server.tls_key", config.tls_key)
    check_certificate(config, cert, key)
    client_ca = _read_pem("server.tls_client_ca", config.tls_client_ca) if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def check_certificate(
    config: ServerConfig, cert_pem: bytes, key_pem: bytes, *, now: datetime.datetime | None = None
) -> None:
    """Refuse (ConfigError) a server certificate that has expired, is not valid yet, or does not match its key;
    warn when it expires within CERT_WARN_DAYS. Clients refuse such a certificate anyway: say so at start, by name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError as exc:
        raise ConfigError(f"server.tls_cert={config.tls_cert!r} holds no readable certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"server.tls_key={config.tls_key!r} is not a readable private key without a passphrase ({exc})"
        ) from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise ConfigError(
            f"server.tls_key={config.tls_key!r} does not belong to the certificate server.tls_cert={config.tls_cert!r} "
            "(their public keys differ); give the key the certificate was issued for"
        )
    moment = now or datetime.datetime.now(datetime.UTC)
    expires = cert.not_valid_after_utc
    if expires <= moment:
        raise ConfigError(
            f"server.tls_cert={config.tls_cert!r} expired on {expires:%Y-%m-%d %H:%M} UTC; clients refuse an expired "
            "certificate: renew it (same key or a new one), then start the daemon again"
        )
    if cert.not_valid_before_utc > moment:
        raise ConfigError(
            f"server.tls_cert={config.tls_cert!r} is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; "
            "check this machine's clock (timedatectl) or the certificate"
        )
    if expires - moment < datetime.timedelta(days=CERT_WARN_DAYS):
        log.warning("the server certificate %s expires on %s UTC, in %d day(s): renew it before then, or clients "
                    "will refuse to connect", config.tls_cert, f"{expires:%Y-%m-%d %H:%M}", (expires - moment).days)


def _read_pem(setting: str, path: str) -> bytes:
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}={path!r} cannot be read: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{setting}={path!r} is not a PEM file (no '-----BEGIN' line)")
    return data


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

