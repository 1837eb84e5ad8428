"""A2: lone-token head states read each uplink row; exact at X = 0, most tokens at X = 1 on SmolLM2."""

from __future__ import annotations

import pytest
import torch
from attack_cases import smollm2, smollm2_chat, tiny_prompt

from lambdasplit.audit.attacks.nearest_neighbour import context_free_table, context_free_tables, nearest_neighbour
from lambdasplit.privacy import intercept
from lambdasplit.split import load_split


def test_embedding_only_head_is_read_exactly(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("gemma")  # the embedding is scaled inside the module: the table must include it
    split = load_split(path, (0, 3))
    item = intercept(split, tiny_prompt(), max_new_tokens=4)
    for side in ("prompt", "output"):
        [result] = nearest_neighbour(split, [item], side=side, top_k=3)
        assert result.exact, side
        assert [row[0] for row in result.details["top_k"]] == result.recovered
        assert all(len(row) == 3 for row in result.details["top_k"])


def test_lone_token_state_does_not_depend_on_its_position(tiny_checkpoint) -> None:
    """Why one table serves every position: with rotary embeddings a lone token's state is position-free."""
    path, _ = tiny_checkpoint("llama")
    split = load_split(path, (2, 4))
    table = context_free_table(split)
    assert split.head is not None and split.head.model is not None
    ids = torch.tensor([[7], [100], [250]])
    with torch.inference_mode():
        moved = split.head.model(input_ids=ids, position_ids=torch.full((3, 1), 37)).last_hidden_state[:, 0]
    torch.testing.assert_close(moved, table[ids[:, 0]], rtol=1e-5, atol=1e-5)
    assert sorted(context_free_tables(split)) == [1, 2]
    assert context_free_tables(split) is context_free_tables(split)  # built once per head


def test_bad_depth_and_missing_head_are_errors(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("llama")
    split = load_split(path, (2, 4))
    item = intercept(split, tiny_prompt(), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"depth must be one of \[1, 2\]"):
        nearest_neighbour(split, [item], depth=3)
    with pytest.raises(ValueError, match="must hold its head"):
        nearest_neighbour(load_split(path, (2, 4), parts=["body"]), [item])


@pytest.mark.smollm2
def test_smollm2_one_head_layer_reads_most_of_the_prompt() -> None:
    split = smollm2("1:28")
    [result] = nearest_neighbour(split, [smollm2_chat("1:28")])
    assert result.token_accuracy > 0.6, result  # measured 0.84 (0.79 on a 58-token chat)
