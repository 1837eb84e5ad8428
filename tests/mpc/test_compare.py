"""Comparisons, selection, ReLU, the row maximum, and the functions built on them, against plaintext over the
ranges measured on SmolLM2's body (docs/secret-sharing.md); and what one party sees of them."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mpc_helpers import Recording, compute, compute_ring
from scipy import stats

from lambdasplit.mpc import compare as C
from lambdasplit.mpc import functions as F
from lambdasplit.mpc.dealing import seeded_sources
from lambdasplit.mpc.party import Party, local_channels, run_pair
from lambdasplit.mpc.ring import Ring
from lambdasplit.mpc.shares import share

RING = Ring()
ULP = 2.0**-16


def as_fixed(fn):
    """A comparison's bit share as the fixed-point 0/1 that ``compute`` decodes."""
    return lambda p, *s: C.to_fixed(p, fn(p, *s))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), min_size=1, max_size=40), st.integers(0, 99))
def test_ltz_is_exact_on_every_ring_element(values, seed):
    """Every int64 is a valid encoding (|x| < 2^47 at f = 16); the sign comes out exact for each, and for zero,
    the extremes and one unit either side of zero."""
    edges = [0, 1, -1, 2, -2, 2**63 - 1, -(2**63), -(2**63) + 1, 2**47 * 2**16 - 1, -(2**47) * 2**16]
    x = torch.tensor(values + edges, dtype=torch.int64)
    out, counter = compute_ring(C.ltz, x, seed=seed)
    assert torch.equal(out, (x < 0).long())
    n = x.numel()
    assert (counter.rounds, counter.sent, counter.dealt) == (8, 200 * n, 104 * n)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4), min_size=1, max_size=30), st.integers(0, 99))
def test_lt_gt_ge_on_encoded_reals_including_ties(values, seed):
    x = torch.tensor(values, dtype=torch.float64)
    y = torch.cat([x[:1], x.flip(0)[1:]])  # a tie in front, then other values (and ties where x is symmetric)
    ex, ey = RING.decode(RING.encode(x), torch.float64), RING.decode(RING.encode(y), torch.float64)
    for fn, ref in [(C.lt, ex < ey), (C.gt, ex > ey), (C.ge, ex >= ey)]:
        out, counter = compute(as_fixed(fn), x, y, seed=seed)
        assert torch.equal(out, ref.double()), fn.__name__
        assert counter.rounds == 8


def test_select_and_relu_are_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g, dtype=torch.float64) * 30
    x[:3] = torch.tensor([0.0, ULP, -ULP])
    encoded = RING.decode(RING.encode(x), torch.float64)
    out, counter = compute(C.relu, x)
    assert torch.equal(out, encoded.clamp(min=0))
    assert (counter.rounds, counter.sent) == (9, 216 * 1000)
    y = torch.randn(1000, generator=g, dtype=torch.float64) * 1e6  # far apart: no truncation to fail
    out, counter = compute(lambda p, a, b: C.select(p, C.lt(p, a, b), a, b), x, y)
    assert torch.equal(out, torch.minimum(encoded, RING.decode(RING.encode(y), torch.float64)))
    assert counter.rounds == 9


