"""XOR shares, binary Beaver triples, the Kogge-Stone adder and the conversions, exact against plaintext."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mpc_helpers import compute_ring, parties

from lambdasplit.mpc import binary as B
from lambdasplit.mpc.binary import xor_share
from lambdasplit.mpc.dealing import seeded_sources
from lambdasplit.mpc.party import run_pair
from lambdasplit.mpc.shares import reconstruct

WORDS = st.integers(min_value=-(2**63), max_value=2**63 - 1)
# carries that run the whole word, the extremes, and around zero
EDGES = [0, 1, -1, 2**63 - 1, -(2**63), -(2**63) + 1, 2**62, -(2**62), 0x5555555555555555, -0x5555555555555556]


def run_binary(program, *xs: torch.Tensor, seed: int = 0):
    """``program(party, *xor_shares)`` on XOR shares of ``xs``: (the XOR of the two outputs, party 0's counter)."""
    p0, p1 = parties(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    pairs = [xor_share(x, gen) for x in xs]
    out0, out1 = run_pair(lambda: program(p0, *(s for s, _ in pairs)), lambda: program(p1, *(s for _, s in pairs)))
    return out0 ^ out1, p1.counter


def test_dealt_binary_triples_and_bits_are_consistent():
    source0, source1 = seeded_sources(0)
    t0, t1 = source0.take("and", (1000,), (1000,)), source1.take("and", (1000,), (1000,))
    a, b, c = (getattr(t0, n) ^ getattr(t1, n) for n in "abc")
    assert torch.equal(a & b, c)
    r0, r1 = source0.bit((10_000,)), source1.bit((10_000,))
    r = r0.binary ^ r1.binary
    assert torch.equal(r, reconstruct(r0.arithmetic, r1.arithmetic))
    assert set(r.unique().tolist()) == {0, 1} and abs(r.double().mean().item() - 0.5) < 0.02


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(WORDS, WORDS), min_size=1, max_size=30), st.integers(0, 99))
def test_and_is_exact(pairs, seed):
    x, y = (torch.tensor(list(v), dtype=torch.int64) for v in zip(*pairs, strict=True))
    out, counter = run_binary(B.and_, x, y, seed=seed)
    assert torch.equal(out, x & y)
    assert (counter.rounds, counter.sent, counter.dealt) == (1, 16 * len(pairs), 8 * len(pairs))  # c1 only


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(WORDS, WORDS), min_size=1, max_size=30), st.integers(0, 99))
def test_kogge_stone_adds_modulo_2_64(pairs, seed):
    x, y = (torch.tensor(list(v), dtype=torch.int64) for v in zip(*pairs, strict=True))
    out, counter = run_binary(B.add, x, y, seed=seed)
    assert torch.equal(out, x + y)  # torch's int64 addition wraps around: the ring's
    assert counter.rounds == 1 + B.ADDER_LEVELS


def test_kogge_stone_on_the_edges():
    x = torch.tensor([a for a in EDGES for _ in EDGES], dtype=torch.int64)
    y = torch.tensor([b for _ in EDGES for b in EDGES], dtype=torch.int64)
    out, _ = run_binary(B.add, x, y)
    assert torch.equal(out, x + y)


@settings(max_examples=30, deadline=None)
@given(st.lists(WORDS, min_size=1, max_size=40), st.integers(0, 99))
def test_a2b_round_trip_is_exact(values, seed):
    x = torch.tensor(values + EDGES, dtype=torch.int64)

    def program(p, s):  # both parties learn x; party 1 returns 0 so the additive reconstruction is x
        opened = B.open_binary(p, B.a2b(p, s))
        return opened if p.index == 0 else torch.zeros_like(opened)

    out, counter = compute_ring(program, x, seed=seed)
    assert torch.equal(out, x)
    n = x.numel()  # 7 rounds of the adder, then the opening (8 B per element)
    assert (counter.rounds, counter.sent, counter.dealt) == (8, 192 * n + 8 * n, 96 * n)


@given(st.lists(st.integers(0, 1), min_size=1, max_size=50), st.integers(0, 99))
@settings(max_examples=25, deadline=None)
def test_b2a_of_a_bit_is_exact(bits, seed):
    b = torch.tensor(bits, dtype=torch.int64)
    p0, p1 = parties(seed=seed)
    s0, s1 = xor_share(b, torch.Generator().manual_seed(seed))
    s0, s1 = s0 & 1, s1 & 1  # the bit lives in bit 0
    out0, out1 = run_pair(lambda: B.b2a_bit(p0, s0), lambda: B.b2a_bit(p1, s1))
    assert torch.equal(reconstruct(out0, out1), b)
    assert (p0.counter.rounds, p0.counter.sent, p0.counter.dealt) == (1, 8 * len(bits), 0)  # from its stream
    assert p1.counter.dealt == 8 * len(bits)  # its additive share of the random bit
