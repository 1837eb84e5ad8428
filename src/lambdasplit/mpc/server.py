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
import threading
import time
from collections import deque
from ssl import SSLContext

import torch
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import Server, ServerConnection, serve

from lambdasplit.errors import CodedError, LambdaSplitError, WireError
from lambdasplit.mpc import messages as M
from lambdasplit.mpc.body import MAX_CONTEXT, BodyWeights, SharedBody
from lambdasplit.mpc.dealing import CorrectedSource, SeededSource, product_shape
from lambdasplit.mpc.layer import Linear
from lambdasplit.mpc.ops import SMOLLM2_REST, SMOLLM2_SINK, NormPlan, SharedOps
from lambdasplit.mpc.party import Party
from lambdasplit.mpc.peer import SESSION_BYTES, PeerChannel, PeerListener, join
from lambdasplit.mpc.ring import KEY_BYTES, Ring

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


class _DeviceFeed:
    """Party 1's ``CorrectionFeed`` over its device connection: a REQUEST per item, the CORRECTIONs in order."""

    def __init__(self, ws: ServerConnection, timeout: float) -> None:
        self.ws, self.timeout = ws, timeout
        self.sent, self.received = 0, 0
        self.shapes: deque[tuple[int, ...]] = deque()

    def request(self, kind: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> None:
        self.shapes.append(shape_a if kind == "bit" else product_shape(kind, shape_a, shape_b))
        self.ws.send(M.pack_request(self.sent, kind, shape_a, shape_b))
        self.sent += 1

    def receive(self) -> torch.Tensor:
        try:
            data = self.ws.recv(timeout=self.timeout)
        except TimeoutError:
            raise WireError(f"the device sent no correction for {self.timeout:.0f} s", code="dealer_timeout") from None
        if isinstance(data, str):
            raise WireError(
                f"the device sent {data[:200]!r} while this server waited for a correction", code="bad_frame"
            )
        (seq,) = M.header(data, M.CORRECTION, M.CORRECTION_MAGIC, "correction")
        if seq != self.received:
            raise WireError(
                f"the device sent correction {seq}, this server expected {self.received}", code="out_of_step"
            )
        self.received += 1
        return M.tensor_of(memoryview(data)[M.CORRECTION.size :], self.shapes.popleft(), "correction")


class ShareServer:
    """Party ``party`` of the body on shares, serving devices on ``host:port`` (WebSocket).

    ``peer``: party 0 listens there for party 1; party 1 connects there (the same address on both).
    ``timeout``: how long any party waits for its peer, its device or a dealer's correction.
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
    ) -> None:
        if party not in (0, 1):
            raise ValueError(f"party is 0 or 1, got {party}")
        self.weights, self.party, self.peer = weights, party, peer
        self.ring = ring or Ring()
        self.rest, self.sink, self.timeout = rest, sink, timeout
        self.hidden_size = int(weights.layers[0].q.weight.shape[1]) if weights.layers else 0
        self.fingerprint = fingerprint(weights, self.ring)
        self.encoded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sessions = threading.BoundedSemaphore(max_sessions)
        self.listener = PeerListener(peer[0], peer[1], self.fingerprint, timeout) if party == 0 else None
        self.server: Server = serve(
            self._session, host, port, max_size=MAX_MESSAGE, compression=None, open_timeout=timeout, ssl=ssl
        )
        self.scheme = "ws" if ssl is None else "wss"
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

    @property
    def peer_address(self) -> tuple[str, int]:
        """Where party 0 listens for party 1 (its bound port when ``peer`` asked for port 0)."""
        if self.listener is not None:
            host, port = self.listener.address
            return str(host), int(port)
        return self.peer

    def start(self) -> ShareServer:
        """Serve in a background thread (tests, ``serve_forever`` for the command line)."""
        self._thread = threading.Thread(target=self.server.serve_forever, name=f"share-{self.party}", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.server.serve_forever()

    def close(self) -> None:
        self.server.shutdown()
        if self.listener is not None:
            self.listener.close()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> ShareServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # one device connection = one session

    def _session(self, ws: ServerConnection) -> None:
        if not self.sessions.acquire(blocking=False):
            _send_error(ws, WireError("this share server is at its session limit; try again later", code="busy"))
            return
        channel: PeerChannel | None = None
        try:
            session, key = self._open(ws)
            channel = self._peer(session)
            feed = _DeviceFeed(ws, self.timeout) if self.party == 1 else None
            source = SeededSource(key) if feed is None else CorrectedSource(key, feed)
            party = Party(self.party, self.ring, channel, source)
            body = SharedBody(self.weights, SharedOps(party, self.rest, self.sink, self.encoded))
            ws.send(json.dumps(self._ready()))
            self._serve(ws, body, party, channel, session)
        except ConnectionClosed:
            log.info("share %d: the device left", self.party)
        except LambdaSplitError as e:
            log.warning("share %d: session ended: %s", self.party, e)
            _send_error(ws, e)
        except Exception as e:  # a bug: the device still gets an answer, and the peer sees the link close
            log.exception("share %d: session failed", self.party)
            _send_error(ws, WireError(f"share server {self.party} failed: {type(e).__name__}: {e}", code="internal"))
        finally:
            if channel is not None:
                channel.close()
            self.sessions.release()

    def _open(self, ws: ServerConnection) -> tuple[bytes, bytes]:
        try:
            raw = ws.recv(timeout=self.timeout)
        except TimeoutError:
            raise WireError(f"the device sent no open message within {self.timeout:.0f} s", code="timeout") from None
        try:
            opened = json.loads(raw) if isinstance(raw, str) else {}
            session, key = bytes.fromhex(opened["session"]), bytes.fromhex(opened["key"])
            party = opened["party"]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise WireError("the first message must be {type: open, session, party, key}", code="bad_frame") from None
        if opened.get("type") != "open" or len(session) != SESSION_BYTES or len(key) != KEY_BYTES:
            raise WireError(f"open needs a {SESSION_BYTES}-byte session and a {KEY_BYTES}-byte key", code="bad_frame")
        if party != self.party:
            raise WireError(f"this is share server {self.party}; the device expected party {party}", code="wrong_party")
        expected = opened.get("fingerprint")
        if expected is not None and expected != self.fingerprint.hex():
            raise WireError("this share server runs another body than the device expects", code="wrong_body")
        return session, key

    def _peer(self, session: bytes) -> PeerChannel:
        if self.listener is not None:
            return self.listener.claim(session, self.timeout)
        return join(self.peer, session, self.fingerprint, self.timeout)

    def _ready(self) -> dict[str, object]:
        return {
            "type": "ready",
            "party": self.party,
            "layers": len(self.weights.layers),
            "hidden_size": self.hidden_size,
            "frac_bits": self.ring.frac_bits,
            "max_context": MAX_CONTEXT,
            "fingerprint": self.fingerprint.hex(),
        }

    def _serve(
        self, ws: ServerConnection, body: SharedBody, party: Party, channel: PeerChannel, session: bytes
    ) -> None:
        for step, data in enumerate(ws):
            if isinstance(data, str):
                kind = _control(data)
                if kind == "close":
                    return
                raise WireError(f"unexpected {kind!r} message in a session", code="bad_frame")
            got_step, position, rows, width = M.header(data, M.FORWARD, M.FORWARD_MAGIC, "forward")
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
            out = body.forward(share, position, session.hex())
            cost = party.counter.since(before)
            log.debug("share %d: step %d, %d rows in %.2f s", self.party, step, rows, time.perf_counter() - start)
            ws.send(M.OUTPUT.pack(M.OUTPUT_MAGIC, step, rows, width, cost.rounds, cost.sent) + M.words(out))


def _control(data: str) -> str:
    try:
        return str(json.loads(data).get("type"))
    except (ValueError, AttributeError):
        return "malformed"


def _send_error(ws: ServerConnection, error: LambdaSplitError) -> None:
    code = error.code if isinstance(error, CodedError) else "bad_request"
    try:
        ws.send(json.dumps({"type": "error", "code": code, "message": str(error)}))
        ws.close()
    except ConnectionClosed:
        pass
