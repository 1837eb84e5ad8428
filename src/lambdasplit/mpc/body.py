"""The body on secret shares: each party runs every decoder layer on its share; the device shares and deals.

::

    device: hidden (1, T, D) --share--> s0, s1          (its own generator; either share alone is uniform)
    party 0: SharedBody(weights, SharedOps(p0)).forward(s0, position) -> o0 ┐ one program, in lock step,
    party 1: SharedBody(weights, SharedOps(p1)).forward(s1, position) -> o1 ┘ talking only through exchange
    device: reconstruct(o0, o1) -> hidden after the body (1, T, D); it deals every triple both parties take
    device: reconstruct each party's norm checks -> norms_fit, or the forward again, wide (computed_again)

``SharedBody`` is one party's body: the public weights (``BodyWeights.from_hf``: read from the body's own HF
model, ``split.body.model``), its ``Ops`` and its sessions' KV caches, held as shares (one list of (k, v) per
session, per layer). With ``PlainOps`` the same class runs the body in float64: the reference that keeps the
re-statement of the layer honest. ``TwoPartyBody`` puts the device and both parties in one process (threads,
queues; the network comes later) for tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lambdasplit.errors import ConfigError, SessionError
from lambdasplit.mpc.dealing import key_from_seed, local_sources, new_key
from lambdasplit.mpc.layer import KV, LayerWeights, Rope, decoder_layer
from lambdasplit.mpc.ops import SMOLLM2_REST, SMOLLM2_SINK, NormPlan, Ops, PlainOps, SharedOps
from lambdasplit.mpc.party import Counter, Party, local_channels, run_pair
from lambdasplit.mpc.ring import Prg, Ring
from lambdasplit.mpc.shares import reconstruct as reconstruct_ring
from lambdasplit.mpc.shares import share as share_ring

MAX_CONTEXT = 500  # the tested range: a softmax row sums to at most S, and 1/500 holds 131 units at f = 16
#: The body's output is the residual stream: at most 2.5e4 on SmolLM2 (the sink, position 0; ~600 elsewhere). A
#: 2-party truncation that wraps (probability ~ m 2^-32 per product of magnitude m, ``shares.truncate``) is off
#: by 2^(64 - 2f) = 2^32 before the layers amplify it; a row far beyond its RMSNorm plan (a second attention sink)
#: sends rsqrt's Newton steps off to 1e10 and more. An output beyond this bound is one of those, and is computed
#: again (wide).
PLAUSIBLE_OUTPUT = 2.0**20
#: A norm row's check ``rsqrt * sqrt(ms / 2^s)`` (``Ops.norms``) is within 3.2e-3 of 1 inside its plan (SmolLM2's rest
#: plan, 3 Newton steps, is 2.9e-3 off at ms / 16 = 8.8, and 1e-4 or less across most of its range; the fixed point
#: adds 2^-16 to rsqrt; SmolLM2's prompts measured 3.1e-3 at most); beyond its plan rsqrt is off by far more, blows
#: up or comes out negated (-1).
NORM_TOLERANCE = 1e-2
RETRIES = 3


@dataclass(frozen=True)
class BodyOutput:
    """A forward's reconstructed output (1, T, D) and its norms' checks (norms, T, 3): mean square, rsqrt, scale
    exponent per row, in the layers' order (``Ops.norms``)."""

    hidden: torch.Tensor
    norms: torch.Tensor


def plausible(out: torch.Tensor, bound: float = PLAUSIBLE_OUTPUT) -> bool:
    """Whether a reconstructed body output is free of a truncation wrap or a blown-up norm: finite and within
    ``bound``."""
    return bool(torch.isfinite(out).all()) and float(out.abs().max()) < bound


def norm_misses(norms: torch.Tensor) -> torch.Tensor:
    """Per norm row (``norms`` (..., 3): mean square, rsqrt, scale exponent), how far ``rsqrt * sqrt(ms / 2^s)`` is
    from 1 (inf where it is not a number: a wrapped mean square)."""
    ms, inv, bits = norms.to(torch.float64).unbind(-1)
    off = (inv * torch.sqrt(ms / torch.pow(2.0, bits)) - 1).abs()
    return torch.where(torch.isfinite(off), off, torch.full_like(off, float("inf")))


