"""The rows a session keeps for replay: positions [0, length) as the body holds them, through speculative
rollbacks (a step sent at an earlier position drops what followed it) and partial blocks."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lambdasplit.client.connection import RemoteBodyLink


def fresh_link() -> RemoteBodyLink:
    return RemoteBodyLink(SimpleNamespace(epoch=0), session=1, wire_dtype=None)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.integers(1, 6)), min_size=1, max_size=40))
def test_history_is_what_the_body_holds_after_any_rollbacks(steps: list[tuple[float, int]]) -> None:
    link, held, counter = fresh_link(), [], 0
    for back, rows in steps:
        position = round(back * len(held))  # anywhere from 0 (a new prompt) to the end (the next step)
        hidden = torch.arange(counter, counter + rows, dtype=torch.float32).repeat(3, 1).T.unsqueeze(0)  # (1, rows, 3)
        counter += rows
        link._remember(hidden, position, reset=False)
        held = held[:position] + hidden[0, :, 0].tolist()
        assert link.length == len(held)
        kept = torch.cat(link.history)[:, 0].tolist() if link.history else []
        assert kept == held


def test_a_reset_or_no_resume_keeps_nothing() -> None:
    link = fresh_link()
    link._remember(torch.ones(1, 4, 3), 0, reset=False)
    link._remember(torch.ones(1, 2, 3), 0, reset=True)
    assert link.history == [] and link.length == 0
    link.resume = False
    link._remember(torch.ones(1, 4, 3), 0, reset=False)
    assert link.history == [] and link.length == 0
