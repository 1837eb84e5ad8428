"""B2: final norm and LM head straight on the downlink: exact with no tail layers, partial with some."""

from __future__ import annotations

import pytest
from attack_cases import smollm2, smollm2_chat, tiny_prompt

from lambdasplit.audit.attacks.logit_lens import logit_lens
from lambdasplit.privacy import intercept
from lambdasplit.split import load_split
from tiny_models import NUM_LAYERS


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_no_tail_layers_makes_the_lens_the_tail(tiny_checkpoint, family: str) -> None:
    path, _ = tiny_checkpoint(family)
    split = load_split(path, (1, NUM_LAYERS))
    item = intercept(split, tiny_prompt(), max_new_tokens=8)
    [result] = logit_lens(split, [item])
    assert result.exact and result.details["top_k_accuracy"] == 1.0


@pytest.mark.smollm2
def test_smollm2_two_skipped_layers_leave_part_of_the_output_readable() -> None:
    split = smollm2("2:28")
    [result] = logit_lens(split, [smollm2_chat("2:28")], top_k=5)
    # Measured 0.25 (top-5: 0.81); 0.5 (0.69) on a 58-token chat.
    assert 0.1 < result.token_accuracy < 1.0, result
    assert result.details["top_k_accuracy"] > 0.5
