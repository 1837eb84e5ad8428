"""A drafter for tests that knows the right answer and is wrong on purpose, so drafts are both kept and rolled back."""

from __future__ import annotations

from collections.abc import Sequence

from lambdasplit.generation import Drafter, DraftLength


class ScriptedDrafter(Drafter):
    """Drafts the true continuation ``truth`` with the third drafted token wrong on every other step."""

    name = "scripted"

    def __init__(self, truth: list[int], prompt_len: int, vocab: int, k: int = 3) -> None:
        super().__init__(DraftLength(k=k, k_min=k, k_max=k, adaptive=False))
        self.truth, self.prompt_len, self.vocab, self.calls = truth, prompt_len, vocab, 0

    def propose(self, ids: Sequence[int], k: int) -> list[int]:
        done = len(ids) - self.prompt_len
        draft = list(self.truth[done : done + k])
        self.calls += 1
        if draft and self.calls % 2:
            i = min(2, len(draft) - 1)
            draft[i] = (draft[i] + 1) % self.vocab  # a wrong guess: rejected, every cache rolls back
        return draft
