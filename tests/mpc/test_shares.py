import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mpc_helpers import compute, parties
from scipy import stats

from lambdasplit.mpc.ring import Ring
from lambdasplit.mpc.shares import add_public, linear, mul_public, public_matmul, reconstruct, share, truncate


@given(st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), min_size=1, max_size=20), st.integers(0, 99))
def test_share_then_reconstruct_is_exact(values, seed):
    x = torch.tensor(values, dtype=torch.int64)
    s0, s1 = share(x, torch.Generator().manual_seed(seed))
    assert torch.equal(reconstruct(s0, s1), x)


def _bits(s: torch.Tensor, shift: int) -> np.ndarray:
    return ((s >> shift) & 0xFF).numpy()


@pytest.mark.parametrize("which", [0, 1])
def test_one_share_is_uniform_and_independent_of_the_secret(which):
    """A single share's low byte and high byte are uniform (chi-square), and shares of two very different
    secrets (zeros vs SmolLM2-sized activations) are indistinguishable (two-sample KS on the top 32 bits)."""
    ring, n = Ring(), 50_000
    zeros = ring.encode(torch.zeros(n))
    activations = ring.encode(torch.randn(n, generator=torch.Generator().manual_seed(5)) * 700)
    a = share(zeros, torch.Generator().manual_seed(1))[which]
    b = share(activations, torch.Generator().manual_seed(2))[which]
    for shift in (0, 56):
        counts = np.bincount(_bits(a, shift), minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-3
    assert stats.ks_2samp((a >> 32).numpy(), (b >> 32).numpy()).pvalue > 1e-3
    # the test has power: the secret itself is told apart from a share at once
    assert stats.ks_2samp((activations >> 32).numpy(), (b >> 32).numpy()).pvalue < 1e-10


@settings(max_examples=30, deadline=None)
@given(st.floats(-1e4, 1e4), st.floats(-100, 100), st.integers(0, 99))
def test_public_constant_ops_are_exact_to_a_few_units(x, c, seed):
    ring = Ring()
    out, counter = compute(
        lambda p, s: add_public(p, mul_public(p, s, c), ring.encode(c)),
        torch.tensor([x], dtype=torch.float64),
        seed=seed,
    )
    assert abs(out.item() - (x * c + c)) <= (2 + abs(c)) / ring.scale + abs(x) * 2**-17
    assert counter.rounds == 0 and counter.sent == 0


def test_truncation_rounds_to_one_unit_and_public_linear_is_local():
    torch.manual_seed(0)
    x, w, b = torch.randn(4, 576) * 3, torch.randn(64, 576) / 24, torch.randn(64)
    out, counter = compute(lambda p, s: linear(p, s, w, b), x)
    assert (out - (x.double() @ w.double().T + b.double())).abs().max().item() < 2e-3
    assert counter.rounds == 0
    p0, p1 = parties()
    v = Ring().encode(torch.tensor([123.456, -7.0]))
    s0, s1 = share(v, torch.Generator().manual_seed(0))
    t = reconstruct(truncate(p0, s0, 4), truncate(p1, s1, 4))
    assert ((t - v // 16).abs() <= 1).all()


@pytest.mark.parametrize("k", [1, 64, 1536])
def test_public_matmul_in_float_limbs_is_exact(k):
    """The three float64 limb products recombine to the int64 matmul bit for bit, wrap-around included."""
    g = torch.Generator().manual_seed(k)
    s = torch.randint(-(2**63), 2**63 - 1, (3, 5, k), generator=g)
    w = Ring().encode(torch.randn(k, 7, generator=g) * 4)
    assert torch.equal(public_matmul(s, w), s @ w)
    big = torch.full((k, 2), 2**40)  # past the exact bound: the int64 path
    assert torch.equal(public_matmul(s, big), s @ big)