def norms_fit(norms: torch.Tensor, tolerance: float = NORM_TOLERANCE) -> bool:
    """Whether every norm of a forward took its row's rsqrt within ``tolerance`` (``norm_misses``): a row beyond its
    plan (a second attention sink) can come out negated, with an output of ordinary size."""
    return norms.numel() == 0 or float(norm_misses(norms).max()) < tolerance


def computed_again(forward: Callable[[bool], BodyOutput], retries: int = RETRIES) -> tuple[torch.Tensor, int]:
    """``forward(wide)`` (a whole forward at one position: the parties roll their caches back to it) until its
    output is ``plausible`` and its norms fit (``norms_fit``); (the output, how many were redone). A forward is
    redone ``wide`` (``SharedOps.wide``: each norm row takes the plan its mean square fits), which also draws fresh
    randomness: a row beyond its position's plan (a second attention sink) is then in range, and a truncation wrap
    recurs with its small probability. ``SessionError`` after ``retries`` redone in a row."""
    for attempt in range(retries + 1):
        out = forward(attempt > 0)
        if plausible(out.hidden) and norms_fit(out.norms):
            return out.hidden, attempt
    missed = float(norm_misses(out.norms).max()) if out.norms.numel() else 0.0
    raise SessionError(
        f"the body's output stayed out of range after {retries} retries (max |x| {float(out.hidden.abs().max()):.3g},"
        f" a norm's rsqrt off by {missed:.3g})",
        "implausible_output",
    )


@dataclass(frozen=True)
class BodyWeights:
    """The public weights of a body's layers and its rotary embedding module (the HF one, untouched)."""

    layers: tuple[LayerWeights, ...]
    rotary: nn.Module  # the model's rotary_emb: (x, position_ids) -> cos, sin (B, T, d)

    @classmethod
    def from_hf(cls, model: nn.Module) -> BodyWeights:
        """From an HF base model (``split.body.model``: a LlamaModel whose ``layers`` are the body's)."""
        layers, rotary = getattr(model, "layers", None), getattr(model, "rotary_emb", None)
        if not isinstance(layers, nn.ModuleList) or not isinstance(rotary, nn.Module):
            raise ConfigError(f"{type(model).__name__} has no layers and rotary_emb: pass the body's HF base model")
        return cls(tuple(LayerWeights.from_hf(layer) for layer in layers), rotary)

    def rope(self, positions: torch.Tensor) -> Rope:
        """Public cos and sin (T, d) for ``positions`` (T,), float64, computed by the model's own module."""
        dummy = torch.zeros(1, dtype=torch.float32)
        with torch.no_grad():
            cos, sin = self.rotary(dummy, positions[None])
        return Rope(cos[0].to(torch.float64), sin[0].to(torch.float64))


class SharedBody:
    """One party's body (or, with ``PlainOps``, the plaintext reference): ``forward(hidden, position, session)``.

    ``hidden`` is this party's share (int64, (1, T, D)) of the rows at positions ``position .. position + T - 1``;
    a session's cache holds exactly the positions before ``position`` after a forward, and a forward at an
    earlier position rolls the cache back (as ``split.state.BodyState``). ``wide``: the forward's norms fit any
    row (``SharedOps.wide``), not only the position's plan. ``norms``: the last forward's norm checks (this party's
    shares, or plain values), (norms, T, 3) (``Ops.norms``).
    """

    def __init__(self, weights: BodyWeights, ops: Ops) -> None:
        self.weights, self.ops = weights, ops
        self.sessions: dict[str, list[KV]] = {}
        self.norms = torch.zeros(0, 0, 3)

    def length(self, session: str) -> int:
        caches = self.sessions.get(session)
        return 0 if not caches else int(caches[0][0].shape[2])

    def forward(
        self, hidden: torch.Tensor, position: int, session: str = "default", wide: bool = False
    ) -> torch.Tensor:
        if hidden.dim() != 3 or hidden.shape[0] != 1:
            raise ConfigError(f"hidden must be (1, T, D), got {tuple(hidden.shape)}")
        held = self.length(session)
        if not 0 <= position <= held:
            raise SessionError(f"position {position} skips ahead: session {session!r} holds {held}", "bad_position")
        T = hidden.shape[1]
        if position + T > MAX_CONTEXT:
            raise ConfigError(
                f"context {position + T} exceeds {MAX_CONTEXT}, the range the shared softmax is tested on"
            )
        caches = [(k[:, :, :position], v[:, :, :position]) for k, v in self.sessions.get(session, [])]
        positions = torch.arange(position, position + T)
        rope = self.weights.rope(positions)
        new: list[KV] = []
        self.ops.wide, self.ops.norms = wide, []
        try:
            for i, layer in enumerate(self.weights.layers):
                hidden, kv = decoder_layer(self.ops, layer, hidden, caches[i] if caches else None, rope, positions)
                new.append(kv)
            self.norms = torch.stack(self.ops.norms)[:, 0]  # (norms, 1, T, 3) -> (norms, T, 3)
        finally:
            self.ops.wide, self.ops.norms = False, []
        self.sessions[session] = new
        return hidden

    def close(self, session: str) -> None:
        self.sessions.pop(session, None)


