"""XOR-shared 64-bit vectors: AND by binary Beaver triples, a Kogge-Stone adder, and the conversions between
additive and XOR shares (A2B; B2A of one bit), following CrypTen's binary shares and converters.

A binary secret ``x`` (int64, read as 64 bits) is held as ``x = s0 ^ s1``. XOR of two shared vectors, shifts
and AND with a public mask are local (each party applies them to its own share); AND of two shared vectors
takes one round and one dealer triple ``(a, b, c = a & b)``:

    open e = x ^ a, d = y ^ b          x & y = c ^ (e & b) ^ (a & d) ^ (e & d)   (party 0 alone adds e & d)

``a`` and ``b`` are uniform 64-bit words, so ``e`` and ``d`` are too, whatever ``x`` and ``y``.

A2B (``a2b``): an additive share is already a XOR sharing of itself with the other party holding 0, so
``x = x0 + x1`` is the XOR-shared sum of ``(x0, 0)`` and ``(0, x1)``, which a binary adder computes. The adder
is Kogge-Stone's parallel prefix on (generate, propagate) bits: ``g = x & y`` (one AND round), then for
``s = 1, 2, 4, ..., 32`` (6 rounds) ``g <- g ^ (p & (g << s))`` and ``p <- p & (p << s)`` (both in one round),
and the sum is ``(x ^ y) ^ (g << 1)``: every element in the same 7 rounds.

B2A of one bit (``b2a_bit``): the dealer gives a random bit ``r`` shared both ways; the parties open
``z = b ^ r`` (uniform, one round) and ``b = z + r - 2 z r`` is linear in the additive share of ``r``.

Cost per element, sent by each party to its peer / dealt to each party by the device (int64 words of 8 B):

==========  ======  =====================  ==========================================
operation   rounds  sent                   dealt
==========  ======  =====================  ==========================================
and_        1       16 B                   24 B (a, b, c)
add, a2b    7       2 + 5 * 4 + 2 words    12 triples: 288 B
                    = 192 B
b2a_bit     1       8 B                    16 B (r's XOR share, r's additive share)
==========  ======  =====================  ==========================================

A bit travels as a whole int64 word; packing 64 bits per word would cut b2a_bit's bytes 64-fold, not done.
"""

from __future__ import annotations

import torch

from lambdasplit.mpc.party import Party
from lambdasplit.mpc.ring import random_elements

WORD_BITS = 64
ADDER_LEVELS = 6  # log2(WORD_BITS): prefix spans 1, 2, 4, ..., 64 bits


def xor_share(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``x`` (int64 bit vectors) into two XOR shares: ``s0`` uniform, ``s1 = x ^ s0``."""
    s0 = random_elements(x.shape, generator)
    return s0, x ^ s0


def open_binary(party: Party, s: torch.Tensor) -> torch.Tensor:
    """Both parties learn the XOR-shared secret: one round, ``s.numel() * 8`` bytes each way."""
    return s ^ party.exchange(s)


def and_(party: Party, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """XOR share of ``x & y`` (bitwise, equal shapes) of two XOR-shared vectors. 1 round, 16 bytes per element."""
    if x.shape != y.shape:
        raise ValueError(f"and_ needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    t = party.take("and", tuple(x.shape), tuple(y.shape))
    mine = torch.cat([(x ^ t.a).flatten(), (y ^ t.b).flatten()])
    both = open_binary(party, mine)
    e, d = both[: x.numel()].view(x.shape), both[x.numel() :].view(y.shape)
    z = t.c ^ (e & t.b) ^ (t.a & d)
    return z ^ (e & d) if party.index == 0 else z


def add(party: Party, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """XOR share of ``x + y`` (mod 2^64) of XOR-shared ``x`` and ``y``: Kogge-Stone adder, 1 + 6 rounds.

    After the level with shift ``s``, bit i of ``g`` is the carry out of bits ``[i - 2s + 1, i]`` (generated
    there and propagated up to i), and bit i of ``p`` says whether that whole span propagates. ``g`` and ``p``
    are never both 1, so XOR stands for OR. After the last level (span 64) bit i of ``g`` is the carry into
    bit i + 1.
    """
    p = x ^ y
    g, span = and_(party, x, y), p
    for level in range(ADDER_LEVELS):
        shift = 1 << level
        if level < ADDER_LEVELS - 1:
            update = and_(party, torch.stack([span, span]), torch.stack([g << shift, span << shift]))
            g, span = g ^ update[0], update[1]
        else:  # the last level's span is not needed
            g = g ^ and_(party, span, g << shift)
    return p ^ (g << 1)


def a2b(party: Party, s: torch.Tensor) -> torch.Tensor:
    """XOR share of the secret whose additive share is ``s``: ``(s0, 0) + (0, s1)`` by ``add``. 7 rounds."""
    zero = torch.zeros_like(s)
    mine, theirs = (s, zero) if party.index == 0 else (zero, s)
    return add(party, mine, theirs)


def b2a_bit(party: Party, b: torch.Tensor) -> torch.Tensor:
    """Additive share of the bit ``b`` (XOR-shared in bit 0; higher bits must be 0) as the ring integer 0/1.

    ``z = b ^ r`` is opened (uniform, since ``r`` is); then ``b = z + r - 2 z r``: party 0 adds ``z``, both
    add ``(1 - 2z)`` times their share of ``r``. 1 round, 8 bytes per element.
    """
    r = party.take_bit(tuple(b.shape))
    z = open_binary(party, b ^ r.binary)
    out = (1 - 2 * z) * r.arithmetic
    return out + z if party.index == 0 else out
