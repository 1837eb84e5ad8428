"""Correlated randomness: the device deals Beaver triples and shared bits, seeded, sending only corrections.

CrypTen's trusted third party, with the device in its place (the party the user trusts; it never sees a share
of a secret computed on the servers). The device draws a fresh 128-bit key per party and per session and sends
each server its own key once, at the start of the session. From then on:

- party 0 draws everything it needs from its key's streams: ``a0``, ``b0`` and ``c0`` of each triple, its
  shares of each random bit. It never hears from the dealer again.
- party 1 draws ``a1`` and ``b1`` from its key's streams; ``c1`` cannot be drawn, since ``c = a * b`` must hold:
  the device replays both parties' streams, computes ``c = (a0 + a1) * (b0 + b1)`` and sends ``c1 = c - c0`` (a
  *correction*). Same for random bits: party 1 gets its additive share.

Elementwise triples (``mul``, ``and``) and random bits do not depend on the shapes they are used in: element i of a
kind's streams is element i whatever tensor it lands in. So the device deals them ahead, as a *pool* of corrections
per kind (``TrustedDealer.pooled``), before party 1 asks: an online phase that waits for the device only when a pool
runs short. Matrix-product triples (attention's two per layer) depend on their shapes, which the device knows before
a forward (``layer.attention_products``): it deals them ahead too, in the order party 1 takes them (party 1 checks
each one's shapes); where none was dealt, party 1 asks (``CorrectionFeed.request``) and reads it after its exchange
with the peer, the two round trips overlapping. ``c0`` is uniform and independent of everything party 1 sees, so the
corrections are too: they tell party 1 nothing about ``a`` or ``b``.

The streams are AES-128 in counter mode (the ``cryptography`` package, OpenSSL's AES), one per kind and
component, keyed by HMAC-SHA256 of the party's key and the stream's name: a standard cipher used as a
pseudorandom generator, as CrypTen uses a seeded generator. torch's own generators (Mersenne Twister) are not
used for anything a party sees: their state is recoverable from their output.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import math
import secrets
from collections.abc import Callable
from typing import Protocol

import torch

from lambdasplit.mpc.party import SharedBit, Triple
from lambdasplit.mpc.ring import KEY_BYTES, Prg

KINDS = ("mul", "matmul", "and")
POOLED = ("mul", "and", "bit")  # dealt ahead, whatever the shapes


def new_key() -> bytes:
    """A fresh stream key from the OS's entropy (``secrets``)."""
    return secrets.token_bytes(KEY_BYTES)


def key_from_seed(seed: int, label: str) -> bytes:
    """A reproducible key for tests and benchmarks (never for users): SHA-256 of the seed and a label."""
    return hashlib.sha256(f"{seed}:{label}".encode()).digest()[:KEY_BYTES]


