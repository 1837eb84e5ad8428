"""What one share server sees, all of it, for two different prompts: its share of the input, every opening its
peer sends, every correction the device deals it (party 1, the party that hears from both). On a tiny Llama.

Two checks: the audit's attacks read the prompt from the plain hidden states and read no more than chance from
the server's share; and the server's whole transcript has the same shapes for both prompts and values whose
distribution a two-sample test cannot tell apart (while the same test tells the plain inputs apart at once).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mpc_helpers import Recording
from scipy import stats
from test_body import TINY

from lambdasplit.audit.attacks.exact_matching import exact_matching
from lambdasplit.audit.attacks.nearest_neighbour import nearest_neighbour
from lambdasplit.mpc.body import BodyWeights, SharedBody, share
from lambdasplit.mpc.dealing import CorrectedSource, LocalFeed, SeededSource, TrustedDealer, key_from_seed
from lambdasplit.mpc.ops import SharedOps
from lambdasplit.mpc.party import Party, local_channels, run_pair
from lambdasplit.mpc.ring import Prg, Ring
from lambdasplit.privacy.intercept import Intercept
from lambdasplit.split import SplitModel, load_split

RING = Ring()


@pytest.fixture(scope="module")
def split(tiny_checkpoint) -> SplitModel:
    path, _ = tiny_checkpoint("llama")
    return load_split(path, (1, 4), device="cpu", dtype="float32", quiet=True)


class RecordingFeed(LocalFeed):
    def __init__(self, dealer: TrustedDealer) -> None:
        super().__init__(dealer)
        self.seen: list[torch.Tensor] = []

    def receive(self) -> torch.Tensor:
        c = super().receive()
        self.seen.append(c.clone())
        return c


def server_view(split: SplitModel, ids: list[int], seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Party 1's share of the body's input and everything it received while computing the body on it."""
    assert split.head is not None and split.body is not None
    with torch.no_grad():
        hidden = split.head(torch.tensor([ids]), split.head.new_cache())
    keys = [key_from_seed(seed, name) for name in ("input", "party0", "party1")]
    dealer = TrustedDealer(keys[1], keys[2])
    c0, c1 = local_channels(30)
    channel, feed = Recording(c1), RecordingFeed(dealer)
    weights = BodyWeights.from_hf(split.body.model)
    body0 = SharedBody(weights, SharedOps(Party(0, RING, c0, SeededSource(keys[1])), TINY, TINY))
    body1 = SharedBody(weights, SharedOps(Party(1, RING, channel, CorrectedSource(keys[2], feed)), TINY, TINY))
    s0, s1 = share(hidden.double(), RING, Prg(keys[0]))
    run_pair(lambda: body0.forward(s0, 0), lambda: body1.forward(s1, 0), timeout=120)
    return s1, channel.received + feed.seen


def test_the_audits_attacks_read_the_plain_states_but_not_a_share(split) -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 320, (48,), generator=g).tolist()
    s1, _ = server_view(split, ids, seed=1)
    assert split.head is not None
    with torch.no_grad():
        plain = split.head(torch.tensor([ids]), split.head.new_cache())[0]
    as_plain = Intercept(ids, [], plain, plain)
    as_share = Intercept(ids, [], RING.decode(s1)[0], RING.decode(s1)[0])  # the share read as hidden states
    for attack in (nearest_neighbour, exact_matching):
        on_plain, on_share = attack(split, [as_plain])[0], attack(split, [as_share])[0]
        # chance is 1/320 a token: 48 tokens give 0.15 hits on average; 3 or more has probability 5e-4
        hits = [sum(r == t for r, t in zip(result.recovered, ids, strict=True)) for result in (on_plain, on_share)]
        assert hits[0] >= 8, attack.__name__  # the attack works on this model's plain states (A1: all 48)
        assert hits[1] <= 2, attack.__name__


def test_a_servers_whole_view_is_independent_of_the_prompt(split) -> None:
    g = torch.Generator().manual_seed(1)
    prompt_a = torch.randint(3, 320, (12,), generator=g).tolist()
    prompt_b = [5] * 12  # as different as prompts get: one token repeated
    share_a, view_a = server_view(split, prompt_a, seed=2)
    share_b, view_b = server_view(split, prompt_b, seed=3)
    assert [tuple(t.shape) for t in view_a] == [tuple(t.shape) for t in view_b]  # the transcript's shape is public
    assert len(view_a) > 100
    words_a = torch.cat([share_a.flatten(), *(t.flatten() for t in view_a)])
    words_b = torch.cat([share_b.flatten(), *(t.flatten() for t in view_b)])
    # B2A openings are single bits (uniform in {0, 1}); everything else is a uniform 64-bit word
    bits = [t.abs().max() <= 1 for t in view_a]
    assert bits == [t.abs().max() <= 1 for t in view_b]
    full_a = torch.cat([share_a.flatten(), *(t.flatten() for t, b in zip(view_a, bits, strict=True) if not b)])
    full_b = torch.cat([share_b.flatten(), *(t.flatten() for t, b in zip(view_b, bits, strict=True) if not b)])
    assert stats.ks_2samp((full_a >> 32).numpy(), (full_b >> 32).numpy()).pvalue > 1e-3
    for full in (full_a, full_b):  # each byte of the words uniform
        for byte in range(8):
            counts = np.bincount(((full >> (8 * byte)) & 0xFF).numpy(), minlength=256)
            assert stats.chisquare(counts).pvalue > 1e-4
    bit_a = torch.cat([t.flatten() for t, b in zip(view_a, bits, strict=True) if b]).double().mean().item()
    bit_b = torch.cat([t.flatten() for t, b in zip(view_b, bits, strict=True) if b]).double().mean().item()
    assert abs(bit_a - 0.5) < 0.01 and abs(bit_b - 0.5) < 0.01
    # power: the same two-sample test on the plain inputs (encoded as the shares are) separates them at once
    assert split.head is not None
    with torch.no_grad():
        plain_a, plain_b = (
            RING.encode(split.head(torch.tensor([p]), split.head.new_cache()).double()).flatten()
            for p in (prompt_a, prompt_b)
        )
    assert stats.ks_2samp(plain_a.numpy(), plain_b.numpy()).pvalue < 1e-4
    assert words_a.numel() == words_b.numel()
