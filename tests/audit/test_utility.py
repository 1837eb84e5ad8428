"""Utility through the split: the plain split scores exactly as the unsplit model; noise costs what it costs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lambdasplit.audit.corpus import token_stream
from lambdasplit.audit.utility import greedy_agreement, perplexity, prefix_agreement
from lambdasplit.errors import ConfigError
from lambdasplit.models import DEFAULT_MODEL
from lambdasplit.privacy.noise import GaussianNoise
from lambdasplit.split import load_split

PROMPTS = [[1, 17, 40, 92, 5, 33, 250, 7], [1, 61, 12, 99, 140, 8, 3, 77, 21], "the quick brown fox"]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_plain_split_perplexity_equals_unsplit(tiny_checkpoint, family: str) -> None:
    path, ref = tiny_checkpoint(family)
    split = load_split(path, "1:3", device="cpu", dtype="float32")
    ids = token_stream(split.tokenizer, 512, split="heldout")
    expected = perplexity(ref, ids, window=64)
    assert perplexity(split, ids, window=64, batch=3) == pytest.approx(expected, rel=1e-4)
    split.wire_transform = GaussianNoise(1.0)
    assert perplexity(split, ids, window=64) != pytest.approx(expected, rel=1e-3)  # noise shows up here
    with pytest.raises(ConfigError, match="at least one full window"):
        perplexity(split, ids[:10], window=64)


def test_plain_split_greedy_agreement_is_one(tiny_checkpoint) -> None:
    path, ref = tiny_checkpoint("llama")
    split = load_split(path, "2:4", device="cpu", dtype="float32")
    assert greedy_agreement(split, ref, PROMPTS, max_new_tokens=12, chat=False) == 1.0
    split.wire_transform = GaussianNoise(3.0)
    assert greedy_agreement(split, ref, PROMPTS, max_new_tokens=12, chat=False) < 1.0


def test_prefix_agreement_stops_at_the_first_divergence() -> None:
    assert prefix_agreement([[1, 2, 3, 4]], [[1, 2, 3, 4]]) == 1.0
    assert prefix_agreement([[1, 2, 9, 4]], [[1, 2, 3, 4]]) == 0.5  # the 4 after the divergence is not counted
    assert prefix_agreement([[1, 2]], [[1, 2, 3, 4]]) == 0.5  # stopping early is a divergence
    assert prefix_agreement([[1, 2, 3, 4], [5]], [[1, 2, 3, 4], [6]]) == 0.8  # pooled over prompts
    assert prefix_agreement([], []) == 1.0


@pytest.mark.smollm2
def test_smollm2_split_perplexity_equals_unsplit() -> None:
    split = load_split(DEFAULT_MODEL, "2:28", device="cpu", dtype="float32", quiet=True)
    ref = AutoModelForCausalLM.from_pretrained(split.path, dtype=torch.float32).eval()
    ids = token_stream(split.tokenizer, 256, split="heldout")
    plain = perplexity(split, ids, window=128)
    assert plain == pytest.approx(perplexity(ref, ids, window=128), rel=1e-4)
    split.wire_transform = GaussianNoise(0.5)
    assert perplexity(split, ids, window=128) > 1.3 * plain  # a trained model pays for noise (about 2x)
