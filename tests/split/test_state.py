"""BodyState: the one place where a session's body cache is rewound, run and measured."""

from __future__ import annotations

import pytest
import torch

from lambdasplit.errors import SessionError
from lambdasplit.split import load_split
from lambdasplit.split.state import BodyState
from tiny_models import NUM_LAYERS


@pytest.fixture
def body(tiny_checkpoint):
    path, _ = tiny_checkpoint("llama")
    split = load_split(path, (1, NUM_LAYERS - 1), parts=["body"], device="cpu", dtype="float32")
    assert split.body is not None
    return split.body, split.hidden_size


def test_steps_rollback_and_reset_equal_one_forward_over_the_sequence(body) -> None:
    body, d = body
    x = torch.randn(1, 7, d, generator=torch.Generator().manual_seed(0))
    whole = body(x, body.new_cache())  # (1, 7, D): the reference, one forward
    state = BodyState(body)
    state.forward(x[:, :4], 0)
    state.forward(torch.randn(1, 2, d), 4)  # two rows that will be rejected ...
    assert state.length == 6
    out = state.forward(x[:, 4:], 4)  # ... rolled back: position 4 < length 6
    assert state.length == 7 and state.steps == 3
    assert state.cache is not None and state.cache.get_seq_length() == 7
    torch.testing.assert_close(out, whole[:, 4:], atol=1e-5, rtol=0)
    again = state.forward(x, 0, reset=True)  # the no-cache baseline: a fresh cache, the whole sequence
    torch.testing.assert_close(again, whole, atol=1e-5, rtol=0)


def test_positions_that_skip_ahead_or_reset_elsewhere_are_refused_with_a_code(body) -> None:
    body, d = body
    state = BodyState(body)
    with pytest.raises(SessionError, match="skips ahead") as info:
        state.forward(torch.zeros(1, 1, d), 3)
    assert info.value.code == "bad_position"
    state.forward(torch.zeros(1, 2, d), 0)
    with pytest.raises(SessionError, match="starts at position 0") as info:
        state.check(1, reset=True)
    assert info.value.code == "bad_position" and state.length == 2


def test_a_forward_that_fails_part_way_leaves_the_cache_where_it_was(body) -> None:
    body, d = body
    state = BodyState(body)
    state.forward(torch.randn(1, 3, d), 0)
    cache = state.cache
    assert cache is not None
    update, calls = cache.update, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first layer took the new positions, the second fails
            raise RuntimeError("injected")
        return update(*args, **kwargs)

    cache.update = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="injected"):
        state.forward(torch.randn(1, 2, d), 3)
    cache.update = update  # type: ignore[method-assign]
    assert state.length == 3 and {layer.keys.shape[-2] for layer in cache.layers} == {3}
