"""The link between the two share servers: one TCP connection per session, one framed message per round.

A computation's ~4,000 rounds per token each cost one exchange, so this link is plain TCP (``TCP_NODELAY``,
24 us a round trip on loopback where a WebSocket round trip took 75 us), framed by hand in one struct::

    frame   = magic "LSPR" | session (16 bytes) | step u32 | seq u32 | nbytes u64 | payload (nbytes)

``step`` counts the session's forwards and ``seq`` the rounds within one; both parties check that the peer's
frame carries their own session, step and sequence number and the size they expect, so parties out of step,
a frame of the wrong size or a peer of another session fail at once with a ``WireError`` naming what differed,
never with wrong numbers. Each exchange sends and receives at the same time (non-blocking, ``select``), so two
large openings cannot deadlock on full socket buffers. A peer that closes the link or stays silent past
``timeout`` fails the exchange (``peer_gone`` / ``peer_timeout``); the session ends, others are untouched.

Keys: the device gives both servers the session's link key (``LINK_KEY_BYTES`` random bytes, in ``open``, over
its own TLS links). Each payload is the int64 words sealed with AES-256-GCM under a key per direction derived
from it, the frame's header as associated data and the count of frames sent so far as nonce (never reused:
a retried forward repeats its step numbers, not its nonces); ``nbytes`` includes GCM's 16-byte tag. A frame
forged, altered, replayed or reordered by anyone without the key fails at once (``peer_unauthenticated``).

Pairing: share server 1 connects to share server 0's peer address and sends ``hello`` = magic "LSPH" | session |
body fingerprint (32 bytes) | proof (32 bytes: HMAC-SHA256 under the link key of "hello", the session and the
fingerprint). Server 0 keeps the hellos of a session until the device opens it there, then takes the first whose
proof holds under the key the device gave it, answers it 1 | its own proof (HMAC of "welcome" and the session),
which server 1 checks, and refuses the rest with 0 (as it refuses a hello of another body, one not claimed within
``timeout``, and one for a session it paired already: the latest ``CLAIMED_KEPT``). A connection without the key
cannot join a session; one that replays server 1's hello, seen on the path, before the pairing can at most end the
session (its first frame fails), as dropping packets would.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import select
import socket
import struct
import threading
import time
from collections import OrderedDict

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lambdasplit.errors import WireError

FRAME = struct.Struct("<4s16sIIQ")
HELLO = struct.Struct("<4s16s32s32s")
FRAME_MAGIC, HELLO_MAGIC = b"LSPR", b"LSPH"
SESSION_BYTES, FINGERPRINT_BYTES, LINK_KEY_BYTES, PROOF_BYTES = 16, 32, 32, 32
TAG_BYTES = 16  # AES-GCM's tag, at the end of every payload
MAX_WAITING = 8  # hellos kept per session until the device opens it (more are refused)
CLAIMED_KEPT = 4096  # sessions already paired, remembered so that a later hello for one is refused at once

log = logging.getLogger(__name__)


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"lambdasplit peer link\x00" + b"".join(parts), hashlib.sha256).digest()


def hello_proof(link_key: bytes, session: bytes, fingerprint: bytes) -> bytes:
    """What share server 1 sends to show it holds ``session``'s link key."""
    return _mac(link_key, b"hello", session, fingerprint)


