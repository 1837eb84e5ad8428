"""Products of two shared tensors with Beaver triples, and the dealer that makes the triples.

Beaver's protocol (as in CrypTen's arithmetic shares): to multiply shared ``x`` and ``y``, the parties take
shares of a triple ``(a, b, c = a * b)`` from the dealer, open ``eps = x - a`` and ``delta = y - b`` (one round:
both in one message), and each computes its share of

    x * y = c + eps * b + a * delta + eps * delta      (party 0 alone adds eps * delta)

``a`` and ``b`` are uniform and unknown to either party, so the opened ``eps`` and ``delta`` are uniform too and
tell a party nothing about ``x`` or ``y``. ``@`` in place of ``*`` gives matrix products (batched, as
torch.matmul). The result carries 2f fractional bits; ``shares.truncate`` brings it back to f.

Cost per product: 1 round; each party sends ``x.numel() + y.numel()`` int64 (8 bytes each) and receives as
many; the dealer sends each party shares of ``a``, ``b`` and ``c``.

Binary triples (``and``): the same protocol with XOR for + and AND for * on XOR-shared 64-bit vectors
(``binary.and_``); ``bit`` deals random bits shared both ways, for turning one XOR-shared bit into an
additive share (``binary.b2a_bit``).

The dealer is the device (the user's own machine, trusted by the user, not a server). It draws the triples from
its generator and would stream them ahead of the computation. Here each party gets all three shares; a seeded
PRG shared with one party would cut the dealer's traffic to ``c``'s share for the other (CrypTen's TTP does
that), not done yet.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from lambdasplit.mpc.party import Party, SharedBit, Triple
from lambdasplit.mpc.ring import random_elements
from lambdasplit.mpc.shares import share, truncate

KINDS = ("mul", "matmul", "and")


def xor_share(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``x`` (int64 bit vectors) into two XOR shares: ``s0`` uniform, ``s1 = x ^ s0``."""
    s0 = random_elements(x.shape, generator)
    return s0, x ^ s0


class Dealer:
    """Makes correlated randomness: triples ``mul`` (elementwise, a and b of one shape), ``matmul``
    (``c = a @ b``, broadcasting), ``and`` (``c = a & b`` on 64-bit vectors, XOR-shared: binary Beaver triples),
    and random bits shared both ways (``bit``).

    Knows no secret: its methods take shapes only, draw uniform values and share them. ``generator`` should be
    seeded from the OS's entropy outside tests.
    """

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def triple(self, kind: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> tuple[Triple, Triple]:
        """Both parties' shares of one fresh triple: (party 0's, party 1's)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        a = random_elements(shape_a, self.generator)
        b = random_elements(shape_b, self.generator)
        if kind == "and":
            (a0, a1), (b0, b1), (c0, c1) = (xor_share(t, self.generator) for t in (a, b, a & b))
        else:
            c = a * b if kind == "mul" else a @ b
            (a0, a1), (b0, b1), (c0, c1) = (share(t, self.generator) for t in (a, b, c))
        return Triple(a0, b0, c0), Triple(a1, b1, c1)

    def bit(self, shape: tuple[int, ...]) -> tuple[SharedBit, SharedBit]:
        """Both parties' shares of fresh uniform bits ``r``: XOR shares in bit 0 and additive shares of 0/1."""
        r = random_elements(shape, self.generator) & 1
        r0 = random_elements(shape, self.generator) & 1
        a0, a1 = share(r, self.generator)
        return SharedBit(r0, a0), SharedBit(r ^ r0, a1)


class InProcessDealer:
    """A dealer shared by two parties in one process: the n-th request of each party gets the n-th item.

    ``feed(i)`` is party i's ``TripleSource``. Both parties must ask for the same kinds and shapes in the same
    order (they run the same program); a mismatch is an internal error and fails loudly.
    """

    def __init__(self, dealer: Dealer) -> None:
        self.dealer = dealer
        self.lock = threading.Lock()
        self.pending: dict[int, tuple[tuple[object, ...], list[Triple | SharedBit | None]]] = {}
        self.taken = [0, 0]

    def feed(self, index: int) -> _Feed:
        return _Feed(self, index)

    def _take(
        self,
        index: int,
        key: tuple[object, ...],
        make: Callable[[], tuple[Triple, Triple] | tuple[SharedBit, SharedBit]],
    ) -> Triple | SharedBit:
        with self.lock:
            n = self.taken[index]
            self.taken[index] += 1
            if n not in self.pending:
                self.pending[n] = (key, list(make()))
            made, halves = self.pending[n]
            if made != key:
                raise RuntimeError(f"dealt item {n}: party {index} asked for {key}, the peer for {made}")
            mine = halves[index]
            halves[index] = None
            if halves == [None, None]:
                del self.pending[n]
        assert mine is not None
        return mine


class _Feed:
    def __init__(self, owner: InProcessDealer, index: int) -> None:
        self.owner, self.index = owner, index

    def take(self, kind: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> Triple:
        key = (kind, tuple(shape_a), tuple(shape_b))
        item = self.owner._take(self.index, key, lambda: self.owner.dealer.triple(kind, shape_a, shape_b))
        assert isinstance(item, Triple)
        return item

    def bit(self, shape: tuple[int, ...]) -> SharedBit:
        item = self.owner._take(self.index, ("bit", tuple(shape)), lambda: self.owner.dealer.bit(shape))
        assert isinstance(item, SharedBit)
        return item


def untruncated(party: Party, kind: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The untruncated share of ``x * y`` or ``x @ y`` (2f fractional bits). One round."""
    t = party.take(kind, tuple(x.shape), tuple(y.shape))
    mine = torch.cat([(x - t.a).flatten(), (y - t.b).flatten()])
    both = mine + party.exchange(mine)
    eps, delta = both[: x.numel()].view(x.shape), both[x.numel() :].view(y.shape)
    op = torch.mul if kind == "mul" else torch.matmul
    z = t.c + op(eps, t.b) + op(t.a, delta)
    return z + op(eps, delta) if party.index == 0 else z


def mul(party: Party, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Share of ``x * y`` (elementwise, same shapes) of two shared tensors. 1 round, 16 bytes per element sent."""
    if x.shape != y.shape:
        raise ValueError(f"mul needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    return truncate(party, untruncated(party, "mul", x, y), party.ring.frac_bits)


def matmul(party: Party, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Share of ``x @ y`` of two shared tensors, (..., n, k) @ (..., k, m) -> (..., n, m) as torch.matmul.

    Attention's ``q @ k^T`` and ``probs @ v``. 1 round; sends ``(x.numel() + y.numel()) * 8`` bytes.
    """
    return truncate(party, untruncated(party, "matmul", x, y), party.ring.frac_bits)


def square(party: Party, x: torch.Tensor) -> torch.Tensor:
    """Share of ``x * x``. 1 round (a Beaver product of x with itself; a square pair would halve the bytes)."""
    return mul(party, x, x)
