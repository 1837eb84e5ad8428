"""The attack table: which attacks read states as the link carries them, and which follow a recovered key."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel

from lambdasplit.audit.attacks.permutation import KeyEstimate
from lambdasplit.audit.prompts import AuditPrompt
from lambdasplit.audit.settings import AuditSettings, Defence
from lambdasplit.audit.state import AuditResources, Configuration
from lambdasplit.audit.table import DefenceUnderTest, RecoveredKey, _plain_rows


def _context(path: Path) -> DefenceUnderTest:
    settings = AuditSettings(
        model=str(path),
        prompts=(AuditPrompt("hello world, my password is fox", "fox"),),
        max_new_tokens=4,
        inverter_tokens=0,
        wire_dtype="float32",
    )
    run = AuditResources(settings, None)
    config = Configuration(head=1, tail=2, sides=("prompt", "output"))
    public = run.load(config)
    return DefenceUnderTest(
        run=run,
        public=public,
        victim=public,
        secret=None,
        defence=Defence.parse("none"),
        sides=config.sides,
        greedy=run.conversations(public),
        label="test",
    )


def test_states_as_carried_get_every_attack_and_decoded_ones_only_those_a_key_is_worth(
    tiny_checkpoint: Callable[[str], tuple[Path, PreTrainedModel]],
) -> None:
    path, _ = tiny_checkpoint("llama")
    ctx = _context(path)
    direct = list(_plain_rows(ctx, "eavesdropper = cloud", ctx.greedy, sampled=False))
    assert [r.attack for r in direct] == [
        "A2 nearest neighbour",
        "A1 exact matching",
        "distance correlation (STIP)",
        "B1 tail replay",
        "B2 logit lens",
        "A1 exact matching (fed-back tokens)",
    ]
    assert all(r.key_accuracy is None for r in direct)

    # The identity "key": the decoded states are the intercepted ones, so only the labels and fields differ.
    estimate = KeyEstimate("permutation", torch.eye(ctx.public.hidden_size), seconds=1.5, key_accuracy=0.75)
    before = (estimate.seconds, estimate.key_accuracy, dict(estimate.details))
    key = RecoveredKey("A4 weight matching", estimate)
    decoded = list(_plain_rows(ctx, "cloud", ctx.greedy, sampled=False, key=key))
    assert [r.attack for r in decoded] == [
        "A4 weight matching -> A2 nearest neighbour",
        "A4 weight matching -> A1 exact matching",
        "A4 weight matching -> B1 tail replay",
    ]
    assert all(r.key_accuracy == 0.75 and r.seconds >= 1.5 for r in decoded)  # A4's time counts in each row
    # The rows read the caller's estimate and leave it as it was (the table once popped fields off a dict).
    assert (estimate.seconds, estimate.key_accuracy, dict(estimate.details)) == before
    assert decoded[0].token_accuracy == direct[0].token_accuracy
