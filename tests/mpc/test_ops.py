"""``SharedOps``' RMSNorm on SmolLM2's plans: by position, and ``wide`` (each row the plan its mean square fits).

Rows are shaped as SmolLM2's residual stream: ordinary ones spread over every dimension, an attention sink's mass
in one dimension (a mean square of 3e5 puts 1.3e4 there, as an ``<|endoftext|>`` token far into a prompt does).
"""

from __future__ import annotations

import math

import torch
from mpc_helpers import compute

from lambdasplit.mpc.body import NORM_TOLERANCE, norm_misses
from lambdasplit.mpc.ops import SMOLLM2_REST, SMOLLM2_SINK, SharedOps

D = 576
EPS = 1e-5
# Errors relative to a row's largest normed entry: within their plans, 2e-6 to 4e-4 here (position 0's row under
# the sink plan the most); a row outside its plan is off by 1e-2 to its own size or more (below).
BOUND = 1e-3


def rows(mean_squares: list[float], seed: int = 0) -> torch.Tensor:
    """(1, T, D) float64 rows of these mean squares: a spread row, plus one massive dimension where needed."""
    g = torch.Generator().manual_seed(seed)
    h = 1.5 * torch.randn(1, len(mean_squares), D, generator=g, dtype=torch.float64)
    for t, ms in enumerate(mean_squares):
        spread = float(h[0, t].pow(2).mean())
        if ms <= 10 * spread:
            h[0, t] *= math.sqrt(ms / spread)
        else:
            h[0, t, 7] = math.sqrt(ms * D - (h[0, t].pow(2).sum() - h[0, t, 7] ** 2))
    return h


def normed(h: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor, wide: bool) -> torch.Tensor:
    def program(party, share):  # type: ignore[no-untyped-def]
        ops = SharedOps(party, SMOLLM2_REST, SMOLLM2_SINK)
        ops.wide = wide
        return ops.rms_norm(share, weight, EPS, positions)

    out, _ = compute(program, h)
    return out


def errors(h: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> list[float]:
    """Per row: max |out - plain| / max |plain|."""
    plain = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * weight
    return ((out - plain).abs().amax(-1) / plain.abs().amax(-1))[0].tolist()


WEIGHT = 1 + 0.2 * torch.randn(D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_wide_norms_fit_every_row_whatever_its_position() -> None:
    """Ordinary rows, sinks beyond position 0 (1.5e4 as some tokens right after the first, 3e5 as an
    ``<|endoftext|>``), the sink's own 1.1e6, and an ordinary row at position 0: all within the bound."""
    mean_squares = [4.0, 1.1e6, 30.0, 900.0, 4000.0, 1.5e4, 3e5, 250.0, 260.0]
    positions = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7])
    h = rows(mean_squares)
    for t, (ms, position) in enumerate(zip(mean_squares, positions.tolist(), strict=True)):  # one row a forward
        err = errors(h[:, t : t + 1], WEIGHT, normed(h[:, t : t + 1], WEIGHT, torch.tensor([position]), True))
        assert err[0] < BOUND, (ms, position, err)
    together = errors(h, WEIGHT, normed(h, WEIGHT, positions, True))  # and all at once: each row picks its own
    assert max(together) < BOUND, together


def test_the_position_plans_miss_rows_beyond_their_range() -> None:
    """Why ``wide`` exists: at positions > 0 the plan fits mean squares up to ~2,500 (SmolLM2's text reaches
    987); a 4,000 comes out with its sign flipped (rsqrt's Newton steps reach the negative root), a 3e5 blows up;
    the sink's plan at position 0 misses an ordinary row. The rows inside their plans are within the bound."""
    mean_squares = [1e6, 4.0, 30.0, 900.0, 4000.0, 3e5]
    positions = torch.tensor([0, 0, 1, 2, 3, 4])
    h = rows(mean_squares)
    err = [
        errors(h[:, t : t + 1], WEIGHT, normed(h[:, t : t + 1], WEIGHT, positions[t : t + 1], False))[0]
        for t in range(len(mean_squares))
    ]
    assert err[0] < BOUND and max(err[2:4]) < BOUND, err
    assert err[1] > 0.01  # position 0's plan on an ordinary row
    assert 1.5 < err[4] < 2.5  # -1/sqrt(ms): every entry negated
    assert err[5] > 100 or not math.isfinite(err[5])


def checks(h: torch.Tensor, positions: torch.Tensor, wide: bool) -> torch.Tensor:
    """The norm's checks (T, 3) the device reconstructs: mean square, rsqrt, scale exponent per row."""

    def program(party, share):  # type: ignore[no-untyped-def]
        ops = SharedOps(party, SMOLLM2_REST, SMOLLM2_SINK)
        ops.wide = wide
        ops.rms_norm(share, WEIGHT, EPS, positions)
        return ops.norms[0]

    out, _ = compute(program, h)
    return out[0]


def test_the_norms_checks_show_every_row_a_plan_missed() -> None:
    """Each norm keeps, as shares for the device, every row's mean square, rsqrt and scale exponent: within its
    plan ``rsqrt * sqrt(ms / 2^s)`` is 1 to 3e-3; the 4,000 the rest's plan negates (an output of ordinary size,
    which the device could not tell from a right one), the 3e5 it blows up and the ordinary row under the sink's
    plan are all off by more than ``NORM_TOLERANCE``. Wide, every row fits, with the plan it took (rest below 256)."""
    mean_squares = [1e6, 4.0, 30.0, 900.0, 4000.0, 3e5]
    positions = torch.tensor([0, 0, 1, 2, 3, 4])
    h = rows(mean_squares)
    narrow = torch.cat([checks(h[:, t : t + 1], positions[t : t + 1], False) for t in range(len(mean_squares))])
    misses = norm_misses(narrow).tolist()
    assert max(misses[0], misses[2], misses[3]) < 3e-3, misses
    assert min(misses[1], misses[4], misses[5]) > NORM_TOLERANCE, misses
    assert 1.9 < misses[4] < 2.1  # negated: rsqrt * sqrt(ms / 16) = -1
    assert narrow[:, 2].tolist() == [14, 14, 4, 4, 4, 4]
    expected = h.pow(2).mean(-1)[0] + EPS
    assert ((narrow[[0, 2, 3], 0] - expected[[0, 2, 3]]).abs() / expected[[0, 2, 3]]).max() < 1e-3
    wide = checks(h, positions, True)
    assert norm_misses(wide).max() < 3e-3, norm_misses(wide)
    assert wide[:, 2].tolist() == [14, 4, 4, 14, 14, 14]
