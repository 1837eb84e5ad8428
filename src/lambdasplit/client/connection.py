"""The device's connection to a body server: one persistent WebSocket, request/response frames.

Never a connection per token (the paper's reference code opens one per token). TCP_NODELAY is set
because each step is one small frame waiting for its answer: Nagle's algorithm would hold it back.
Compression is off: hidden states do not compress, and deflate would add latency on both ends.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import torch
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI, WebSocketException
from websockets.sync.client import ClientConnection, connect

from lambdasplit import __version__
from lambdasplit.errors import ConfigError, RemoteError, WireError
from lambdasplit.generation.session import Traffic
from lambdasplit.wire import (
    Frame,
    FrameFlags,
    FrameLimits,
    MessageType,
    WireDtype,
    decode_frame,
    encode_frame,
    frame_tensor,
    tensor_frame,
)

PROTOCOL = 1
_TCP_INFO_BYTES = struct.Struct("<QQ")  # tcpi_bytes_acked, tcpi_bytes_received at offset 120 (Linux >= 4.2)


@dataclass(frozen=True)
class SocketBytes:
    """TCP payload bytes at the socket (WebSocket framing and the HTTP upgrade included)."""

    sent: int
    received: int

    def __sub__(self, other: SocketBytes) -> SocketBytes:
        return SocketBytes(self.sent - other.sent, self.received - other.received)


@dataclass(frozen=True)
class CloudText:
    """A cloud-only server's answer to GENERATE."""

    text: str
    new_tokens: int
    prompt_tokens: int
    finish_reason: str


