"""Merge a device's adapters into a whole model: ``W + A M B`` in place, the model the split run must equal.

A device that holds the whole model (offline use, or the tests' reference) can fold its private ``M`` into the
weights once: A and B are drawn again from the layout's seed. The result is an ordinary HF model.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from lambdasplit.privatelora.layout import find_projections
from lambdasplit.privatelora.private import PrivateAdapters


@torch.no_grad()
def merge_into(model: PreTrainedModel, adapters: PrivateAdapters) -> PreTrainedModel:
    """Add ``(A M B)^T`` to the weight of every adapted projection of ``model`` (a whole causal LM); returns it.

    ``nn.Linear`` stores ``W^T`` (out, in), so the paper's ``Delta W = A M B`` (in, out) is added transposed.
    """
    layers: Any = model.base_model.layers
    for index in adapters.layers:
        found = find_projections(layers[index], adapters.layout, index)
        for target, (_, _, linear) in found.items():
            a, b = adapters.layout.draw(index, target, linear.in_features, linear.out_features)
            m = adapters.matrix(index, target).detach().cpu()
            linear.weight += (a @ m @ b).T.to(linear.weight.device, linear.weight.dtype)
    return model