def welcome_proof(link_key: bytes, session: bytes) -> bytes:
    """What share server 0 answers to show it holds ``session``'s link key too."""
    return _mac(link_key, b"welcome", session)


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

    ``party`` is this side's (0 or 1): it seals what it sends under its direction's key and opens the peer's
    under the other. ``begin(step)`` before each forward; the sequence number restarts at 0.
    """

    def __init__(self, sock: socket.socket, session: bytes, link_key: bytes, party: int, timeout: float) -> None:
        _tune(sock)
        sock.setblocking(False)
        self.sock, self.session, self.timeout = sock, session, timeout
        keys = [AESGCM(_mac(link_key, b"frames", bytes([p]))) for p in (0, 1)]
        self._seal, self._open = keys[party], keys[1 - party]
        self._sent = self._received = 0  # frames each way: the nonces
        self.step, self.seq = 0, 0
        self.closed = False

    def begin(self, step: int) -> None:
        self.step, self.seq = step, 0

    def exchange(self, tensor: torch.Tensor) -> torch.Tensor:
        mine = tensor.detach().to("cpu").contiguous()
        words = mine.numpy().tobytes()
        header = FRAME.pack(FRAME_MAGIC, self.session, self.step, self.seq, len(words) + TAG_BYTES)
        sealed = self._seal.encrypt(self._sent.to_bytes(12, "little"), words, header)
        self._sent += 1
        peer_header, body = bytearray(FRAME.size), bytearray(len(sealed))
        self._send_and_receive(memoryview(header + sealed), peer_header, body)
        try:
            opened = self._open.decrypt(self._received.to_bytes(12, "little"), body, bytes(peer_header))
        except InvalidTag:
            raise WireError(
                f"the peer's frame in step {self.step}, round {self.seq} does not authenticate under this session's "
                "link key: it was altered, or sent by someone other than the other share server",
                code="peer_unauthenticated",
            ) from None
        self._received += 1
        self.seq += 1
        peer = torch.frombuffer(bytearray(opened), dtype=torch.int64) if opened else torch.empty(0, dtype=torch.int64)
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


def join(address: tuple[str, int], session: bytes, fingerprint: bytes, link_key: bytes, timeout: float) -> PeerChannel:
    """Party 1: connect to party 0's peer address and join ``session`` with its link key. Raises ``WireError`` if
    refused, or if party 0 does not prove it holds the key."""
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except OSError as e:
        raise WireError(
            f"share server 0's peer link at {address[0]}:{address[1]} is unreachable: {e}", code="peer_gone"
        ) from None
    _tune(sock)
    sock.sendall(HELLO.pack(HELLO_MAGIC, session, fingerprint, hello_proof(link_key, session, fingerprint)))
    # party 0 answers when the device opens the session there, or refuses after its own timeout: wait longer
    deadline = time.monotonic() + 2 * timeout
    answer = _read_exactly(sock, 1, deadline, "answer to joining the session")
    if answer != b"\x01":
        sock.close()
        raise WireError(
            f"share server 0 refused session {session.hex()}: no device opened it there within {timeout:.0f} s with "
            "the same link key, or it serves another body",
            code="session_mismatch",
        )
    proof = _read_exactly(sock, PROOF_BYTES, deadline, "proof of the link key")
    if not hmac.compare_digest(proof, welcome_proof(link_key, session)):
        sock.close()
        raise WireError(
            f"the peer at {address[0]}:{address[1]} accepted session {session.hex()} without proving it holds the "
            "session's link key: not the share server the device opened it on",
            code="peer_unauthenticated",
        )
    return PeerChannel(sock, session, link_key, 1, timeout)


class PeerListener:
    """Party 0: accepts party 1's connections and pairs each with the session the device opened here."""

    def __init__(self, host: str, port: int, fingerprint: bytes, timeout: float) -> None:
        self.fingerprint, self.timeout = fingerprint, timeout
        self.server = socket.create_server((host, port), reuse_port=False)
        self.address = self.server.getsockname()[:2]
        self._arrived: dict[bytes, list[tuple[socket.socket, bytes]]] = {}  # session -> (socket, proof) waiting
        self._claimed: OrderedDict[bytes, None] = OrderedDict()  # the latest sessions paired, oldest first
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
            magic, session, fingerprint, proof = HELLO.unpack(
                _read_exactly(sock, HELLO.size, time.monotonic() + self.timeout, "hello")
            )
        except (WireError, struct.error):
            sock.close()
            return
        with self._cond:
            waiting = self._arrived.setdefault(session, [])
            kept = (
                magic == HELLO_MAGIC
                and fingerprint == self.fingerprint
                and len(waiting) < MAX_WAITING
                and session not in self._claimed  # paired already: a replay or a late second server 1
            )
            if kept:
                waiting.append((sock, proof))
                self._cond.notify_all()
            elif not waiting:
                del self._arrived[session]
        if not kept:
            _refuse(sock)
            return
        # not claimed in time: refuse it (the joining party then fails with session_mismatch)
        timer = threading.Timer(self.timeout, self._expire, args=(session, sock))
        timer.daemon = True
        timer.start()

    def _take(self, session: bytes, sock: socket.socket | None = None) -> list[tuple[socket.socket, bytes]]:
        """Remove ``sock`` (or all) of ``session``'s waiting hellos; returns what was removed. Holds the lock."""
        waiting = self._arrived.get(session, [])
        taken = [w for w in waiting if sock is None or w[0] is sock]
        rest = [w for w in waiting if w not in taken]
        if rest:
            self._arrived[session] = rest
        else:
            self._arrived.pop(session, None)
        return taken

    def _expire(self, session: bytes, sock: socket.socket) -> None:
        with self._cond:
            taken = self._take(session, sock)
        for waiting, _ in taken:
            _refuse(waiting)

    def claim(self, session: bytes, link_key: bytes, timeout: float) -> PeerChannel:
        """Wait up to ``timeout`` s for party 1 to join ``session`` with a hello proving ``link_key``; answer it
        and return the link. Hellos of the session without that proof are refused."""
        deadline = time.monotonic() + timeout
        expected = hello_proof(link_key, session, self.fingerprint)
        while True:
            with self._cond:
                while session not in self._arrived:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._stopped:
                        raise WireError(
                            f"share server 1 did not join session {session.hex()} within {timeout:.0f} s: is it "
                            "running, with --peer at this server's peer address, and did the device open the same "
                            "session there?",
                            code="peer_timeout",
                        )
                    self._cond.wait(left)
                waiting = self._take(session)
                proven = [sock for sock, proof in waiting if hmac.compare_digest(proof, expected)]
                if proven:  # from now on a hello for this session is refused on arrival
                    self._claimed[session] = None
                    while len(self._claimed) > CLAIMED_KEPT:
                        self._claimed.popitem(last=False)
            for sock, proof in waiting:
                if not proven or sock is not proven[0]:
                    why = "a second one" if hmac.compare_digest(proof, expected) else "without its link key"
                    log.warning("peer link: refused a hello for session %s (%s)", session.hex(), why)
                    _refuse(sock)
            if proven:
                break
        sock = proven[0]
        try:
            sock.sendall(b"\x01" + welcome_proof(link_key, session))
        except OSError as e:
            sock.close()
            raise WireError(
                f"share server 1 left session {session.hex()} while joining: {e}", code="peer_gone"
            ) from None
        return PeerChannel(sock, session, link_key, 0, self.timeout)

    def close(self) -> None:
        self._stopped = True
        with self._cond:
            self._cond.notify_all()
            pending = [sock for waiting in self._arrived.values() for sock, _ in waiting]
            self._arrived.clear()
        for sock in pending:
            sock.close()
        self.server.close()


def _refuse(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(b"\x00")
    sock.close()
