"""The device's side of the body on shares: share what goes up, deal the randomness, reconstruct what comes back.

``SecretSharedLink`` is a ``BodyLink`` (``generation.session``): the generation loop, head and tail are the
plain split's; only the body runs on two share servers. Per forward the device

1. encodes the head's hidden states in the ring and splits them: a uniform mask ``s0`` (its own AES stream)
   to share server 0, ``s1 = x - s0`` to share server 1;
2. deals share server 1 the corrections it will need (``dealing.TrustedDealer``): the attention products'
   triples before the forward (their shapes follow from the rows and the context), the elementwise kinds as
   pools sized by the last forward of as many rows, and answers its requests when a pool runs short; share
   server 0 draws its randomness from the key it got at ``open`` and asks for nothing;
3. reconstructs the two output shares and decodes them for the tail.

What each server sees: one uniformly random share of each input, the peer's masked openings, and (server 1)
corrections that are uniform given its view. What the device pays: the input rows twice, the output rows
twice, and the corrections (bytes per token in docs/secret-sharing.md).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Sequence

import torch
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from lambdasplit.errors import ConfigError, RemoteError, WireError
from lambdasplit.mpc import messages as M
from lambdasplit.mpc.body import BodyOutput, computed_again, reconstruct, share
from lambdasplit.mpc.dealing import TrustedDealer, new_key
from lambdasplit.mpc.layer import attention_products
from lambdasplit.mpc.peer import LINK_KEY_BYTES, SESSION_BYTES
from lambdasplit.mpc.ring import Prg, Ring
from lambdasplit.mpc.server import MAX_MESSAGE
from lambdasplit.syncws import connect_session
from lambdasplit.tls import TlsTrust
from lambdasplit.traffic import Traffic


class SecretSharedLink:
    """A body computed by two share servers (``urls``: share server 0's, then 1's) on the device's shares.

    ``timeout``: seconds to wait for either server at any point (a server waits as long for its peer).
    ``token``: the bearer token both servers take, or a pair (server 0's, server 1's: non-colluding servers are run
    by different parties, each with its own); None: send none.
    ``traffic`` counts both servers' messages: FORWARDs up, OUTPUTs down, and the dealer's traffic with server 1
    (``dealt``: correction bytes; ``dealt_ahead``: matrix-product corrections sent before their forward;
    ``requests``: what server 1 still asked for).
    ``wide``: every forward's norms fit any row (``SharedOps.wide``: more rounds each), so that no forward is redone
    for a row beyond its position's plan; by default only a forward redone after an implausible output is (both
    servers see that it was redone).
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        timeout: float = 60.0,
        trust: TlsTrust | None = None,
        token: str | Sequence[str | None] | None = None,
        wide: bool = False,
    ) -> None:
        if len(urls) != 2:
            raise ConfigError(
                f"secret sharing needs two share servers (party 0's URL, then party 1's), got {len(urls)}"
            )
        tokens = (token, token) if token is None or isinstance(token, str) else tuple(token)
        if len(tokens) != 2:
            raise ConfigError(f"one bearer token for both share servers, or one for each; got {len(tokens)}")
        self.urls, self.timeout, self.trust, self.wide = tuple(urls), timeout, trust or TlsTrust(), wide
        self._tokens = tokens
        self.session = secrets.token_bytes(SESSION_BYTES)
        keys = new_key(), new_key()
        link_key = secrets.token_bytes(LINK_KEY_BYTES)  # the servers' peer link: only they and this device hold it
        self.dealer = TrustedDealer(*keys)
        self.randomness = Prg(new_key())
        self.traffic = Traffic()
        self.dealt = self.requests = self.retries = 0
        self.dealt_ahead = 0  # matrix-product corrections sent before the forward that takes them
        self.pool_dealt = dict.fromkeys(M.POOL_KINDS, 0)  # elementwise corrections sent ahead, per kind
        self.pool_used = dict.fromkeys(M.POOL_KINDS, 0)  # ... and used, as server 1 reports them
        self.usage: dict[int, dict[str, int]] = {}  # rows of a forward -> what the last one of as many rows used
        self.peer_rounds = [0, 0]  # rounds each server reports having run with its peer
        self.peer_bytes = [0, 0]  # bytes each server reports having sent its peer
        self.step = 0
        self.links: list[ClientConnection] = []
        self._stack = contextlib.ExitStack()  # websockets wants its connections entered as context managers
        try:
            for url in self.urls:
                self.links.append(self._connect(url))
            for party, ws in enumerate(self.links):
                ws.send(
                    json.dumps(
                        {
                            "type": "open",
                            "session": self.session.hex(),
                            "party": party,
                            "key": keys[party].hex(),
                            "link": link_key.hex(),
                        }
                    )
                )
            ready = [self._ready(party) for party in (0, 1)]
        except BaseException:
            self.close()
            raise
        if ready[0]["fingerprint"] != ready[1]["fingerprint"]:
            self.close()
            raise ConfigError("the two share servers run different bodies (their fingerprints differ)")
        numbers = {k: int(v) for k, v in ready[0].items() if isinstance(v, int)}
        self.ring = Ring(numbers["frac_bits"])
        self.hidden_size, self.max_context, self.layers = (numbers[k] for k in ("hidden_size", "max_context", "layers"))
        # The attention products' triples are dealt ahead where the server says what their shapes follow from.
        names = ("heads", "kv_heads", "head_dim")
        self.attention = tuple(numbers[k] for k in names) if all(k in numbers for k in names) else None

    def _connect(self, url: str) -> ClientConnection:
        return connect_session(
            url,
            what=f"share server {len(self.links)}",
            exposes="this session's dealer key and the hidden states' shares",
            trust=self.trust,
            timeout=self.timeout,
            max_size=MAX_MESSAGE,
            stack=self._stack,
            token=self._tokens[len(self.links)],
        )

    def _receive(self, party: int, what: str) -> str | bytes:
        try:
            data = self.links[party].recv(timeout=self.timeout)
        except TimeoutError:
            raise WireError(
                f"share server {party} sent no {what} within {self.timeout:.0f} s", code="timeout"
            ) from None
        except ConnectionClosed:
            raise WireError(f"share server {party} closed the session before its {what}", code="peer_gone") from None
        if isinstance(data, str):
            message = json.loads(data)
            if message.get("type") == "error":
                raise RemoteError(f"share server {party}: {message.get('message')}", code=str(message.get("code")))
        return data

    def _ready(self, party: int) -> dict[str, object]:
        data = self._receive(party, "ready message")
        message = json.loads(data) if isinstance(data, str) else {}
        if message.get("type") != "ready" or message.get("party") != party:
            raise WireError(f"share server {party} answered open with {str(data)[:200]!r}", code="bad_frame")
        return dict(message)

    def forward(self, hidden: torch.Tensor, position: int, reset: bool = False, last: bool = False) -> torch.Tensor:
        """The body's output for ``hidden`` at ``position``; a forward whose output is implausible (a row beyond
        its norm plan, a truncation wrap) is sent again at the same position, wide (the servers roll back;
        ``body.computed_again``, counted in ``retries``)."""
        if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[2] != self.hidden_size:
            raise ConfigError(f"hidden must be (1, T, {self.hidden_size}), got {tuple(hidden.shape)}")
        if reset and position != 0:
            raise ConfigError("reset drops the cache: it starts at position 0")
        out, redone = computed_again(lambda wide: self._forward(hidden, position, wide or self.wide))
        self.retries += redone
        out = out.to(hidden.device, hidden.dtype)
        return out[:, -1:] if last else out

    def _forward(self, hidden: torch.Tensor, position: int, wide: bool) -> BodyOutput:
        start = time.perf_counter()
        rows = hidden.shape[1]
        shares = share(hidden.detach().to("cpu", torch.float64), self.ring, self.randomness)
        up = self._deal_products(rows, position)  # before server 1's FORWARD: there when its first product asks
        flags = M.WIDE if wide else 0
        for party, s in enumerate(shares):
            frame = M.FORWARD.pack(M.FORWARD_MAGIC, self.step, position, rows, self.hidden_size, flags) + M.words(s)
            self._send(party, frame)
            up += len(frame)
        up += self._deal_ahead(rows)
        try:
            (out1, norms1), dealer_up, dealer_down = self._deal_until_output()
            out0, norms0 = self._output(0, self._receive(0, "output"))
        except WireError as e:
            raise self._both_errors(e) from None
        self.step += 1
        down = 2 * (M.OUTPUT.size + (out0.numel() + norms0.numel()) * 8)
        self.traffic.add(
            up + dealer_down,
            down + dealer_up,
            up_payload=2 * rows * self.hidden_size * 8,
            down_payload=2 * out0.numel() * 8,
            seconds=time.perf_counter() - start,
        )
        return BodyOutput(reconstruct(out0, out1, self.ring), reconstruct(norms0, norms1, self.ring, torch.float64))

    def _send(self, party: int, data: bytes) -> None:
        try:
            self.links[party].send(data)
        except ConnectionClosed:
            raise WireError(f"share server {party} closed the session", code="peer_gone") from None

    def _deal_ahead(self, rows: int) -> int:
        """Send server 1 the pooled corrections a forward of ``rows`` rows will use (the last such forward's use,
        5% more, less what it holds already); bytes sent. A first forward of its size is dealt on request."""
        sent = 0
        for kind, used in self.usage.get(rows, {}).items():
            surplus = self.pool_dealt[kind] - self.pool_used[kind]
            sent += self._deal_pool(kind, int(used * 1.05) + 4096 - surplus)
        return sent

    def _deal_products(self, rows: int, position: int) -> int:
        """Send server 1 the corrections of every matrix-product triple a forward of ``rows`` rows at ``position``
        takes (two per layer: ``layer.attention_products``), in the order it takes them, so that it never waits on
        this device mid-forward for them (a round trip each); bytes sent. Nothing where the server did not say its
        attention heads (it then asks for each)."""
        if self.attention is None:
            return 0
        sent = 0
        for shape_a, shape_b in attention_products(rows, position + rows, *self.attention) * self.layers:
            correction = self.dealer.correction("matmul", shape_a, shape_b)
            frame = M.pack_dealt(shape_a, shape_b, correction)
            self._send(1, frame)
            self.dealt += 8 * correction.numel()
            self.dealt_ahead += 1
            sent += len(frame)
        return sent

    def _deal_pool(self, kind: str, n: int) -> int:
        if n <= 0:
            return 0
        sent = 0
        for message in M.pool_messages(kind, self.dealer.pooled(kind, n)):
            self._send(1, message)
            sent += len(message)
        self.pool_dealt[kind] += n
        self.dealt += 8 * n
        return sent

    def _deal_until_output(self) -> tuple[tuple[torch.Tensor, torch.Tensor], int, int]:
        """Answer share server 1's requests until its output arrives: (its output and norm checks' shares, request
        bytes, dealt bytes)."""
        up = down = 0
        while True:
            data = self._receive(1, "output")
            if isinstance(data, str) or data[:4] != M.REQUEST_MAGIC:
                return self._output(1, data), up, down
            seq, kind, shape_a, shape_b = M.unpack_request(data)
            if seq != self.requests:
                raise WireError(
                    f"share server 1 sent request {seq}, the device expected {self.requests}", code="out_of_step"
                )
            self.requests += 1
            up += len(data)
            if kind in M.POOL_KINDS:  # a pool ran short: top it up, with room to spare
                down += self._deal_pool(kind, max(shape_a[0] if shape_a else 0, M.POOL_CHUNK))
                continue
            correction = M.words(self.dealer.correction(kind, shape_a, shape_b))
            frame = M.CORRECTION.pack(M.CORRECTION_MAGIC, seq) + correction
            self._send(1, frame)
            self.dealt += len(correction)
            down += len(frame)

    def _output(self, party: int, data: str | bytes) -> tuple[torch.Tensor, torch.Tensor]:
        """A server's OUTPUT: its shares of the body's output (1, rows, width) and of its norms' checks (2 per
        layer, rows, 3)."""
        if isinstance(data, str):
            raise WireError(f"share server {party} sent {data[:200]!r} where its output was due", code="bad_frame")
        step, rows, width, rounds, sent, *used = M.header(data, M.OUTPUT, M.OUTPUT_MAGIC, "output")
        if step != self.step or width != self.hidden_size:
            raise WireError(f"share server {party} sent output for step {step} ({rows} x {width})", code="out_of_step")
        self.peer_rounds[party] += rounds
        self.peer_bytes[party] += sent
        if party == 1:
            for kind, n in zip(M.POOL_KINDS, used, strict=True):
                self.pool_used[kind] += n
            self.usage[rows] = dict(zip(M.POOL_KINDS, used, strict=True))
        words = M.tensor_of(
            memoryview(data)[M.OUTPUT.size :], (rows * (width + 2 * self.layers * 3),), f"share server {party}'s output"
        )
        return words[: rows * width].view(1, rows, width), words[rows * width :].view(2 * self.layers, rows, 3)

    def _both_errors(self, first: WireError) -> WireError:
        """When one server fails, the other ends its side too: report what each said (briefly waiting for it)."""
        messages = [str(first)]
        for party, ws in enumerate(self.links):
            if f"share server {party}" in str(first):
                continue
            try:
                data = ws.recv(timeout=min(self.timeout, 5.0))
                if isinstance(data, str) and json.loads(data).get("type") == "error":
                    messages.append(f"share server {party}: {json.loads(data).get('message')}")
            except (TimeoutError, ConnectionClosed, ValueError):
                pass
        self.close()
        return (RemoteError if isinstance(first, RemoteError) else WireError)("; ".join(messages), code=first.code)

    def close(self) -> None:
        for ws in self.links:
            with contextlib.suppress(ConnectionClosed, RuntimeError):
                ws.send(json.dumps({"type": "close"}))
        self._stack.close()
