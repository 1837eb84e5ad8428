"""Products of two shared tensors with Beaver triples.

Beaver's protocol (as in CrypTen's arithmetic shares): to multiply shared ``x`` and ``y``, the parties take
shares of a triple ``(a, b, c = a * b)`` from the dealer, open ``eps = x - a`` and ``delta = y - b`` (one round:
both in one message), and each computes its share of

    x * y = c + eps * b + a * delta + eps * delta      (party 0 alone adds eps * delta)

``a`` and ``b`` are uniform and unknown to either party, so the opened ``eps`` and ``delta`` are uniform too and
tell a party nothing about ``x`` or ``y``. ``@`` in place of ``*`` gives matrix products (batched, as
torch.matmul). The result carries 2f fractional bits; ``shares.truncate`` brings it back to f.

Cost per product: 1 round; each party sends ``x.numel() + y.numel()`` int64 (8 bytes each) and receives as
many; the dealer sends party 1 its share of ``c`` (party 0 draws all of its shares from its stream).

Binary triples (``and``): the same protocol with XOR for + and AND for * on XOR-shared 64-bit vectors
(``binary.and_``); random bits shared both ways turn one XOR-shared bit into an additive share
(``binary.b2a_bit``).

The dealer is the device (the user's own machine, trusted by the user, not a server): ``dealing`` holds how it
hands the triples out (seeded streams, and corrections for party 1 only).
"""

from __future__ import annotations

import torch

from lambdasplit.mpc.party import Party
from lambdasplit.mpc.shares import truncate


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
