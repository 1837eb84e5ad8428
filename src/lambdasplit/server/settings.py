"""Body server settings: typed, frozen, validated; every limit has a default (see `lambdasplit serve --help`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from lambdasplit.errors import ConfigError
from lambdasplit.tls import is_loopback, self_signed
from lambdasplit.tls.certificate import default_names
from lambdasplit.wire import FrameLimits, WireDtype

TlsMode = Literal["auto", "on", "off"]
TLS_MODES: tuple[TlsMode, ...] = ("auto", "on", "off")


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8765
    #: Accepted bearer tokens; empty means no authentication (fine on loopback, not on a network).
    tokens: tuple[str, ...] = ()
    max_sessions: int = 64
    #: Positions one session may hold in its KV cache (prompt + generated tokens).
    max_context: int = 8192
    #: Seconds a session may sit unused before its KV cache is freed.
    idle_ttl: float = 300.0
    #: Bytes all sessions' KV caches may hold together; a FORWARD that would go past it is refused
    #: (``memory_full``) instead of the process running out of memory.
    kv_budget_bytes: int = 4 << 30
    #: Most decode steps of different sessions run as one batched forward (1 turns batching off).
    max_batch: int = 16
    #: Seconds between WebSocket pings to each client; a client that has not answered one within as many
    #: seconds again is dropped and its sessions freed (a device that vanished without closing).
    ws_ping_interval: float = 20.0
    max_frame_bytes: int = 64 << 20
    #: WebSocket connections held at once, from everyone and from one client address; more are refused before the
    #: upgrade (HTTP 503, ``too_many_connections``), so a client that opens connections in a loop cannot exhaust
    #: the server's sockets or its other clients' share.
    max_connections: int = 256
    max_connections_per_client: int = 32
    #: Seconds a TCP connection may take to send a complete HTTP request (the WebSocket upgrade) before it is
    #: closed: half-open and trickled handshakes do not hold a socket forever.
    handshake_timeout: float = 10.0
    #: On SIGTERM (or POST /admin/drain) the server drains: it refuses new connections and sessions, sends every
    #: device GOAWAY with this deadline, serves the steps still coming, and exits once its devices have left or
    #: the deadline has passed. 0: exit at once, dropping connected devices.
    drain_seconds: float = 30.0
    wire_dtypes: tuple[WireDtype, ...] = field(default_factory=lambda: tuple(d for d in WireDtype if d.is_tensor))
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: "auto": wss:// with ``tls_cert`` or when listening beyond loopback (then, without ``tls_cert``, on a
    #: self-signed certificate made once in ``tls_dir``); "on": wss:// on loopback too; "off": plain ws://
    #: wherever it listens (``--insecure``: TLS terminated elsewhere).
    tls: TlsMode = "auto"
    #: Where the self-signed certificate is kept (default: ``lambdasplit.tls.state_dir() / "tls"``).
    tls_dir: Path | None = None
    #: Serve whole generations from text (GENERATE) instead of body sessions: the cloud-only baseline,
    #: where the server sees the prompt and the answer. Split clients are refused by such a server.
    cloud_only: bool = False

    def __post_init__(self) -> None:
        checks = {
            "port": (self.port, 0 <= self.port <= 65535, "0..65535 (0 picks a free port)"),
            "max_sessions": (self.max_sessions, self.max_sessions >= 1, ">= 1"),
            "max_context": (self.max_context, self.max_context >= 1, ">= 1"),
            "idle_ttl": (self.idle_ttl, self.idle_ttl > 0, "> 0 seconds"),
            "kv_budget_bytes": (self.kv_budget_bytes, self.kv_budget_bytes >= 1 << 20, ">= 1 MiB"),
            "max_batch": (self.max_batch, self.max_batch >= 1, ">= 1 (1: no batching)"),
            "ws_ping_interval": (self.ws_ping_interval, self.ws_ping_interval > 0, "> 0 seconds"),
            "max_frame_bytes": (self.max_frame_bytes, self.max_frame_bytes >= 1024, ">= 1024"),
            "max_connections": (self.max_connections, self.max_connections >= 1, ">= 1"),
            "max_connections_per_client": (
                self.max_connections_per_client,
                1 <= self.max_connections_per_client <= self.max_connections,
                "1 .. max_connections",
            ),
            "handshake_timeout": (self.handshake_timeout, self.handshake_timeout > 0, "> 0 seconds"),
            "drain_seconds": (self.drain_seconds, self.drain_seconds >= 0, ">= 0 seconds (0: no draining)"),
        }
        for name, (value, ok, allowed) in checks.items():
            if not ok:
                raise ConfigError(f"{name}={value!r} is invalid: must be {allowed}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
        if self.tls not in TLS_MODES:
            raise ConfigError(f"tls={self.tls!r} is invalid: must be one of {', '.join(TLS_MODES)}")
        if self.tls == "off" and self.tls_cert is not None:
            raise ConfigError("--insecure serves plain ws://, which contradicts --tls-cert: pass one or the other")
        if any(not t for t in self.tokens):
            raise ConfigError("an empty token would let anyone in; pass a non-empty secret")
        self.frame_limits  # noqa: B018 - validates the derived limits now, before any model is loaded

    @property
    def frame_limits(self) -> FrameLimits:
        return FrameLimits(max_frame_bytes=self.max_frame_bytes, max_json_bytes=min(64 << 10, self.max_frame_bytes))

    @property
    def encrypted(self) -> bool:
        """Whether this server speaks TLS (wss://): see ``tls``."""
        if self.tls_cert is not None or self.tls == "on":
            return True
        return self.tls == "auto" and not is_loopback(self.host)

    @property
    def scheme(self) -> str:
        return "wss" if self.encrypted else "ws"

    def with_certificate(self) -> ServerSettings:
        """These settings with the certificate to serve filled in: ``tls_cert`` when given, else, when
        ``encrypted``, the self-signed one in ``tls_dir`` (made the first time); unchanged for plain ws://."""
        if self.tls_cert is not None or not self.encrypted:
            return self
        own = self_signed(self.tls_dir, default_names(self.host))
        return replace(self, tls_cert=own.cert, tls_key=own.key)
