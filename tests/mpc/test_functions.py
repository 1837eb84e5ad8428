"""Each function against plaintext over the ranges measured on SmolLM2's body (docs/secret-sharing.md)."""

import pytest
import torch
from mpc_helpers import compute

from lambdasplit.mpc import functions as F


def grid(lo: float, hi: float, n: int = 400, log: bool = False) -> torch.Tensor:
    import math

    if log:
        return torch.logspace(math.log10(lo), math.log10(hi), n, dtype=torch.float64)
    return torch.linspace(lo, hi, n, dtype=torch.float64)


def test_exp_over_softmax_centred_scores():
    x = grid(-67, 0)  # scores minus their row's maximum: [-66.9, 0]
    out, counter = compute(F.exp, x)
    assert (out - x.exp()).abs().max().item() < 4e-3
    assert counter.rounds == F.EXP_ITERATIONS


def test_reciprocal_over_softmax_row_sums():
    x = grid(1, 64, log=True)  # sum of exp(x - max) over a row: [1, 58] measured
    out, counter = compute(F.reciprocal, x)
    assert ((out * x) - 1).abs().max().item() < 2e-3
    assert counter.rounds == F.EXP_ITERATIONS + 2 * F.RECIPROCAL_ITERATIONS


@pytest.mark.parametrize(("hi", "octaves"), [(64.0, 6), (500.0, 9), (1.9, 1)])
def test_reciprocal_of_a_softmax_row_sum_from_its_octave(hi, octaves):
    """Sums in [1, T] (a row's maximum contributes e^0 = 1), every octave's edges included: within 2e-3 relative,
    or two units of f = 16 where 1/x has fewer than 1,000 of them (1/500 has 131)."""
    x = torch.cat([grid(1, hi, log=True), torch.tensor([2.0**k for k in range(octaves + 1) if 2.0**k <= hi])])
    x = torch.cat([x, x * 0.999, x * 1.001]).clamp(1.0, hi)
    out, counter = compute(lambda p, s: F.reciprocal_of_sum(p, s, octaves), x)
    assert ((out - 1 / x).abs() <= torch.maximum(2e-3 / x, torch.tensor(2.0**-15))).all()
    assert counter.rounds == 8 + 2 * F.SUM_RECIPROCAL_ITERATIONS


@pytest.mark.parametrize(
    ("lo", "hi", "scale", "iterations", "bound"),
    # mean square at positions > 0 (result down to 0.03: the last place is 5e-4 of it), and at position 0
    # (unscaled result: the caller folds 1/sqrt(scale) into h)
    [(3.5, 1000.0, 8.0, 3, 5e-3), (50.0, 1.1e6, 2.0**13, 8, 2e-3)],
)
def test_rsqrt_over_the_mean_squares(lo, hi, scale, iterations, bound):
    x = grid(lo, hi, log=True)
    out, counter = compute(lambda p, s: F.rsqrt(p, s, iterations, scale, apply_scale=False), x)
    assert ((out * (x / scale).sqrt()) - 1).abs().max().item() < bound
    assert counter.rounds == F.EXP_ITERATIONS + 3 * iterations


@pytest.mark.parametrize(("magnitude", "pre_shift"), [(100.0, 2), (2.5e4, 12)])
def test_mean_square_of_residual_rows(magnitude, pre_shift):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 576, generator=g, dtype=torch.float64) * 3
    h[:, :2] = magnitude  # the few massive channels of the residual stream
    out, counter = compute(lambda p, s: F.mean_square(p, s, pre_shift), h)
    ref = h.pow(2).mean(-1, keepdim=True)
    assert ((out / ref) - 1).abs().max().item() < 1e-3
    assert counter.rounds == 1


def test_softmax_with_the_row_maximum_as_shift():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 16, generator=g, dtype=torch.float64) * 8  # scores span [-58, 28]
    top = scores.amax(-1, keepdim=True)
    out, counter = compute(lambda p, s, m: F.softmax(p, s, m), scores, top)
    assert (out - scores.softmax(-1)).abs().max().item() < 5e-3
    assert counter.rounds == F.EXP_ITERATIONS + 8 + 2 * F.SUM_RECIPROCAL_ITERATIONS + 1


def test_silu_over_the_bulk_of_gate_values():
    """The bulk ([-3.9, 3.5] holds 99.8% of gate values); the whole range is in test_compare.py."""
    x = grid(-10, 10)
    out, counter = compute(F.silu, x)
    assert (out - torch.nn.functional.silu(x)).abs().max().item() < 4e-3
    assert counter.rounds == 8 + 1 + F.EXP_ITERATIONS + 2 * F.SIGMOID_ITERATIONS + 1
