"""The cloud's part of PrivateLoRA: frozen A and B wrapped around a body's own projections.

``CloudAdapters(body, layout)`` replaces each target ``nn.Linear`` of the body's decoder layers by an
``AdaptedLinear`` that calls the untouched original and adds ``v B``, where ``v`` is the device's answer to
``u = x A``. The HF forward of the layer is not copied or changed: only the projection modules are wrapped,
as peft wraps them.

Who answers is the ``Exchange`` of the calling thread (``exchanging``): the server runs each session in its own
thread with that session's connection as the exchange; tests and the local reference use ``LocalExchange``.
The exchange is an autograd function: in training, backpropagating through ``v`` asks the exchange for
``dL/du`` given ``dL/dv`` (the device holds M), so the cloud's backward runs through its frozen layers, A and B.

Shapes: ``x`` (B, T, in); ``u`` (n, B, T, r_c2d) for the n projections of a group; ``v`` (n, B, T, r_d2c).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn

from lambdasplit.errors import ConfigError
from lambdasplit.privatelora.layout import AdapterLayout, find_projections
from lambdasplit.privatelora.private import PrivateAdapters
from lambdasplit.split.parts import Body


class Exchange(Protocol):
    """The device's side, as the cloud's adapters reach it."""

    def forward(self, layer: int, group: int, u: torch.Tensor) -> torch.Tensor:
        """``v`` (n, B, T, r_d2c) for ``u`` (n, B, T, r_c2d) of ``group`` in global ``layer``."""
        ...

    def backward(self, layer: int, group: int, grad_v: torch.Tensor) -> torch.Tensor:
        """``dL/du`` for ``dL/dv`` of the last training forward of ``group`` in ``layer``."""
        ...


class LocalExchange:
    """The device's adapters in this process (tests, the local reference, a fine-tuning step timed without network).

    ``keep``: forwards keep their graphs for a backward (training).
    """

    def __init__(self, adapters: PrivateAdapters, keep: bool = False) -> None:
        self.adapters, self.keep = adapters, keep
        self.exchanges = 0

    def forward(self, layer: int, group: int, u: torch.Tensor) -> torch.Tensor:
        self.exchanges += 1
        return self.adapters.answer(layer, group, u, keep=self.keep).to(u.dtype)

    def backward(self, layer: int, group: int, grad_v: torch.Tensor) -> torch.Tensor:
        self.exchanges += 1
        return self.adapters.gradient(layer, group, grad_v).to(grad_v.dtype)


class _Context:
    """One thread's exchange, and the deltas its groups computed ahead (per thread: sessions share the modules)."""

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.pending: dict[int, tuple[torch.Tensor, dict[int, torch.Tensor]]] = {}  # id(group) -> (x, slot -> delta)


_CURRENT: contextvars.ContextVar[_Context | None] = contextvars.ContextVar("privatelora_exchange", default=None)


