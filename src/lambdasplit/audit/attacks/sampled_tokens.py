"""B3: sampled output tokens, from the tail's candidates confirmed on the uplink.

With sampling (temperature > 0) the tail's argmax (B1) is often not the token the device drew. But the
drawn token is fed back: its head state is the next uplink row. So the attacker ranks candidates by
the replayed tail's logits (``tail_replay.replay_logits``) and keeps the one that, run through the
public head after the recovered prefix, reproduces that row exactly (A1's ``PrefixMatcher``). This is
exact matching (SipIt, Nikolaou et al., 2025) with the model's own next-token distribution as the
candidate order, which puts the drawn token in the first handful.

The last generated token is never fed back, so nothing confirms it: it is the tail's argmax
(``details["unconfirmed"]``). The prompt prefix is recovered first with A1 unless given.

Shapes: ``P`` prompt length, ``G`` generated tokens, ``D`` hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from lambdasplit.audit.attacks.exact_matching import PrefixMatcher, Ranking, recover, search
from lambdasplit.audit.attacks.nearest_neighbour import context_free_tables, similarity
from lambdasplit.audit.attacks.result import AttackResult
from lambdasplit.audit.attacks.tail_replay import replay_logits
from lambdasplit.privacy.intercept import Intercept
from lambdasplit.split.loader import SplitModel


def sampled_tokens(
    public: SplitModel,
    intercepts: Sequence[Intercept],
    *,
    prompts: Sequence[Sequence[int]] | None = None,
    top_k: int = 32,
    batch_size: int = 1024,
    max_candidates: int = 4096,
    wire_dtype: torch.dtype = torch.float32,
    atol: float = 0.0,
    chunk: int = 128,
) -> list[AttackResult]:
    """Recover each intercept's generated tokens, sampled or not; one result per intercept.

    ``prompts``: the prompt ids per intercept when already recovered (A1's ``details`` or ``recovered``);
    otherwise A1 recovers them here. Candidates: the tail's ``top_k`` first, then the tail's ranking and
    A2's in turn, up to ``max_candidates`` per position. ``details``: ``misses`` (fed positions with no
    exact match), ``unconfirmed`` (the last token), ``tried``, ``prompt_misses``.
    """
    if prompts is not None and len(prompts) != len(intercepts):
        raise ValueError(f"got {len(prompts)} prompts for {len(intercepts)} intercepts")
    tables = list(context_free_tables(public).values())
    results = []
    for n, item in enumerate(intercepts):
        start = time.perf_counter()
        p = item.prompt_length
        if prompts is None:
            found = recover(public, item.uplink[:p], max_candidates=max_candidates, wire_dtype=wire_dtype, atol=atol)
            prefix, prompt_misses = found.ids, found.misses
        else:
            prefix, prompt_misses = list(prompts[n]), []
        logits = replay_logits(public, item.downlink, p)  # (G, V): row i predicts output token i
        matcher = PrefixMatcher(public, wire_dtype=wire_dtype, atol=atol)
        recovered: list[int] = []
        misses: list[int] = []
        tried: list[int] = []
        with torch.inference_mode():
            matcher.feed(prefix)
            fed = item.uplink[p:]  # row i holds output token i, for i < G - 1
            for i, row in enumerate(fed):
                if i % chunk == 0:  # A2's similarities, (chunk, V) per table
                    scores = [similarity(t, fed[i : i + chunk]) for t in tables]
                lead = logits[i].topk(min(top_k, logits.shape[-1])).indices
                ranking = Ranking([logits[i], *(s[i % chunk] for s in scores)], lead=lead)
                token, hit, count = search(
                    matcher, row, ranking, first_batch=top_k, batch_size=batch_size, max_candidates=max_candidates
                )
                recovered.append(token)
                tried.append(count)
                if not hit:
                    misses.append(i)
        unconfirmed = list(range(len(recovered), len(logits)))
        recovered += logits[len(recovered) :].argmax(dim=-1).tolist()
        results.append(
            AttackResult(
                attack="sampled_tokens",
                side="output",
                recovered=recovered,
                target=list(item.output_ids),
                seconds=time.perf_counter() - start,
                details={"misses": misses, "unconfirmed": unconfirmed, "tried": tried, "prompt_misses": prompt_misses},
            )
        )
    return results
