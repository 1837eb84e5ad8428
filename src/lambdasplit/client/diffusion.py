"""The device's link to a diffusion body server: `SplitPipeline.generate(prompt, RemoteDiffusionLink(client))`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from lambdasplit.client.connection import CloudClient
from lambdasplit.diffusion.protocol import FrameTraffic, SessionOptions
from lambdasplit.errors import ConfigError, ConnectionLost, RemoteError, WireError
from lambdasplit.wire import Frame, MessageType

T = TypeVar("T")


class RemoteDiffusionLink:
    """One image session at a time on a `CloudClient` connected to ``lambdasplit serve --pipeline ...``.

    ``traffic`` counts whole frames each way; ``client.socket_bytes()`` gives the TCP bytes at the socket.
    A server lost between images (a restart, a crash) is reconnected to when the next image opens, within the
    client's ``reconnect_deadline`` (any of its URLs; a draining server's GOAWAY moves it as for text). An image
    whose connection is lost mid-way fails with ``ConnectionLost``: its session and steps were on the lost server;
    ``restarting`` makes it again from the start.
    """

    def __init__(self, client: CloudClient) -> None:
        if client.mode != "diffusion":
            raise ConfigError(f"{client.url} serves {client.mode!r}, not a diffusion body (serve --pipeline ...)")
        self.client = client
        self.traffic = FrameTraffic()
        self._handle = 0
        self.opened = 0  # sessions opened on this link so far (a caller can tell whether an image got going)

    @property
    def handle(self) -> int:
        return self._handle

    def open(self, options: SessionOptions) -> dict[str, Any]:
        frame, epoch = Frame.json(MessageType.OPEN, options.to_json()), self.client.epoch
        before = (self.client.bytes_sent, self.client.bytes_received)
        try:
            reply = self.client.request(frame)
        except ConnectionLost:  # lost since the last image: connect again (its handshake is not the image's)
            self.client.reconnect(epoch)
            before = (self.client.bytes_sent, self.client.bytes_received)
            reply = self.client.request(frame)
        self._count(before, frames_up=1, frames_down=1)
        self._handle = reply.session
        self.opened += 1
        return reply.json_body()

    def send(self, frame: Frame) -> None:
        before = (self.client.bytes_sent, self.client.bytes_received)
        self.client.send(frame)
        self._count(before, frames_up=1)

    def receive(self) -> Frame:
        before = (self.client.bytes_sent, self.client.bytes_received)
        frame = self.client.receive()
        self._count(before, frames_down=1)
        return frame

    def close(self) -> dict[str, Any]:
        if not self._handle:
            return {}
        handle, self._handle = self._handle, 0
        try:
            self.send(Frame(MessageType.CLOSE, session=handle))
            # After an error on the device, frames the cloud already streamed may precede CLOSED: skip them.
            for _ in range(100_000):
                reply = self.receive()
                if reply.type is MessageType.CLOSED:
                    return reply.json_body()
        except (WireError, RemoteError):
            pass
        return {}

    def _count(self, before: tuple[int, int], frames_up: int = 0, frames_down: int = 0) -> None:
        self.traffic.frames_up += frames_up
        self.traffic.frames_down += frames_down
        self.traffic.bytes_up += self.client.bytes_sent - before[0]
        self.traffic.bytes_down += self.client.bytes_received - before[1]


def restarting(link: Any, make: Callable[[], T], on_restart: Callable[[ConnectionLost], None] | None = None) -> T:
    """``make()``: one image over ``link``, made once more from the start if the connection is lost after its
    session opened (its steps were on the lost server; the next OPEN reconnects, and the seed gives the same
    image). ``on_restart(lost)`` is called before it starts again. Lost before the session opened, the
    reconnection already failed within the client's deadline: raised at once, as is a second loss."""
    for attempt in (1, 2):
        opened = getattr(link, "opened", 0)
        try:
            return make()
        except ConnectionLost as lost:
            if attempt == 2 or getattr(link, "opened", 0) == opened:
                raise
            if on_restart is not None:
                on_restart(lost)
    raise AssertionError("unreachable")
