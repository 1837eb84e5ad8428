import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mpc_helpers import compute

from lambdasplit.mpc.beaver import matmul, mul
from lambdasplit.mpc.dealing import SeededSource, Streams, TrustedDealer, key_from_seed, seeded_sources
from lambdasplit.mpc.shares import reconstruct


def test_dealt_triples_are_consistent_and_fresh():
    """Party 0's triple from its stream plus party 1's (its stream and the dealer's correction) is a triple."""
    source0, source1 = seeded_sources(0)
    for kind, sa, sb in (
        ("matmul", (2, 3, 4), (2, 4, 5)),
        ("mul", (7,), (7,)),
        ("matmul", (1, 9, 1, 64), (1, 9, 64, 5)),
    ):
        t0, t1 = source0.take(kind, sa, sb), source1.take(kind, sa, sb)
        a, b, c = (reconstruct(getattr(t0, n), getattr(t1, n)) for n in "abc")
        assert torch.equal(a @ b if kind == "matmul" else a * b, c)
        assert t0.dealt == 0 and t1.dealt == c.numel() * 8  # only c1 crosses from the dealer
    u0, v0 = source0.take("mul", (3,), (3,)), source0.take("mul", (3,), (3,))
    assert not torch.equal(u0.a, v0.a)
    other0, _ = seeded_sources(1)
    assert not torch.equal(other0.take("mul", (3,), (3,)).a, seeded_sources(0)[0].take("mul", (3,), (3,)).a)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 999), st.sampled_from([1.0, 20.0, 700.0]))
def test_mul_error_is_a_few_units_in_the_last_place(seed, magnitude):
    """Over the measured ranges (q, k up to 22; the residual stream up to 720 at positions > 0)."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(256, generator=g) * magnitude, torch.randn(256, generator=g) * 3
    out, counter = compute(mul, x, y, seed=seed)
    err = (out - x.double() * y.double()).abs()
    assert err.max().item() <= (1 + 3 * magnitude) * 2**-16 * 4  # rounding of both inputs and one truncation
    assert (counter.rounds, counter.sent) == (1, 2 * 256 * 8)
    assert counter.dealt == 256 * 8  # c1 of one triple, to party 1


def test_batched_matmul_of_attention_shapes():
    """q (B, H, T, d) @ k^T (B, H, d, S) with SmolLM2's head size 64 and |q|, |k| up to ~20: scores to 1e-3."""
    g = torch.Generator().manual_seed(0)
    q, kt = torch.randn(1, 9, 4, 64, generator=g) * 4, torch.randn(1, 9, 64, 32, generator=g) * 4
    out, counter = compute(matmul, q / 8, kt)  # the 1/sqrt(d) scaling folded into q: a public constant
    assert (out - (q.double() / 8) @ kt.double()).abs().max().item() < 5e-3
    assert counter.rounds == 1 and counter.sent == (q.numel() + kt.numel()) * 8


def test_pooled_corrections_do_not_depend_on_how_they_are_cut():
    """The device deals elementwise corrections ahead in chunks of its choosing; party 1 cuts them into the
    shapes it uses. Both must see the same stream: element i is element i."""
    k0, k1 = key_from_seed(5, "party0"), key_from_seed(5, "party1")
    one, other = TrustedDealer(k0, k1), TrustedDealer(k0, k1)
    for kind in ("mul", "and", "bit"):
        assert torch.equal(torch.cat([one.pooled(kind, 6), one.pooled(kind, 9)]), other.pooled(kind, 15))
    source0, dealer = SeededSource(k0), TrustedDealer(k0, k1)
    streams1 = Streams(k1)
    c1 = dealer.pooled("mul", 15)
    t0 = source0.take("mul", (3, 5), (3, 5))
    a1, b1 = streams1("mul.a").elements((3, 5)), streams1("mul.b").elements((3, 5))
    assert torch.equal((t0.a + a1) * (t0.b + b1), t0.c + c1.view(3, 5))
