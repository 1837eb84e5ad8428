"""Comparisons on additive shares and what they select: sign, less-than, select, ReLU, row maximum (and argmax).

Following CrypTen (Knott et al., NeurIPS 2021; ``ltz`` and ``max`` in its ``mpc.py``): the sign of a shared
``x`` is the top bit of ``x0 + x1``, which a binary adder on XOR shares computes (``binary.a2b``, 7 rounds);
that one bit goes back to an additive share through a dealer's random bit (``binary.b2a_bit``, 1 round).

Bits: comparisons return additive shares of the ring *integers* 0 and 1, not fixed-point values. A product of
such a bit with a fixed-point share needs no truncation, so ``select`` is exact (no rounding, no truncation
failure, whatever the magnitudes): the maximum of a row equals one of its encoded entries bit for bit.
``to_fixed`` turns a bit into the fixed-point 0.0/1.0 when a caller wants it as a value.

The sign is exact for every ring element (the sum is computed mod 2^64 exactly), so ``ltz`` holds over the
whole encodable range ``|x| < 2^(63 - f)``; ``lt(x, y)`` needs ``x - y`` in that range.

==========  ========================================  =======================  ========================
function    method                                     rounds                   sent per element
==========  ========================================  =======================  ========================
ltz         top bit of a2b(x), b2a_bit                 7 + 1 = 8                192 + 8 = 200 B
lt, gt, ge  ltz of a difference (ge = 1 - lt)          8                        200 B
select      b + c * (a - b), untruncated Beaver        1                        16 B
relu        x - ltz(x) * x                             9                        216 B
maximum     pairwise tournament, ceil(log2 n) levels,  9 * ceil(log2 n)         216 B per comparison,
            each level all pairs at once                                        n - 1 comparisons
maximum,    groups of 4: all 6 pairs compared at       10 * ceil(log4 n)        about 2 n comparisons
arity 4     once, the winner's bit by two products                              (6 per group of 4)
argmax      the same tournament on a row padded to a   9 * ceil(log2 n)         + 16 B per padded element
            power of two, one-hots selected alongside                           per level
==========  ========================================  =======================  ========================

Dealt per comparison: 12 binary triples (288 B) and a random bit (16 B); per select one triple (24 B).
"""

from __future__ import annotations

import torch

from lambdasplit.mpc.beaver import untruncated
from lambdasplit.mpc.binary import WORD_BITS, a2b, b2a_bit
from lambdasplit.mpc.party import Party
from lambdasplit.mpc.shares import add_public


def ltz(party: Party, x: torch.Tensor) -> torch.Tensor:
    """Bit share of ``x < 0`` for every element of the shared ``x`` (any shape). 8 rounds, 200 B per element."""
    sign = (a2b(party, x) >> (WORD_BITS - 1)) & 1
    return b2a_bit(party, sign)


