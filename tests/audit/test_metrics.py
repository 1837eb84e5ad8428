"""Scores: position-wise accuracy, ROUGE-L over ids, exactness, and secrets found in text."""

from __future__ import annotations

import pytest

from lambdasplit.audit.attacks.result import AttackResult
from lambdasplit.audit.metrics import exact, find_span, rouge_l, secret_recovered, token_accuracy
from lambdasplit.audit.prompts import AuditPrompt
from lambdasplit.audit.rows import score


def test_token_accuracy_is_position_wise_and_counts_missing_as_wrong() -> None:
    assert token_accuracy([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert token_accuracy([1, 9, 3, 9], [1, 2, 3, 4]) == 0.5
    assert token_accuracy([1, 2], [1, 2, 3, 4]) == 0.5  # two missing
    assert token_accuracy([2, 3, 4], [1, 2, 3, 4]) == 0.0  # shifted by one: nothing in place
    assert token_accuracy([1, 2, 3, 4, 5, 6], [1, 2, 3, 4]) == 1.0  # extras past the target not counted
    assert token_accuracy([], []) == 1.0 and token_accuracy([1], []) == 0.0


def test_rouge_l_is_the_lcs_f1() -> None:
    assert rouge_l([1, 2, 3], [1, 2, 3]) == 1.0
    assert rouge_l([4, 5], [1, 2, 3]) == 0.0
    # LCS of (1 2 3 4 5) and (1 3 5 7) is (1 3 5): P = 3/5, R = 3/4.
    assert rouge_l([1, 2, 3, 4, 5], [1, 3, 5, 7]) == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert rouge_l([2, 3, 4], [1, 2, 3, 4]) == pytest.approx(2 * 1 * 0.75 / 1.75)  # a shift costs little
    assert rouge_l([], []) == 1.0 and rouge_l([1], []) == 0.0 and rouge_l([], [1]) == 0.0
    assert rouge_l([3, 1, 2], [1, 2, 3]) == rouge_l([1, 2, 3], [3, 1, 2])


def test_exact() -> None:
    assert exact([1, 2], [1, 2]) and exact((1, 2), [1, 2])
    assert not exact([1, 2, 3], [1, 2]) and not exact([1], [1, 2])


def test_secret_recovered() -> None:
    assert secret_recovered("my PIN is 4812, thanks", "4812")
    assert secret_recovered("name: Alice\n  Smith", "Alice Smith")  # whitespace runs compare as one space
    assert not secret_recovered("my PIN is 4821", "4812")
    assert not secret_recovered("alice smith", "Alice Smith")
    assert secret_recovered("alice smith", "Alice Smith", ignore_case=True)
    with pytest.raises(ValueError, match="non-whitespace"):
        secret_recovered("anything", "  ")


def test_attack_result_scores_itself() -> None:
    result = AttackResult("x", "prompt", recovered=[1, 2, 9], target=[1, 2, 3], seconds=0.1)
    assert result.token_accuracy == pytest.approx(2 / 3)
    assert result.rouge_l == pytest.approx(2 / 3)
    assert not result.exact and result.details == {}


def test_find_span_finds_the_first_contiguous_run() -> None:
    assert find_span([7, 1, 2, 3, 1, 2], [1, 2]) == slice(1, 3)
    assert find_span([1, 3, 2], [1, 2]) is None  # not contiguous
    assert find_span([1, 2], []) is None and find_span([1], [1, 2]) is None


def test_user_accuracy_counts_only_the_users_tokens_inside_the_template() -> None:
    """Template tokens (here 8 and 9) are the same for everyone: reading them is not reading the user."""
    words = {"hi": [5], "there": [6]}

    def encode(text: str) -> list[int]:
        return [i for word in text.split() for i in words[word]]

    prompt = AuditPrompt("hi there")
    template_only = AttackResult("x", "prompt", recovered=[8, 9, 0, 0, 9], target=[8, 9, 5, 6, 9], seconds=0)
    scored = score([template_only], [prompt], decode=str, encode=encode)
    assert scored["token_accuracy"] == pytest.approx(3 / 5) and scored["user_accuracy"] == 0.0
    half = AttackResult("x", "prompt", recovered=[0, 0, 5, 0, 0], target=[8, 9, 5, 6, 9], seconds=0)
    assert score([half], [prompt], decode=str, encode=encode)["user_accuracy"] == 0.5
    assert score([half], [prompt], decode=str)["user_accuracy"] is None  # no tokenizer: not claimed
    output = AttackResult("x", "output", recovered=[1, 2, 0], target=[1, 2, 3], seconds=0)
    assert score([output], [prompt], decode=str)["user_accuracy"] == pytest.approx(2 / 3)  # all generated tokens
