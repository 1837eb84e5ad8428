"""Session servers and device connections that block: one thread per session (websockets' synchronous API).

The body servers whose computation stops mid-forward to talk to someone else (the share servers ask their peer
and the dealer, ``mpc.server``; the PrivateLoRA server asks the device at every adapted layer,
``privatelora.server``) run each session in its own thread. What they share lives here: the server's lifecycle,
the coded error that ends a session, and a device's connection with its TLS rule.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from http import HTTPStatus
from ssl import SSLContext
from typing import Any
from urllib.parse import urlsplit

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.http11 import Request, Response
from websockets.sync.client import ClientConnection, connect
from websockets.sync.server import Server, ServerConnection, serve

from lambdasplit.auth import bearer_authorized, bearer_header
from lambdasplit.errors import CodedError, ConfigError, LambdaSplitError, RemoteError, WireError
from lambdasplit.tls import TlsTrust, is_loopback

DRAINING = "draining: this server is restarting\n"


class SessionServer:
    """``handler(connection)`` for every WebSocket connection to ``host:port``, each in its own thread.

    With ``tokens``, a handshake whose ``Authorization`` header names none of them is refused (HTTP 401) before
    the handler sees it, as the body server refuses it (``auth``). ``drain`` refuses new connections (HTTP 503)
    and waits, within a deadline, for the sessions in progress to end: a rolling restart loses no device's
    generation (``serve`` calls it on SIGTERM). ``start`` serves in a background thread (tests); the command line
    calls ``serve_forever``.
    """

    def __init__(
        self,
        handler: Callable[[ServerConnection], None],
        host: str,
        port: int,
        *,
        max_size: int,
        timeout: float,
        ssl: SSLContext | None,
        name: str,
        tokens: Sequence[str] = (),
        max_sessions: int | None = None,
    ) -> None:
        # ``max_sessions``: connections (one session each) served at once; one more is told ``busy`` and closed.
        self.tokens, self.max_sessions = tuple(tokens), max_sessions
        self.refused = 0  # handshakes refused for their token
        self.draining = False
        self._active = 0  # handlers running
        # Handshakes answered 101 whose handler has not started yet (its connection's thread): a drain waits for
        # them too. A thread that ends without running the handler (its handshake failed) no longer counts.
        self._accepted: dict[ServerConnection, threading.Thread] = {}
        self._idle = threading.Condition()
        self._handler = handler
        self.server: Server = serve(
            self._run,
            host,
            port,
            max_size=max_size,
            compression=None,
            open_timeout=timeout,
            ssl=ssl,
            process_request=self._check_request,
            process_response=self._count_accepted,
        )
        self.scheme = "ws" if ssl is None else "wss"
        self._name = name
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.socket.getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        host = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{host}:{port}"

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if self.draining:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, DRAINING)
        if bearer_authorized(request.headers.get("Authorization"), self.tokens):
            return None
        self.refused += 1
        return connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized: bad or missing bearer token\n")

    def _count_accepted(self, connection: ServerConnection, request: Request, response: Response) -> Response | None:
        """The last word on a handshake: a session counts from the moment its 101 is decided, so a drain that
        starts before its handler's first line still waits for it (or, if the drain came first, it is refused)."""
        if response.status_code != HTTPStatus.SWITCHING_PROTOCOLS:
            return None
        with self._idle:
            if self.draining:
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, DRAINING)
            self._forget_failed()
            self._accepted[connection] = threading.current_thread()
        return None

    def _forget_failed(self) -> None:
        """Drop accepted handshakes whose thread ended without reaching the handler. Holds the lock."""
        self._accepted = {c: t for c, t in self._accepted.items() if t.is_alive()}

    def _run(self, connection: ServerConnection) -> None:
        with self._idle:
            self._accepted.pop(connection, None)
            full = self.max_sessions is not None and self._active >= self.max_sessions
            if not full:
                self._active += 1
        if full:
            message = f"this server is at its limit of {self.max_sessions} sessions; try again later"
            send_error(connection, WireError(message, code="busy"))
            return
        try:
            self._handler(connection)
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def drain(self, seconds: float) -> int:
        """Refuse new connections from now on (HTTP 503) and wait up to ``seconds`` for the running ones to end;
        returns how many are still running (``close`` then ends them with 1001, going away)."""
        deadline = time.monotonic() + seconds
        with self._idle:
            self.draining = True
            while True:
                self._forget_failed()
                running = self._active + len(self._accepted)
                left = deadline - time.monotonic()
                if not running or left <= 0:
                    return running
                self._idle.wait(min(left, 0.05))  # (a failed handshake's thread ends without a word)

    def start(self) -> SessionServer:
        self._thread = threading.Thread(target=self.server.serve_forever, name=self._name, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.server.serve_forever()

    def close(self) -> None:
        self.server.shutdown()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> SessionServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def control_type(data: str) -> str:
    """The ``type`` of a JSON control message, or ``malformed``."""
    try:
        return str(json.loads(data).get("type"))
    except (ValueError, AttributeError):
        return "malformed"


def receive_open(ws: ServerConnection, timeout: float, fields: str) -> dict[str, Any]:
    """A session's first message, a JSON object; ``timeout`` or ``bad_frame`` (naming ``fields``) otherwise."""
    try:
        raw = ws.recv(timeout=timeout)
    except TimeoutError:
        raise WireError(f"the device sent no open message within {timeout:.0f} s", code="timeout") from None
    try:
        opened = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        opened = None
    if not isinstance(opened, dict) or opened.get("type") != "open":
        raise WireError(f"the first message must be {{type: open, {fields}}}", code="bad_frame")
    return opened


def send_error(ws: ServerConnection, error: LambdaSplitError) -> None:
    """End a session with ``{"type": "error", "code", "message"}``; a device already gone is no error."""
    code = error.code if isinstance(error, CodedError) else "bad_request"
    try:
        ws.send(json.dumps({"type": "error", "code": code, "message": str(error)}))
        ws.close()
    except ConnectionClosed:
        pass


def connect_session(
    url: str,
    *,
    what: str,
    exposes: str,
    trust: TlsTrust,
    timeout: float,
    max_size: int,
    stack: contextlib.ExitStack,
    token: str | None = None,
) -> ClientConnection:
    """A device's connection to ``what`` at ``url`` (ws:// or wss://), entered on ``stack``, with ``token`` as its
    bearer token when given.

    Plain ws:// beyond loopback is refused unless ``trust.insecure``: it would show ``exposes`` (and the token) to
    the network.
    """
    parsed = urlsplit(url)
    host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "wss" else 80)
    if parsed.scheme not in ("ws", "wss"):
        raise ConfigError(f"{what}'s URL is ws://HOST:PORT or wss://HOST:PORT, got {url!r}")
    if parsed.scheme == "ws" and not is_loopback(host) and not trust.insecure:
        raise ConfigError(
            f"{url}: plain ws:// beyond loopback would show {exposes} to the network; serve {what} with TLS "
            "(wss://), or pass --insecure if TLS is terminated on a path you trust"
        )
    context = trust.context(host, port) if parsed.scheme == "wss" else None
    try:
        return stack.enter_context(
            connect(
                url,
                max_size=max_size,
                compression=None,
                open_timeout=timeout,
                ssl=context,
                additional_headers=bearer_header(token),
            )
        )
    except InvalidStatus as e:
        if e.response.status_code in (401, 403):
            said = "refused the bearer token" if token else "needs a bearer token"
            raise RemoteError(f"{what} at {url} {said} (use --token)", "unauthorized") from None
        if e.response.status_code == 503:
            raise RemoteError(f"{what} at {url} is draining (a restart): connect to another one", "draining") from None
        raise WireError(f"cannot reach {what} at {url}: {e}", code="unreachable") from None
    except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as e:
        raise WireError(f"cannot reach {what} at {url}: {e}", code="unreachable") from None
