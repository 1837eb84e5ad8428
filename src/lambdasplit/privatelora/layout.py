"""Which projections of a body carry PrivateLoRA adapters, their ranks, and the cloud's frozen A and B.

PrivateLoRA (``../shared/papers/privatelora.txt``) adds ``Delta W = A M B`` to a projection ``W`` (``in x out``,
``y = x W``): ``A`` (``in x r_c2d``) and ``B`` (``r_d2c x out``) are random, frozen and held by the cloud; ``M``
(``r_c2d x r_d2c``) is trained and held by the device. Per adapted projection the cloud sends ``u = x A`` down
(``r_c2d`` values per token) and gets ``v = u M`` back (``r_d2c`` values), then adds ``v B`` to ``x W``.

Projections that read the same input (q, k and v read the attention's normed input; gate and up the MLP's) form a
*group* and travel together: one exchange per group and layer, as the paper's reference code stacks q, k and v.
With the paper's default targets (q, k, v) a layer costs one round trip of ``3 r_c2d`` values down and
``3 r_d2c`` up per token.

``A`` and ``B`` are drawn from ``seed`` with torch's CPU generator, one seed per (layer, projection), so any
process with the layout can draw them again (the cloud, and the tests' merged reference model). They carry no
private information: only ``M`` is trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lambdasplit.errors import ConfigError

#: The paper's reference code adapts the attention's query, key and value projections of every layer.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj")
DEFAULT_RANK = 32  # the paper's worked example: r_c2d = r_d2c = 32
MAX_RANK = 1024
#: Projections that read one shared input tensor, by the name HF families give them.
_SHARED_INPUT = (("q_proj", "k_proj", "v_proj", "qkv_proj"), ("gate_proj", "up_proj", "gate_up_proj"))


@dataclass(frozen=True)
class AdapterLayout:
    """Where the adapters are and how large: ``targets`` (projection names inside each decoder layer), the ranks
    ``r_c2d`` (values per token the cloud sends down per projection) and ``r_d2c`` (values sent back up), and the
    ``seed`` A and B are drawn from."""

    targets: tuple[str, ...] = DEFAULT_TARGETS
    rank_c2d: int = DEFAULT_RANK
    rank_d2c: int = DEFAULT_RANK
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"adapter targets must be distinct projection names, got {self.targets!r}")
        for rank in (self.rank_c2d, self.rank_d2c):
            if not 1 <= rank <= MAX_RANK:
                raise ConfigError(f"adapter ranks are 1 .. {MAX_RANK}, got {rank}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"the adapter seed is 0 .. 2^32 - 1, got {self.seed}")

    @classmethod
    def parse(cls, targets: str, rank: str | int, seed: int = 0) -> AdapterLayout:
        """From the command line: ``targets`` comma-separated (``q_proj,v_proj``), ``rank`` ``R`` or ``C2D/D2C``."""
        names = tuple(t.strip() for t in targets.split(",") if t.strip())
        c2d, _, d2c = str(rank).partition("/")
        try:
            return cls(names, int(c2d), int(d2c or c2d), seed)
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"an adapter rank is an integer or C2D/D2C (e.g. 32 or 32/16), got {rank!r}") from None

    def groups(self) -> list[tuple[str, ...]]:
        """The targets as exchange groups, in the order a layer runs them (projections sharing an input together)."""
        out: list[tuple[str, ...]] = []
        for siblings in _SHARED_INPUT:
            group = tuple(t for t in self.targets if t in siblings)
            if group:
                out.append(group)
        shared = {t for siblings in _SHARED_INPUT for t in siblings}
        out.extend((t,) for t in self.targets if t not in shared)
        return out

    def describe(self) -> dict[str, object]:
        """What the device and the server compare at ``open`` (JSON)."""
        return {"targets": list(self.targets), "rank_c2d": self.rank_c2d, "rank_d2c": self.rank_d2c}

    def values_per_token(self, layers: int) -> tuple[int, int]:
        """Values one token sends (down, up) over ``layers`` adapted layers: the paper's formula."""
        n = len(self.targets)
        return layers * n * self.rank_c2d, layers * n * self.rank_d2c

    def draw(self, layer: int, target: str, d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A (d_in, r_c2d) and B (r_d2c, d_out) of ``target`` in global layer ``layer``, float32 on the CPU.

        Gaussian with variances 1/d_in and 1/r_d2c: ``x A`` has about the scale of ``x``'s entries and ``v B`` of
        ``v``'s, so one learning rate suits every width.
        """
        index = self.targets.index(target)
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + layer * 1_009 + index) % 2**63)
        a = torch.randn(d_in, self.rank_c2d, generator=generator) / math.sqrt(d_in)
        b = torch.randn(self.rank_d2c, d_out, generator=generator) / math.sqrt(self.rank_d2c)
        return a, b


def find_projections(
    layer: nn.Module, layout: AdapterLayout, index: int
) -> dict[str, tuple[nn.Module, str, nn.Linear]]:
    """``target -> (parent module, attribute name, the nn.Linear)`` for every target in decoder layer ``index``."""
    found: dict[str, tuple[nn.Module, str, nn.Linear]] = {}
    linears: list[str] = []
    for name, module in layer.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        linears.append(name)
        parent_name, _, attr = name.rpartition(".")
        if attr in layout.targets:
            if attr in found:
                raise ConfigError(f"layer {index} has two projections named {attr!r}; adapt a unique name")
            found[attr] = (layer.get_submodule(parent_name), attr, module)
    missing = [t for t in layout.targets if t not in found]
    if missing:
        raise ConfigError(
            f"layer {index} has no linear projection named {', '.join(missing)}; its projections are "
            f"{', '.join(sorted({n.rpartition('.')[2] for n in linears}))}"
        )
    return found
