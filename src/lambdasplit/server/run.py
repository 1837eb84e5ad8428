"""Run a server (LLM or diffusion body) under uvicorn, announcing the bound address once it listens."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from types import FrameType

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from lambdasplit.server.app import PATH, BodyServer
from lambdasplit.server.base import FrameServer
from lambdasplit.server.settings import ServerSettings
from lambdasplit.split.loader import SplitModel
from lambdasplit.tls import certificate_fingerprint

#: The line a server prints on stdout once it listens: READY, the URL, and for wss:// the certificate's
#: fingerprint (what devices pin), separated by a space.
READY = "lambdasplit-serve: listening on "


def announce(url: str, fingerprint: str | None) -> None:
    """Print the ready line (``lambdasplit.server.process`` waits for it)."""
    print(f"{READY}{url}" + (f" {fingerprint}" if fingerprint else ""), flush=True)


class _AnnouncingServer(uvicorn.Server):
    """uvicorn.Server that reports the real port after binding, so ``--port 0`` is race-free for callers, and
    drains on SIGTERM.

    Draining (``FrameServer.drain``): the first SIGTERM, or POST /admin/drain, starts it instead of uvicorn's
    immediate shutdown; the server exits once ``drained`` (its devices have left, or the deadline passed). A second
    SIGTERM, or Ctrl-C, exits at once.
    """

    def __init__(
        self, config: uvicorn.Config, on_ready: Callable[[str], None], app: FrameServer | None = None, drain: float = 0
    ) -> None:
        super().__init__(config)
        self._on_ready = on_ready
        self._app, self._drain_seconds = app, drain
        self._drain_asked = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        draining = self._app is not None and self._app.draining_until is not None
        if sig == signal.SIGTERM and self._app is not None and self._drain_seconds > 0 and not draining:
            self._drain_asked = True  # started on the loop's next tick (this runs in a signal handler)
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._app is not None:
            if self._drain_asked:
                self._drain_asked = False
                await self._app.drain(self._drain_seconds)
            if self._app.drained():
                self.should_exit = True
        return await super().on_tick(counter)

    async def startup(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        await super().startup(sockets)
        if self.should_exit:  # bind failed; uvicorn has said why
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        scheme = "wss" if self.config.ssl_certfile else "ws"
        host = f"[{host}]" if ":" in host else host
        self._on_ready(f"{scheme}://{host}:{port}{PATH}")


def timed_handshakes(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, closing a connection that has not sent a complete request ``seconds`` after it opened.

    uvicorn's own keep-alive timeout starts only after a first response, so a client that connects and sends
    nothing (or trickles its headers) would hold the socket forever. Once the request arrives (uvicorn's request
    cycle exists) or the connection was upgraded to a WebSocket (the transport has another protocol), the timer
    does nothing.
    """

    class TimedHandshake(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._handshake = self.loop.call_later(seconds, self._too_slow)

        def _too_slow(self) -> None:
            transport = self.transport
            if transport.get_protocol() is self and self.cycle is None and not transport.is_closing():
                transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._handshake.cancel()
            super().connection_lost(exc)

    return TimedHandshake


def serve(
    split: SplitModel | Mapping[str, SplitModel],
    settings: ServerSettings,
    on_ready: Callable[[str], None] | None = None,
    executor: ThreadPoolExecutor | None = None,
) -> None:
    """Serve until interrupted (SIGINT/SIGTERM). ``on_ready(url)`` is called once the socket listens.

    ``split`` may map user groups to their bodies (``BodyServer``).

    ``executor``: the compute thread the body's forwards run on (``batching.compute_thread``; a new one by default).
    ``lambdasplit serve`` loads the split on it too (``executor.submit(load_split, ...).result()``), so that one thread
    runs all of the process's torch work: see ``compute_thread``.

    Beyond loopback it serves wss:// unless ``settings.tls`` is "off" (see ``ServerSettings.tls``); call
    ``settings.with_certificate()`` first to know the certificate (and its fingerprint) it will use.
    """
    serve_app(BodyServer(split, settings, executor), settings, on_ready)


def serve_app(server: FrameServer, settings: ServerSettings, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve any lambdasplit server (an LLM body, a diffusion body) under uvicorn until interrupted.

    Without ``on_ready``, the ready line (``announce``) goes to stdout, with the certificate's fingerprint.
    """
    settings = settings.with_certificate()
    if on_ready is None:
        fingerprint = certificate_fingerprint(settings.tls_cert) if settings.tls_cert else None
        on_ready = lambda url: announce(url, fingerprint)  # noqa: E731 - a one-line callback
    config = uvicorn.Config(
        server.app,
        host=settings.host,
        port=settings.port,
        ws="websockets-sansio",
        http=timed_handshakes(settings.handshake_timeout),
        # Frames up to max_frame_bytes are parsed and refused with an error frame; far larger messages are
        # cut off by the WebSocket layer itself (close code 1009) before they are buffered.
        ws_max_size=settings.max_frame_bytes + 65536,
        ws_per_message_deflate=False,  # hidden states do not compress; deflate would only add latency
        ws_ping_interval=settings.ws_ping_interval,
        ws_ping_timeout=settings.ws_ping_interval,
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=2,
    )
    _AnnouncingServer(config, on_ready, server, settings.drain_seconds).run()
