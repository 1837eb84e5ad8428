"""A share server: one of the two parties that compute the body on secret shares (``lambdasplit serve --share``).

::

    device ──ws── share server 0 ──peer link (TCP, mpc.peer)── share server 1 ──ws── device
                  (party 0: draws all its                       (party 1: asks the device for each
                   randomness from its key)                      correction, mpc.dealing)

Each device connection is one session (``messages`` has the protocol): the device opens it with a session id,
the party it expects and the party's key; party 0 waits for party 1 to join that session on its peer address,
party 1 joins it, and both answer ``ready``. Every FORWARD is checked (step, width, size, context) before any
computation; a bad one, a peer that leaves or stays silent, or a device that goes away ends that session on
both servers with an ``error`` message to the device, and no other session: each has its own thread, peer
connection and KV caches (``SharedBody``). The weights' fixed-point encodings are made once and shared.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Sequence
from ssl import SSLContext

import torch
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection

from lambdasplit.errors import LambdaSplitError, WireError
from lambdasplit.mpc import messages as M
from lambdasplit.mpc.body import MAX_CONTEXT, BodyWeights, SharedBody
from lambdasplit.mpc.dealing import CorrectedSource, SeededSource, product_shape
from lambdasplit.mpc.layer import Linear
from lambdasplit.mpc.ops import SMOLLM2_REST, SMOLLM2_SINK, NormPlan, SharedOps
from lambdasplit.mpc.party import Party
from lambdasplit.mpc.peer import LINK_KEY_BYTES, SESSION_BYTES, PeerChannel, PeerListener, join
from lambdasplit.mpc.ring import KEY_BYTES, Ring
from lambdasplit.syncws import SessionServer, control_type, receive_open, send_error

log = logging.getLogger("lambdasplit.mpc")

MAX_MESSAGE = 1 << 27  # a prefill's largest correction (an MLP product of 500 rows) is ~6 MB


def fingerprint(weights: BodyWeights, ring: Ring) -> bytes:
    """32 bytes that differ between bodies (layer count, shapes, a sample of every weight) or rings."""
    digest = hashlib.sha256(f"frac_bits={ring.frac_bits};layers={len(weights.layers)}".encode())
    for layer in weights.layers:
        for name, value in sorted(vars(layer).items()):
            tensors = (value.weight, value.bias) if isinstance(value, Linear) else (value,)
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    digest.update(f"{name}{tuple(t.shape)}".encode())
                    digest.update(t.detach().flatten()[::997].to(torch.float32).numpy().tobytes())
                elif t is not None:
                    digest.update(f"{name}={t}".encode())
    return digest.digest()


class _Slot:
    """A matrix-product triple's correction, in the order the triples were taken: dealt ahead (``tensor`` set at
    once) or requested (``seq``; set when the CORRECTION arrives)."""

    def __init__(self, shape: tuple[int, ...], seq: int | None = None, tensor: torch.Tensor | None = None) -> None:
        self.shape, self.seq, self.tensor = shape, seq, tensor


class _DeviceFeed:
    """Party 1's ``CorrectionFeed`` over its device connection: POOLs of elementwise corrections the device sends
    ahead (and on REQUEST when one runs short), and the matrix-product triples' corrections, DEALT before the
    FORWARD that takes them (checked against the shapes the body asks for) or, where none was dealt, a REQUEST and
    its CORRECTION."""

    def __init__(self, ws: ServerConnection, timeout: float) -> None:
        self.ws, self.timeout = ws, timeout
        self.sent = 0
        self.ahead: deque[tuple[tuple[int, ...], tuple[int, ...], memoryview]] = deque()  # DEALT, not taken yet
        self.slots: deque[_Slot] = deque()  # matmul triples taken, their corrections in order
        self.requested = 0  # matmul corrections asked for (none dealt ahead)
        self.pools: dict[str, deque[torch.Tensor]] = {k: deque() for k in M.POOL_KINDS}
        self.available = dict.fromkeys(M.POOL_KINDS, 0)
        self.asked = dict.fromkeys(M.POOL_KINDS, 0)
        self.used = dict.fromkeys(M.POOL_KINDS, 0)

    def request(self, kind: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> None:
        shape = product_shape(kind, shape_a, shape_b)
        self._drain()
        if self.ahead:
            dealt_a, dealt_b, words = self.ahead.popleft()
            if (dealt_a, dealt_b) != (tuple(shape_a), tuple(shape_b)):
                raise WireError(
                    f"the device dealt a product of {dealt_a} @ {dealt_b} ahead where this body takes "
                    f"{tuple(shape_a)} @ {tuple(shape_b)}",
                    code="out_of_step",
                )
            self.slots.append(_Slot(shape, tensor=M.tensor_of(words, shape, "dealt correction")))
            return
        self.slots.append(_Slot(shape, seq=self.sent))
        self.requested += 1
        self._ask(kind, shape_a, shape_b)

    def _ask(self, kind: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> None:
        self.ws.send(M.pack_request(self.sent, kind, shape_a, shape_b))
        self.sent += 1

    def receive(self) -> torch.Tensor:
        while self.slots[0].tensor is None:
            self._read(self.timeout)
        tensor = self.slots.popleft().tensor
        assert tensor is not None
        return tensor

    def pooled(self, kind: str, n: int) -> torch.Tensor:
        self._drain()
        while self.available[kind] < n:
            short = n - self.available[kind] - self.asked[kind]
            if short > 0:
                self._ask(kind, (short,), ())
                self.asked[kind] += short
            self._read(self.timeout)
        pool, taken, got = self.pools[kind], [], 0
        while got < n:
            chunk = pool.popleft()
            if got + len(chunk) > n:
                chunk, rest = chunk[: n - got], chunk[n - got :]
                pool.appendleft(rest)
            taken.append(chunk)
            got += len(chunk)
        self.available[kind] -= n
        self.used[kind] += n
        return taken[0] if len(taken) == 1 else torch.cat(taken)

    def _drain(self) -> None:
        """Take in what the device has sent already (its pools dealt ahead), without waiting."""
        while True:
            try:
                self._read(0)
            except TimeoutError:
                return

    def _read(self, timeout: float) -> None:
        try:
            data = self.ws.recv(timeout=timeout)
        except TimeoutError:
            if timeout == 0:
                raise
            raise WireError(f"the device sent no correction for {self.timeout:.0f} s", code="dealer_timeout") from None
        if isinstance(data, str):
            raise WireError(
                f"the device sent {data[:200]!r} while this server waited for a correction", code="bad_frame"
            )
        self.take_in(data)

    def take_in(self, data: bytes) -> None:
        """A POOL, DEALT or CORRECTION message from the device."""
        if data[:4] == M.DEALT_MAGIC:
            shape_a, shape_b, words = M.unpack_dealt(data)
            self.ahead.append((shape_a, shape_b, words))  # its size is checked when it is taken
            return
        if data[:4] == M.POOL_MAGIC:
            code, n = M.header(data, M.POOL, M.POOL_MAGIC, "pool")
            if code >= len(M.POOL_KINDS):
                raise WireError(f"a pool of unknown kind {code}", code="bad_frame")
            kind = M.POOL_KINDS[code]
            self.pools[kind].append(M.tensor_of(memoryview(data)[M.POOL.size :], (n,), f"{kind} pool"))
            self.available[kind] += n
            self.asked[kind] = max(0, self.asked[kind] - n)
            return
        (seq,) = M.header(data, M.CORRECTION, M.CORRECTION_MAGIC, "correction")
        slot = next((slot for slot in self.slots if slot.tensor is None), None)
        if slot is None or seq != slot.seq:
            expected = None if slot is None else slot.seq
            raise WireError(f"the device sent correction {seq}, this server expected {expected}", code="out_of_step")
        slot.tensor = M.tensor_of(memoryview(data)[M.CORRECTION.size :], slot.shape, "correction")

    def usage(self) -> tuple[int, int, int]:
        """Pooled corrections used so far, per kind (mul, and, bit)."""
        return self.used["mul"], self.used["and"], self.used["bit"]


class ShareServer(SessionServer):
    """Party ``party`` of the body on shares, serving devices on ``host:port`` (WebSocket).

    ``peer``: party 0 listens there for party 1; party 1 connects there (the same address on both).
    ``timeout``: how long any party waits for its peer, its device or a dealer's correction.
    ``tokens``: the bearer tokens a device must present (none: any device is served).
    """

    def __init__(
        self,
        weights: BodyWeights,
        party: int,
        peer: tuple[str, int],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ring: Ring | None = None,
        rest: NormPlan = SMOLLM2_REST,
        sink: NormPlan = SMOLLM2_SINK,
        timeout: float = 60.0,
        max_sessions: int = 8,
        ssl: SSLContext | None = None,
        tokens: Sequence[str] = (),
    ) -> None:
        if party not in (0, 1):
            raise ValueError(f"party is 0 or 1, got {party}")
        self.weights, self.party, self.peer = weights, party, peer
        self.ring = ring or Ring()
        self.rest, self.sink, self.timeout = rest, sink, timeout
        self.hidden_size = int(weights.layers[0].q.weight.shape[1]) if weights.layers else 0
        self.fingerprint = fingerprint(weights, self.ring)
        self.encoded: dict[int, tuple[torch.Tensor, torch.Tensor, bool]] = {}
        self.listener = PeerListener(peer[0], peer[1], self.fingerprint, timeout) if party == 0 else None
        super().__init__(
            self._session,
            host,
            port,
            max_size=MAX_MESSAGE,
            timeout=timeout,
            ssl=ssl,
            name=f"share-{party}",
            tokens=tokens,
            max_sessions=max_sessions,
        )

    @property
    def peer_address(self) -> tuple[str, int]:
        """Where party 0 listens for party 1 (its bound port when ``peer`` asked for port 0)."""
        if self.listener is not None:
            host, port = self.listener.address
            return str(host), int(port)
        return self.peer

    def start(self) -> ShareServer:
        super().start()
        return self

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
        super().close()

    def __enter__(self) -> ShareServer:
        return self.start()

    # one device connection = one session

    def _session(self, ws: ServerConnection) -> None:
        channel: PeerChannel | None = None
        try:
            session, key, link_key = self._open(ws)
            channel = self._peer(session, link_key)
            feed = _DeviceFeed(ws, self.timeout) if self.party == 1 else None
            source = SeededSource(key) if feed is None else CorrectedSource(key, feed)
            party = Party(self.party, self.ring, channel, source)
            body = SharedBody(self.weights, SharedOps(party, self.rest, self.sink, self.encoded))
            ws.send(json.dumps(self._ready()))
            self._serve(ws, body, party, channel, feed, session)
        except ConnectionClosed:
            log.info("share %d: the device left", self.party)
        except LambdaSplitError as e:
            log.warning("share %d: session ended: %s", self.party, e)
            send_error(ws, e)
        except Exception as e:  # a bug: the device still gets an answer, and the peer sees the link close
            log.exception("share %d: session failed", self.party)
            send_error(ws, WireError(f"share server {self.party} failed: {type(e).__name__}: {e}", code="internal"))
        finally:
            if channel is not None:
                channel.close()

    def _open(self, ws: ServerConnection) -> tuple[bytes, bytes, bytes]:
        fields = "session, party, key, link"
        opened = receive_open(ws, self.timeout, fields)
        try:
            session, key = bytes.fromhex(opened["session"]), bytes.fromhex(opened["key"])
            link_key = bytes.fromhex(opened["link"])
            party = opened["party"]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise WireError(f"the first message must be {{type: open, {fields}}}", code="bad_frame") from None
        if len(session) != SESSION_BYTES or len(key) != KEY_BYTES or len(link_key) != LINK_KEY_BYTES:
            raise WireError(
                f"open needs a {SESSION_BYTES}-byte session, a {KEY_BYTES}-byte key and a {LINK_KEY_BYTES}-byte link",
                code="bad_frame",
            )
        if party != self.party:
            raise WireError(f"this is share server {self.party}; the device expected party {party}", code="wrong_party")
        expected = opened.get("fingerprint")
        if expected is not None and expected != self.fingerprint.hex():
            raise WireError("this share server runs another body than the device expects", code="wrong_body")
        return session, key, link_key

    def _peer(self, session: bytes, link_key: bytes) -> PeerChannel:
        if self.listener is not None:
            return self.listener.claim(session, link_key, self.timeout)
        return join(self.peer, session, self.fingerprint, link_key, self.timeout)

    def _ready(self) -> dict[str, object]:
        return {
            "type": "ready",
            "party": self.party,
            "layers": len(self.weights.layers),
            "hidden_size": self.hidden_size,
            "frac_bits": self.ring.frac_bits,
            "max_context": MAX_CONTEXT,
            "fingerprint": self.fingerprint.hex(),
            # what the attention products' shapes follow from (the device deals their triples ahead)
            "heads": self.weights.layers[0].heads,
            "kv_heads": self.weights.layers[0].kv_heads,
            "head_dim": self.weights.layers[0].head_dim,
        }

    def _serve(
        self,
        ws: ServerConnection,
        body: SharedBody,
        party: Party,
        channel: PeerChannel,
        feed: _DeviceFeed | None,
        session: bytes,
    ) -> None:
        step = 0
        for data in ws:
            if isinstance(data, str):
                kind = control_type(data)
                if kind == "close":
                    return
                raise WireError(f"unexpected {kind!r} message in a session", code="bad_frame")
            if feed is not None and data[:4] in (M.POOL_MAGIC, M.DEALT_MAGIC):  # dealt ahead of the next forward
                feed.take_in(data)
                continue
            got_step, position, rows, width, flags = M.header(data, M.FORWARD, M.FORWARD_MAGIC, "forward")
            if flags & ~M.WIDE:
                raise WireError(f"a forward with unknown flags {flags:#x}", code="bad_frame")
            if got_step != step:
                raise WireError(f"forward for step {got_step}; this session is at step {step}", code="out_of_step")
            if width != self.hidden_size or rows < 1:
                raise WireError(
                    f"a share of {rows} x {width}; this body takes rows of width {self.hidden_size}", code="bad_share"
                )
            if position + rows > MAX_CONTEXT:
                raise WireError(f"context {position + rows} exceeds {MAX_CONTEXT} on shares", code="context_full")
            share = M.tensor_of(memoryview(data)[M.FORWARD.size :], (1, rows, width), "forward share")
            channel.begin(step)
            start, before = time.perf_counter(), party.counter.snapshot()
            used_before = feed.usage() if feed is not None else (0, 0, 0)
            out = body.forward(share, position, session.hex(), wide=bool(flags & M.WIDE))
            cost = party.counter.since(before)
            used = tuple(u - b for u, b in zip(feed.usage(), used_before, strict=True)) if feed else (0, 0, 0)
            log.debug("share %d: step %d, %d rows in %.2f s", self.party, step, rows, time.perf_counter() - start)
            header = M.OUTPUT.pack(M.OUTPUT_MAGIC, step, rows, width, cost.rounds, cost.sent, *used)
            ws.send(header + M.words(out) + M.words(body.norms))  # the norms' checks: the device's, body.norms_fit
            step += 1
