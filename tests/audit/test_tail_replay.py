"""B1: the public tail replayed on the downlink reproduces every greedy output token."""

from __future__ import annotations

import pytest
from attack_cases import NEW_TOKENS, smollm2, smollm2_chat, tiny_prompt

from lambdasplit.audit.attacks.tail_replay import tail_replay
from lambdasplit.privacy import intercept
from lambdasplit.split import load_split
from tiny_models import NUM_LAYERS


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])  # tied head; sliding window; soft-capped logits
@pytest.mark.parametrize("points", [(1, 2), (2, NUM_LAYERS - 1), (2, NUM_LAYERS)])  # tail of 3, 1 and 0 layers
def test_tiny_models_greedy_output_recovered(tiny_checkpoint, family: str, points: tuple[int, int]) -> None:
    path, _ = tiny_checkpoint(family)
    split = load_split(path, points)
    item = intercept(split, tiny_prompt(), max_new_tokens=12)  # past the sliding window (8)
    [result] = tail_replay(split, [item])
    assert result.side == "output" and result.exact, result


def test_missing_tail_is_an_error(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("llama")
    split = load_split(path, (1, 3))
    item = intercept(split, tiny_prompt(), max_new_tokens=2)
    with pytest.raises(ValueError, match="must hold its tail"):
        tail_replay(load_split(path, (1, 3), parts=["head", "body"]), [item])


@pytest.mark.smollm2
def test_smollm2_greedy_output_recovered() -> None:
    split = smollm2("2:28")
    item = smollm2_chat("2:28")
    assert len(item.output_ids) == NEW_TOKENS
    [result] = tail_replay(split, [item])
    assert result.exact, result
