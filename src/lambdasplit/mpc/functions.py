"""Non-linear functions on shares, by CrypTen's approximations (Knott et al., NeurIPS 2021), from products only.

Every function takes a ``Party`` and its share (int64, any shape) and returns its share of the result; the
rounds are Beaver products (``beaver.mul``, 1 round each). Parameters come from the ranges SmolLM2-135M's
body takes at 2:28 (benchmarks/mpc_ranges.py; docs/secret-sharing.md has the figures):

==============  ==========================================  ========================================  ======
function        method                                      valid input range, default parameters      rounds
==============  ==========================================  ========================================  ======
exp             (1 + x / 2^n)^(2^n), n = 8 squarings        [-128, 4]; softmax's x - max is [-67, 0]  8
reciprocal      Newton y <- y (2 - x y), y0 = 3 e^(1/2-x)   [0.5, 500] / scale; rowsum is [1, 58]     8 + 2k
                + 0.003 (CrypTen's), k = 10
reciprocal of   Newton from (2/3) 2^-k, k = the octave of x  [1, 2^n]: a softmax row's sum is in      8 + 2k
a sum           ([x >= 2^i], n comparisons at once), k = 4   [1, T], n = ceil(log2 T)
rsqrt           Newton y <- y (3 - x y^2) / 2, y0 =         [0.2, 125] * scale at k = 3; mean square  8 + 3k
                2.2 e^(-x/2 - 0.2) + 0.2 - x/1024, k = 3    is [3.6, 987] at positions > 0: scale 8;
                                                            [53, 1.1e6] at position 0: scale 2^13, k 8
mean_square     sum of untruncated products, one truncation per row, after a public pre-shift        1
softmax         e^(x - max) * reciprocal of the sum; the      x - max in [-128, 0]: scores span         M +
                row's maximum by ``compare.maximum``        [-58.6, 28.4], x - max [-67, 0];          8+16+1
                (exact)                                     M = 10 ceil(log4 T) for up to 128 rows,
                                                            9 ceil(log2 T) beyond
sigmoid, silu   CrypTen's sign folding: c = x < 0,          |x| <= 256 (the gate spans [-31, 50])      24
                s = 1 / (1 + e^-|x|) (reciprocal of [1, 2]:
                chord + 3 Newton steps), silu = |x| s + c x
==============  ==========================================  ========================================  ======

The maximum in softmax: measured on SmolLM2, no free shift works (the sink's score s0 leaves max - s0 in
[0, 29.8], and its spread within one (layer, head) is 5 to 30), so ``softmax`` computes the row's maximum
itself unless given a shift (a shared (..., 1) tensor or a public float). Comparisons (``compare``) cost 8
rounds each; the maximum's tournament 9 per level. SiLU no longer needs |x| <= 10: the sign is compared, and
exp only ever sees -|x| <= 0.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from lambdasplit.mpc.beaver import mul, square, untruncated
from lambdasplit.mpc.compare import ltz, maximum
from lambdasplit.mpc.party import Party
from lambdasplit.mpc.shares import add_public, mul_public, public, truncate

EXP_ITERATIONS = 8
RECIPROCAL_ITERATIONS = 10
SUM_RECIPROCAL_ITERATIONS = 4  # from the octave's guess, |1 - x y0| <= 1/3: (1/3)^(2^4) = 2e-8
RSQRT_ITERATIONS = 3
SIGMOID_ITERATIONS = 3  # Newton steps for 1 / (1 + e^-|x|), a reciprocal of [1, 2]
MASKED = float(2**20)  # what softmax's masked entries become (negated): below any score, far inside the ring
#: softmax takes its maximum in groups of 4 (fewer rounds, about twice the comparisons' bytes) for at most this
#: many rows: a decode step's (9 for SmolLM2), a short draft's; a prefill's hundreds keep the pairs' bytes.
FOURS_UP_TO_ROWS = 128


def exp(party: Party, x: torch.Tensor, iterations: int = EXP_ITERATIONS) -> torch.Tensor:
    """Share of ``e^x`` by the limit ``(1 + x / 2^n)^(2^n)``: ``iterations`` = n rounds (squarings).

    Valid for x in [-2^(n-1), ~4]: below -2^n the base goes negative (and its even power positive);
    above ~4 the last squarings' products grow and the truncation's failure probability with them. The
    relative error at x is about x^2 / 2^(n+1) plus 2^n units in the last place (each squaring doubles it).
    """
    y = add_public(party, truncate(party, x, iterations), party.ring.scale)
    for _ in range(iterations):
        y = square(party, y)
    return y


def reciprocal(
    party: Party, x: torch.Tensor, iterations: int = RECIPROCAL_ITERATIONS, scale: float = 1.0
) -> torch.Tensor:
    """Share of ``1 / x`` for positive x: Newton's ``y <- y (2 - x y)`` from CrypTen's ``3 e^(1/2 - x) + 0.003``.

    ``scale`` (public) maps the input into the guess's range: 1/x = (1 / (x/scale)) / scale; the iteration
    converges for x / scale in about [0.5, 500] (faster near 1). Rounds: 8 (exp) + 2 per iteration.
    """
    if scale != 1.0:
        x = mul_public(party, x, 1.0 / scale)
    ring = party.ring
    y = add_public(
        party, mul_public(party, exp(party, add_public(party, -x, ring.encode(0.5))), 3.0), ring.encode(0.003)
    )
    for _ in range(iterations):
        xy = mul(party, x, y)
        y = mul(party, y, add_public(party, -xy, ring.encode(2.0)))
    return y if scale == 1.0 else mul_public(party, y, 1.0 / scale)


def reciprocal_of_sum(
    party: Party, x: torch.Tensor, octaves: int, iterations: int = SUM_RECIPROCAL_ITERATIONS
) -> torch.Tensor:
    """Share of ``1 / x`` for x in [1, 2^octaves] (a softmax row's sum: at least its maximum's e^0 = 1, at most
    its length): the guess ``(2/3) 2^-k`` for x in [2^k, 2^(k+1)), from the bits ``[x < 2^i]``, i = 1..octaves
    (one batched comparison: 8 rounds, whatever ``octaves``), then Newton's ``y <- y (2 - x y)``.

    The guess leaves ``x y0`` in [2/3, 4/3), so the relative error ``1 - x y`` starts within 1/3 and squares with
    each step: below f = 16's last place after 4. The bits are integer shares, so the guess ``1 - sum 2^-i +
    sum [x < 2^i] 2^-i`` (times 2/3) is local and exact. Rounds: 8 + 2 per iteration (16 against ``reciprocal``'s
    28), and the guess's product is over the sums only (n values per row), not the row.
    """
    ring = party.ring
    powers = [2.0**i for i in range(1, octaves + 1)]
    below = ltz(party, add_public(party, x.unsqueeze(-1), ring.encode(torch.tensor([-v for v in powers]))))
    steps = public(ring.encode(torch.tensor([2.0 / 3.0 / v for v in powers])), below)  # (2/3) 2^-i
    top = ring.encode(2.0 / 3.0 * (1.0 - sum(1.0 / v for v in powers)))  # (2/3) 2^-n
    y = add_public(party, (below * steps).sum(-1), top)
    for _ in range(iterations):
        y = mul(party, y, add_public(party, -mul(party, x, y), ring.encode(2.0)))
    return y


def rsqrt(
    party: Party,
    x: torch.Tensor,
    iterations: int = RSQRT_ITERATIONS,
    scale: float | torch.Tensor = 1.0,
    apply_scale: bool = True,
) -> torch.Tensor:
    """Share of ``1 / sqrt(x)`` for positive x: Newton's ``y <- y (3 - x y^2) / 2`` from CrypTen's guess
    ``2.2 e^(-x/2 - 0.2) + 0.2 - x/1024``.

    ``scale`` (public): 1/sqrt(x) = (1/sqrt(x/scale)) / sqrt(scale). Relative error (in floats) below 2.9e-3 for
    x / scale in [0.2, 125] at 3 iterations (below 1e-4 except near 1 and 9), 4e-5 in [0.005, 195] at 8. Beyond
    the top the guess is too large: rsqrt blows up, or converges to the negative root (8 iterations: x / scale
    ~205-300), or near it is a few % off, so a caller checks (``body.norms_fit``). Rounds: 8 (exp) + 3 per
    iteration.
    ``apply_scale=False`` returns ``1/sqrt(x/scale)`` and leaves the factor ``1/sqrt(scale)`` to the caller: at
    the attention sink (mean square 1e6) the result 1e-3 has only 65 units at f = 16 (1.5% relative), so
    RMSNorm should fold the factor into h (pre-shifted by ``mean_square``'s bits) instead. ``scale`` may be a
    public tensor broadcastable to x (one per row: the secret-shared body's position-0 rows take a larger one).

    Precision: ``x / scale`` enters the Newton step only through the product ``x y^2``, divided by ``scale``
    after the product (by a truncation when ``scale`` is a power of two, as RMSNorm's are), so a small
    ``x / scale`` (0.017 at f = 16: 4e-4 relative in its encoding) costs no precision; only the guess sees it.
    """
    scaled = not (isinstance(scale, float) and scale == 1.0)
    ring = party.ring
    xs = _divide(party, x, scale) if scaled else x
    guess = exp(party, add_public(party, mul_public(party, -xs, 0.5), ring.encode(-0.2)))
    y = add_public(party, mul_public(party, guess, 2.2) - mul_public(party, xs, 1 / 1024), ring.encode(0.2))
    for _ in range(iterations):
        xy2 = mul(party, x, square(party, y))
        if scaled:
            xy2 = _divide(party, xy2, scale)
        y = mul_public(party, mul(party, y, add_public(party, -xy2, ring.encode(3.0))), 0.5)
    return y if not scaled or not apply_scale else mul_public(party, y, scale**-0.5)


def _divide(party: Party, x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Share of ``x / scale`` for a public positive ``scale`` (float or tensor broadcastable to x): a truncation
    (exact to the last place) when every scale is a power of two, else a public product."""
    bits = torch.log2(torch.as_tensor(scale, dtype=torch.float64))
    if bool((bits == bits.round()).all()) and bool((bits >= 0).all()):
        return truncate(party, x, bits.round().to(torch.int64))
    return mul_public(party, x, 1.0 / scale)


def mean_square(party: Party, h: torch.Tensor, pre_shift: int | torch.Tensor = 2) -> torch.Tensor:
    """Share of ``mean(h^2)`` over the last dimension, (..., D) -> (..., 1), as RMSNorm needs. 1 round.

    The products stay untruncated (2f fractional bits) through the sum, then one truncation per row: its
    failure probability is about ``D * ms * 2^(2 (f - pre_shift)) / 2^64`` (``shares.truncate``). ``pre_shift``
    (public, bits) divides h first: SmolLM2's residual stream reaches |h| = 720 (ms 987) at positions > 0, where
    pre_shift 2 gives 2^-17 per row at worst; and 2.5e4 (ms 1.1e6) at position 0, where 12 does. A public int64
    tensor (..., 1) gives each row its own shift.
    """
    hs = truncate(party, h, pre_shift)
    total = truncate(party, untruncated(party, "mul", hs, hs).sum(-1, keepdim=True), party.ring.frac_bits)
    factor = 4.0**pre_shift if isinstance(pre_shift, int) else torch.pow(4.0, pre_shift.to(torch.float64))
    return mul_public(party, total, factor / h.shape[-1])


def softmax(
    party: Party,
    x: torch.Tensor,
    shift: torch.Tensor | float | None = None,
    exp_iterations: int = EXP_ITERATIONS,
    reciprocal_iterations: int = SUM_RECIPROCAL_ITERATIONS,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Share of ``softmax(x, -1)`` as ``e^(x - shift) / sum(e^(x - shift))``; x is (..., T).

    ``shift``: ``None`` (the default) computes the row's maximum under MPC (``compare.maximum``: exact,
    9 * ceil(log2 T) rounds); or this party's share of a (..., 1) tensor; or a public float that only party 0
    subtracts. The result is exact in the shift; precision needs ``x - shift`` within exp's range with the
    row's maximum near 0, so the sum lies in [1, T] (``reciprocal_of_sum`` over ceil(log2 T) octaves).
    Rounds: the maximum's + exp + 8 + 2 * ``reciprocal_iterations`` + 1.

    The maximum's tournament (``compare.maximum``) goes by fours for up to ``FOURS_UP_TO_ROWS`` rows, by pairs
    beyond.

    ``mask`` (public bool, broadcastable to x; True = kept) leaves entries out, as attention's causal mask: they
    are set to ``-MASKED`` before the maximum (so they never win it) and their exponentials to exactly 0
    (a share times the public integer 0) before the sum; their output is exactly 0. A row needs one kept entry.
    """
    keep = None if mask is None else mask.to(x.device).expand_as(x).to(torch.int64)
    if keep is not None:
        x = add_public(party, x * keep, (1 - keep) * party.ring.encode(-MASKED))
    if shift is None:
        rows = x.numel() // max(1, x.shape[-1])
        shift = maximum(party, x, keepdim=True, arity=4 if rows <= FOURS_UP_TO_ROWS else 2)
    shifted = add_public(party, x, party.ring.encode(-shift)) if isinstance(shift, float) else x - shift
    e = exp(party, shifted, exp_iterations)
    if keep is not None:
        e = e * keep  # masked entries' exp is garbage (far outside its range): zero it exactly
    octaves = max(1, math.ceil(math.log2(x.shape[-1])))
    inv = reciprocal_of_sum(party, e.sum(-1, keepdim=True), octaves, reciprocal_iterations)
    out = mul(party, e, inv.expand_as(e).contiguous())
    return out if keep is None else out * keep


def _reciprocal_of_one_to_two(party: Party, d: torch.Tensor, iterations: int = SIGMOID_ITERATIONS) -> torch.Tensor:
    """Share of ``1 / d`` for d in [1, 2]: Newton from the chord ``1.5 - d / 2``, whose relative error
    ``1 - d y`` is at most 1/8 and squares with each iteration: 2^-12 after 2, 2^-24 (below f = 16's last
    place) after 3. 2 rounds per iteration."""
    ring = party.ring
    y = add_public(party, mul_public(party, d, -0.5), ring.encode(1.5))
    for _ in range(iterations):
        y = mul(party, y, add_public(party, -mul(party, d, y), ring.encode(2.0)))
    return y


class _Folded(NamedTuple):
    """Shares of what the sign-folded sigmoid computes for x: the bit ``x < 0``, ``(x < 0) * x``, ``|x|`` and
    ``sigmoid(|x|)``."""

    negative: torch.Tensor
    negative_part: torch.Tensor
    magnitude: torch.Tensor
    sigmoid_of_magnitude: torch.Tensor


def _fold(party: Party, x: torch.Tensor, exp_iterations: int) -> _Folded:
    """The sign by one comparison, ``|x| = x - 2 (x < 0) x``, then ``1 / (1 + e^-|x|)``: e^-|x| lies in (0, 1],
    where exp's limit is accurate for any |x| <= 256 (no overflow, unlike e^-x), and the denominator in [1, 2],
    where a chord and 3 Newton steps suffice. Rounds: 8 (ltz) + 1 + exp + 6."""
    negative = ltz(party, x)
    negative_part = untruncated(party, "mul", negative, x)  # a bit times x: exact, no truncation
    magnitude = x - 2 * negative_part
    denominator = add_public(party, exp(party, -magnitude, exp_iterations), party.ring.scale)
    return _Folded(negative, negative_part, magnitude, _reciprocal_of_one_to_two(party, denominator))


def sigmoid(party: Party, x: torch.Tensor, exp_iterations: int = EXP_ITERATIONS) -> torch.Tensor:
    """Share of ``1 / (1 + e^-x)`` for |x| <= 256, by CrypTen's sign folding: ``s = sigmoid(|x|)``, kept where
    x >= 0, ``1 - s`` where x < 0: ``s + (x < 0) (1 - 2 s)``. Rounds: 8 + 1 + 8 + 6 + 1 = 24."""
    f = _fold(party, x, exp_iterations)
    s = f.sigmoid_of_magnitude
    flipped = add_public(party, -2 * s, party.ring.scale)
    return s + untruncated(party, "mul", f.negative, flipped)


def silu(party: Party, x: torch.Tensor, exp_iterations: int = EXP_ITERATIONS) -> torch.Tensor:
    """Share of ``x * sigmoid(x)`` (SiLU, the MLP's activation) for |x| <= 256 (the gate spans [-31, 50]).

    With ``s = sigmoid(|x|)``: ``x s`` for x >= 0 and ``x (1 - s) = |x| s + x`` for x < 0, so
    ``silu(x) = |x| s + (x < 0) x``, one product after the fold. Rounds: 8 + 1 + 8 + 6 + 1 = 24.
    """
    f = _fold(party, x, exp_iterations)
    return mul(party, f.magnitude, f.sigmoid_of_magnitude) + f.negative_part