def product_shape(kind: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of ``c`` for a triple of ``kind`` (matmul broadcasts as torch.matmul)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "matmul":
        return tuple(torch.empty(shape_a, device="meta").matmul(torch.empty(shape_b, device="meta")).shape)
    if tuple(shape_a) != tuple(shape_b):
        raise ValueError(f"{kind} triples need equal shapes, got {shape_a} and {shape_b}")
    return tuple(shape_a)


def _combine(kind: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if kind == "and":
        return a & b
    return a * b if kind == "mul" else a @ b


class Streams:
    """One party's named streams, each keyed by HMAC-SHA256(party key, name): ``streams("mul.a")``."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a stream key has {KEY_BYTES} bytes, got {len(key)}")
        self.key = key
        self._streams: dict[str, Prg] = {}

    def __call__(self, name: str) -> Prg:
        stream = self._streams.get(name)
        if stream is None:
            stream = self._streams[name] = Prg(hmac.new(self.key, name.encode(), "sha256").digest()[:KEY_BYTES])
        return stream


class TrustedDealer:
    """The device's side: both parties' streams, replayed in the order the parties consume them.

    ``pooled(kind, n)``: party 1's corrections for the next ``n`` elements of an elementwise kind (``mul``,
    ``and``, or ``bit`` for random bits). ``correction(kind, shape_a, shape_b)``: party 1's ``c1`` of the next
    matrix-product triple.
    """

    def __init__(self, key0: bytes, key1: bytes) -> None:
        self.streams = (Streams(key0), Streams(key1))

    def pooled(self, kind: str, n: int) -> torch.Tensor:
        s0, s1 = self.streams
        if kind == "bit":
            r0, arithmetic0 = s0("bit.r").elements((n,)) & 1, s0("bit.x").elements((n,))
            return (r0 ^ (s1("bit.r").elements((n,)) & 1)) - arithmetic0
        if kind not in POOLED:
            raise ValueError(f"pooled kinds are {POOLED}, got {kind!r}")
        a0, b0, c0 = (s0(f"{kind}.{part}").elements((n,)) for part in "abc")
        a1, b1 = (s1(f"{kind}.{part}").elements((n,)) for part in "ab")
        if kind == "and":
            return ((a0 ^ a1) & (b0 ^ b1)) ^ c0
        return (a0 + a1) * (b0 + b1) - c0

    def correction(self, kind: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> torch.Tensor:
        if kind != "matmul":
            raise ValueError(f"only matmul triples are dealt by request, got {kind!r}")
        shape_c = product_shape(kind, shape_a, shape_b)
        s0, s1 = self.streams
        a0, b0, c0 = (
            s0("matmul.a").elements(shape_a),
            s0("matmul.b").elements(shape_b),
            s0("matmul.c").elements(shape_c),
        )
        a1, b1 = s1("matmul.a").elements(shape_a), s1("matmul.b").elements(shape_b)
        return (a0 + a1) @ (b0 + b1) - c0


class SeededSource:
    """Party 0's ``TripleSource``: every item drawn from its own streams, nothing received."""

    def __init__(self, key: bytes) -> None:
        self.streams = Streams(key)

    def take(self, kind: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> Triple:
        shape_c = product_shape(kind, shape_a, shape_b)
        s = self.streams
        return Triple(
            s(f"{kind}.a").elements(shape_a), s(f"{kind}.b").elements(shape_b), s(f"{kind}.c").elements(shape_c)
        )

    def bit(self, shape: tuple[int, ...]) -> SharedBit:
        return SharedBit(self.streams("bit.r").elements(shape) & 1, self.streams("bit.x").elements(shape))


class CorrectionFeed(Protocol):
    """Party 1's line to the dealer. ``pooled(kind, n)``: the next ``n`` corrections of an elementwise kind
    (waits, and asks, only if the pool is short). ``request`` (does not wait) the next matrix-product triple's
    correction, ``receive`` (waits) the oldest requested one."""

    def pooled(self, kind: str, n: int) -> torch.Tensor: ...

    def request(self, kind: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> None: ...

    def receive(self) -> torch.Tensor: ...


class CorrectedSource:
    """Party 1's ``TripleSource``: ``a1``, ``b1`` (and its XOR bits) from its streams, the rest from the dealer.

    A matrix product's correction is requested when the triple is taken and read when ``c`` is first used,
    after the opening with the peer: the two round trips overlap. Pooled corrections are read in the order the
    items are taken (``Triple.c`` is resolved before the next item is taken; checked).
    """

    def __init__(self, key: bytes, feed: CorrectionFeed) -> None:
        self.streams, self.feed = Streams(key), feed
        self.taken = self.resolved = 0

    def take(self, kind: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> Triple:
        shape_c = product_shape(kind, shape_a, shape_b)
        if kind == "matmul":
            self.feed.request(kind, tuple(shape_a), tuple(shape_b))
            receive: Callable[[], torch.Tensor] = self.feed.receive
        else:
            n = math.prod(shape_c)

            def receive() -> torch.Tensor:
                return self.feed.pooled(kind, n).view(shape_c)

        a, b = self.streams(f"{kind}.a").elements(shape_a), self.streams(f"{kind}.b").elements(shape_b)
        return Triple(a, b, _Pending(self, self.taken, receive, shape_c), dealt=8 * math.prod(shape_c))

    def bit(self, shape: tuple[int, ...]) -> SharedBit:
        binary = self.streams("bit.r").elements(shape) & 1
        return SharedBit(binary, self.feed.pooled("bit", math.prod(shape)).view(shape), dealt=8 * math.prod(shape))


class _Pending:
    """A correction not read yet: ``Triple.c`` resolves it on first use, in the order the triples were taken."""

    def __init__(
        self, owner: CorrectedSource, index: int, receive: Callable[[], torch.Tensor], shape: tuple[int, ...]
    ) -> None:
        owner.taken += 1
        self.owner, self.index, self.receive, self.shape = owner, index, receive, shape

    def resolve(self) -> torch.Tensor:
        if self.index != self.owner.resolved:
            raise RuntimeError(
                f"triple {self.index} used before triple {self.owner.resolved}: corrections out of order"
            )
        self.owner.resolved += 1
        c = self.receive()
        if tuple(c.shape) != self.shape:
            raise _mismatch("triple", self.shape, tuple(c.shape))
        return c


def _mismatch(what: str, expected: tuple[int, ...], got: tuple[int, ...]) -> Exception:
    from lambdasplit.errors import WireError

    return WireError(f"the dealer sent a {what} correction of shape {got}, expected {expected}", code="bad_share")


class LocalFeed:
    """A ``CorrectionFeed`` to a dealer in this process (tests, benchmarks): corrections made on request."""

    def __init__(self, dealer: TrustedDealer) -> None:
        self.dealer = dealer
        self.ready: collections.deque[torch.Tensor] = collections.deque()

    def pooled(self, kind: str, n: int) -> torch.Tensor:
        return self.dealer.pooled(kind, n)

    def request(self, kind: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> None:
        self.ready.append(self.dealer.correction(kind, shape_a, shape_b))

    def receive(self) -> torch.Tensor:
        return self.ready.popleft()


def local_sources(key0: bytes, key1: bytes) -> tuple[SeededSource, CorrectedSource]:
    """Both parties' sources with the dealer in this process."""
    return SeededSource(key0), CorrectedSource(key1, LocalFeed(TrustedDealer(key0, key1)))


def seeded_sources(seed: int) -> tuple[SeededSource, CorrectedSource]:
    """``local_sources`` with keys derived from ``seed``: reproducible, for tests only."""
    return local_sources(key_from_seed(seed, "party0"), key_from_seed(seed, "party1"))
