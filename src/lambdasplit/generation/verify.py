"""Check a split against the unsplit model on the user's own checkpoint: same logits, same greedy tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lambdasplit.generation.session import LocalBodyLink, ModelDecoder, SplitDecoder
from lambdasplit.models.unsplit import load_unsplit
from lambdasplit.split.loader import SplitModel


@dataclass(frozen=True)
class VerifyReport:
    max_abs_diff: list[float]  # per call: prefill (last position), then each decode step
    split_tokens: list[int]
    unsplit_tokens: list[int]

    @property
    def worst(self) -> float:
        return max(self.max_abs_diff)

    def passed(self, atol: float) -> bool:
        return self.worst <= atol and self.split_tokens == self.unsplit_tokens


def verify_split(split: SplitModel, prompt_ids: list[int], steps: int = 20) -> VerifyReport:
    """Greedy-decode ``steps`` tokens with the split (in process) and with the unsplit HF model side by side.

    Each side follows its own greedy choice, so a divergence shows up as different tokens, not just as
    a logit difference.
    """
    if split.body is None:
        raise ValueError("verify_split needs all three parts in this process")
    ref, dut = ModelDecoder(load_unsplit(split.path, split.runtime)), SplitDecoder(split, LocalBodyLink(split.body))
    prompt = torch.tensor([prompt_ids])
    a, b = ref.prefill(prompt), dut.prefill(prompt)
    diffs, ref_tokens, dut_tokens = [], [], []
    for i in range(steps + 1):
        diffs.append(float((a.float() - b.float()).abs().max()))
        if i == steps:
            break
        ref_tokens.append(int(a.argmax()))
        dut_tokens.append(int(b.argmax()))
        a, b = ref.step(ref_tokens[-1]), dut.step(dut_tokens[-1])
    ref.close()
    dut.close()
    return VerifyReport(diffs, dut_tokens, ref_tokens)
