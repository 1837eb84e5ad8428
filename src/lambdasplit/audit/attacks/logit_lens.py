"""B2: the logit lens, final norm and LM head straight on the downlink, skipping the tail's layers.

From nostalgebraist, "interpreting GPT: the logit lens" (2020): a residual stream read through the
model's own unembedding already ranks the next token well in the upper layers. It is the attack that
needs no tail layers at all, so it bounds what a cloud learns from its own output when it does not
bother to run the public tail (B1). Top-1 of the output tokens; top-k in ``details``.

Shapes: ``P`` prompt length, ``G`` generated tokens, ``D`` hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from lambdasplit.audit.attacks.result import AttackResult
from lambdasplit.audit.attacks.tail_replay import public_tail
from lambdasplit.privacy.intercept import Intercept
from lambdasplit.split.loader import SplitModel


@torch.inference_mode()
def lens_logits(public: SplitModel, states: torch.Tensor) -> torch.Tensor:
    """(T, V) float32 logits of the final norm and LM head applied to ``states`` (T, D)."""
    model = public_tail(public).model
    assert model is not None
    hidden = states.to(public.runtime.device, public.runtime.dtype)
    norm = cast(nn.Module, model.base_model.norm)  # nn.Module.__getattr__ is typed Tensor | Module
    return model.get_output_embeddings()(norm(hidden)).float()


def logit_lens(public: SplitModel, intercepts: Sequence[Intercept], *, top_k: int = 5) -> list[AttackResult]:
    """Read each generated token as the lens's argmax at the row before it; one result per intercept.

    ``details["top_k_accuracy"]``: the fraction of output tokens among the lens's ``top_k``.
    """
    results = []
    for item in intercepts:
        start = time.perf_counter()
        p = item.prompt_length
        logits = lens_logits(public, item.downlink[p - 1 :])  # (G, V): row i predicts output token i
        seconds = time.perf_counter() - start
        target = list(item.output_ids)
        top = logits.topk(top_k, dim=-1).indices.cpu()
        within = sum(t in row for t, row in zip(target, top.tolist(), strict=False))
        results.append(
            AttackResult(
                attack="logit_lens",
                side="output",
                recovered=top[:, 0].tolist(),
                target=target,
                seconds=seconds,
                details={"top_k": top_k, "top_k_accuracy": within / len(target) if target else 1.0},
            )
        )
    return results
