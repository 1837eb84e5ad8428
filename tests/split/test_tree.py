"""Token trees (``split.tree``): a block of rows under a tree mask computes each row as its path fed as a chain would,
in the unsplit model and in every part of a split; keeping a branch leaves every cache as that chain would have."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from lambdasplit.errors import SessionError
from lambdasplit.generation import LocalBodyLink, ModelDecoder, SplitDecoder
from lambdasplit.split import load_split
from lambdasplit.split.parts import with_cache
from lambdasplit.split.state import BodyState
from lambdasplit.split.tree import (
    MAX_TREE_ROWS,
    aside_mask,
    check_tree,
    is_chain,
    keep_rows,
    path_to,
    supports_trees,
    tree_inputs,
)
from tiny_models import NUM_LAYERS

PROMPT = [1, 17, 42, 99, 7, 31]
#: Row 0 is the last token; 1 and 3 follow it, 2 and 5 follow 1, 4 follows 3.
PARENTS = [-1, 0, 1, 0, 3, 1]
TOKENS = [64, 12, 5, 9, 250, 33]


def test_tree_shapes_are_checked_and_walked() -> None:
    assert check_tree(PARENTS) == [0, 1, 2, 1, 2, 2]
    assert path_to(PARENTS, 4) == [0, 3, 4] and path_to(PARENTS, 0) == [0]
    assert is_chain([-1, 0, 1]) and not is_chain(PARENTS)
    bad = {
        "non-empty": [],
        "root": [0, 0],
        "earlier row": [-1, 0, 2],
        "earlier row ": [-1, -1],
        "at most": [-1, *range(MAX_TREE_ROWS)],
    }
    for message, parents in bad.items():
        with pytest.raises(SessionError, match=message.strip()) as info:
            check_tree(parents)
        assert info.value.code == "bad_tree"
    with pytest.raises(SessionError, match="has 3 rows and the FORWARD 2"):
        check_tree([-1, 0, 0], 2)


def test_the_tree_mask_lets_a_row_see_the_cache_and_its_own_path() -> None:
    mask, positions = tree_inputs(PARENTS, 3, torch.float32, "cpu")
    assert mask.shape == (1, 1, 6, 9) and positions.tolist() == [[3, 4, 5, 4, 5, 5]]
    seen = (mask[0, 0] == 0).int()
    assert seen[:, :3].all()  # the cache, every row
    assert seen[4, 3:].tolist() == [1, 0, 0, 1, 1, 0]  # row 4: the root, row 3, itself
    assert seen[5, 3:].tolist() == [1, 1, 0, 0, 0, 1]


def test_rows_aside_see_a_prefix_of_the_cache_and_themselves() -> None:
    mask = aside_mask([2, 4, 0], 4, torch.bfloat16, "cpu")
    assert mask.shape == (1, 1, 3, 7) and mask.dtype == torch.bfloat16
    seen = (mask[0, 0] == 0).int().tolist()
    assert seen == [[1, 1, 0, 0, 1, 0, 0], [1, 1, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0, 1]]
    with pytest.raises(SessionError, match="cannot see"):
        aside_mask([5], 4, torch.float32, "cpu")


def _chain_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


def test_each_row_of_a_tree_is_computed_as_its_path(tiny_checkpoint) -> None:
    """The unsplit model (``ModelDecoder``) on a tree: row i's logits are those after the prompt and row i's path;
    after keeping a branch the next step continues as if that branch had been fed as a chain."""
    _, ref = tiny_checkpoint("llama")
    decoder = ModelDecoder(ref)
    decoder.prefill(torch.tensor([PROMPT[:-1]]))
    rows = decoder.extend_tree([PROMPT[-1], *TOKENS[1:]], PARENTS)
    fed = [PROMPT[-1], *TOKENS[1:]]
    for i in range(len(PARENTS)):
        path = [fed[r] for r in path_to(PARENTS, i)]
        torch.testing.assert_close(rows[i], _chain_logits(ref, PROMPT[:-1] + path), atol=1e-4, rtol=1e-4)
    decoder.accept([0, 3, 4])
    assert decoder.ids == [*PROMPT, fed[3], fed[4]]
    after = decoder.step(77)
    torch.testing.assert_close(after, _chain_logits(ref, [*PROMPT, fed[3], fed[4], 77]), atol=1e-4, rtol=1e-4)
    with pytest.raises(SessionError, match="accept follows extend_tree"):
        decoder.accept([0])


def test_a_split_feeds_a_tree_as_the_model_does_and_keeps_its_rows(tiny_checkpoint) -> None:
    """Head, body and tail under the tree mask (the head's leading chain rows reused from a look-ahead); the kept
    branch's states and features join the decoder's records, as a chain's would."""
    path, ref = tiny_checkpoint("llama")
    split = load_split(path, f"1:{NUM_LAYERS - 1}", device="cpu", dtype="float32")
    model, dut = ModelDecoder(ref), SplitDecoder(split, LocalBodyLink(split.body))
    dut.keep_features = True
    assert dut.trees and model.trees
    fed = [PROMPT[-1], *TOKENS[1:]]
    parents = [-1, 0, 1, 2, 0, 4]  # a chain of 3 guesses, then a branch at the root
    for decoder in (model, dut):
        decoder.prefill(torch.tensor([PROMPT[:-1]]))
    dut.look_ahead(fed[:3], len(PROMPT) - 1)  # as the head drafter does: its rows are reused for the chain part
    torch.testing.assert_close(dut.extend_tree(fed, parents), model.extend_tree(fed, parents), atol=1e-4, rtol=1e-4)
    with pytest.raises(SessionError, match="not a branch"):
        dut.accept([0, 1, 4])
    for decoder in (model, dut):
        decoder.accept([0, 4, 5])
    torch.testing.assert_close(dut.extend([3, 8]), model.extend([3, 8]), atol=1e-4, rtol=1e-4)
    # The records: the same rows a chain of the accepted tokens leaves.
    chain = SplitDecoder(split, LocalBodyLink(split.body))
    chain.keep_features = True
    chain.prefill(torch.tensor([PROMPT[:-1]]))
    chain.extend([fed[0], fed[4], fed[5]])
    chain.extend([3, 8])
    end = len(PROMPT) + 4
    for kept in ("states", "features"):
        ours, theirs = getattr(dut, kept), getattr(chain, kept)
        first = max(ours.first, theirs.first)
        torch.testing.assert_close(ours.span(first, end), theirs.span(first, end), atol=1e-5, rtol=1e-5)
    # A tree fed and not accepted is rolled back like rejected drafts.
    before = dut.extend([5])
    dut.extend_tree([9, 10, 11], [-1, 0, 0])
    dut.truncate(len(dut.ids) - 1)
    torch.testing.assert_close(dut.extend([5]), before, atol=1e-5, rtol=1e-5)


def test_keeping_rows_of_a_cache_and_where_it_cannot(tiny_checkpoint) -> None:
    _, ref = tiny_checkpoint("llama")
    cache = DynamicCache(config=ref.config)
    with torch.no_grad():
        ref(torch.tensor([PROMPT]), use_cache=True, **with_cache(ref, cache))
    keys = cache.layers[0].keys.clone()
    keep_rows(cache, 2, [0, 3])
    assert cache.get_seq_length() == 4
    torch.testing.assert_close(cache.layers[0].keys, keys[..., [0, 1, 2, 5], :])
    with pytest.raises(SessionError, match="cannot keep rows"):
        keep_rows(cache, 2, [2])
    _, sliding = tiny_checkpoint("mistral")
    window = DynamicCache(config=sliding.config)
    assert supports_trees(cache) and not supports_trees(window)
    with pytest.raises(SessionError, match="full-attention"):
        keep_rows(window, 0, [0])


def test_an_empty_body_takes_trees_as_its_server_announces(tiny_checkpoint) -> None:
    """A body with no layers (a cut X:X) has no cache: a tree passes through it and keeping a branch only counts."""
    path, _ = tiny_checkpoint("llama")
    state = BodyState(load_split(path, "2:2", parts=("body",), device="cpu", dtype="float32").body)
    assert state.cache is None and state.supports_trees
    hidden = torch.randn(1, 3, 64)
    state.forward(hidden[:, :2], 0)
    torch.testing.assert_close(state.forward(hidden, 2, tree=[-1, 0, 0]), hidden)
    state.keep(2, [0, 2])
    assert state.length == 4
