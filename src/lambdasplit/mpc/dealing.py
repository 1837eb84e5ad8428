"""Correlated randomness: the device deals Beaver triples and shared bits, seeded, sending only corrections.

CrypTen's trusted third party, with the device in its place (the party the user trusts; it never sees a share
of a secret computed on the servers). The device draws a fresh 128-bit key per party and per session and sends
each server its own key once, at the start of the session. From then on:

- party 0 draws everything it needs from its key's stream: ``a0``, ``b0`` and ``c0`` of each triple, its
  shares of each random bit. It never hears from the dealer again.
- party 1 draws ``a1`` and ``b1`` from its key's stream; ``c1`` cannot be drawn, since ``c = a * b`` must hold:
  it asks the device, which replays both streams in the same order, computes ``c = (a0 + a1) * (b0 + b1)``
  and sends ``c1 = c - c0`` (a *correction*). Same for random bits: party 1 asks for its additive share.

So the device sends one tensor per triple to one server (a third of dealing every share outright), and party 1
can send its request before its exchange with the peer and read the correction after it: the device's round
trip overlaps the peers' (``CorrectionFeed``). ``c0`` is uniform and independent of everything party 1 sees,
so ``c1`` is too: the corrections tell party 1 nothing about ``a`` or ``b``.

The streams are AES-128 in counter mode (the ``cryptography`` package, OpenSSL's AES), read as int64 words: a
standard cipher used as a pseudorandom generator, as CrypTen uses a seeded generator. torch's own generators
(Mersenne Twister) are not used for anything a party sees: their state is recoverable from their output.
"""

from __future__ import annotations

import collections
import hashlib
import math
import secrets
from collections.abc import Callable
from typing import Protocol

import torch

from lambdasplit.mpc.party import SharedBit, Triple
from lambdasplit.mpc.ring import KEY_BYTES, Prg

KINDS = ("mul", "matmul", "and")


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


class TrustedDealer:
    """The device's side: both parties' streams, replayed in the order the parties consume them.

    ``correction(kind, shape_a, shape_b)`` is party 1's ``c1`` for the next triple; ``bit_correction(shape)``
    party 1's additive share of the next random bits. Each call advances both streams exactly as the two
    parties' own calls do, so the device must see party 1's requests in order (it does: one connection).
    """

    def __init__(self, key0: bytes, key1: bytes) -> None:
        self.streams = (Prg(key0), Prg(key1))

    def correction(self, kind: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> torch.Tensor:
        shape_c = product_shape(kind, shape_a, shape_b)
        p0, p1 = self.streams
        a0, b0, c0 = p0.elements(shape_a), p0.elements(shape_b), p0.elements(shape_c)
        a1, b1 = p1.elements(shape_a), p1.elements(shape_b)
        if kind == "and":
            return _combine(kind, a0 ^ a1, b0 ^ b1) ^ c0
        return _combine(kind, a0 + a1, b0 + b1) - c0

    def bit_correction(self, shape: tuple[int, ...]) -> torch.Tensor:
        p0, p1 = self.streams
        r0, arithmetic0 = p0.elements(shape) & 1, p0.elements(shape)
        r1 = p1.elements(shape) & 1
        return (r0 ^ r1) - arithmetic0


class SeededSource:
    """Party 0's ``TripleSource``: every item drawn from its own stream, nothing received."""

    def __init__(self, key: bytes) -> None:
        self.stream = Prg(key)

    def take(self, kind: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> Triple:
        shape_c = product_shape(kind, shape_a, shape_b)
        s = self.stream
        return Triple(s.elements(shape_a), s.elements(shape_b), s.elements(shape_c))

    def bit(self, shape: tuple[int, ...]) -> SharedBit:
        binary = self.stream.elements(shape) & 1
        return SharedBit(binary, self.stream.elements(shape))


class CorrectionFeed(Protocol):
    """Party 1's line to the dealer: ``request`` (does not wait) the next correction, ``receive`` (waits) the
    oldest requested one. ``("bit", shape, ())`` asks for random bits."""

    def request(self, kind: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> None: ...

    def receive(self) -> torch.Tensor: ...


class CorrectedSource:
    """Party 1's ``TripleSource``: ``a1``, ``b1`` (and its XOR bits) from its stream, the rest from the dealer.

    The correction is requested when the item is taken and read when ``c`` is first used, after the opening
    with the peer: the two round trips overlap.
    """

    def __init__(self, key: bytes, feed: CorrectionFeed) -> None:
        self.stream, self.feed = Prg(key), feed

    def take(self, kind: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> Triple:
        shape_c = product_shape(kind, shape_a, shape_b)
        self.feed.request(kind, tuple(shape_a), tuple(shape_b))
        a, b = self.stream.elements(shape_a), self.stream.elements(shape_b)
        return Triple(a, b, _Pending(self.feed.receive, shape_c), dealt=8 * math.prod(shape_c))

    def bit(self, shape: tuple[int, ...]) -> SharedBit:
        self.feed.request("bit", tuple(shape), ())
        binary = self.stream.elements(shape) & 1
        arithmetic = self.feed.receive()
        if tuple(arithmetic.shape) != tuple(shape):
            raise _mismatch("bit", tuple(shape), tuple(arithmetic.shape))
        return SharedBit(binary, arithmetic, dealt=8 * math.prod(shape))


class _Pending:
    """A correction not read yet: ``Triple.c`` resolves it on first use."""

    def __init__(self, receive: Callable[[], torch.Tensor], shape: tuple[int, ...]) -> None:
        self.receive, self.shape = receive, shape

    def resolve(self) -> torch.Tensor:
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

    def request(self, kind: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> None:
        self.ready.append(serve_request(self.dealer, kind, shape_a, shape_b))

    def receive(self) -> torch.Tensor:
        return self.ready.popleft()


def serve_request(dealer: TrustedDealer, kind: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> torch.Tensor:
    """The dealer's answer to one request of party 1 (``kind`` "bit" for random bits)."""
    if kind == "bit":
        return dealer.bit_correction(shape_a)
    return dealer.correction(kind, shape_a, shape_b)


def local_sources(key0: bytes, key1: bytes) -> tuple[SeededSource, CorrectedSource]:
    """Both parties' sources with the dealer in this process."""
    return SeededSource(key0), CorrectedSource(key1, LocalFeed(TrustedDealer(key0, key1)))


def seeded_sources(seed: int) -> tuple[SeededSource, CorrectedSource]:
    """``local_sources`` with keys derived from ``seed``: reproducible, for tests only."""
    return local_sources(key_from_seed(seed, "party0"), key_from_seed(seed, "party1"))