def fours_levels(n: int) -> int:
    """Levels of the 4-ary tournament over n: each takes ceil(n / 4)."""
    levels = 0
    while n > 1:
        n, levels = -(-n // 4), levels + 1
    return levels


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 64, 65, 256])
@pytest.mark.parametrize("arity", [2, 4])
def test_maximum_of_attention_rows_is_exact(n, arity):
    """Rows of scores over the measured span [-58.6, 28.4], lengths up to the context, with ties planted (the
    maximum twice; a row of one value; for fours, a tie inside every group of a row)."""
    g = torch.Generator().manual_seed(n)
    s = torch.rand(9, 2, n, generator=g, dtype=torch.float64) * 87 - 58.6
    s[0, 0] = s[0, 0, 0]  # a row of one value
    s[1, 0, n // 2] = s[1, 0, 0] = 30.0  # the maximum twice
    s[2, 1, 1::2] = s[2, 1, 0::2][: n // 2]  # neighbours equal: ties in every group of fours
    encoded = RING.decode(RING.encode(s), torch.float64)
    out, counter = compute(lambda p, v: C.maximum(p, v, keepdim=True, arity=arity), s)
    assert torch.equal(out, encoded.amax(-1, keepdim=True))
    if arity == 2:
        assert counter.rounds == 9 * (math.ceil(math.log2(n)) if n > 1 else 0)
        assert counter.sent == 216 * 18 * (n - 1)  # n - 1 comparisons and selects per row, 18 rows
    else:
        assert counter.rounds == 10 * fours_levels(n)
    out, _ = compute(lambda p, v: C.maximum(p, v, dim=0, arity=arity), s)  # another dimension
    assert torch.equal(out, encoded.amax(0))


@pytest.mark.parametrize("n", [5, 64])
def test_argmax_marks_the_first_maximum(n):
    g = torch.Generator().manual_seed(n)
    s = torch.rand(6, n, generator=g, dtype=torch.float64) * 87 - 58.6
    s[0, 1] = s[0, 3] = 40.0
    s[1, -1] = 40.0
    s[2] = 1.0  # all tied

    def program(p, v):
        top, onehot = C.argmax(p, v)
        return torch.cat([top, C.to_fixed(p, onehot)], -1)

    out, counter = compute(program, s)
    assert torch.equal(out[:, :1], RING.decode(RING.encode(s), torch.float64).amax(-1, keepdim=True))
    assert torch.equal(out[:, 1:], torch.nn.functional.one_hot(s.argmax(-1), n).double())
    assert counter.rounds == 9 * math.ceil(math.log2(n))


@pytest.mark.parametrize("length", [64, 256])
def test_softmax_computes_its_own_maximum(length):
    """Scores spanning [-58.6, 28.4] with no shift given: within 5e-3 of softmax (the max is exact; the rest is
    exp's and reciprocal's error, as with a given shift)."""
    g = torch.Generator().manual_seed(length)
    s = torch.rand(9, 2, length, generator=g, dtype=torch.float64) * 87 - 58.6
    s[0, 0] = torch.randn(length, generator=g, dtype=torch.float64)  # a flat row: its sum is near the length
    out, counter = compute(F.softmax, s)
    assert (out - s.softmax(-1)).abs().max().item() < 5e-3
    maximum = 10 * fours_levels(length)  # 18 rows: the tournament by fours
    assert counter.rounds == maximum + F.EXP_ITERATIONS + (8 + 2 * F.SUM_RECIPROCAL_ITERATIONS) + 1
    many = torch.cat([s] * 8)  # 144 rows: by pairs
    out, counter = compute(F.softmax, many)
    assert (out - many.softmax(-1)).abs().max().item() < 5e-3
    levels = math.ceil(math.log2(length))
    assert counter.rounds == 9 * levels + F.EXP_ITERATIONS + (8 + 2 * F.SUM_RECIPROCAL_ITERATIONS) + 1


def test_silu_and_sigmoid_over_the_whole_gate_range():
    """[-60, 60] covers the measured gate extremes [-31, 50] with room; the bounds hold up to |x| = 256."""
    x = torch.cat([torch.linspace(-60, 60, 2401, dtype=torch.float64), torch.tensor([-256.0, -100.0, 100.0, 256.0])])
    out, counter = compute(F.silu, x)
    assert (out - torch.nn.functional.silu(x)).abs().max().item() < 4e-3
    assert counter.rounds == 8 + 1 + F.EXP_ITERATIONS + 2 * F.SIGMOID_ITERATIONS + 1
    out, _ = compute(F.sigmoid, x)
    assert (out - torch.sigmoid(x)).abs().max().item() < 2e-3


class RecordingFeed:
    """A dealer's feed that keeps everything it deals to its party."""

    def __init__(self, inner) -> None:
        self.inner, self.dealt = inner, []

    def take(self, kind, shape_a, shape_b):
        t = self.inner.take(kind, shape_a, shape_b)
        self.dealt += [t.a, t.b, t.c]
        return t

    def bit(self, shape):
        r = self.inner.bit(shape)
        self.dealt += [r.binary, r.arithmetic]
        return r


def party_one_view(secret: torch.Tensor, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Everything party 1 receives while the two compute ``relu`` of ``secret``: (from the peer, from the dealer)."""
    source0, source1 = seeded_sources(seed)
    c0, c1 = local_channels()
    channel, feed = Recording(c1), RecordingFeed(source1)
    p0, p1 = Party(0, RING, c0, source0), Party(1, RING, channel, feed)
    s0, s1 = share(RING.encode(secret), torch.Generator().manual_seed(seed + 1))
    run_pair(lambda: C.relu(p0, s0), lambda: C.relu(p1, s1))
    return channel.received, feed.dealt


def test_one_party_view_does_not_depend_on_the_secret():
    """ReLU (a comparison, a B2A, a product) of all -3.0 vs all +5.0, signs opposite everywhere: each round's
    messages from the peer are indistinguishable (KS on the top 32 bits of words, a two-proportion test on
    single bits), and the dealer's items, whose only input is the shapes, are identical bit for bit."""
    n = 20_000
    recv_a, dealt_a = party_one_view(torch.full((n,), -3.0), seed=7)
    recv_b, dealt_b = party_one_view(torch.full((n,), 5.0), seed=7)
    assert all(torch.equal(a, b) for a, b in zip(dealt_a, dealt_b, strict=True))
    _, dealt_c = party_one_view(torch.full((n,), 5.0), seed=8)
    assert not torch.equal(dealt_b[0], dealt_c[0])  # fresh randomness per dealer seed
    recv_a, _ = party_one_view(torch.full((n,), -3.0), seed=11)  # independent randomness for the comparison
    assert len(recv_a) == len(recv_b) == 9
    for a, b in zip(recv_a, recv_b, strict=True):
        if a.abs().max() <= 1:  # the B2A opening: one bit per element
            pa, pb = a.double().mean().item(), b.double().mean().item()
            z = (pa - pb) / math.sqrt(0.5 * 0.5 * 2 / a.numel())
            assert abs(z) < 4.5 and abs(pa - 0.5) < 0.02
        else:
            assert stats.ks_2samp((a >> 32).numpy(), (b >> 32).numpy()).pvalue > 1e-4
            low = np.bincount(((a ^ b) & 0xFF).numpy(), minlength=256)
            assert stats.chisquare(low).pvalue > 1e-4
    # the tests have power: the same statistics tell the secrets' sign bits, and their encodings, apart at once
    signs_a, signs_b = ((torch.full((n,), v) < 0).double().mean().item() for v in (-3.0, 5.0))
    assert abs(signs_a - signs_b) / math.sqrt(0.5 * 0.5 * 2 / n) > 100
    enc_a, enc_b = (RING.encode(torch.randn(n, generator=torch.Generator().manual_seed(0)) + v) for v in (-3.0, 5.0))
    assert stats.ks_2samp(enc_a.numpy(), enc_b.numpy()).pvalue < 1e-10
