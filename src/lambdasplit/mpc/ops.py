"""The operations a decoder layer is written in, twice: on plain float64 tensors and on one party's shares.

``layer.decoder_layer`` states a Llama layer's arithmetic once, over an ``Ops``; ``PlainOps`` runs it in float64
(the test that it equals the HF layer's own forward keeps the re-statement honest), ``SharedOps`` runs it as one
party of the two-party computation. Everything else a layer does (reshapes, slicing, ``+`` of two values, ``-``,
concatenation for the KV cache) is the same torch call on both kinds of tensor: local on shares.

====================  ===========================================  ========================================
op                    plaintext                                    on shares (rounds)
====================  ===========================================  ========================================
linear(x, w, b)       x @ w.T + b                                  local: public weights (0)
scale(x, c)           x * c, c public (RoPE's cos/sin, 1/sqrt(d))  local, one truncation (0)
mul(x, y)             x * y                                        Beaver (1)
matmul(x, y)          x @ y                                        Beaver (1)
rms_norm(h, w, eps)   h * rsqrt(mean(h^2) + eps) * w               mean_square 1 + rsqrt 8+3k + mul 1
softmax(x, mask)      masked softmax over the last dim             maximum + 8 + 16 + 1; maximum 10 ceil(log4 S)
                                                                   for <= 128 rows, else 9 ceil(log2 S)
silu(x)               x * sigmoid(x)                               sign-folded SiLU (24)
====================  ===========================================  ========================================

RMSNorm's fixed point needs a public scale per row (``NormPlan``): the attention sink at position 0 carries a
mean square up to 1.1e6 on SmolLM2 (at most ~1e3 elsewhere in text; docs/secret-sharing.md), so rows at position 0
take a larger pre-shift, rsqrt scale and more Newton steps. That choice depends on the (public) position only,
never on data. Some inputs make a second sink further on (SmolLM2: an ``<|endoftext|>`` token anywhere, mean
square 3e5; some tokens right after the first, 1.5e4), beyond the position's plan: a forward whose output shows it
is computed again ``wide`` (``SharedOps.wide``), where every row takes both plans and keeps, by a comparison under
MPC, the one its mean square fits. A row beyond its plan does not always blow up (a mean square near 4,000 after
position 0 comes out with its norm negated), so every norm also keeps what the device checks it by (``norms``):
each row's mean square, its rsqrt and the plan's scale exponent, as shares; the device reconstructs them
(``body.norms_fit``) and has a forward whose rsqrt missed computed again, wide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as nnf

from lambdasplit.errors import ConfigError
from lambdasplit.mpc import functions as F
from lambdasplit.mpc.beaver import matmul, mul
from lambdasplit.mpc.compare import ltz, select
from lambdasplit.mpc.party import Party
from lambdasplit.mpc.shares import add_public, limb_matmul, limb_weight, mul_public, public_matmul, truncate


class Ops(Protocol):
    """What a decoder layer needs beyond local tensor manipulation. ``positions`` (T,) are the rows' public
    positions in the sequence. ``wide``: the body sets it for a forward whose norms must fit any row (shares only).
    ``norms``: each ``rms_norm`` since the body emptied it appends its rows' check (..., T, 3): the mean square
    (eps included), the rsqrt the norm took of it and the exponent ``s`` of the scale it was taken at, so that
    ``rsqrt * sqrt(ms / 2^s)`` is 1 for a row the norm got right (``body.norms_fit``)."""

    wide: bool
    norms: list[torch.Tensor]

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...

    def scale(self, x: torch.Tensor, c: torch.Tensor | float) -> torch.Tensor: ...

    def mul(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def matmul(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def rms_norm(self, h: torch.Tensor, weight: torch.Tensor, eps: float, positions: torch.Tensor) -> torch.Tensor: ...

    def softmax(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor: ...

    def silu(self, x: torch.Tensor) -> torch.Tensor: ...


class PlainOps:
    """The layer in float64, as HF computes it (in float32): the reference the shared computation is held to."""

    wide = False  # float64 has the range: nothing to widen

    def __init__(self) -> None:
        self.norms: list[torch.Tensor] = []

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return nnf.linear(x, weight, bias)

    def scale(self, x: torch.Tensor, c: torch.Tensor | float) -> torch.Tensor:
        return x * c

    def mul(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x * y

    def matmul(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x @ y

    def rms_norm(self, h: torch.Tensor, weight: torch.Tensor, eps: float, positions: torch.Tensor) -> torch.Tensor:
        ms = h.pow(2).mean(-1, keepdim=True) + eps
        inv = torch.rsqrt(ms)
        self.norms.append(torch.cat([ms, inv, torch.zeros_like(ms)], -1))
        return h * inv * weight

    def softmax(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return (x if mask is None else x.masked_fill(~mask, float("-inf"))).softmax(-1)

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        return nnf.silu(x)


@dataclass(frozen=True)
class NormPlan:
    """Public fixed-point parameters of RMSNorm for one kind of row (docs/secret-sharing.md, "Parameters chosen").

    ``pre_shift``: bits h is divided by before its squares are summed (keeps the untruncated sum below 2^47).
    ``scale_bits`` (even): rsqrt computes 1/sqrt(ms / 2^scale_bits), valid for that in [0.2, 125] at 3
    ``iterations`` and [0.005, 195] at 8 (``functions.rsqrt``); the factor 2^(-scale_bits / 2) is then applied to
    h * w by a truncation, which is exact where an encoded 1/sqrt(scale) would lose 1e-3 at the sink's 2^-6.
    """

    pre_shift: int
    scale_bits: int
    iterations: int

    def __post_init__(self) -> None:
        if self.scale_bits % 2 or self.scale_bits < 0:
            raise ConfigError(f"scale_bits must be even and >= 0 (its square root is a shift), got {self.scale_bits}")


#: SmolLM2-135M at 2:28: mean square [3.6, 987] at positions > 0 (/16: [0.23, 62]); [28, 1.1e6] at position 0,
#: the attention sink (/2^14: [0.0017, 67], where the guess + 10 Newton steps converge to float precision; the
#: guess goes negative above ~200). Pre-shift 8 bits keeps 576 * 1.1e6 * 2^(2 (16 - 8)) below 2^47; 12 would
#: leave h = 8 with 128 units (a 2e-3 error of the norm that the sink's massive MLP output multiplies).
SMOLLM2_REST = NormPlan(pre_shift=2, scale_bits=4, iterations=3)
SMOLLM2_SINK = NormPlan(pre_shift=8, scale_bits=14, iterations=10)


class SharedOps:
    """One party's side of every op: its ``Party`` (ring, peer link, dealer feed) and the public weights, encoded
    once and kept (transposed for ``public_matmul``). ``encoded``: a cache of those to share between the sessions
    of one server (the encodings are the same for every party and session).

    ``wide`` (set per forward, the same on both parties): every RMSNorm row takes ``rest``'s plan where its mean
    square is below ``16 * 2^rest.scale_bits`` (256 for SmolLM2, well inside both plans' ranges) and ``sink``'s
    above, whatever its position; which one a row took stays secret (``rms_norm``). ``norms``: shares of each norm
    row's check (``Ops``), for the device; the scale exponent is a public value as a share (party 0 holds it) or,
    wide, the picked plan's, picked with the row."""

    def __init__(
        self,
        party: Party,
        rest: NormPlan = SMOLLM2_REST,
        sink: NormPlan = SMOLLM2_SINK,
        encoded: dict[int, tuple[torch.Tensor, torch.Tensor, bool]] | None = None,
    ) -> None:
        self.party, self.rest, self.sink = party, rest, sink
        self._encoded = {} if encoded is None else encoded
        self.wide = False
        self.norms: list[torch.Tensor] = []

    def _weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``encode(weight).T`` (in, out), made once per weight tensor (keyed by identity; the tensor is kept): in
        float64 for ``limb_matmul`` where its entries are small enough (True), else in int64 (False)."""
        kept = self._encoded.get(id(weight))
        if kept is None or kept[0] is not weight:
            encoded = self.party.ring.encode(weight).T.contiguous()
            limbs = limb_weight(encoded)
            kept = (weight, encoded, False) if limbs is None else (weight, limbs, True)
            self._encoded[id(weight)] = kept
        return kept[1], kept[2]

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        p = self.party
        w, limbs = self._weight(weight)
        out = truncate(p, limb_matmul(x, w) if limbs else public_matmul(x, w), p.ring.frac_bits)
        return out if bias is None else add_public(p, out, p.ring.encode(bias))

    def scale(self, x: torch.Tensor, c: torch.Tensor | float) -> torch.Tensor:
        return mul_public(self.party, x, c)

    def mul(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return mul(self.party, x, y)

    def matmul(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return matmul(self.party, x, y)

    def rms_norm(self, h: torch.Tensor, weight: torch.Tensor, eps: float, positions: torch.Tensor) -> torch.Tensor:
        """h (..., T, D) -> h * rsqrt(mean(h^2) + eps) * weight, rows at position 0 with ``sink``'s plan (``wide``:
        each row with the plan its mean square fits)."""
        if self.wide:
            return self._wide_norm(h, weight, eps)
        p = self.party
        sink = (positions == 0).unsqueeze(-1)  # (T, 1), public
        pre_shift = torch.where(sink, torch.tensor(self.sink.pre_shift), torch.tensor(self.rest.pre_shift))
        scale_bits = torch.where(sink, torch.tensor(self.sink.scale_bits), torch.tensor(self.rest.scale_bits))
        iterations = self.sink.iterations if bool(sink.any()) else self.rest.iterations
        ms = add_public(p, F.mean_square(p, h, pre_shift), p.ring.encode(eps))
        scale = torch.pow(2.0, scale_bits.to(torch.float64))
        inv = F.rsqrt(p, ms, iterations, scale, apply_scale=False)  # 1 / sqrt(ms / scale), (..., T, 1)
        self.norms.append(torch.cat([ms, inv, self._public(scale_bits, ms)], -1))
        weighted = truncate(p, mul_public(p, h, weight), scale_bits // 2)  # h * w / sqrt(scale)
        return mul(p, weighted, inv.expand_as(h).contiguous())

    def _public(self, values: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
        """This party's share of public ``values`` (broadcast to ``like``, a share): party 0 holds them, encoded;
        party 1 holds 0."""
        encoded = self.party.ring.encode(torch.as_tensor(values, dtype=torch.float64, device=like.device))
        return add_public(self.party, torch.zeros_like(like), encoded.expand_as(like))

    def _wide_norm(self, h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm with both plans on every row, side by side (each with its own pre-shift, the Newton steps of
        the plan that takes more), and each row's result picked by ``ms < threshold`` (a comparison on the mean
        square under the sink's pre-shift, which keeps any row's sum of squares from wrapping; then a select,
        exact: the pick is a secret bit, and the branch not picked, garbage or not, adds exactly 0).
        Rounds: 1 + rsqrt (the larger plan's) + 1 + 8 + 1, against the position plan's 1 + rsqrt + 1. Each row's
        check (``norms``) is picked with it, in the same select."""
        p, rest, sink = self.party, self.rest, self.sink
        shifts = torch.tensor([rest.pre_shift, sink.pre_shift]).view(2, *([1] * h.dim()))
        ms = add_public(p, F.mean_square(p, torch.stack([h, h]), shifts), p.ring.encode(eps))  # (2, ..., T, 1)
        scale = torch.tensor([2.0**rest.scale_bits, 2.0**sink.scale_bits], dtype=torch.float64)
        iterations = max(rest.iterations, sink.iterations)
        inv = F.rsqrt(p, torch.cat([ms[0], ms[1]], -1), iterations, scale, apply_scale=False)  # (..., T, 2)
        weighted = mul_public(p, h, weight)
        normed = mul(
            p,
            torch.stack([truncate(p, weighted, rest.scale_bits // 2), truncate(p, weighted, sink.scale_bits // 2)]),
            torch.stack([inv[..., :1].expand_as(h), inv[..., 1:].expand_as(h)]).contiguous(),
        )
        threshold = 16.0 * 2.0**rest.scale_bits
        small = ltz(p, add_public(p, ms[1], p.ring.encode(-threshold)))  # bit share: the row takes rest's plan
        bits = [self._public(float(plan.scale_bits), ms[1]) for plan in (rest, sink)]
        # each row's check is picked with it: one select over (..., T, D + 3)
        picked = select(
            p,
            small,
            torch.cat([normed[0], ms[0], inv[..., :1], bits[0]], -1),
            torch.cat([normed[1], ms[1], inv[..., 1:], bits[1]], -1),
        )
        self.norms.append(picked[..., -3:])
        return picked[..., :-3]

    def softmax(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return F.softmax(self.party, x, mask=mask)

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.party, x)
