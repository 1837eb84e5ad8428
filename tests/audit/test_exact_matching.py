"""A1: exact matching with the public head recovers every fed token; a non-matching uplink gives no hit."""

from __future__ import annotations

import pytest
import torch
from attack_cases import smollm2, smollm2_chat, tiny_prompt

from lambdasplit.audit.attacks.exact_matching import Ranking, exact_matching
from lambdasplit.privacy import Intercept, intercept
from lambdasplit.split import load_split


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma"])  # GQA; sliding window (8 < 24 positions)
@pytest.mark.parametrize("points", [(0, 3), (1, 4), (2, 3)])
def test_tiny_models_prompt_and_output_recovered(tiny_checkpoint, family: str, points: tuple[int, int]) -> None:
    path, _ = tiny_checkpoint(family)
    split = load_split(path, points)
    item = intercept(split, tiny_prompt(), max_new_tokens=5)
    [prompt] = exact_matching(split, [item])
    assert prompt.exact and prompt.details["misses"] == []
    [output] = exact_matching(split, [item], side="output")
    assert output.target == item.output_ids[:-1]  # the last token is never fed back
    assert output.exact and output.details["prompt_recovered"] == item.prompt_ids


def test_random_uplink_has_no_exact_match_in_the_whole_vocabulary(tiny_checkpoint) -> None:
    """Negative control: states no token sequence produced match nothing, though every id is tried."""
    path, _ = tiny_checkpoint("llama")
    split = load_split(path, (1, 4))
    item = intercept(split, tiny_prompt(8), max_new_tokens=2)
    fake = torch.randn_like(item.uplink) * item.uplink.std()
    [result] = exact_matching(split, [Intercept(item.prompt_ids, item.output_ids, fake, item.downlink)])
    assert result.details["misses"] == list(range(8))
    assert result.details["tried"] == [320] * 8


def test_bad_budget_is_an_error(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("llama")
    split = load_split(path, (1, 4))
    item = intercept(split, tiny_prompt(4), max_new_tokens=1)
    with pytest.raises(ValueError, match="max_candidates must be >= 1, got 16, 1024, 0"):
        exact_matching(split, [item], max_candidates=0)


@pytest.mark.parametrize(("wire", "dtype"), [("bfloat16", torch.bfloat16), ("int8", torch.int8)])
def test_tolerance_follows_the_wire_dtype(tiny_checkpoint, wire: str, dtype: torch.dtype) -> None:
    path, _ = tiny_checkpoint("llama")
    split = load_split(path, (2, 4))
    item = intercept(split, tiny_prompt(), max_new_tokens=2, wire_dtype=wire)
    [strict] = exact_matching(split, [item], max_candidates=16)
    assert strict.details["misses"], "a state rounded on the wire is not float32-exact"
    [loose] = exact_matching(split, [item], side="output", wire_dtype=dtype)
    assert loose.exact and loose.details["prompt_recovered"] == item.prompt_ids


def test_ranking_interleaves_rows_after_the_lead_without_repeats() -> None:
    a = torch.tensor([0.9, 0.8, 0.1, 0.0, 0.5])  # order 0 1 4 2 3
    b = torch.tensor([0.0, 0.7, 0.1, 0.9, 0.2])  # order 3 1 4 2 0
    ranking = Ranking([a, b], lead=torch.tensor([2]))
    assert ranking.first(10).tolist() == [2, 0, 3, 1, 4]
    assert ranking.first(3).tolist() == [2, 0, 3]


@pytest.mark.smollm2
@pytest.mark.parametrize("layers", ["1:28", "2:28"])
def test_smollm2_chat_prompt_recovered_exactly(layers: str) -> None:
    split = smollm2(layers)
    item = smollm2_chat(layers)
    [result] = exact_matching(split, [item])
    assert result.exact, (result.details["misses"], result.token_accuracy)
    assert split.tokenizer is not None and "4812" in split.tokenizer.decode(result.recovered)


@pytest.mark.smollm2
def test_smollm2_fed_back_output_recovered_and_a_perturbed_row_missed() -> None:
    split = smollm2("2:28")
    item = smollm2_chat("2:28")
    [result] = exact_matching(split, [item], side="output")
    assert result.exact and len(result.recovered) == len(item.output_ids) - 1
    # One prompt row nudged by 1% of its scale: that position has no exact match any more. The closest
    # candidate (still the right token) goes into the prefix, so the next position matches again.
    uplink = item.uplink.clone()
    noise = torch.randn(uplink.shape[1], generator=torch.Generator().manual_seed(0))
    uplink[10] += 0.01 * uplink[10].abs().max() * noise
    nudged = Intercept(item.prompt_ids[:12], [], uplink[:12], item.downlink[:12])
    [missed] = exact_matching(split, [nudged], max_candidates=64)
    assert missed.details["misses"] == [10]
    assert missed.recovered == item.prompt_ids[:12]
