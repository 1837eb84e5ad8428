"""What a defence costs the user: perplexity and greedy agreement measured through the split.

Both run the split exactly as a device would, ``wire_transform`` included (head -> encode -> body ->
decode -> tail), so a defence that perturbs the states (noise) shows its price here, and an exact one
(a permutation matched by the body's weights) shows none. Either function also takes the unsplit HF model,
the reference the split is compared against.

Shapes: ``B`` windows in a batch, ``T`` window length, ``V`` vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from lambdasplit.errors import ConfigError
from lambdasplit.generation.api import Prompt, prompt_ids
from lambdasplit.generation.generate import Generation
from lambdasplit.generation.sampling import SamplingParams
from lambdasplit.generation.session import Decoder, LocalBodyLink, ModelDecoder, SplitDecoder
from lambdasplit.split.loader import SplitModel

Model = SplitModel | PreTrainedModel


@torch.inference_mode()
def window_logits(model: Model, ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of every position of the windows ``ids`` (B, T), in one forward with no cache."""
    if isinstance(model, PreTrainedModel):
        return model(input_ids=ids.to(model.device)).logits.float()
    if model.head is None or model.body is None or model.tail is None:
        raise ConfigError("measuring utility through a split needs its head, body and tail in this process")
    transform = model.wire_transform
    hidden = model.head(ids.to(model.runtime.device))  # (B, T, D)
    hidden = model.body(hidden if transform is None else transform.encode(hidden))
    hidden = hidden if transform is None else transform.decode(hidden)
    return model.tail(hidden, logits_to_keep=ids.shape[1]).float()  # every position, not only the last


@torch.inference_mode()
def perplexity(model: Model, text_ids: torch.Tensor, *, window: int = 256, batch: int = 4) -> float:
    """exp(mean next-token NLL) over ``text_ids`` (1-D) cut into non-overlapping windows of ``window`` tokens.

    Each window is scored from its own start (its first token is context only); a shorter last piece is
    dropped. Windows are independent, so the figure depends on ``window`` but not on ``batch``.
    """
    ids = text_ids.reshape(-1)
    n = ids.numel() // window
    if window < 2 or n == 0:
        raise ConfigError(f"need window >= 2 and at least one full window, got window={window}, {ids.numel()} ids")
    windows = ids[: n * window].view(n, window)
    total, count = 0.0, 0
    for part in windows.split(batch):
        logits = window_logits(model, part)[:, :-1]  # (B, T - 1, V): position t predicts token t + 1
        target = part[:, 1:].to(logits.device)
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")
        total, count = total + float(nll), count + target.numel()
    return math.exp(total / count)


def _decoder(model: Model) -> Decoder:
    if isinstance(model, PreTrainedModel):
        return ModelDecoder(model)
    if model.body is None:
        raise ConfigError("greedy agreement through a split needs its body in this process")
    return SplitDecoder(model, LocalBodyLink(model.body))


def greedy_tokens(model: Model, ids: Sequence[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy continuation of the token ids ``ids`` (stops at ``eos`` or after ``max_new_tokens``)."""
    params = SamplingParams(max_new_tokens=max_new_tokens)
    return Generation(_decoder(model), list(ids), params, eos_token_ids=eos).run().token_ids


def prefix_agreement(outputs: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> float:
    """Fraction of output tokens equal to the reference's, counted up to each pair's first divergence.

    Per pair: the common prefix's length over the longer output's length (tokens after a divergence
    follow a different context, so they are not compared); lengths are summed over pairs before dividing.
    1.0: token-identical outputs everywhere.
    """
    if len(outputs) != len(references):
        raise ConfigError(f"{len(outputs)} outputs but {len(references)} references")
    same = total = 0
    for a, b in zip(outputs, references, strict=True):
        prefix = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        same, total = same + prefix, total + max(len(a), len(b))
    return same / total if total else 1.0


def greedy_agreement(
    split: SplitModel, reference: Model, prompts: Sequence[Prompt], *, max_new_tokens: int = 32, chat: bool = True
) -> float:
    """``prefix_agreement`` of the split's greedy outputs for ``prompts`` with ``reference``'s (same token ids in)."""
    eos = split.eos_token_ids()
    ids = [prompt_ids(split, prompt, chat=chat) for prompt in prompts]
    outputs = [greedy_tokens(split, i, max_new_tokens, eos) for i in ids]
    return prefix_agreement(outputs, [greedy_tokens(reference, i, max_new_tokens, eos) for i in ids])
