"""Shared pieces of the PrivateLoRA tests: a tiny model's device and cloud parts, random M, the references."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from lambdasplit.privatelora import AdapterLayout, PrivateAdapters
from lambdasplit.privatelora.layout import find_projections

TIMEOUT = 5.0  # every wait in these tests: a failure surfaces within this, not as a hang
LAYOUT = AdapterLayout(rank_c2d=8, rank_d2c=6, seed=7)


def random_adapters(layout: AdapterLayout, layers: range, seed: int = 0, scale: float = 0.5) -> PrivateAdapters:
    """M drawn at random (an untrained M is zero and would hide a wrong A, B or order)."""
    adapters = PrivateAdapters(layout, layers)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return adapters


class _Reference(nn.Module):
    """``base(x) + x A M B`` with M a plain leaf: the adapter computed by ordinary autograd in one process."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, m: nn.Parameter, b: torch.Tensor) -> None:
        super().__init__()
        self.base, self.a, self.m, self.b = base, a, m, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.a @ self.m @ self.b


def autograd_reference(
    model: PreTrainedModel, adapters: PrivateAdapters
) -> tuple[PreTrainedModel, dict[str, nn.Parameter]]:
    """A copy of ``model`` whose adapted projections compute ``x W + x A M B`` with their own leaf M (same values):
    (the model, ``"layer.target" -> M``)."""
    model = copy.deepcopy(model)
    model.requires_grad_(False)
    leaves: dict[str, nn.Parameter] = {}
    layers: Any = model.base_model.layers
    for index in adapters.layers:
        for target, (parent, attr, linear) in find_projections(layers[index], adapters.layout, index).items():
            a, b = adapters.layout.draw(index, target, linear.in_features, linear.out_features)
            m = nn.Parameter(adapters.matrix(index, target).detach().clone())
            leaves[f"{index}.{target}"] = m
            setattr(parent, attr, _Reference(linear, a, m, b))
    return model, leaves