def plain_body(weights: BodyWeights) -> SharedBody:
    """The body's re-statement in float64, no shares: ``forward`` takes and returns float64 hidden states."""
    return SharedBody(weights, PlainOps())


def share(hidden: torch.Tensor, ring: Ring, randomness: Prg) -> tuple[torch.Tensor, torch.Tensor]:
    """The device's side: real hidden states -> two int64 shares (one per server), the mask from ``randomness``."""
    return share_ring(ring.encode(hidden), randomness)


def reconstruct(out0: torch.Tensor, out1: torch.Tensor, ring: Ring, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The device's side: both servers' output shares (hidden states, or norm checks) -> real values."""
    return ring.decode(reconstruct_ring(out0, out1), dtype)


class TwoPartyBody:
    """The device (sharing, reconstructing, dealing) and both parties in one process: two threads, queues.

    ``forward(hidden float (1, T, D), position, session)`` -> the body's output (float32), computed on shares.
    ``counters`` are the two parties' (rounds, bytes to and from the peer, bytes dealt by the device).
    ``wide``: every forward's norms fit any row (``SharedOps.wide``), not only after an implausible output.
    """

    def __init__(
        self,
        weights: BodyWeights,
        ring: Ring | None = None,
        seed: int | None = None,
        rest: NormPlan = SMOLLM2_REST,
        sink: NormPlan = SMOLLM2_SINK,
        timeout: float = 600.0,
        wide: bool = False,
    ) -> None:
        self.ring = ring or Ring()
        self.wide = wide
        keys = [new_key() if seed is None else key_from_seed(seed, label) for label in ("input", "party0", "party1")]
        self.randomness = Prg(keys[0])  # the input shares' masks
        c0, c1 = local_channels(timeout)
        source0, source1 = local_sources(keys[1], keys[2])
        self.parties = (Party(0, self.ring, c0, source0), Party(1, self.ring, c1, source1))
        self.bodies = tuple(SharedBody(weights, SharedOps(p, rest, sink)) for p in self.parties)
        self.timeout = timeout
        self.retries = 0

    @property
    def counters(self) -> tuple[Counter, Counter]:
        return self.parties[0].counter, self.parties[1].counter

    def forward(self, hidden: torch.Tensor, position: int, session: str = "default") -> torch.Tensor:
        """The body's output (float32); a forward whose output is implausible or whose norms missed (a row beyond
        its norm plan, a truncation wrap) is computed again, wide (``computed_again``; counted in ``retries``)."""
        out, redone = computed_again(lambda wide: self._forward(hidden, position, session, wide or self.wide))
        self.retries += redone
        return out

    def _forward(self, hidden: torch.Tensor, position: int, session: str, wide: bool) -> BodyOutput:
        s0, s1 = share(hidden, self.ring, self.randomness)
        b0, b1 = self.bodies
        out0, out1 = run_pair(
            lambda: b0.forward(s0, position, session, wide),
            lambda: b1.forward(s1, position, session, wide),
            self.timeout,
        )
        norms = reconstruct(b0.norms, b1.norms, self.ring, torch.float64)
        return BodyOutput(reconstruct(out0, out1, self.ring), norms)