def lt(party: Party, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bit share of ``x < y`` (elementwise, equal shapes). 8 rounds."""
    return ltz(party, x - y)


def gt(party: Party, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bit share of ``x > y``. 8 rounds."""
    return ltz(party, y - x)


def ge(party: Party, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bit share of ``x >= y`` as ``1 - (x < y)``. 8 rounds."""
    return add_public(party, -lt(party, x, y), 1)


def to_fixed(party: Party, bit: torch.Tensor) -> torch.Tensor:
    """The fixed-point 0.0 / 1.0 share of a bit share (exact, local)."""
    return bit * party.ring.scale


def select(party: Party, cond: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Share of ``a`` where the bit ``cond`` is 1, ``b`` where it is 0: ``b + cond * (a - b)``. 1 round, exact.

    ``cond`` is a bit share (``ltz``, ``lt``, ...) broadcastable to ``a``'s shape; ``a`` and ``b`` are shares
    of any encoding (the product of an integer bit does not change the scale).
    """
    cond = cond.expand_as(a).contiguous()
    return b + untruncated(party, "mul", cond, a - b)


def relu(party: Party, x: torch.Tensor) -> torch.Tensor:
    """Share of ``max(x, 0)`` as ``x - (x < 0) * x``. 9 rounds, exact."""
    return x - untruncated(party, "mul", ltz(party, x), x)


def maximum(party: Party, x: torch.Tensor, dim: int = -1, keepdim: bool = False, arity: int = 2) -> torch.Tensor:
    """Share of the maximum of ``x`` along ``dim``, exact (it is one of the entries bit for bit).

    ``arity=2``: a tournament: neighbours ``(0, 1), (2, 3), ...`` are compared and the larger kept, an odd one
    out passes to the next level untouched; every pair of every row goes through one ``ge`` and one ``select``
    at once, so a row of n costs ``ceil(log2 n)`` levels of 9 rounds, and n - 1 comparisons in all.
    ``arity=4``: groups of 4 per level (``_maximum_of_fours``): ``ceil(log4 n)`` levels of 10 rounds (30 for
    n = 64 against 54) for about twice the comparisons; worth it where rounds cost more than bytes (few rows:
    a decode step's, between servers apart).
    """
    if arity == 4:
        values = x.movedim(dim, -1)
        while values.shape[-1] > 1:
            values = _maximum_of_fours(party, values)
        return values.movedim(-1, dim) if keepdim else values.squeeze(-1)
    if arity != 2:
        raise ValueError(f"maximum's tournament takes pairs or fours, not {arity}")
    values = x.movedim(dim, -1)
    while values.shape[-1] > 1:
        pairs = values.shape[-1] // 2
        a, b = values[..., 0 : 2 * pairs : 2], values[..., 1 : 2 * pairs : 2]
        values = torch.cat([select(party, ge(party, a, b), a, b), values[..., 2 * pairs :]], -1)
    return values.movedim(-1, dim) if keepdim else values.squeeze(-1)


#: The 6 pairs (i < j) of a group of 4, and for each candidate the pairs it must win: (pair, True) where it is
#: the first of the pair (x_i >= x_j), (pair, False) where it is the second (x_j > x_i: not x_i >= x_j). Ties go
#: to the lowest index, so exactly one candidate wins.
_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
_WINS = tuple(tuple((k, pair[0] == c) for k, pair in enumerate(_PAIRS) if c in pair) for c in range(4))


def _maximum_of_fours(party: Party, values: torch.Tensor) -> torch.Tensor:
    """One level of the 4-ary tournament: (..., n) -> (..., ceil(n / 4)), each the maximum of its group of 4
    (a short last group padded with copies of the row's first entry, which never change a maximum).

    Round 1-8: ``ge`` of all 6 pairs of every group at once. Each candidate wins its 3 pairs (a bit each, its
    own or its complement); the winner's indicator is their product: round 9 takes the product of the first
    two bits and, alongside, the third bit times the candidate's value; round 10 multiplies those and sums
    over the group. Bits are integer shares, so every product is exact (untruncated)."""
    n = values.shape[-1]
    groups = -(-n // 4)
    if groups * 4 != n:
        pad = values[..., :1].expand(*values.shape[:-1], groups * 4 - n)
        values = torch.cat([values, pad], -1)
    four = values.unflatten(-1, (groups, 4))  # (..., g, 4)
    a = torch.stack([four[..., i] for i, _ in _PAIRS], -1)
    b = torch.stack([four[..., j] for _, j in _PAIRS], -1)
    wins = ge(party, a, b)  # (..., g, 6): x_i >= x_j

    def bit(c: int, k: int) -> torch.Tensor:
        pair, first = _WINS[c][k]
        won = wins[..., pair]
        return won if first else add_public(party, -won, 1)

    firsts = torch.stack([bit(c, 0) for c in range(4)], -1)
    seconds = torch.stack([bit(c, 1) for c in range(4)], -1)
    thirds = torch.stack([bit(c, 2) for c in range(4)], -1)
    both = untruncated(
        party, "mul", torch.cat([firsts.flatten(), thirds.flatten()]), torch.cat([seconds.flatten(), four.flatten()])
    )
    m = firsts.numel()
    won, valued = both[:m].view(firsts.shape), both[m:].view(four.shape)
    return untruncated(party, "mul", won.contiguous(), valued.contiguous()).sum(-1)


def argmax(party: Party, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shares of the maximum over the last dimension, (..., n) -> (..., 1), and of a one-hot (bit shares,
    (..., n)) that marks its first occurrence, as ``torch.argmax`` picks.

    The row is padded to a power of two with copies of its first entry (ties go to the left, so a copy never
    wins); at the level with blocks of size ``w`` each surviving candidate carries the one-hot of its block,
    and the select that keeps the larger value also keeps its block's one-hot (``[k * oh_a, oh_b - k * oh_b]``)
    in the same round: ``ceil(log2 n)`` levels of 9 rounds, as ``maximum``.
    """
    n = x.shape[-1]
    width = 1 << (n - 1).bit_length()
    values = torch.cat([x, x[..., :1].expand(*x.shape[:-1], width - n)], -1)
    # (..., candidates, block): every entry is the one-hot of its block of one, public (party 0 holds it)
    onehot = torch.full((*x.shape[:-1], width, 1), 1 if party.index == 0 else 0, dtype=torch.int64)
    while values.shape[-1] > 1:
        a, b = values[..., 0::2], values[..., 1::2]  # (..., c)
        blocks = onehot.unflatten(-2, (-1, 2))  # (..., c, 2, block)
        oh_a, oh_b = blocks[..., 0, :], blocks[..., 1, :]
        keep = ge(party, a, b)
        k = keep.unsqueeze(-1).expand_as(oh_a)
        both = untruncated(
            party,
            "mul",
            torch.cat([keep.flatten(), k.flatten(), k.flatten()]),
            torch.cat([(a - b).flatten(), oh_a.flatten(), oh_b.flatten()]),
        )
        m, s = keep.numel(), oh_a.numel()
        values = b + both[:m].view(keep.shape)
        onehot = torch.cat([both[m : m + s].view(oh_a.shape), oh_b - both[m + s :].view(oh_b.shape)], -1)
    return values, onehot.squeeze(-2)[..., :n]
