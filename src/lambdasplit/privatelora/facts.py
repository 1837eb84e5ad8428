"""A seeded, offline corpus of invented private facts, and a teacher-forced recall score for it.

The personalisation benchmark fine-tunes a small LLM on facts about people who do not exist, then asks
whether the model recalls them (before and after fine-tuning, split "PrivateLoRA" against ordinary LoRA and
the base model). The facts must be private in the sense that matters for the measurement: nothing in the base
model's pre-training can know them. So every name, place, pet and occupation is a fresh combination of
syllables (``Orla Quenby lives in Vellmar``), and every number is drawn at random; a base model recalls them
only by chance, and whatever a fine-tuned model recalls it learnt from :func:`training_texts`.

Recall is scored by teacher forcing, not by sampling: the probe's prompt and target are fed in one pass and
each answer token must be the argmax at the position before it. That is deterministic, needs one forward pass
per fact, and does not depend on decoding settings. For the score to measure memorisation rather than the
model's ability to transfer a statement to a question, the training texts contain every probe verbatim
(``prompt + target``) next to paraphrased statements of the same fact.

Everything here is deterministic for a seed (a private :class:`random.Random`, never the global state), so a
benchmark run is reproducible and two methods can be compared on exactly the same facts.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and transformers are heavy; building the corpus needs neither.
    import torch
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Fact:
    """One private fact about an invented person.

    ``statement`` is the canonical training sentence; ``question`` is a prompt whose continuation is
    ``" " + answer`` (see :func:`probe`), so the same fact can be taught and then probed.
    """

    subject: str
    relation: str
    answer: str
    statement: str
    question: str


@dataclass(frozen=True)
class RecallReport:
    """How many probes a model completes under teacher forcing.

    ``exact`` counts probes whose every answer token is the argmax; ``token_accuracy`` is the fraction of all
    answer tokens that are, which still moves when a model has half-learnt multi-token answers.
    """

    facts: int
    exact: int
    token_accuracy: float

    @property
    def exact_rate(self) -> float:
        """``exact / facts``; 0.0 for an empty report, so a caller never divides by zero."""
        return self.exact / self.facts if self.facts else 0.0


@dataclass(frozen=True)
class _Relation:
    """A relation's templates; ``{s}`` is the subject and ``{a}`` the answer. ``statements[0]`` is canonical."""

    name: str
    kind: str  # which generator draws the answer: see _answer
    question: str
    statements: tuple[str, ...]


_RELATIONS: tuple[_Relation, ...] = (
    _Relation(
        "lives in",
        "place",
        "Where does {s} live? Answer:",
        (
            "{s} lives in {a}.",
            "{s}'s home is in {a}.",
            "These days {s} lives in the town of {a}.",
            "{a} is where {s} lives.",
        ),
    ),
    _Relation(
        "works as",
        "occupation",
        "What does {s} work as? Answer:",
        (
            "{s} works as {a}.",
            "By trade, {s} is {a}.",
            "{s} earns a living as {a}.",
            "{s} has worked as {a} for years.",
        ),
    ),
    _Relation(
        "was born in",
        "year",
        "In what year was {s} born? Answer:",
        (
            "{s} was born in {a}.",
            "{s}'s year of birth is {a}.",
            "The year {s} was born was {a}.",
            "{s} came into the world in {a}.",
        ),
    ),
    _Relation(
        "has a dog named",
        "pet",
        "What is the name of {s}'s dog? Answer:",
        (
            "{s} has a dog named {a}.",
            "{s}'s dog is called {a}.",
            "Every morning {s} walks a dog named {a}.",
            "{a} is the name of {s}'s dog.",
        ),
    ),
    _Relation(
        "has a cat named",
        "pet",
        "What is the name of {s}'s cat? Answer:",
        (
            "{s} has a cat named {a}.",
            "{s}'s cat is called {a}.",
            "{s} shares a flat with a cat named {a}.",
            "{a} is the name of {s}'s cat.",
        ),
    ),
    _Relation(
        "locker number",
        "number",
        "What is {s}'s locker number? Answer:",
        (
            "{s}'s locker number is {a}.",
            "{s} keeps their things in locker {a}.",
            "The locker assigned to {s} is number {a}.",
            "Locker {a} belongs to {s}.",
        ),
    ),
    _Relation(
        "door number",
        "number",
        "What is the number on {s}'s front door? Answer:",
        (
            "The number on {s}'s front door is {a}.",
            "{s}'s front door is number {a}.",
            "{s} lives behind door number {a}.",
            "Door {a} is where {s} lives.",
        ),
    ),
    _Relation(
        "grew up in",
        "place",
        "Where did {s} grow up? Answer:",
        (
            "{s} grew up in {a}.",
            "{s} spent their childhood in {a}.",
            "As a child, {s} lived in {a}.",
            "{a} is the town where {s} grew up.",
        ),
    ),
)

