"""A party of the two-party computation: its index, its channel to the peer, its triples, its counters.

Everything a party learns from its peer passes through ``Party.exchange``: both parties send one int64 tensor
and receive the peer's, in one round. The only tensors ever exchanged are *openings*: ``x - a`` for a secret
``x`` masked by a dealer's uniformly random ``a`` (Beaver), or a share being reconstructed on purpose. So the
same code runs with both parties in one process (``local_channels``, threads and queues, for tests) or each in
its own process (``peer.PeerChannel``, one TCP connection per session).

The dealer (the device, which the user trusts) is not a party: it only hands out correlated randomness
(``TripleSource``: Beaver triples, arithmetic or binary, and random bits shared both ways; ``dealing``) and
never sees a share of a secret.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar

import torch

from lambdasplit.errors import WireError
from lambdasplit.mpc.ring import Ring

T = TypeVar("T")


class Channel(Protocol):
    """A party's link to its peer. ``exchange`` sends ``tensor`` and returns the peer's tensor of the same round."""

    def exchange(self, tensor: torch.Tensor) -> torch.Tensor: ...


class Pending(Protocol):
    """A tensor still on its way (a dealer's correction): ``resolve`` waits for it."""

    def resolve(self) -> torch.Tensor: ...


class Triple:
    """One party's shares of a Beaver triple: ``c = a * b`` (elementwise), ``c = a @ b`` (matmul) or
    ``c = a & b`` (XOR-shared), all int64. ``c`` may still be on its way from the dealer (``Pending``): it is
    waited for on first use. ``dealt``: bytes the dealer sent this party for it."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | Pending, dealt: int = 0) -> None:
        self.a, self.b, self._c, self.dealt = a, b, c, dealt

    @property
    def c(self) -> torch.Tensor:
        if not isinstance(self._c, torch.Tensor):
            self._c = self._c.resolve()
        return self._c


@dataclass(frozen=True)
class SharedBit:
    """One party's shares of uniformly random bits ``r`` (one per element), dealt twice: ``binary`` XOR-shares
    ``r`` in bit 0 (int64 0/1), ``arithmetic`` shares it additively as the ring integer 0/1 (not fixed point).
    ``binary.b2a_bit`` turns a XOR-shared bit into an additive one with them."""

    binary: torch.Tensor
    arithmetic: torch.Tensor
    dealt: int = 0  # bytes the dealer sent this party for them


class TripleSource(Protocol):
    """Where a party takes its correlated randomness from, in the order both parties ask for it.

    ``kind`` is ``"mul"`` (a, b, c of ``shape_a``; ``shape_b`` equals it), ``"matmul"`` (``a`` of ``shape_a``,
    ``b`` of ``shape_b``, ``c = a @ b`` with torch.matmul's broadcasting), both additively shared, or ``"and"``
    (a, b, c of ``shape_a`` with ``c = a & b`` bitwise, all XOR-shared). ``bit`` deals random bits.
    """

    def take(self, kind: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> Triple: ...

    def bit(self, shape: tuple[int, ...]) -> SharedBit: ...


@dataclass
class Counter:
    """What crossed a party's links: rounds and bytes with the peer, bytes of triples received from the dealer."""

    rounds: int = 0
    sent: int = 0
    received: int = 0
    dealt: int = 0

    def snapshot(self) -> Counter:
        return replace(self)

    def since(self, before: Counter) -> Counter:
        """The traffic between ``before`` (a snapshot) and now."""
        return Counter(
            self.rounds - before.rounds,
            self.sent - before.sent,
            self.received - before.received,
            self.dealt - before.dealt,
        )


@dataclass
class Party:
    """Party ``index`` (0 or 1) of a computation: the ring both agree on, the peer link, the dealer's feed.

    Party 0 is the one that adds public constants (a public value enters the sum of shares exactly once).
    """

    index: int
    ring: Ring
    channel: Channel
    triples: TripleSource
    counter: Counter = field(default_factory=Counter)

    def exchange(self, tensor: torch.Tensor) -> torch.Tensor:
        """Send ``tensor`` (int64) to the peer and return the peer's tensor of this round (same shape)."""
        if tensor.dtype != torch.int64:
            raise TypeError(f"only int64 ring elements are exchanged, got {tensor.dtype}")
        peer = self.channel.exchange(tensor)
        if peer.shape != tensor.shape or peer.dtype != torch.int64:
            raise WireError(
                f"party {self.index}: the peer sent {peer.dtype} {tuple(peer.shape)}, expected int64 "
                f"{tuple(tensor.shape)}: the parties are out of step",
                code="bad_share",
            )
        nbytes = tensor.numel() * tensor.element_size()
        self.counter.rounds += 1
        self.counter.sent += nbytes
        self.counter.received += nbytes
        return peer

    def take(self, kind: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> Triple:
        triple = self.triples.take(kind, shape_a, shape_b)
        self.counter.dealt += triple.dealt
        return triple

    def take_bit(self, shape: tuple[int, ...]) -> SharedBit:
        shared = self.triples.bit(shape)
        self.counter.dealt += shared.dealt
        return shared


class _QueueChannel:
    """One end of an in-process channel: sends into the peer's inbox, reads its own."""

    def __init__(self, inbox: queue.Queue[torch.Tensor], outbox: queue.Queue[torch.Tensor], timeout: float) -> None:
        self.inbox, self.outbox, self.timeout = inbox, outbox, timeout

    def exchange(self, tensor: torch.Tensor) -> torch.Tensor:
        self.outbox.put(tensor.clone())
        try:
            return self.inbox.get(timeout=self.timeout)
        except queue.Empty:
            raise WireError(f"the peer sent nothing within {self.timeout} s", code="peer_timeout") from None


def local_channels(timeout: float = 10.0) -> tuple[Channel, Channel]:
    """Two connected in-process channels (party 0's, party 1's)."""
    a: queue.Queue[torch.Tensor] = queue.Queue()
    b: queue.Queue[torch.Tensor] = queue.Queue()
    return _QueueChannel(a, b, timeout), _QueueChannel(b, a, timeout)


def run_pair(fn0: Callable[[], T], fn1: Callable[[], T], timeout: float = 30.0) -> tuple[T, T]:
    """Run the two parties' programs at once (one thread each, as two processes would) and return both results.

    An exception in either is re-raised here (party 0's first); a party left waiting fails by its channel's
    timeout, never hangs.
    """
    results: list[T | None] = [None, None]
    errors: list[BaseException | None] = [None, None]

    def runner(i: int, fn: Callable[[], T]) -> None:
        try:
            results[i] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            errors[i] = e

    threads = [threading.Thread(target=runner, args=(i, fn), daemon=True) for i, fn in enumerate((fn0, fn1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    for i, t in enumerate(threads):
        if t.is_alive():
            raise WireError(f"party {i} did not finish within {timeout} s", code="peer_timeout")
    for e in errors:
        if e is not None:
            raise e
    return results[0], results[1]  # type: ignore[return-value]
