"""B3: sampled tokens, which the tail's argmax misses, are confirmed exactly on the next uplink row."""

from __future__ import annotations

import pytest
from attack_cases import smollm2, smollm2_chat, tiny_prompt

from lambdasplit.audit.attacks.sampled_tokens import sampled_tokens
from lambdasplit.audit.attacks.tail_replay import tail_replay
from lambdasplit.privacy import intercept
from lambdasplit.split import load_split


@pytest.mark.parametrize("points", [(0, 3), (2, 4)])
def test_tiny_sampled_output_recovered(tiny_checkpoint, points: tuple[int, int]) -> None:
    path, _ = tiny_checkpoint("llama")
    split = load_split(path, points)
    item = intercept(split, tiny_prompt(), max_new_tokens=10, temperature=1.0, seed=3)
    [result] = sampled_tokens(split, [item])  # the prompt prefix recovered by A1 first
    fed = len(item.output_ids) - 1
    assert result.recovered[:fed] == item.output_ids[:fed]
    assert result.details["misses"] == [] and result.details["prompt_misses"] == []
    assert result.details["unconfirmed"] == [fed]
    [given] = sampled_tokens(split, [item], prompts=[item.prompt_ids])
    assert given.recovered == result.recovered


def test_prompts_must_pair_with_intercepts(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("llama")
    split = load_split(path, (1, 3))
    item = intercept(split, tiny_prompt(), max_new_tokens=2)
    with pytest.raises(ValueError, match="got 2 prompts for 1 intercepts"):
        sampled_tokens(split, [item], prompts=[[1], [2]])


@pytest.mark.smollm2
def test_smollm2_sampled_output_recovered() -> None:
    split = smollm2("2:28")
    item = smollm2_chat("2:28", temperature=1.0)
    [replayed] = tail_replay(split, [item])
    assert not replayed.exact, "the sampled output should differ from the argmax, or this test shows nothing"
    [result] = sampled_tokens(split, [item])
    fed = len(item.output_ids) - 1
    assert result.recovered[:fed] == item.output_ids[:fed], result.details
    assert result.details["misses"] == []