@contextlib.contextmanager
def exchanging(exchange: Exchange) -> Iterator[None]:
    """Adapted projections run in this block (this thread) ask ``exchange``."""
    token = _CURRENT.set(_Context(exchange))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def forward_for_training(body: Body, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The body's output (1, T, D) on ``hidden`` with autograd on (no KV cache), and the input leaf that the
    backward reaches (so the graph holds every exchange even when nothing before the body is trained)."""
    assert body.model is not None
    with torch.inference_mode(False), torch.enable_grad():
        leaf = hidden.detach().clone().requires_grad_(True)  # clone: the head's output is an inference tensor
        out = body.model(inputs_embeds=leaf, use_cache=False).last_hidden_state
    return out, leaf


class _Remote(torch.autograd.Function):
    """v = exchange(u); in backward, dL/du = exchange.backward(dL/dv). The device's M is the function."""

    @staticmethod
    def forward(u: torch.Tensor, exchange: Exchange, layer: int, group: int) -> torch.Tensor:
        return exchange.forward(layer, group, u)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        _, ctx.exchange, ctx.layer, ctx.group = inputs

    @staticmethod
    def backward(ctx: Any, grad_v: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return ctx.exchange.backward(ctx.layer, ctx.group, grad_v.contiguous()), None, None, None


class Group:
    """The projections of one exchange group in one layer: their A (stacked) and B, and the deltas of the input
    being processed (computed for all projections at the first one's call, handed out at each one's)."""

    def __init__(
        self, layer: int, index: int, targets: tuple[str, ...], a: torch.Tensor, b: list[torch.Tensor]
    ) -> None:
        self.layer, self.index, self.targets = layer, index, targets
        self.a = a  # (n, in, r_c2d)
        self.b = b  # n x (r_d2c, out_t)

    def delta(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """``v_slot B_slot`` (B, T, out) for the projection at ``slot`` reading ``x`` (B, T, in).

        The group's first projection to run exchanges for all of them; its siblings, called on the same ``x``
        object (HF attention passes one tensor to q, k and v), take their deltas. A sibling called on another
        input gets an exchange of its own: more traffic, never a wrong delta.
        """
        context = _CURRENT.get()
        if context is None:
            raise ConfigError("a PrivateLoRA body runs inside `exchanging(...)`: its adapters need the device's M")
        pending = context.pending.get(id(self))
        if pending is not None and pending[0] is x and slot in pending[1]:
            delta = pending[1].pop(slot)
            if not pending[1]:
                del context.pending[id(self)]
            return delta
        u = x.unsqueeze(0) @ self.a.unsqueeze(1).to(x.dtype)  # (n, B, T, r_c2d)
        v = _Remote.apply(u, context.exchange, self.layer, self.index)
        deltas = {i: (v[i] @ b.to(v.dtype)).to(x.dtype) for i, b in enumerate(self.b)}
        delta = deltas.pop(slot)
        if deltas:
            context.pending[id(self)] = (x, deltas)
        else:
            context.pending.pop(id(self), None)
        return delta


class AdaptedLinear(nn.Module):
    """``base(x) + v B``: an untouched ``nn.Linear`` and its place in an exchange group."""

    def __init__(self, base: nn.Linear, group: Group, slot: int) -> None:
        super().__init__()
        self.base, self.slot = base, slot
        self.group = group  # not a submodule: A and B are plain tensors shared by the group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.group.delta(x, self.slot)

    def extra_repr(self) -> str:
        return f"layer={self.group.layer}, group={self.group.index}, slot={self.slot}"


class CloudAdapters:
    """A and B of ``layout`` installed in every decoder layer of ``body`` (global layers [start, stop)).

    A body with adapters needs an ``exchanging`` block around every forward; ``remove`` puts the original
    projections back.
    """

    def __init__(self, body: Body, layout: AdapterLayout) -> None:
        if body.model is None or body.num_layers == 0:
            raise ConfigError("PrivateLoRA adapts the body's layers; this body has none (X == Y)")
        self.body, self.layout = body, layout
        self.groups: list[Group] = []
        self._installed: list[tuple[nn.Module, str, nn.Linear]] = []
        layers: Any = body.model.layers
        for local, layer in enumerate(layers):
            index = body.start + local
            found = find_projections(layer, layout, index)
            for g, targets in enumerate(layout.groups()):
                shapes = [found[t][2] for t in targets]
                if len({m.in_features for m in shapes}) != 1:
                    raise ConfigError(f"layer {index}: {targets} do not read inputs of one width")
                drawn = [
                    layout.draw(index, t, m.in_features, m.out_features) for t, m in zip(targets, shapes, strict=True)
                ]
                weight = shapes[0].weight
                group = Group(
                    index,
                    g,
                    targets,
                    torch.stack([a for a, _ in drawn]).to(weight.device, weight.dtype),
                    [b.to(weight.device, weight.dtype) for _, b in drawn],
                )
                self.groups.append(group)
                for slot, t in enumerate(targets):
                    parent, attr, linear = found[t]
                    setattr(parent, attr, AdaptedLinear(linear, group, slot))
                    self._installed.append((parent, attr, linear))

    @property
    def layers(self) -> range:
        return range(self.body.start, self.body.stop)

    def remove(self) -> None:
        for parent, attr, linear in self._installed:
            setattr(parent, attr, linear)
        self._installed.clear()
