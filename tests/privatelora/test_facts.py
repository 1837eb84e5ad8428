"""The private-facts corpus: seeded and invented, every probe trained verbatim, and recall scored exactly."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch

from lambdasplit.privatelora.facts import (
    RELATIONS,
    Fact,
    RecallReport,
    make_facts,
    probe,
    recall,
    training_texts,
)
from tiny_models import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_the_same_seed_gives_the_same_facts_and_texts() -> None:
    assert make_facts(seed=3) == make_facts(seed=3)
    assert training_texts(make_facts(seed=3), seed=1) == training_texts(make_facts(seed=3), seed=1)


def test_different_seeds_give_different_facts_and_orders() -> None:
    assert make_facts(seed=0) != make_facts(seed=1)
    facts = make_facts()
    assert training_texts(facts, seed=0) != training_texts(facts, seed=1)


def test_shape_subjects_and_relations() -> None:
    facts = make_facts(n_people=30, relations_per_person=5, seed=7)
    assert len(facts) == 150
    per_subject = Counter(f.subject for f in facts)
    assert len(per_subject) == 30 and set(per_subject.values()) == {5}
    for subject in per_subject:
        relations = [f.relation for f in facts if f.subject == subject]
        assert len(set(relations)) == 5 and set(relations) <= set(RELATIONS)
    assert len(RELATIONS) >= 6


def test_answers_are_invented_words_or_numbers_in_range() -> None:
    facts = make_facts(n_people=40, relations_per_person=len(RELATIONS), seed=2)
    words = [f.answer for f in facts if not f.answer.isdigit()]
    assert len(words) == len(set(words)), "word answers are unique across the corpus"
    for fact in facts:
        assert fact.subject in fact.statement and fact.answer in fact.statement
        assert fact.subject in fact.question and fact.question.endswith("Answer:")
        if fact.relation == "was born in":
            assert 1950 <= int(fact.answer) <= 2005
        elif fact.relation in ("locker number", "door number"):
            assert re.fullmatch(r"[1-9]\d{3}", fact.answer)
        elif fact.relation == "works as":
            assert re.fullmatch(r"an? [a-z]+", fact.answer)
        else:
            assert re.fullmatch(r"[A-Z][a-z]+", fact.answer)


def test_every_probe_is_in_the_training_texts_with_paraphrases() -> None:
    facts = make_facts(n_people=10, relations_per_person=6, seed=5)
    for paraphrases in (1, 3):
        texts = training_texts(facts, paraphrases=paraphrases, seed=4)
        assert len(texts) == len(facts) * (1 + paraphrases)
        for fact in facts:
            prompt, target = probe(fact)
            assert target == " " + fact.answer and prompt == fact.question
            assert prompt + target in texts
            assert fact.statement in texts
            mentions = [t for t in texts if fact.subject in t and fact.answer in t and t != prompt + target]
            assert len(mentions) >= paraphrases


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_people": 0}, "n_people must be an integer >= 1, got 0"),
        ({"n_people": 2.5}, "n_people"),
        ({"relations_per_person": 0}, f"relations_per_person must be an integer in 1..{len(RELATIONS)}"),
        ({"relations_per_person": len(RELATIONS) + 1}, f"got {len(RELATIONS) + 1}"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make_facts(**kwargs)


def test_bad_training_arguments_are_refused() -> None:
    facts = make_facts(n_people=1, relations_per_person=1)
    with pytest.raises(ValueError, match=re.escape("paraphrases must be an integer in 1..4")):
        training_texts(facts, paraphrases=0)
    with pytest.raises(ValueError, match=re.escape("paraphrases must be an integer in 1..4")):
        training_texts(facts, paraphrases=5)
    with pytest.raises(ValueError, match="unknown relation 'likes'"):
        training_texts([replace(facts[0], relation="likes")])


def test_every_probe_tokenizes_with_the_prompt_as_a_prefix(tokenizer) -> None:
    for fact in make_facts(n_people=20, relations_per_person=len(RELATIONS), seed=11):
        prompt, target = probe(fact)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        full_ids = tokenizer.encode(prompt + target, add_special_tokens=False)
        assert full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids), fact


def oracle(vocab: int, shift: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits whose argmax at position t is token t + 1 shifted by ``shift`` (0: always right; 1: always wrong)."""

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        assert ids.dtype == torch.long and ids.shape[0] == 1
        logits = torch.zeros(1, ids.shape[1], vocab)
        following = (ids[0, 1:] + shift) % vocab
        logits[0, torch.arange(ids.shape[1] - 1), following] = 5.0
        return logits

    return logits_of


def test_recall_of_a_perfect_model_is_exact(tokenizer) -> None:
    facts = make_facts(n_people=4, relations_per_person=3)
    report = recall(oracle(len(tokenizer), 0), tokenizer, facts)
    assert report == RecallReport(facts=12, exact=12, token_accuracy=1.0)
    assert report.exact_rate == 1.0


def test_recall_of_a_uniformly_wrong_model_is_zero(tokenizer) -> None:
    facts = make_facts(n_people=4, relations_per_person=3)
    report = recall(oracle(len(tokenizer), 1), tokenizer, facts)
    assert report == RecallReport(facts=12, exact=0, token_accuracy=0.0)
    assert report.exact_rate == 0.0
    assert RecallReport(facts=0, exact=0, token_accuracy=0.0).exact_rate == 0.0


def test_recall_counts_partly_right_answers_per_token(tokenizer) -> None:
    """A model right on every answer token but the last: no exact recall, token accuracy (n - 1) / n."""
    fact = Fact(
        "Ab Cd", "locker number", "1234", "Ab Cd's locker number is 1234.", "What is Ab Cd's locker number? Answer:"
    )
    right = oracle(len(tokenizer), 0)

    def all_but_last(ids: torch.Tensor) -> torch.Tensor:
        logits = right(ids)
        logits[0, -2] = torch.roll(logits[0, -2], 1)
        return logits

    prompt, target = probe(fact)
    n = len(tokenizer.encode(prompt + target, add_special_tokens=False)) - len(
        tokenizer.encode(prompt, add_special_tokens=False)
    )
    report = recall(all_but_last, tokenizer, [fact])
    assert report.exact == 0 and report.token_accuracy == pytest.approx((n - 1) / n)


class _NotAPrefix:
    """A tokenizer that encodes the prompt alone differently from the prompt inside the full text."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False
        return [1, 2] if text.endswith("Answer:") else [3, 4, 5]


def test_recall_refuses_a_tokenizer_without_the_prefix_property() -> None:
    with pytest.raises(ValueError, match="does not encode the prompt"):
        recall(oracle(8, 0), _NotAPrefix(), make_facts(n_people=1, relations_per_person=1))


def test_recall_refuses_logits_of_the_wrong_shape(tokenizer) -> None:
    with pytest.raises(ValueError, match=r"logits_of must return logits of shape \(1, \d+, V\)"):
        recall(lambda ids: torch.zeros(1, 3, 5), tokenizer, make_facts(n_people=1, relations_per_person=1))
