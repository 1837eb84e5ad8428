"""B1: the public tail replayed on the downlink gives the generated tokens.

The downlink carries the state after layer Y-1 of every position; the tail that turns it into logits
(layers [Y, N), final norm, LM head) is public. The attacker runs a copy of it frame by frame, as the
device does (the prefill frame, then one row per decode step, with a KV cache), and reads the argmax.
This is the "model completion" of split-learning attacks (Fu et al., "Label Inference Attacks Against
Vertical Federated Learning", USENIX Security 2022) with nothing left to learn: under greedy decoding it
is the device's own computation, so it recovers every generated token.

For position ``i`` the logits predict token ``i + 1``: the output tokens are the predictions at
positions P-1 .. P+G-2 (the prefill's last row, then each fed token's row).

Shapes: ``P`` prompt length, ``G`` generated tokens, ``D`` hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from lambdasplit.audit.attacks.result import AttackResult
from lambdasplit.privacy.intercept import Intercept
from lambdasplit.split.loader import SplitModel
from lambdasplit.split.parts import Tail


def public_tail(public: SplitModel) -> Tail:
    """The attacker's tail; an error that says what to load when it is missing."""
    if public.tail is None:
        raise ValueError(f"the attacker's public model {public.name!r} must hold its tail (load all three parts)")
    return public.tail


@torch.inference_mode()
def replay_logits(public: SplitModel, downlink: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """(G, V) float32 tail logits for each generated token, from ``downlink`` (P + G - 1, D).

    Frames as on the link: rows [0, P) at once (keeping the last row's logits), then one row per step.
    """
    tail = public_tail(public)
    rows = downlink.to(public.runtime.device, public.runtime.dtype)[None]  # (1, P + G - 1, D)
    if rows.shape[1] < prompt_length or prompt_length < 1:
        raise ValueError(f"downlink has {rows.shape[1]} rows; need at least the prompt's {prompt_length}")
    cache = tail.new_cache()
    if cache is None:  # no tail layers: each row is read on its own
        return tail(rows[:, prompt_length - 1 :], logits_to_keep=0)[0].float()
    logits = [tail(rows[:, :prompt_length], cache)[0, -1]]
    logits += [tail(rows[:, i : i + 1], cache)[0, -1] for i in range(prompt_length, rows.shape[1])]
    return torch.stack(logits).float()


def tail_replay(public: SplitModel, intercepts: Sequence[Intercept]) -> list[AttackResult]:
    """Recover the generated tokens from each intercept's downlink; one result per intercept."""
    results = []
    for item in intercepts:
        start = time.perf_counter()
        logits = replay_logits(public, item.downlink, item.prompt_length)
        results.append(
            AttackResult(
                attack="tail_replay",
                side="output",
                recovered=logits.argmax(dim=-1).tolist(),
                target=list(item.output_ids),
                seconds=time.perf_counter() - start,
            )
        )
    return results
