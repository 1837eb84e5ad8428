"""Run a two-party program on real inputs: share them, run both parties in threads, reconstruct the output."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lambdasplit.mpc.dealing import seeded_sources
from lambdasplit.mpc.party import Channel, Counter, Party, local_channels, run_pair
from lambdasplit.mpc.ring import Ring
from lambdasplit.mpc.shares import reconstruct, share


def parties(ring: Ring | None = None, seed: int = 0) -> tuple[Party, Party]:
    ring = ring or Ring()
    source0, source1 = seeded_sources(seed + 1)
    c0, c1 = local_channels()
    return Party(0, ring, c0, source0), Party(1, ring, c1, source1)


def compute_ring(
    program: Callable[..., torch.Tensor], *inputs: torch.Tensor, ring: Ring | None = None, seed: int = 0
) -> tuple[torch.Tensor, Counter]:
    """``program(party, *shares)`` on additive shares of int64 ring elements ``inputs`` (no encoding): (the
    reconstructed int64 result, party 1's counter: the dealer's corrections go to party 1 only)."""
    p0, p1 = parties(ring, seed)
    gen = torch.Generator().manual_seed(seed)
    pairs = [share(x, gen) for x in inputs]
    out0, out1 = run_pair(lambda: program(p0, *(s for s, _ in pairs)), lambda: program(p1, *(s for _, s in pairs)))
    return reconstruct(out0, out1), p1.counter


def compute(
    program: Callable[..., torch.Tensor], *inputs: torch.Tensor, ring: Ring | None = None, seed: int = 0
) -> tuple[torch.Tensor, Counter]:
    """``program(party, *shares)`` on shares of the real ``inputs``: (the reconstructed real result, party 1's
    counter)."""
    p0, p1 = parties(ring, seed)
    gen = torch.Generator().manual_seed(seed)
    pairs = [share(p0.ring.encode(x), gen) for x in inputs]
    out0, out1 = run_pair(lambda: program(p0, *(s for s, _ in pairs)), lambda: program(p1, *(s for _, s in pairs)))
    return p0.ring.decode(reconstruct(out0, out1), torch.float64), p1.counter


class Recording:
    """A channel that keeps everything its party receives from the peer (``received``)."""

    def __init__(self, inner: Channel) -> None:
        self.inner, self.received = inner, []

    def exchange(self, tensor: torch.Tensor) -> torch.Tensor:
        peer = self.inner.exchange(tensor)
        self.received.append(peer.clone())
        return peer
