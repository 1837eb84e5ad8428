"""Shared, cached inputs for the attack tests: SmolLM2 splits and their intercepted conversations.

Loaded once per test process (``functools.cache``), so each split's public head builds its
nearest-neighbour table once for all attack tests. The attacker's public model is a fresh load of the
same weights at the same split points; with no defence that is the victim's own ``SplitModel`` (the
attacks keep their own KV caches), which saves a load per split.
"""

from __future__ import annotations

import functools

import torch

from lambdasplit.models import DEFAULT_MODEL
from lambdasplit.privacy import Intercept, intercept
from lambdasplit.split import SplitModel, load_split

#: A short chat (44 tokens with SmolLM2's template and default system prompt) holding a secret.
CHAT = [{"role": "user", "content": "My PIN is 4812 and my name is Alice."}]
NEW_TOKENS = 16


@functools.cache
def smollm2(layers: str) -> SplitModel:
    return load_split(DEFAULT_MODEL, layers, device="cpu", dtype="float32", quiet=True)


@functools.cache
def smollm2_chat(layers: str, temperature: float = 0.0) -> Intercept:
    """The chat on the victim's split; sampled (seed 0) when ``temperature`` > 0."""
    sampling = {"temperature": temperature, "seed": 0} if temperature else {}
    return intercept(smollm2(layers), CHAT, chat=True, max_new_tokens=NEW_TOKENS, **sampling)


def tiny_prompt(length: int = 20, seed: int = 1) -> list[int]:
    """Random token ids (no specials), longer than the tiny sliding windows (8)."""
    return torch.randint(3, 320, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