class CloudClient:
    """A connection to ``url`` (``ws://`` or ``wss://host:port/v1/split``), handshake done.

    ``welcome`` holds what the server announced: model, fingerprint, split ``layers``, hidden size,
    limits. With ``fingerprint`` given, a server running another model refuses the connection.
    Requests are serialised by a lock, so several threads may share one client.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        fingerprint: str | None = None,
        timeout: float = 60.0,
        ca_file: str | None = None,
        limits: FrameLimits | None = None,
    ) -> None:
        self.url, self.timeout = url, timeout
        self.limits = limits or FrameLimits()
        self._lock = threading.Lock()
        self.frames_sent = self.frames_received = self.bytes_sent = self.bytes_received = 0
        self._ws = self._connect(url, token, timeout, ca_file)
        self._sock: socket.socket = self._ws.socket
        try:
            welcome = self.request(
                Frame.json(
                    MessageType.HELLO,
                    {"protocol": PROTOCOL, "client": f"lambdasplit/{__version__}"}
                    | ({"fingerprint": fingerprint} if fingerprint else {}),
                )
            )
        except BaseException:
            self.close()
            raise
        self.welcome: dict[str, Any] = welcome.json_body()

    def _connect(self, url: str, token: str | None, timeout: float, ca_file: str | None) -> ClientConnection:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ConfigError(f"cloud URL must look like ws://HOST:PORT/v1/split or wss://..., got {url!r}")
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        context = None
        if parts.scheme == "wss":
            context = ssl.create_default_context(cafile=ca_file)
        try:
            sock = socket.create_connection((parts.hostname, port), timeout=timeout)
        except OSError as exc:
            raise WireError(f"cannot reach the body server at {url}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            # __enter__ opens the connection without the context-manager block (closed in self.close()).
            return connect(
                url,
                sock=sock,
                ssl=context,
                server_hostname=parts.hostname if context else None,
                compression=None,
                additional_headers=headers,
                user_agent_header=f"lambdasplit/{__version__}",
                proxy=None,
                open_timeout=timeout,
                ping_interval=None,  # liveness is the request timeout; no background traffic
                max_size=self.limits.max_frame_bytes,
            ).__enter__()
        except InvalidStatus as exc:
            sock.close()
            status = exc.response.status_code
            if status in (401, 403):
                raise RemoteError("the server refused the bearer token (use --token)", "unauthorized") from exc
            raise WireError(f"{url} answered HTTP {status}; is it a lambdasplit body server?") from exc
        except (InvalidURI, WebSocketException, OSError, ssl.SSLError) as exc:
            sock.close()
            raise WireError(f"WebSocket handshake with {url} failed: {exc}") from exc

    # --- requests ---------------------------------------------------------------------------------
    def roundtrip(self, data: bytes) -> bytes:
        """Send one encoded frame, return the raw reply."""
        with self._lock:
            try:
                self._ws.send(data)
                reply = self._ws.recv(timeout=self.timeout)
            except TimeoutError as exc:
                raise WireError(f"no answer from {self.url} within {self.timeout:.0f} s") from exc
            except ConnectionClosed as exc:
                raise WireError(f"connection to {self.url} lost: {exc}") from exc
        if isinstance(reply, str):
            raise WireError("the server sent a text message; expected binary frames")
        self.frames_sent += 1
        self.frames_received += 1
        self.bytes_sent += len(data)
        self.bytes_received += len(reply)
        return reply

    def request(self, frame: Frame) -> Frame:
        """Send ``frame``, return the decoded reply; an ERROR reply raises ``RemoteError``."""
        return _check(decode_frame(self.roundtrip(encode_frame(frame)), self.limits))

    def open_session(self, wire_dtype: WireDtype | str = WireDtype.FLOAT16) -> RemoteBodyLink:
        opened = self.request(Frame.json(MessageType.OPEN, {}))
        return RemoteBodyLink(self, opened.session, WireDtype.parse(wire_dtype))

    def generate_text(
        self, prompt: str | list[dict[str, str]], *, chat: bool = False, system: str | None = None, **sampling: Any
    ) -> CloudText:
        """Cloud-only baseline (``serve --cloud-only``): send the prompt as text, get the generated text back.

        ``sampling`` are ``SamplingParams`` fields. Here the server sees the prompt and the answer in full.
        """
        if "stop" in sampling:
            sampling["stop"] = list(sampling["stop"] or ())
        body = {"prompt": prompt, "chat": chat, "system": system, **sampling}
        reply = self.request(Frame.json(MessageType.GENERATE, body)).json_body()
        return CloudText(
            str(reply["text"]), int(reply["new_tokens"]), int(reply["prompt_tokens"]), str(reply["finish_reason"])
        )

    @property
    def mode(self) -> str:
        """``"split"`` (a body server) or ``"cloud-only"`` (a whole-model server answering GENERATE)."""
        return str(self.welcome.get("mode", "split"))

    def ping(self) -> None:
        self.request(Frame(MessageType.PING))

    def socket_bytes(self) -> SocketBytes | None:
        """TCP payload bytes sent (and acknowledged) and received on this connection; None if unavailable."""
        try:
            info = self._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        except (OSError, AttributeError):
            return None
        if len(info) < 136:
            return None
        acked, received = _TCP_INFO_BYTES.unpack_from(info, 120)
        return SocketBytes(max(0, acked - 1), received)  # the SYN counts as one acked byte

    @property
    def layers(self) -> tuple[int, int]:
        x, y = self.welcome["layers"]
        return int(x), int(y)

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


def _check(frame: Frame) -> Frame:
    if frame.type is MessageType.ERROR:
        body = frame.json_body()
        raise RemoteError(str(body.get("message", "")), str(body.get("code", "error")))
    return frame


class RemoteBodyLink:
    """A ``BodyLink`` to one session on a body server. Counts the frames it sends and receives."""

    def __init__(self, client: CloudClient, session: int, wire_dtype: WireDtype) -> None:
        self.client, self.session, self.wire_dtype = client, session, wire_dtype
        self.traffic = Traffic()
        self.closed = False
        # The last frames as they crossed the wire, for showing what an eavesdropper sees.
        self.last_sent: bytes = b""
        self.last_received: bytes = b""

    def forward(self, hidden: torch.Tensor, position: int, reset: bool = False) -> torch.Tensor:
        """(1, T, D) at ``position`` -> (1, T, D), through the server's body and its KV cache for this session."""
        flags = FrameFlags.RESET if reset else FrameFlags(0)
        start = time.perf_counter()
        frame = tensor_frame(MessageType.FORWARD, hidden[0], self.wire_dtype, self.session, position, flags=flags)
        data = encode_frame(frame)
        raw = self.client.roundtrip(data)
        reply = _check(decode_frame(raw, self.client.limits))
        if reply.type is not MessageType.RESULT or reply.session != self.session or reply.position != position:
            raise WireError(
                f"expected RESULT for session {self.session} at {position}, "
                f"got {reply.type.name} for session {reply.session} at {reply.position}"
            )
        out = frame_tensor(reply, dtype=hidden.dtype, device=hidden.device)
        seconds = time.perf_counter() - start  # encoding, the round trip and decoding: all of it the link's cost
        self.traffic.add(len(data), len(raw), len(frame.payload), len(reply.payload), seconds)
        self.last_sent, self.last_received = data, raw
        return out.unsqueeze(0)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        # If the connection is gone, the server frees that connection's sessions by itself.
        with contextlib.suppress(WireError):
            self.client.request(Frame.json(MessageType.CLOSE, {}, session=self.session))
