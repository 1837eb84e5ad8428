"""Drafters: guess the next few tokens cheaply on the device, so one round trip can verify several.

With one round trip per token, split decoding cannot beat 1 / (round-trip time + compute). A drafter
proposes k tokens; the device sends their k hidden states in one frame, the body runs them in one
forward, and the tail accepts the longest correct prefix plus one token (``speculative.verify``). The
output does not depend on the drafter: a bad drafter only costs speed.

Every drafter here is deterministic given the ids so far (a point-mass draft), which is what lets the
acceptance rule keep the sampling distribution unchanged without the drafter's probabilities.

- ``PromptLookupDrafter``: n-gram lookup in the prompt and the text so far (Saxena 2023, "prompt lookup
  decoding"; in transformers as ``prompt_lookup_num_tokens``). No model; strong when the answer copies
  from the prompt (summaries, rewrites, code edits, retrieval-augmented answers).
- ``ModelDrafter``: greedy tokens from a small causal model on the device: a separately loaded model with
  the same tokenizer (``ModelDecoder``), or the split's own head and tail with the body skipped
  (``self_drafter``), which costs no extra weights.

``DraftLength`` adapts k as transformers' assisted generation does: +2 after a fully accepted draft,
-1 after a rejection.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lambdasplit.errors import ConfigError
from lambdasplit.generation.session import Decoder, ModelDecoder, SplitDecoder, Traffic
from lambdasplit.split.loader import SplitModel


@dataclass
class DraftLength:
    """How many tokens to draft next: ``k`` adapted between ``k_min`` and ``k_max`` unless fixed."""

    k: int = 4
    k_min: int = 1
    k_max: int = 16
    adaptive: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.k_min <= self.k <= self.k_max:
            raise ConfigError(f"draft length needs 1 <= k_min <= k <= k_max, got {self.k_min}, {self.k}, {self.k_max}")

    #: Steps to skip drafting after a draft was wholly rejected; doubles on each such miss (up to
    #: ``max_backoff``), back to 0 once a token is accepted. A wasted draft costs compute (a forward over
    #: k + 1 positions is slower than over 1 on a CPU), so drafting that keeps missing is tried less often.
    backoff: int = 0
    max_backoff: int = 16
    _skip: int = 0

    def next(self, limit: int) -> int:
        """Tokens to draft in this step (0: skip drafting), at most ``limit``."""
        if self._skip > 0:
            self._skip -= 1
            return 0
        return max(0, min(self.k, limit))

    def update(self, accepted: int, drafted: int) -> None:
        if not self.adaptive or drafted == 0:
            return
        if accepted == drafted:
            self.k = min(self.k + 2, self.k_max)
        else:
            self.k = max(self.k - 1, self.k_min)
        if accepted == 0:
            self.backoff = min(max(1, 2 * self.backoff), self.max_backoff)
            self._skip = self.backoff
        else:
            self.backoff = 0


class StepCost:
    """What a verification step costs, by how many drafted tokens it sends, learnt from the generation's own steps.

    A step's seconds are the wall clock from drafting to verification: the round trip, both sides' compute, the
    draft itself. On a CPU a second row costs far more than the ones after it (one row is a matrix-vector product;
    16 ms of 36 in process for SmolLM2-135M), and at a long round trip every row is cheap: no fixed draft length
    suits both, so a drafter that knows how likely its tokens are (``HeadDrafter``) sends the count that maximises
    expected tokens per second.

    Counts not measured recently (``max_age`` steps) are assumed to cost what the nearest shorter count measured
    recently did, so they get tried again: a slow spell while a count was measured does not rule it out for good.
    A step without a draft is what everything is compared with: when its measure is missing or old, the next step
    sends no draft and measures it.
    """

    def __init__(self, smoothing: float = 0.3, max_age: int = 32) -> None:
        if not 0 < smoothing <= 1 or max_age < 1:
            raise ConfigError(f"StepCost needs 0 < smoothing <= 1 and max_age >= 1, got {smoothing}, {max_age}")
        self.smoothing, self.max_age = smoothing, max_age
        self.seconds: dict[int, float] = {}  # drafted tokens sent -> moving average of the step's seconds
        self.measured: dict[int, int] = {}  # drafted tokens sent -> the step that last measured it
        self.steps = 0

    def observe(self, drafted: int, seconds: float) -> None:
        if seconds < 0 or drafted < 0:
            raise ValueError(f"a step cannot send {drafted} drafted tokens in {seconds} s")
        self.steps += 1
        old = self.seconds.get(drafted)
        self.seconds[drafted] = seconds if old is None else old + self.smoothing * (seconds - old)
        self.measured[drafted] = self.steps

    def _fresh(self, drafted: int) -> bool:
        return drafted in self.seconds and self.steps - self.measured[drafted] < self.max_age

    def estimate(self, drafted: int) -> float | None:
        if self._fresh(drafted):
            return self.seconds[drafted]
        shorter = [n for n in self.seconds if n < drafted and self._fresh(n)]
        return self.seconds[max(shorter)] if shorter else None

    def best_length(self, expected: Sequence[float]) -> int:
        """How many drafted tokens to send: ``expected[j - 1]`` is how many tokens are expected to be accepted
        when the first ``j`` are sent (one more comes from the model in any case)."""
        return self.best(expected)[0]

    def best(self, expected: Sequence[float]) -> tuple[int, float]:
        """``best_length`` and the tokens per second it expects (0.0 while a plain step's price is not known)."""
        if not self._fresh(0):
            return 0, 0.0
        best, best_rate = 0, 1.0 / max(self.seconds[0], 1e-9)
        for j, accepted in enumerate(expected, start=1):
            seconds = self.estimate(j)
            assert seconds is not None  # 0 is fresh: every count has a fresh shorter one
            rate = (1.0 + accepted) / max(seconds, 1e-9)
            if rate > best_rate:
                best, best_rate = j, rate
        return best, best_rate

    def could_gain(self, expected: Sequence[float], gain: float, limit: int) -> bool:
        """Whether drafting more can change ``best_length``'s answer: some count past ``len(expected)``, up to
        ``limit``, would beat the best of those drafted so far if each further token added ``gain`` expected tokens
        (a drafter's bound: its later tokens are no likelier than the last). False: stop drafting, nothing is lost.
        """
        if not self._fresh(0):
            return False  # the next step measures a plain step: it sends nothing
        total = expected[-1] if expected else 0.0
        best = max(
            [1.0 / max(self.seconds[0], 1e-9)]
            + [(1.0 + e) / max(self.estimate(j) or 0.0, 1e-9) for j, e in enumerate(expected, start=1)]
        )
        return any(
            (1.0 + total + gain * (n - len(expected))) / max(self.estimate(n) or 0.0, 1e-9) > best
            for n in range(len(expected) + 1, limit + 1)
        )


class Drafter(ABC):
    """Proposes up to k next tokens for a sequence; ``length`` says how many to try."""

    name = "drafter"

    def __init__(self, length: DraftLength | None = None) -> None:
        self.length = length or DraftLength()

    def draft(self, ids: Sequence[int], limit: int) -> list[int]:
        """Up to ``min(k, limit)`` tokens that may follow ``ids`` (fewer, or none, when it has no guess)."""
        k = self.length.next(limit)
        return self.propose(ids, k)[:k] if k > 0 else []

    def draft_tree(self, ids: Sequence[int], limit: int) -> tuple[list[int], list[int]]:
        """Drafted tokens and what each follows (0: the last of ``ids``; ``j``: the ``j``-th drafted token), no path
        longer than ``limit``: a token tree (``split.tree``). Here the chain ``draft`` gives; a drafter that
        knows more than one guess per position (``HeadDrafter``) offers several where its decoder can verify them."""
        tokens = self.draft(ids, limit)
        return tokens, list(range(len(tokens)))

    def update(
        self, accepted: int, drafted: int, seconds: float | None = None, kept: Sequence[int] | None = None
    ) -> None:
        """Told after each verification how many of its ``drafted`` tokens were accepted, how long the step took
        (drafting to verification) when the caller timed it, and for a token tree which drafted tokens were on the
        branch kept (``kept``: indices into the draft; None: the first ``accepted``, as in a chain)."""
        self.length.update(accepted, drafted)

    def attach(self, decoder: Decoder) -> None:  # noqa: B027 (a no-op unless the drafter reads the decoder)
        """Told the decoder of a generation before it starts (the head drafter reads its hidden states)."""

    @abstractmethod
    def propose(self, ids: Sequence[int], k: int) -> list[int]: ...

    def close(self) -> None:  # noqa: B027 (a no-op unless the drafter holds a session)
        pass


class PromptLookupDrafter(Drafter):
    """Finds the latest earlier occurrence of the last n tokens (n from ``max_ngram`` down to ``min_ngram``)
    and proposes the tokens that followed it.

    Each n-gram's latest position is kept in an index that grows with the sequence, so a step costs the same
    whatever the context's length (a scan of the context cost 0.3 ms a step after 500 tokens, 2.7 ms after 4,000
    and 21 ms after 32,000 on this VM: ``benchmarks/prompt_lookup.py``). Another sequence (one that does not
    extend the last one) rebuilds the index.
    """

    name = "lookup"

    def __init__(self, length: DraftLength | None = None, *, max_ngram: int = 3, min_ngram: int = 1) -> None:
        super().__init__(length)
        if not 1 <= min_ngram <= max_ngram:
            raise ConfigError(f"n-gram sizes need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._ids: list[int] = []  # the sequence indexed
        self._latest: dict[tuple[int, ...], int] = {}  # n-gram -> its latest start with a token after it

    def propose(self, ids: Sequence[int], k: int) -> list[int]:
        return self.match(ids, k)[0]

    def match(self, ids: Sequence[int], k: int) -> tuple[list[int], int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the longest suffix found, and that
        suffix's length in tokens (0: no match)."""
        ids = self._index(ids)
        end = len(ids)
        for n in range(min(self.max_ngram, end - 1), self.min_ngram - 1, -1):
            # The latest match with a token after it: it ends before the suffix itself does.
            start = self._latest.get(tuple(ids[end - n :]))
            if start is not None:
                return ids[start + n : start + n + k], n
        return [], 0

    def _index(self, ids: Sequence[int]) -> list[int]:
        """The sequence indexed, after indexing whatever ``ids`` adds to it (from scratch if it is another)."""
        known = len(self._ids)
        if len(ids) < known or list(ids[:known]) != self._ids:
            self._ids, self._latest, known = [], {}, 0
        self._ids.extend(ids[known:])
        seq = self._ids
        # A gram starting at s is followed by a token once s + n < len: index those the new tokens complete.
        for n in range(self.min_ngram, self.max_ngram + 1):
            for s in range(max(0, known - n), len(seq) - n):
                self._latest[tuple(seq[s : s + n])] = s
        return seq

    def close(self) -> None:
        self._ids, self._latest = [], {}


class ModelDrafter(Drafter):
    """Greedy drafts from a small causal model kept in step with the sequence through its own KV cache."""

    name = "model"

    def __init__(
        self, decoder: ModelDecoder | SplitDecoder, length: DraftLength | None = None, *, name: str | None = None
    ) -> None:
        super().__init__(length)
        self.decoder = decoder
        self.name = name or self.name

    def propose(self, ids: Sequence[int], k: int) -> list[int]:
        # Only what follows the prefix the decoder already holds (its last sequence and the drafts accepted) is fed.
        logits = self.decoder.resume(ids)
        out: list[int] = []
        while True:
            token = int(logits.argmax())
            out.append(token)
            if len(out) >= k:
                break
            logits = self.decoder.step(token)
        return out

    def close(self) -> None:
        """End of a generation: forget the sequence, so the drafter can serve the next one."""
        self.decoder.reset()


class _SkippedBody:
    """A ``BodyLink`` that returns its input: the head's output goes straight into the tail."""

    def __init__(self) -> None:
        self.traffic = Traffic()

    def forward(self, hidden: torch.Tensor, position: int, reset: bool = False, last: bool = False) -> torch.Tensor:
        return hidden[:, -1:] if last else hidden

    def close(self) -> None:
        pass


def self_drafter(split: SplitModel, length: DraftLength | None = None) -> ModelDrafter:
    """Drafts with the device's own head and tail, the body skipped (layer skipping; no extra weights).

    It has its own KV caches, so it never disturbs the real session's.
    """
    if split.head is None or split.tail is None:
        raise ConfigError(
            "the self drafter needs the head and the tail in this process (STIP's layout has no tail: use the "
            "lookup drafter or a draft model)"
        )
    return ModelDrafter(SplitDecoder(split, _SkippedBody()), length, name="self")


DRAFTERS = ("lookup", "self", "head", "head:PATH", "model:PATH")


def model_drafter(model: str, split: SplitModel, length: DraftLength | None = None) -> ModelDrafter:
    """Drafts with a separately loaded small causal LM (a name, folder, .gguf or hub id) on the device.

    It must share the split model's tokenizer: its vocabulary size is checked.
    """
    from lambdasplit.models.resolve import resolve_checkpoint
    from lambdasplit.models.unsplit import load_unsplit

    draft = load_unsplit(resolve_checkpoint(model, quiet=True), split.runtime)
    if int(draft.config.vocab_size) != int(split.config.vocab_size):
        raise ConfigError(
            f"the draft model {model} has a vocabulary of {draft.config.vocab_size} tokens, the split model "
            f"{split.config.vocab_size}: a drafter must use the same tokenizer"
        )
    return ModelDrafter(ModelDecoder(draft), length, name=f"model:{model}")


def make_drafter(kind: str, split: SplitModel, length: DraftLength | None = None) -> Drafter:
    """A drafter by name: ``lookup`` (prompt n-grams), ``self`` (head and tail without the body), ``head`` (the
    trained draft head shipped for the default model; ``head:PATH`` another) or ``model:PATH`` (a small model with
    the same tokenizer). ``length`` is where drafting starts; the head picks its own count each step unless
    ``length`` is fixed (``adaptive=False``)."""
    check_drafter_name(kind)
    if kind == "lookup":
        return PromptLookupDrafter(length)
    if kind == "self":
        return self_drafter(split, length)
    if kind == "head" or kind.startswith("head:"):
        from lambdasplit.generation.drafthead.drafter import head_drafter  # torch modules built only when asked

        # The head picks its own count each step (up to 8): only a fixed length (adaptive=False) is passed on.
        fixed = length if length is not None and not length.adaptive else None
        return head_drafter(split, kind.removeprefix("head:") if kind != "head" else None, fixed)
    if kind.startswith("model:") and len(kind) > len("model:"):
        return model_drafter(kind.removeprefix("model:"), split, length)
    raise ConfigError(f"unknown drafter {kind!r}; choose from {', '.join(DRAFTERS)}")


def check_drafter_name(kind: str) -> None:
    """Refuse a drafter name ``make_drafter`` would refuse, before anything is loaded."""
    with_path = any(kind.startswith(p) and len(kind) > len(p) for p in ("model:", "head:"))
    if kind not in ("lookup", "self", "head") and not with_path:
        raise ConfigError(f"unknown drafter {kind!r}; choose from {', '.join(DRAFTERS)}")
