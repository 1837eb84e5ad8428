"""The generation loop shared by every mode: in-process split, networked split, unsplit reference."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from lambdasplit.generation.drafting import Drafter
from lambdasplit.generation.sampling import SamplingParams, TokenChooser
from lambdasplit.generation.session import Decoder, Traffic
from lambdasplit.generation.speculative import verify, verify_tree
from lambdasplit.generation.text import TextStream
from lambdasplit.split.tree import is_chain

FinishReason = Literal["eos", "stop", "length"]


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text it adds (``""`` while text is held back).

    The last event of a generation may carry ``token_id=None``: text held back until the end.
    """

    token_id: int | None
    text: str


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # the new tokens only
    prompt_tokens: int
    finish_reason: FinishReason
    seconds: float  # prefill + decode, wall clock
    prefill_seconds: float
    traffic: Traffic = field(default_factory=Traffic)
    steps: int = 0  # decode steps (one round trip each when split), prefill not counted
    drafted_tokens: int = 0  # speculative decoding: tokens proposed by the drafter
    accepted_tokens: int = 0  # ... and accepted by the model

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / drafted tokens; None when nothing was drafted."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(new_tokens=self.new_tokens, tokens_per_second=round(self.tokens_per_second, 3))
        d.update(acceptance_rate=self.acceptance_rate)
        return d


class Generation:
    """Iterate for ``TokenEvent``s as tokens are generated; ``result`` is set once iteration ends.

    Stops at ``max_new_tokens``, at any EOS id (unless ``ignore_eos``), or at a stop string
    (needs a tokenizer). The decoder is closed at the end, also when the caller stops iterating early,
    unless ``keep_open``: then the prompt is fed with ``resume`` (positions the decoder already holds are
    reused) and the decoder stays open for the next turn.

    With a ``drafter``, each step feeds the last token plus the drafter's guesses and keeps the longest
    prefix the model agrees with (``speculative.verify``): the same tokens as without it when greedy,
    the same distribution when sampling, in fewer round trips when the guesses are good. A drafter may offer a
    token tree (several guesses at a position, where the decoder can verify them): the branch the model agrees
    with is kept (``speculative.verify_tree``).
    """

    def __init__(
        self,
        decoder: Decoder,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        eos_token_ids: set[int] | frozenset[int] = frozenset(),
        device: torch.device | None = None,
        drafter: Drafter | None = None,
        keep_open: bool = False,
    ) -> None:
        self.decoder, self.prompt_ids, self.params = decoder, list(prompt_ids), params
        self.keep_open = keep_open
        self.drafter = drafter
        self.eos = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        self.stream = TextStream(tokenizer, params.stop) if tokenizer is not None else None
        if params.stop and self.stream is None:
            raise ValueError("stop strings need a tokenizer")
        self.chooser = TokenChooser(params, device or torch.device("cpu"))
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[TokenEvent]:
        new: list[int] = []
        reason: FinishReason | None = None
        start = time.perf_counter()
        steps = drafted = accepted = 0
        # Seeded sampling must give the same text every time: drafts sent then may not depend on the clock (each
        # drafted token consumes a random draw), so the drafter is not told how long steps took.
        reproducible = not self.chooser.greedy and self.params.seed is not None
        try:
            if self.drafter is not None:
                self.drafter.attach(self.decoder)
            if self.keep_open:  # a conversation's decoder: reuse the positions it shares with this prompt
                logits = self.decoder.resume(self.prompt_ids)
            else:
                logits = self.decoder.prefill(torch.tensor([self.prompt_ids]))
            prefill_seconds = time.perf_counter() - start
            pending = [self.chooser(logits, self.prompt_ids)]
            while True:
                for token in pending:
                    if token in self.eos:
                        reason = "eos"
                        break
                    new.append(token)
                    delta = self.stream.push(new) if self.stream is not None else ""
                    yield TokenEvent(token, delta)
                    if self.stream is not None and self.stream.stopped:
                        reason = "stop"
                        break
                    if len(new) >= self.params.max_new_tokens:
                        reason = "length"
                        break
                if reason is not None:
                    break
                # The decoder holds the prompt and new[:-1]; this step feeds new[-1] and the draft.
                context = self.prompt_ids + new
                budget = self.params.max_new_tokens - len(new) - 1  # the step's own token is one more
                step_start = time.perf_counter()
                draft, parents = self.drafter.draft_tree(context, budget) if self.drafter is not None else ([], [])
                tree = [-1, *parents]  # row 0 is the last token; drafted token j is row j + 1
                if is_chain(tree):
                    rows = self.decoder.extend([new[-1], *draft])
                    pending = verify(self.chooser, rows, context, draft)
                    kept = len(pending) - 1
                    branch = list(range(kept + 1))
                    if kept < len(draft):
                        self.decoder.truncate(len(context) + kept)  # rejected drafts leave every cache
                else:  # a token tree: one branch is kept in every cache
                    rows = self.decoder.extend_tree([new[-1], *draft], tree)
                    pending, branch = verify_tree(self.chooser, rows, context, [new[-1], *draft], tree)
                    self.decoder.accept(branch)
                    kept = len(branch) - 1
                steps += 1
                drafted, accepted = drafted + len(draft), accepted + kept
                if self.drafter is not None:
                    seconds = None if reproducible else time.perf_counter() - step_start
                    self.drafter.update(kept, len(draft), seconds, kept=[row - 1 for row in branch[1:]])
            if self.stream is not None and reason != "stop":
                tail = self.stream.finish(new)
                if tail:
                    yield TokenEvent(None, tail)
        finally:
            if not self.keep_open:
                self.decoder.close()
            if self.drafter is not None:
                self.drafter.close()
        assert reason is not None
        self.result = GenerationResult(
            text=self.stream.text if self.stream is not None else "",
            token_ids=new,
            prompt_tokens=len(self.prompt_ids),
            finish_reason=reason,
            seconds=time.perf_counter() - start,
            prefill_seconds=prefill_seconds,
            traffic=self.decoder.traffic,
            steps=steps,
            drafted_tokens=drafted,
            accepted_tokens=accepted,
        )

    def run(self) -> GenerationResult:
        """Generate to the end and return the result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result
