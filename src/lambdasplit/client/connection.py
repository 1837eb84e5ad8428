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
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import torch
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus, InvalidURI, WebSocketException
from websockets.sync.client import ClientConnection, connect

from lambdasplit import __version__
from lambdasplit.auth import bearer_header
from lambdasplit.errors import (
    ConfigError,
    ConnectionLost,
    LambdaSplitError,
    RemoteError,
    SessionError,
    StaleConnection,
    UntrustedCertificate,
    WireError,
)
from lambdasplit.tls import TlsTrust
from lambdasplit.traffic import Traffic
from lambdasplit.wire import (
    PROTOCOL,
    Frame,
    FrameFlags,
    FrameLimits,
    MessageType,
    WireDtype,
    decode_frame,
    encode_frame,
    frame_tensor,
    raise_for_error,
    tensor_frame,
)

__all__ = ["PROTOCOL", "CloudClient", "CloudText", "RemoteBodyLink", "SocketBytes", "StaleConnection"]

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

    ``url`` may be a list: the first that answers is used, and ``reconnect`` (called by sessions whose
    connection was lost) tries them all, in order, for up to ``reconnect_deadline`` seconds. A request
    with no answer within ``timeout`` seconds counts as a lost connection.

    ``group`` names the user group of a server that hosts several (a model developer's bundle): the server
    checks that ``fingerprint`` is that group's body.

    ``trust`` says which ``wss://`` certificates to accept (``TlsTrust``: a pinned fingerprint, a CA, or trust
    on first use, the default); a certificate it refuses raises ``UntrustedCertificate`` before anything is
    sent, and is never retried or failed over. A token is never sent over plain ``ws://`` beyond loopback
    unless ``trust.insecure``.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        token: str | None = None,
        fingerprint: str | None = None,
        timeout: float = 60.0,
        trust: TlsTrust | None = None,
        limits: FrameLimits | None = None,
        reconnect_deadline: float = 60.0,
        ca_file: str | None = None,
        group: str | None = None,
    ) -> None:
        self.urls = [url] if isinstance(url, str) else list(url)
        if not self.urls:
            raise ConfigError("at least one body server URL is needed")
        self.url, self.timeout, self.reconnect_deadline = self.urls[0], timeout, reconnect_deadline
        self.limits = limits or FrameLimits()
        self.trust = _trust(trust, ca_file)
        self._token, self._fingerprint, self._group = token, fingerprint, group
        self._lock = threading.Lock()
        self._reconnect_lock = threading.Lock()
        self.epoch = 0  # +1 per (re)connection; sessions of an older epoch are gone
        self.reconnects = 0
        self.moves = 0  # reconnections because the server said GOAWAY (draining), before it dropped us
        self.going_away: dict[str, Any] | None = None  # the GOAWAY of the current connection, if one came
        self._next_move = 0.0  # time.monotonic() before which a move that found nowhere to go is not retried
        self.frames_sent = self.frames_received = self.bytes_sent = self.bytes_received = 0
        errors: list[LambdaSplitError] = []
        for candidate in self.urls:
            try:
                self.welcome: dict[str, Any] = self._open(candidate)
                break
            except (RemoteError, UntrustedCertificate):
                raise  # refused (token, model, certificate): another URL of the deployment must not be tried blindly
            except WireError as exc:
                errors.append(exc)
        else:
            raise errors[-1] if len(errors) == 1 else WireError("; ".join(str(e) for e in errors))

    def _open(self, url: str) -> dict[str, Any]:
        """Connect to ``url`` and shake hands; only then does it become the client's connection."""
        ws, welcome = self._handshake_only(url)
        with self._lock:
            self._ws, self._sock, self.url = ws, ws.socket, url
            self.epoch += 1
            self.going_away = None
        return welcome

    def _handshake_only(self, url: str) -> tuple[ClientConnection, dict[str, Any]]:
        """A new connection to ``url`` and its WELCOME, not yet the client's."""
        try:
            ws = self._connect(url)
        except WireError as exc:
            if not isinstance(exc.__cause__, InvalidMessage):
                raise
            # The server took the connection (and TLS) and closed it before answering the upgrade: seen in the test
            # suite right after refused TLS handshakes (cause not found). One more try, then the error.
            time.sleep(0.2)
            ws = self._connect(url)
        hello = {"protocol": PROTOCOL, "client": f"lambdasplit/{__version__}"}
        if self._fingerprint:
            hello["fingerprint"] = self._fingerprint
        if self._group:
            hello["group"] = self._group
        try:
            raw = self._exchange(ws, encode_frame(Frame.json(MessageType.HELLO, hello)))
            welcome = raise_for_error(decode_frame(raw, self.limits)).json_body()
        except BaseException:
            ws.close()
            raise
        return ws, welcome

    def reconnect(self, seen_epoch: int) -> float:
        """Connect again (to any of the URLs) after the connection of ``seen_epoch`` was lost.

        Several sessions may call this at once: the first reconnects, the others find the epoch moved
        on and return. Retries with back-off until ``reconnect_deadline``; the new server must run the
        same model and split. Returns the seconds it took.
        """
        start = time.monotonic()
        with self._reconnect_lock:
            if self.epoch != seen_epoch:
                return time.monotonic() - start
            with contextlib.suppress(Exception):
                self._ws.close()
            layers, delay, last = self.welcome.get("layers"), 0.1, None
            while True:
                for url in self.urls:
                    try:
                        welcome = self._open(url)
                    except (RemoteError, UntrustedCertificate):
                        raise  # refused (token, model) or not the certificate trusted: retrying will not help
                    except WireError as exc:
                        last = exc
                        continue
                    if welcome.get("layers") != layers:
                        self.close()
                        raise WireError(f"{url} now splits at {welcome.get('layers')}, not {layers}: cannot resume")
                    self.welcome = welcome
                    self.reconnects += 1
                    return time.monotonic() - start
                if time.monotonic() - start + delay > self.reconnect_deadline:
                    raise WireError(
                        f"lost the body server and could not reconnect within {self.reconnect_deadline:.0f} s: {last}"
                    )
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _connect(self, url: str) -> ClientConnection:
        """Open the WebSocket to ``url``; for ``wss://``, only to a server ``self.trust`` accepts."""
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ConfigError(f"cloud URL must look like ws://HOST:PORT/v1/split or wss://..., got {url!r}")
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "wss" else 80)
        if parts.scheme == "ws":
            self.trust.check_plain(host, port, self._token)
            return self._handshake(url, host, port, None)
        try:
            return self._handshake(url, host, port, self.trust.context(host, port))
        except ssl.SSLCertVerificationError as exc:  # a CA refused it: pin it on first use, if allowed
            first_use = self.trust.first_use_context(host, port)
            if first_use is None:
                raise self.trust.verification_failed(host, port, exc) from exc
            return self._handshake(url, host, port, first_use)

    def _handshake(self, url: str, host: str, port: int, context: ssl.SSLContext | None) -> ClientConnection:
        """TCP connect, TLS (with ``context``) and the WebSocket upgrade, which carries the token."""
        try:
            sock = socket.create_connection((host, port), timeout=self.timeout)
        except OSError as exc:
            raise WireError(f"cannot reach the body server at {url}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            # __enter__ opens the connection without the context-manager block (closed in self.close()).
            return connect(
                url,
                sock=sock,
                ssl=context,
                server_hostname=host if context else None,
                compression=None,
                additional_headers=bearer_header(self._token),
                user_agent_header=f"lambdasplit/{__version__}",
                proxy=None,
                open_timeout=self.timeout,
                ping_interval=None,  # liveness is the request timeout; no background traffic
                max_size=self.limits.max_frame_bytes,
            ).__enter__()
        except InvalidStatus as exc:
            sock.close()
            status = exc.response.status_code
            if status in (401, 403):
                raise RemoteError("the server refused the bearer token (use --token)", "unauthorized") from exc
            raise WireError(f"{url} answered HTTP {status}; is it a lambdasplit body server?") from exc
        except ssl.SSLCertVerificationError:
            sock.close()
            raise  # _connect decides: trust on first use, or an error that names the certificate
        except ssl.SSLError as exc:
            sock.close()
            raise WireError(f"TLS with {url} failed: {exc.reason or exc}. Is the server serving wss:// there?") from exc
        except (InvalidURI, WebSocketException, OSError) as exc:
            sock.close()
            raise WireError(f"WebSocket handshake with {url} failed: {exc}") from exc
        except UntrustedCertificate:
            sock.close()
            raise

    # --- requests ---------------------------------------------------------------------------------
    def roundtrip(self, data: bytes | Sequence[bytes], epoch: int | None = None) -> bytes:
        """Send one encoded frame (or several, of which only the last is answered: a TREE frame and its FORWARD),
        return the raw reply.

        With ``epoch``, the frame goes out only on that connection: a session handle is only valid on the
        connection that opened it (after a reconnect, numbering starts again and the same number may name
        another session), so a request made for an older connection raises ``StaleConnection`` instead.
        """
        with self._lock:
            self._notice_goaway(self._ws)
            seen, move = self.epoch, self.going_away is not None and bool(self._move_targets())
            move = move and time.monotonic() >= self._next_move
        if move:
            self._move(seen)
        with self._lock:
            if epoch is not None and epoch != self.epoch:
                raise StaleConnection(f"the connection of epoch {epoch} was replaced (now {self.epoch})")
            return self._exchange(self._ws, data)

    def _move(self, seen_epoch: int) -> None:
        """The server is draining (GOAWAY): connect to another of the URLs while this connection still works, so
        sessions rebuild there from their history. With nowhere to go, stay until the server drops us (then the
        usual reconnection runs)."""
        with self._reconnect_lock:
            if self.epoch != seen_epoch:
                return
            old, layers = self._ws, self.welcome.get("layers")
            for url in self._move_targets():
                try:
                    ws, welcome = self._handshake_only(url)
                except (RemoteError, UntrustedCertificate, WireError):
                    continue
                if welcome.get("layers") != layers:
                    ws.close()
                    continue
                with self._lock:
                    self._ws, self._sock, self.url, self.welcome = ws, ws.socket, url, welcome
                    self.epoch += 1
                    self.going_away = None
                    self.moves += 1
                with contextlib.suppress(Exception):
                    old.close()
                return
            # Nowhere to go yet (the other replicas are full, or starting): try again in a second, not every step.
            self._next_move = time.monotonic() + 1.0

    def _move_targets(self) -> list[str]:
        """Where a device told GOAWAY may go: the other URLs, and its own when it fronts several replicas (Ray
        Serve's proxy: a new connection there reaches another replica, since a draining one takes none)."""
        own = [self.url] if self.welcome.get("replica") is not None else []
        return [url for url in self.urls if url != self.url] + own

    def _notice_goaway(self, ws: ClientConnection) -> None:
        """Take in what the server sent unasked (GOAWAY), without waiting."""
        while True:
            try:
                data = ws.recv(timeout=0)
            except (TimeoutError, ConnectionClosed, OSError):
                return
            if isinstance(data, str) or not self._goaway(data):
                raise WireError("the server sent a frame nobody asked for")

    @contextlib.contextmanager
    def _socket_errors(self, ws: ClientConnection, *, close: bool = False) -> Iterator[None]:
        """Turn what the socket raises into ``WireError`` (a timeout, a lost connection).

        With ``close``, any failure also closes the connection: a request whose answer may still come would
        otherwise have it read as the answer to the next request, so the next request reconnects instead.
        """
        try:
            yield
        except BaseException as exc:
            if close:
                with contextlib.suppress(Exception):
                    ws.close()
            if isinstance(exc, TimeoutError):
                raise WireError(f"no answer from {self.url} within {self.timeout:g} s") from exc
            if isinstance(exc, ConnectionClosed | OSError):
                raise ConnectionLost(f"connection to {self.url} lost: {exc}") from exc
            raise

    def _recv(self, ws: ClientConnection) -> bytes:
        reply = ws.recv(timeout=self.timeout)
        if isinstance(reply, str):
            raise WireError("the server sent a text message; expected binary frames")
        self.frames_received += 1
        self.bytes_received += len(reply)
        return reply

    def _send(self, ws: ClientConnection, data: bytes) -> None:
        ws.send(data)
        self.frames_sent += 1
        self.bytes_sent += len(data)

    def _exchange(self, ws: ClientConnection, data: bytes | Sequence[bytes]) -> bytes:
        with self._socket_errors(ws, close=True):
            for one in [data] if isinstance(data, bytes) else data:
                self._send(ws, one)
            while self._goaway(reply := self._recv(ws)):
                pass  # noted; the answer follows (a draining server still serves the steps in flight)
            return reply

    def _goaway(self, data: bytes) -> bool:
        """Whether ``data`` is a GOAWAY frame (then kept in ``going_away``)."""
        if len(data) < 4 or data[3] != MessageType.GOAWAY:
            return False
        self.going_away = decode_frame(data, self.limits).json_body()
        return True

    def send(self, frame: Frame) -> None:
        """Send one frame that gets no reply of its own (a diffusion input; its answer comes later)."""
        data = encode_frame(frame)
        with self._lock, self._socket_errors(self._ws):
            self._send(self._ws, data)

    def receive(self) -> Frame:
        """The next frame the server sends (one of several replies, or an error about an earlier frame)."""
        with self._lock, self._socket_errors(self._ws):
            while self._goaway(reply := self._recv(self._ws)):
                pass  # noted: a stream in flight finishes here; the next request moves (``roundtrip``)
        return raise_for_error(decode_frame(reply, self.limits))

    def request(self, frame: Frame, epoch: int | None = None) -> Frame:
        """Send ``frame``, return the decoded reply; an ERROR reply raises ``RemoteError``."""
        return raise_for_error(decode_frame(self.roundtrip(encode_frame(frame), epoch), self.limits))

    def open_session(self, wire_dtype: WireDtype | str = WireDtype.FLOAT16) -> RemoteBodyLink:
        """A new body session. It survives a lost connection: see ``RemoteBodyLink``.

        If the connection was lost since the last request, it reconnects first (within the deadline).
        """
        epoch = self.epoch
        try:
            handle = self._open_handle(epoch)
        except RemoteError:
            raise
        except WireError:
            self.reconnect(epoch)
            epoch = self.epoch
            handle = self._open_handle(epoch)
        return RemoteBodyLink(self, handle, WireDtype.parse(wire_dtype), epoch=epoch)

    def _open_handle(self, epoch: int) -> int:
        return self.request(Frame.json(MessageType.OPEN, {}), epoch).session

    def max_frame_bytes(self) -> int:
        """The largest frame both ends accept."""
        theirs = self.welcome.get("limits", {}).get("max_frame_bytes", self.limits.max_frame_bytes)
        return min(int(theirs), self.limits.max_frame_bytes)

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


def _trust(trust: TlsTrust | None, ca_file: str | None) -> TlsTrust:
    if ca_file is None:
        return trust or TlsTrust()
    warnings.warn("ca_file= is deprecated: pass trust=TlsTrust(ca_file=...)", DeprecationWarning, stacklevel=3)
    if trust is not None:
        raise ConfigError("pass the CA in trust=TlsTrust(ca_file=...) or as ca_file=, not both")
    return TlsTrust(ca_file=Path(ca_file))


@dataclass(frozen=True)
class Recovery:
    """One session rebuilt after its connection or session was lost."""

    reason: str
    seconds: float  # from the failed request to the replay done
    replayed_positions: int


class RemoteBodyLink:
    """A ``BodyLink`` to one session on a body server. Counts the frames it sends and receives.

    It keeps the hidden states it has sent in this session (a few KB per token). If the connection is
    lost (the server died, restarted, or stopped answering within the client's timeout) or the server
    no longer knows the session (evicted after idle), it reconnects through the client, opens a new
    session and replays that history, so the body's cache is rebuilt and the generation goes on with
    the same tokens. ``recoveries`` records each time it did; ``resume=False`` raises instead.
    """

    def __init__(
        self, client: CloudClient, session: int, wire_dtype: WireDtype, *, resume: bool = True, epoch: int | None = None
    ) -> None:
        self.client, self.session, self.wire_dtype, self.resume = client, session, wire_dtype, resume
        self.epoch = client.epoch if epoch is None else epoch  # the connection the session lives on
        self.traffic = Traffic()
        self.closed = False
        self.history: list[torch.Tensor] = []  # (rows, D) blocks sent, in order, covering positions [0, length)
        self.length = 0
        self.recoveries: list[Recovery] = []
        # The last frames as they crossed the wire, for showing what an eavesdropper sees.
        self.last_sent: bytes = b""
        self.last_received: bytes = b""
        self.last_sent_bytes = 0

    def forward(self, hidden: torch.Tensor, position: int, reset: bool = False, last: bool = False) -> torch.Tensor:
        """(1, T, D) at ``position`` -> (1, T, D) (or logits (1, T, V) from a STIP body; one row with ``last``),
        through the server's body and its KV cache for this session."""
        return self._step(hidden, position, reset, last)

    @property
    def trees(self) -> bool:
        """Whether the server verifies token trees (its WELCOME says ``"trees": true``)."""
        return bool(self.client.welcome.get("trees"))

    def forward_tree(
        self, hidden: torch.Tensor, position: int, parents: list[int] | None, keep: tuple[int, list[int]] | None
    ) -> torch.Tensor:
        """``forward`` of a token tree's block (``parents``; None: a chain), the server first keeping ``keep``, the
        branch of the last tree that was accepted. A TREE frame goes just before the FORWARD, in the same round trip.
        The history keeps the branch too, so a rebuilt session replays what the body held."""
        if keep is not None:
            self._keep(*keep)
        return self._step(hidden, position, False, False, parents, keep)

    def _step(
        self,
        hidden: torch.Tensor,
        position: int,
        reset: bool,
        last: bool,
        parents: list[int] | None = None,
        keep: tuple[int, list[int]] | None = None,
    ) -> torch.Tensor:
        """One FORWARD (after a TREE frame for ``parents`` or ``keep``), the session rebuilt and the step resent when
        the connection or the session was lost."""
        failed_at: float | None = None
        reason = ""
        for attempt in range(3):
            try:
                if self.epoch != self.client.epoch or failed_at is not None:
                    reason = reason or "the connection was re-established for another session"
                    self._rebuild(position if not reset else 0)
                    waited = time.monotonic() - (failed_at or time.monotonic())
                    self.recoveries.append(Recovery(reason, waited, 0 if reset else position))
                    keep = None  # the new session was fed the history, which holds the kept branch already
                tree = ({"parents": parents} if parents is not None else {}) | (
                    {"keep": {"start": keep[0], "rows": keep[1]}} if keep is not None else {}
                )
                out = self._forward_once(hidden, position, reset, last, tree=tree or None)
                break
            except RemoteError as exc:  # the server answered, with an error (RemoteError is a WireError)
                if exc.code != "unknown_session" or not self.resume or attempt == 2:
                    raise
                reason, failed_at = "session unknown to the server (evicted or restarted)", time.monotonic()
            except WireError as exc:  # the connection is gone (or was replaced: StaleConnection)
                if not self.resume or attempt == 2:
                    raise
                reason, failed_at = f"connection lost: {exc}", time.monotonic()
                if isinstance(exc, StaleConnection):
                    reason = "the connection was re-established for another session"
                self.client.reconnect(self.epoch)
        self._remember(hidden, position, reset)
        return out

    def _keep(self, start: int, rows: list[int]) -> None:
        """The history holds positions [0, start) and then the branch ``rows`` of the block sent from ``start``."""
        if not self.resume:
            return
        if start > self.length or start + (max(rows) if rows else -1) >= self.length:
            raise SessionError(f"cannot keep rows {rows} after position {start}: {self.length} positions were sent")
        after: list[torch.Tensor] = []  # the rows sent from `start` on, taken off the end of the history
        while self.length > start:
            block = self.history.pop()
            cut = min(block.shape[0], self.length - start)
            if cut < block.shape[0]:
                self.history.append(block[: block.shape[0] - cut])
            after.insert(0, block[block.shape[0] - cut :])
            self.length -= cut
        if rows:
            self.history.append(torch.cat(after)[rows])
        self.length = start + len(rows)

    def _forward_once(
        self, hidden: torch.Tensor, position: int, reset: bool, last: bool = False, tree: dict[str, Any] | None = None
    ) -> torch.Tensor:
        flags = (FrameFlags.RESET if reset else FrameFlags(0)) | (FrameFlags.LAST if last else FrameFlags(0))
        start = time.perf_counter()
        frame = tensor_frame(MessageType.FORWARD, hidden[0], self.wire_dtype, self.session, position, flags=flags)
        forward = encode_frame(frame)
        data: bytes | list[bytes] = forward
        if tree is not None:  # no reply of its own: the FORWARD's answers for both
            data = [encode_frame(Frame.json(MessageType.TREE, tree, session=self.session)), forward]
        raw = self.client.roundtrip(data, self.epoch)
        reply = raise_for_error(decode_frame(raw, self.client.limits))
        if reply.type is not MessageType.RESULT or reply.session != self.session or reply.position != position:
            raise WireError(
                f"expected RESULT for session {self.session} at {position}, "
                f"got {reply.type.name} for session {reply.session} at {reply.position}"
            )
        out = frame_tensor(reply, dtype=hidden.dtype, device=hidden.device)
        seconds = time.perf_counter() - start  # encoding, the round trip and decoding: all of it the link's cost
        sent = data if isinstance(data, bytes) else b"".join(data)
        self.traffic.add(len(sent), len(raw), len(frame.payload), len(reply.payload), seconds)
        self.last_sent, self.last_received = (data if isinstance(data, bytes) else data[-1]), raw
        self.last_sent_bytes = len(sent)  # the FORWARD and the TREE frame before it, when there is one
        return out.unsqueeze(0)

    def _remember(self, hidden: torch.Tensor, position: int, reset: bool) -> None:
        """Keep what the body now holds: positions [0, position) of the history, then these rows."""
        if reset or not self.resume:
            self.history, self.length = [], 0
            return  # a no-cache step resends everything anyway; without resume nothing is replayed
        self._truncate(position)
        self.history.append(hidden[0].detach().to("cpu", copy=True))
        self.length = position + hidden.shape[1]

    def _truncate(self, length: int) -> None:
        """Keep positions [0, length): blocks the body rolled back go from the end. Each step calls this, so it
        touches only the blocks it drops (walking the whole history cost 0.17 ms a step at 100 positions, and
        grew with every token)."""
        while self.history and self.length - self.history[-1].shape[0] >= length:
            self.length -= self.history.pop().shape[0]
        if self.length > length:  # part of the last block goes
            last = self.history[-1]
            self.history[-1] = last[: last.shape[0] - (self.length - length)]
            self.length = length

    def _rebuild(self, position: int) -> None:
        """A new session on the (new) connection, fed the first ``position`` positions sent so far."""
        epoch = self.client.epoch
        self.session = self.client._open_handle(epoch)  # raises StaleConnection if it changed meanwhile
        self.epoch = epoch
        self._truncate(position)
        if not self.history:
            return
        states = torch.cat(self.history)  # (position, D)
        row_bytes = states.shape[1] * 4 + 64  # float32 is the widest wire dtype
        rows = max(1, (self.client.max_frame_bytes() - 1024) // row_bytes)
        for start in range(0, states.shape[0], rows):
            chunk = states[start : start + rows].unsqueeze(0)
            # The body's output for these is already in the tail's cache: only the last row comes back.
            self._forward_once(chunk, start, False, last=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.history = []
        if self.epoch != self.client.epoch:
            return  # that session went with its connection
        # If the connection is gone, the server frees that connection's sessions by itself.
        with contextlib.suppress(WireError, RemoteError):
            self.client.request(Frame.json(MessageType.CLOSE, {}, session=self.session), self.epoch)