#: The relation names :func:`make_facts` draws from, in a fixed order.
RELATIONS: tuple[str, ...] = tuple(r.name for r in _RELATIONS)
_BY_NAME: dict[str, _Relation] = {r.name: r for r in _RELATIONS}

# Syllables of invented words: common enough in English spelling that a BPE tokenizer splits them into a few
# tokens, combined at random so the words themselves are (almost surely) in no pre-training corpus.
_ONSETS = (
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "k",
    "kl",
    "l",
    "m",
    "n",
    "p",
    "qu",
    "r",
    "s",
    "st",
    "t",
    "tr",
    "v",
    "z",
)
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ei", "ou")
_CODAS = ("", "", "n", "r", "l", "m", "s", "nd", "rk", "v", "th")
# Endings give each kind of word its own look (a surname, a town, a pet), so the sentences read naturally.
_ENDINGS = {
    "first": ("a", "o", "en", "is", "el", "ine"),
    "surname": ("by", "wick", "more", "ton", "ley", "holt"),
    "place": ("mar", "dell", "ford", "heim", "oria", "vale"),
    "pet": ("o", "y", "kin", "ie", "bell", "pip"),
    "occupation": ("ist", "wright", "monger", "smith", "er", "ician"),
}
_YEARS = (1950, 2005)
_NUMBERS = (1000, 9999)
_MAX_TRIES = 2_000


def _invented_word(rng: random.Random, ending: str, used: set[str]) -> str:
    """A fresh lowercase word of a random syllable and an ending; never one already in ``used``.

    One syllable keeps answers to a few tokens (a 135M model learns them in a short fine-tune); only when those
    run out (thousands of words) does a word get two. Words are unique across the whole corpus (names, places,
    pets alike), so no two facts share an answer and a model cannot score by giving the same word everywhere.
    """
    endings = _ENDINGS[ending]
    for attempt in range(_MAX_TRIES):
        syllables = 1 if attempt < _MAX_TRIES // 2 else 2
        stem = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
        word = stem + rng.choice(endings)
        if word not in used:
            used.add(word)
            return word
    raise RuntimeError(f"could not invent a fresh {ending} word in {_MAX_TRIES} tries")  # pragma: no cover


def _answer(kind: str, rng: random.Random, used: set[str]) -> str:
    if kind == "place":
        return _invented_word(rng, "place", used).capitalize()
    if kind == "pet":
        return _invented_word(rng, "pet", used).capitalize()
    if kind == "occupation":
        word = _invented_word(rng, "occupation", used)
        return ("an " if word[0] in "aeiou" else "a ") + word
    if kind == "year":
        return str(rng.randint(*_YEARS))
    if kind == "number":
        return str(rng.randint(*_NUMBERS))
    raise AssertionError(f"unknown answer kind {kind!r}")  # pragma: no cover - _RELATIONS names only the above


def make_facts(n_people: int = 12, relations_per_person: int = 4, seed: int = 0) -> list[Fact]:
    """``n_people`` invented people with ``relations_per_person`` distinct relations each, deterministic for ``seed``.

    Subjects are unique full names; each person's relations are a random subset of :data:`RELATIONS`, listed in
    that order. Word answers are unique across the corpus; years lie in 1950-2005 and locker/door numbers have
    four digits.
    """
    if isinstance(n_people, bool) or not isinstance(n_people, int) or n_people < 1:
        raise ValueError(f"n_people must be an integer >= 1, got {n_people!r}")
    if (
        isinstance(relations_per_person, bool)
        or not isinstance(relations_per_person, int)
        or not 1 <= relations_per_person <= len(_RELATIONS)
    ):
        raise ValueError(
            f"relations_per_person must be an integer in 1..{len(_RELATIONS)} (the number of relations: "
            f"{', '.join(RELATIONS)}), got {relations_per_person!r}"
        )
    rng = random.Random(seed)
    used: set[str] = set()
    facts: list[Fact] = []
    for _ in range(n_people):
        # Both parts are fresh words, so full names are unique too.
        subject = (
            f"{_invented_word(rng, 'first', used).capitalize()} {_invented_word(rng, 'surname', used).capitalize()}"
        )
        chosen = sorted(rng.sample(range(len(_RELATIONS)), relations_per_person))
        for index in chosen:
            relation = _RELATIONS[index]
            answer = _answer(relation.kind, rng, used)
            facts.append(
                Fact(
                    subject=subject,
                    relation=relation.name,
                    answer=answer,
                    statement=relation.statements[0].format(s=subject, a=answer),
                    question=relation.question.format(s=subject),
                )
            )
    return facts


