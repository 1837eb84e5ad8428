"""Additive secret shares over Z / 2^64 and the operations each party does alone.

A secret ``x`` (int64, already fixed-point encoded by ``Ring.encode``) is held as ``x = s0 + s1 (mod 2^64)``:
``s0`` uniformly random, ``s1 = x - s0``. Each share alone is uniform over the ring whatever ``x`` is, so a
party holding one learns nothing about ``x``. Shares are plain int64 tensors of the secret's shape; the
functions here take a ``Party`` and that party's share and return that party's share of the result.

Local (no round, no byte): addition of two shared tensors (``+``), public constants (``add_public``), products
by public values (``mul_public``) and public-weight linear layers (``linear``) followed by ``truncate``.
"""

from __future__ import annotations

import torch

from lambdasplit.mpc.party import Party
from lambdasplit.mpc.ring import Prg, random_elements


def share(x: torch.Tensor, randomness: Prg | torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Split encoded ``x`` (int64, any shape) into two shares of its shape; ``s0`` is drawn from ``randomness``:
    a ``Prg`` for anything a server sees, a seeded torch generator in tests."""
    s0 = randomness.elements(x.shape) if isinstance(randomness, Prg) else random_elements(x.shape, randomness)
    return s0, x - s0


def reconstruct(s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
    """The secret from both shares (int64, wrap-around sum)."""
    return s0 + s1


def open_shared(party: Party, s: torch.Tensor) -> torch.Tensor:
    """Both parties learn the secret (int64): one round, ``s.numel() * 8`` bytes each way."""
    return s + party.exchange(s)


def public(c: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor | int:
    """A public operand on the share's device (CUDA, or meta in the dealer's dry run); ints stay ints."""
    return c.to(like.device) if isinstance(c, torch.Tensor) and c.device != like.device else c


def add_public(party: Party, s: torch.Tensor, c: torch.Tensor | int) -> torch.Tensor:
    """Share of ``x + c`` for an encoded public ``c`` (broadcastable): only party 0 adds it."""
    c = public(c, s)
    return s + c if party.index == 0 else s + torch.zeros_like(torch.as_tensor(c, device=s.device))


def truncate(party: Party, s: torch.Tensor, bits: int | torch.Tensor) -> torch.Tensor:
    """Share of ``x / 2^bits`` by each party dividing its own share (SecureML's 2-party truncation, as CrypTen).

    Party 0 takes ``floor(s0 / 2^bits)``, party 1 ``-floor(-s1 / 2^bits)``; the result is off by at most one
    unit in the last place, except when ``s0 + s1`` wrapped around 2^64, which happens with probability about
    ``|x| / 2^64`` (x as a ring integer): then it is off by 2^(64 - bits), a catastrophic error. At
    ``frac_bits`` f = 16 a product of reals of magnitude m carries ``m * 2^32``, so the failure probability is
    ``m * 2^-32`` per element: 2^-24 for m = 256, 2^-12 for m = 2^20. Keep operands small before multiplying
    (``functions.rsqrt`` pre-scales; the measured magnitudes are in docs/secret-sharing.md). No round.
    ``bits`` may be a public int64 tensor broadcastable to ``s`` (a shift per row: ``functions.mean_square``).
    """
    if isinstance(bits, int) and bits == 0:
        return s
    bits = public(bits, s)
    return s >> bits if party.index == 0 else -((-s) >> bits)


def mul_public(party: Party, s: torch.Tensor, c: torch.Tensor | float) -> torch.Tensor:
    """Share of ``x * c`` for a real public ``c`` (broadcastable): encode, multiply, truncate. No round."""
    return truncate(party, s * public(party.ring.encode(c), s), party.ring.frac_bits)


def linear(party: Party, s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Share of ``x @ weight.T + bias`` for public ``weight`` (out, in) and ``bias`` (out,); ``s`` is (..., in).

    What nn.Linear computes, on a share: the weight is public, so each party multiplies its own share
    (int64 matmul, wrap-around) and truncates; the bias enters once, through party 0. No round.
    """
    out = truncate(party, public_matmul(s, party.ring.encode(weight).T), party.ring.frac_bits)
    return out if bias is None else add_public(party, out, party.ring.encode(bias))


_LIMB = 21  # bits per limb of ``public_matmul``: three limbs (21, 21, 22 signed) cover int64


def limb_weight(w: torch.Tensor) -> torch.Tensor | None:
    """An encoded public ``w`` (K, N) in float64 for ``limb_matmul``, or None where its entries are too large for
    the limbs' products to stay exact (see ``public_matmul``)."""
    if w.is_meta or w.numel() == 0 or w.shape[0] * int(w.abs().max().item()) > 2 ** (53 - _LIMB):
        return None
    return w.to(torch.float64)


def limb_matmul(s: torch.Tensor, wf: torch.Tensor) -> torch.Tensor:
    """``s @ w`` modulo 2^64 for a share ``s`` (..., K) and ``wf = limb_weight(w)``: three float64 products."""
    wf = wf.to(s.device)
    mask = (1 << _LIMB) - 1
    limbs = (s & mask, (s >> _LIMB) & mask, s >> (2 * _LIMB))
    out = [(limb.to(torch.float64) @ wf).to(torch.int64) for limb in limbs]
    return out[0] + out[1] * (1 << _LIMB) + out[2] * (1 << (2 * _LIMB))


def public_matmul(s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``s @ w`` modulo 2^64 for a share ``s`` (..., K) and a small encoded public ``w`` (K, N), both int64.

    torch's int64 matmul runs no BLAS (about 40x slower than float64 at a prefill's size), so ``s`` is cut into
    three limbs ``s = l0 + l1 2^21 + l2 2^42`` (l0, l1 in [0, 2^21), l2 signed in [-2^21, 2^21)) and each
    ``li @ w`` runs in float64, where it is exact while ``K * max|w| * 2^21 <= 2^53``: encoded weights below
    2^32 / K (|w| < 42 for K = 1536 at f = 16). The limbs recombine with int64 wrap-around, so the result is
    bit for bit the int64 matmul's; larger weights take the int64 path. A caller that multiplies by the same ``w``
    again and again keeps ``limb_weight(w)`` and calls ``limb_matmul`` (this pays a pass over ``w`` and a copy).
    """
    w = w.to(s.device)
    wf = None if s.is_meta else limb_weight(w)
    return s @ w if wf is None else limb_matmul(s, wf)
