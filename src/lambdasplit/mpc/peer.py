"""The link between the two share servers: one TCP connection per session, one framed message per round.

A computation's ~4,000 rounds per token each cost one exchange, so this link is plain TCP (``TCP_NODELAY``,
24 us a round trip on loopback where a WebSocket round trip took 75 us), framed by hand in one struct::

    frame   = magic "LSPR" | session (16 bytes) | step u32 | seq u32 | nbytes u64 | payload (nbytes, int64 LE)

``step`` counts the session's forwards and ``seq`` the rounds within one; both parties check that the peer's
frame carries their own session, step and sequence number and the size they expect, so parties out of step,
a frame of the wrong size or a peer of another session fail at once with a ``WireError`` naming what differed,
never with wrong numbers. Each exchange sends and receives at the same time (non-blocking, ``select``), so two
large openings cannot deadlock on full socket buffers. A peer that closes the link or stays silent past
``timeout`` fails the exchange (``peer_gone`` / ``peer_timeout``); the session ends, others are untouched.

Pairing: share server 1 connects to share server 0's peer address and sends ``hello`` = magic "LSPH" |
session | body fingerprint (32 bytes); server 0 answers one byte, 1 (joined) or 0 (refused: no such session
or another body), and hands the socket to the session the device opened there (``PeerListener.claim``).
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time

import torch

from lambdasplit.errors import WireError

FRAME = struct.Struct("<4s16sIIQ")
HELLO = struct.Struct("<4s16s32s")
FRAME_MAGIC, HELLO_MAGIC = b"LSPR", b"LSPH"
SESSION_BYTES, FINGERPRINT_BYTES = 16, 32


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _read_exactly(sock: socket.socket, n: int, deadline: float, what: str) -> bytes:
    data = bytearray()
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise WireError(f"the peer sent no {what} in time", code="peer_timeout")
        sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(data))
        except TimeoutError:
            continue
        except OSError as e:
            raise WireError(f"the peer link failed while reading the {what}: {e}", code="peer_gone") from None
        if not chunk:
            raise WireError(f"the peer closed the link before its {what}", code="peer_gone")
        data += chunk
    return bytes(data)


class PeerChannel:
    """One session's link to the peer party: ``exchange`` one int64 tensor per round (``party.Channel``).

    ``begin(step)`` before each forward; the sequence number restarts at 0.
    """

    def __init__(self, sock: socket.socket, session: bytes, timeout: float) -> None:
        _tune(sock)
        sock.setblocking(False)
        self.sock, self.session, self.timeout = sock, session, timeout
        self.step, self.seq = 0, 0
        self.closed = False

    def begin(self, step: int) -> None:
        self.step, self.seq = step, 0

    def exchange(self, tensor: torch.Tensor) -> torch.Tensor:
        mine = tensor.detach().to("cpu").contiguous()
        payload = mine.numpy().tobytes()
        out = memoryview(FRAME.pack(FRAME_MAGIC, self.session, self.step, self.seq, len(payload)) + payload)
        header, body = bytearray(FRAME.size), bytearray(len(payload))
        self._send_and_receive(out, header, body)
        self.seq += 1
        peer = torch.frombuffer(body, dtype=torch.int64) if body else torch.empty(0, dtype=torch.int64)
        return peer.view(mine.shape).to(tensor.device)

    def _send_and_receive(self, out: memoryview, header: bytearray, body: bytearray) -> None:
        sent, got, checked = 0, 0, False
        need = len(header)
        target = memoryview(header)
        deadline = time.monotonic() + self.timeout
        while sent < len(out) or got < need:
            progressed = False
            if sent < len(out):
                try:
                    n = self.sock.send(out[sent:])
                    sent, progressed = sent + n, progressed or n > 0
                except BlockingIOError:
                    pass
                except OSError as e:
                    raise WireError(
                        f"the peer link failed while sending round {self.seq}: {e}", code="peer_gone"
                    ) from None
            if got < need:
                try:
                    n = self.sock.recv_into(target[got:need])
                except BlockingIOError:
                    n = -1
                except OSError as e:
                    raise WireError(f"the peer link failed in round {self.seq}: {e}", code="peer_gone") from None
                if n == 0:
                    raise WireError(
                        f"the peer closed the link in step {self.step}, round {self.seq}: its session ended",
                        code="peer_gone",
                    )
                if n > 0:
                    got, progressed = got + n, True
            if not checked and got == need == len(header):
                self._check(bytes(header), len(body))
                checked, got, need, target = True, 0, len(body), memoryview(body)
                continue
            if not progressed:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WireError(
                        f"the peer sent nothing for {self.timeout:.0f} s in step {self.step}, round {self.seq}",
                        code="peer_timeout",
                    )
                readable = [self.sock] if got < need else []
                writable = [self.sock] if sent < len(out) else []
                select.select(readable, writable, [], min(left, 1.0))

    def _check(self, header: bytes, expected: int) -> None:
        magic, session, step, seq, nbytes = FRAME.unpack(header)
        if magic != FRAME_MAGIC:
            raise WireError(f"the peer sent {magic!r} where a round frame starts: not a share server", code="bad_frame")
        if session != self.session:
            raise WireError(
                f"the peer's frame is for session {session.hex()}, this link's is {self.session.hex()}",
                code="session_mismatch",
            )
        if (step, seq) != (self.step, self.seq):
            raise WireError(
                f"the peer is at step {step}, round {seq}; this party at step {self.step}, round {self.seq}: "
                "the parties are out of step",
                code="out_of_step",
            )
        if nbytes != expected:
            raise WireError(
                f"the peer's share in step {step}, round {seq} has {nbytes} bytes, this party's {expected}",
                code="bad_share",
            )

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self.sock.close()


def join(address: tuple[str, int], session: bytes, fingerprint: bytes, timeout: float) -> PeerChannel:
    """Party 1: connect to party 0's peer address and join ``session``. Raises ``WireError`` if refused."""
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except OSError as e:
        raise WireError(
            f"share server 0's peer link at {address[0]}:{address[1]} is unreachable: {e}", code="peer_gone"
        ) from None
    _tune(sock)
    sock.sendall(HELLO.pack(HELLO_MAGIC, session, fingerprint))
    # party 0 answers when the device opens the session there, or refuses after its own timeout: wait longer
    answer = _read_exactly(sock, 1, time.monotonic() + 2 * timeout, "answer to joining the session")
    if answer != b"\x01":
        sock.close()
        raise WireError(
            f"share server 0 refused session {session.hex()}: no device opened it there within {timeout:.0f} s, or "
            "it serves another body",
            code="session_mismatch",
        )
    return PeerChannel(sock, session, timeout)