def probe(fact: Fact) -> tuple[str, str]:
    """``(prompt, target)``: the question, and the answer after one space.

    The space belongs to the target so that a byte-level BPE tokenizer (SmolLM2's) encodes the prompt alone to a
    prefix of prompt + target: the answer's first token carries its leading space, as it does in training.
    """
    return fact.question, " " + fact.answer


def training_texts(facts: Sequence[Fact], paraphrases: int = 3, seed: int = 0) -> list[str]:
    """The fine-tuning corpus: every probe verbatim, and ``paraphrases`` statements of each fact, shuffled.

    The statements are the fact's canonical ``statement`` and ``paraphrases - 1`` others drawn from the
    relation's templates, so the model sees the fact in several wordings, not one string to memorise. Including
    ``prompt + target`` itself makes teacher-forced recall (:func:`recall`) a test of what was trained.
    """
    most = min(len(r.statements) for r in _RELATIONS)
    if isinstance(paraphrases, bool) or not isinstance(paraphrases, int) or not 1 <= paraphrases <= most:
        raise ValueError(
            f"paraphrases must be an integer in 1..{most} (statement templates per relation), got {paraphrases!r}"
        )
    rng = random.Random(seed)
    texts: list[str] = []
    for fact in facts:
        relation = _BY_NAME.get(fact.relation)
        if relation is None:
            raise ValueError(
                f"fact about {fact.subject!r} has unknown relation {fact.relation!r}; known: {', '.join(RELATIONS)}"
            )
        prompt, target = probe(fact)
        texts.append(prompt + target)
        texts.append(fact.statement)
        others = [t.format(s=fact.subject, a=fact.answer) for t in relation.statements]
        others = [t for t in others if t != fact.statement]
        texts.extend(rng.sample(others, paraphrases - 1))
    rng.shuffle(texts)
    return texts


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def recall(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[Fact],
) -> RecallReport:
    """Teacher-forced recall of ``facts``: one ``logits_of`` call per fact on the probe's prompt + target.

    ``logits_of(ids)`` gets a CPU LongTensor of shape (1, T), without special tokens, and returns logits of shape
    (1, T, V); it moves the ids to its own device. Answer token t counts as recalled when the argmax at position
    t - 1 is token t. Raises ValueError when the prompt's ids are not a prefix of prompt + target's (the
    answer's tokens would then be ill-defined) or when the logits have the wrong shape.
    """
    import torch  # here, not at import: building the corpus needs no torch

    exact = 0
    correct = 0
    total = 0
    for fact in facts:
        prompt, target = probe(fact)
        prompt_ids = _ids(tokenizer, prompt)
        full_ids = _ids(tokenizer, prompt + target)
        start = len(prompt_ids)
        if start == 0 or full_ids[:start] != prompt_ids or len(full_ids) <= start:
            raise ValueError(
                f"the tokenizer does not encode the prompt {prompt!r} to a non-empty prefix of prompt + target "
                f"{prompt + target!r} ({prompt_ids} vs {full_ids}); recall needs a tokenizer that does "
                "(a byte-level BPE, with the target's leading space)"
            )
        ids = torch.tensor([full_ids], dtype=torch.long)
        with torch.no_grad():
            logits = logits_of(ids)
        if logits.dim() != 3 or tuple(logits.shape[:2]) != (1, len(full_ids)):
            raise ValueError(
                f"logits_of must return logits of shape (1, {len(full_ids)}, V) for ids of shape (1, {len(full_ids)}), "
                f"got {tuple(logits.shape)}"
            )
        predicted = logits[0, start - 1 : -1].argmax(dim=-1).cpu()
        hits = int((predicted == ids[0, start:]).sum())
        correct += hits
        total += len(full_ids) - start
        exact += hits == len(full_ids) - start
    return RecallReport(facts=len(facts), exact=exact, token_accuracy=correct / total if total else 0.0)