class PeerListener:
    """Party 0: accepts party 1's connections and pairs each with the session the device opened here."""

    def __init__(self, host: str, port: int, fingerprint: bytes, timeout: float) -> None:
        self.fingerprint, self.timeout = fingerprint, timeout
        self.server = socket.create_server((host, port), reuse_port=False)
        self.address = self.server.getsockname()[:2]
        self._arrived: dict[bytes, socket.socket] = {}
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._accept_loop, name="peer-listener", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stopped:
            try:
                sock, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._greet, args=(sock,), daemon=True).start()

    def _greet(self, sock: socket.socket) -> None:
        try:
            magic, session, fingerprint = HELLO.unpack(
                _read_exactly(sock, HELLO.size, time.monotonic() + self.timeout, "hello")
            )
        except (WireError, struct.error):
            sock.close()
            return
        if magic != HELLO_MAGIC or fingerprint != self.fingerprint:
            sock.sendall(b"\x00")
            sock.close()
            return
        with self._cond:
            old = self._arrived.pop(session, None)
            self._arrived[session] = sock
            self._cond.notify_all()
        if old is not None:
            old.close()
        # not claimed in time: refuse it (the joining party then fails with session_mismatch)
        timer = threading.Timer(self.timeout, self._expire, args=(session, sock))
        timer.daemon = True
        timer.start()

    def _expire(self, session: bytes, sock: socket.socket) -> None:
        with self._cond:
            if self._arrived.get(session) is not sock:
                return
            del self._arrived[session]
        with contextlib.suppress(OSError):
            sock.sendall(b"\x00")
        sock.close()

    def claim(self, session: bytes, timeout: float) -> PeerChannel:
        """Wait up to ``timeout`` s for party 1 to join ``session``; answer it and return the link."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while session not in self._arrived:
                left = deadline - time.monotonic()
                if left <= 0 or self._stopped:
                    raise WireError(
                        f"share server 1 did not join session {session.hex()} within {timeout:.0f} s: is it running, "
                        "with --peer at this server's peer address, and did the device open the same session there?",
                        code="peer_timeout",
                    )
                self._cond.wait(left)
            sock = self._arrived.pop(session)
        try:
            sock.sendall(b"\x01")
        except OSError as e:
            sock.close()
            raise WireError(
                f"share server 1 left session {session.hex()} while joining: {e}", code="peer_gone"
            ) from None
        return PeerChannel(sock, session, self.timeout)

    def close(self) -> None:
        self._stopped = True
        with self._cond:
            self._cond.notify_all()
            pending = list(self._arrived.values())
            self._arrived.clear()
        for sock in pending:
            sock.close()
        self.server.close()
