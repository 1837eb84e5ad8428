"""A1: left-to-right exact matching of the uplink with the public head weights.

After SipIt ("Language Models are Injective and Hence Invertible", Nikolaou et al., 2025): a causal
transformer maps distinct prompts to distinct hidden states, so an attacker holding the head's weights
recovers position ``t`` by running candidate tokens through the head with the already-recovered prefix
in its KV cache and keeping the one whose state equals the intercepted row. Candidates are tried in
the order of the nearest-neighbour attack (A2, ``nearest_neighbour.py``), its rankings at depth 1 and
depth X taken in turn: a small first batch, then the rest of the vocabulary in growing batches, up to
``max_candidates`` per position. The search stops at the first batch holding a candidate within
tolerance (the closest such wins). A position with none is a miss: the closest candidate takes its
place in the prefix so the search goes on (if it is wrong, later positions miss too; all recorded).

At X = 0 the head is the embedding alone, context-free, so matching is a lookup.

The same search runs on every fed position: generated tokens are fed back through the head, so uplink
rows P.. hold them (``side="output"``).

The search compares states through a ``view`` (default: as they are). ``sorted_values`` is the view a
secret permutation of the hidden dimension leaves unchanged, so with it the search reads a permuted
uplink without the key (``permutation.sorted_matching``).

Shapes: ``V`` vocabulary, ``D`` hidden size, ``T`` positions, ``k`` candidates in one batch.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import Cache

from lambdasplit.audit.attacks.nearest_neighbour import context_free_tables, positions, public_head, similarity
from lambdasplit.audit.attacks.result import AttackResult, Side
from lambdasplit.privacy.intercept import Intercept
from lambdasplit.split.loader import SplitModel

#: A function of states (..., D) -> (..., D) applied to candidates and intercepted rows before comparing.
View = Callable[[torch.Tensor], torch.Tensor]


def sorted_values(states: torch.Tensor) -> torch.Tensor:
    """Each state's values in increasing order: what a permutation of the hidden dimension keeps.

    Rounding each value to within a relative bound moves each sorted value by no more than that bound
    (order statistics are monotone), so ``tolerance`` of the sorted target holds for sorted candidates.
    """
    return states.sort(dim=-1).values


def tolerance(
    target: torch.Tensor, *, wire_dtype: torch.dtype, compute_dtype: torch.dtype, atol: float = 0.0
) -> torch.Tensor:
    """Per-channel bound (D,) on |recomputed - intercepted| for the right token.

    Two sources: rounding to the wire dtype and the public model's own float noise from a different batch
    shape (relative to the row's largest value; 1e-4 in float32, measured 3e-7 on SmolLM2). Float wires
    round each value to half an ulp (allowed: a whole ulp); ``torch.int8`` stands for the wire's per-row
    affine QINT8, off by up to half a step of (row max - row min) / 255 (allowed: a whole step). ``atol``
    adds a fixed allowance. A wrong token misses by a margin of order one, so this is loose on purpose.
    """
    scale = target.abs()
    wire: float | torch.Tensor  # a float wire in float32 adds no rounding
    if wire_dtype in (torch.int8, torch.uint8):
        wire = (target.max() - target.min()) / 255
    else:
        wire = 0.0 if wire_dtype == torch.float32 else torch.finfo(wire_dtype).eps * scale
    compute = 1e-4 if compute_dtype == torch.float32 else 8 * torch.finfo(compute_dtype).eps
    return wire + compute * scale.max().clamp_min(1.0) + atol


class PrefixMatcher:
    """Runs candidate tokens through the public head after a known prefix, and extends the prefix.

    The prefix lives in a batch-1 KV cache of the head; a batch of ``k`` candidates runs on a ``k``-fold
    copy of it, and the matching row of that copy becomes the new prefix cache (no extra forward pass).
    """

    def __init__(
        self,
        public: SplitModel,
        *,
        wire_dtype: torch.dtype = torch.float32,
        atol: float = 0.0,
        view: View | None = None,
    ) -> None:
        self.public = public
        self.view = view
        self.head = public_head(public)
        self.cache: Cache | None = self.head.new_cache()  # None when the head has no layers (X = 0)
        self.prefix: list[int] = []
        self.wire_dtype, self.atol = wire_dtype, atol
        self.device = public.runtime.device
        self.last: torch.Tensor | None = None  # the public state (D,) of the prefix's last token, when known

    def states(self, ids: torch.Tensor) -> tuple[torch.Tensor, Cache | None]:
        """Head output (k, D) float32 of each candidate in ``ids`` (k,) after the prefix, and the k-row cache."""
        ids = ids.to(self.device)
        if self.cache is None:  # embedding only (X = 0): context-free, nothing to cache
            return self.head(ids[:, None])[:, 0].float(), None
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(len(ids))
        return self.head(ids[:, None], cache)[:, 0].float(), cache

    def extend(self, ids: torch.Tensor, index: int, cache: Cache | None, state: torch.Tensor | None = None) -> None:
        """Make candidate ``ids[index]`` (whose run left ``cache`` and gave ``state`` (D,)) the next token."""
        self.last = state
        if cache is not None:
            cache.batch_select_indices(torch.tensor([index], device=self.device))
            self.cache = cache
        self.prefix.append(int(ids[index]))

    def feed(self, ids: Sequence[int]) -> None:
        """Append known tokens to the prefix in one forward pass (a prompt recovered elsewhere)."""
        if ids and self.cache is not None:
            self.head(torch.tensor([list(ids)], device=self.device), self.cache)
        self.prefix.extend(int(i) for i in ids)

    def match(self, target: torch.Tensor, ids: torch.Tensor) -> tuple[int | None, float, int]:
        """Try ``ids`` (k,) against ``target`` (D,); on an exact hit, extend the prefix with it.

        Returns (index of the hit or None, the closest candidate's distance, its index). The distance is
        max |state - target| over channels, in units of the tolerance: <= 1 is a hit.
        """
        states, cache = self.states(ids)
        target = target.to(states.device, torch.float32)
        seen = states
        if self.view is not None:
            seen, target = self.view(states), self.view(target)
        bound = tolerance(target, wire_dtype=self.wire_dtype, compute_dtype=self.public.runtime.dtype, atol=self.atol)
        distance = ((seen - target).abs() / bound).amax(dim=-1)  # (k,)
        closest = int(distance.argmin())
        if distance[closest] <= 1:  # the closest of the hits: a near-twin token cannot win on order alone
            self.extend(ids, closest, cache, states[closest])
            return closest, float(distance[closest]), closest
        return None, float(distance[closest]), closest


@dataclass
class Recovery:
    """What the search found for each position, in order."""

    ids: list[int] = field(default_factory=list)
    hits: list[bool] = field(default_factory=list)  # an exact match was found (False: closest candidate kept)
    tried: list[int] = field(default_factory=list)  # candidates run through the head at this position

    @property
    def misses(self) -> list[int]:
        return [i for i, hit in enumerate(self.hits) if not hit]


class Ranking:
    """Candidate order for one position: ``lead`` tokens first, then each score row's ranking in turn.

    ``scores``: one or more (V,) rows, higher is better (A2's similarities, or a tail's logits). A token
    ranked r-th by any row comes by position ``len(lead) + len(scores) * (r + 1)``. Only the prefix of
    the order that the search reaches is sorted.
    """

    def __init__(self, scores: Sequence[torch.Tensor], lead: torch.Tensor | None = None) -> None:
        self.scores = list(scores)
        self.vocab = self.scores[0].numel()
        self.lead = torch.empty(0, dtype=torch.long) if lead is None else lead.flatten().long()

    def first(self, n: int) -> torch.Tensor:
        """The first ``min(n, V)`` candidates (ids), best first, no repeats."""
        n = min(n, self.vocab)
        tops = torch.stack([row.topk(n).indices for row in self.scores])  # (m, n)
        # Interleave: rank 0 of every row, then rank 1, ...; the first n distinct ids are the order's first n.
        interleaved = torch.cat([self.lead.to(tops.device), tops.T.reshape(-1)])
        first = torch.full((self.vocab,), interleaved.numel(), device=tops.device)
        first.scatter_reduce_(0, interleaved, torch.arange(interleaved.numel(), device=tops.device), "amin")
        seen = (first < interleaved.numel()).nonzero()[:, 0]
        return seen[first[seen].argsort()][:n]


def search(
    matcher: PrefixMatcher,
    target: torch.Tensor,
    ranking: Ranking,
    *,
    first_batch: int,
    batch_size: int,
    max_candidates: int,
) -> tuple[int, bool, int]:
    """Try ``ranking``'s candidates against ``target`` (D,) in growing batches; extend the prefix.

    Returns (token, whether it matched exactly, candidates tried). On a miss the closest candidate seen is
    appended to the prefix (one more forward pass) so later positions can still be searched.
    """
    if min(first_batch, batch_size, max_candidates) < 1:
        got = f"{first_batch}, {batch_size}, {max_candidates}"
        raise ValueError(f"first_batch, batch_size and max_candidates must be >= 1, got {got}")
    tried, size = 0, first_batch
    best: tuple[float, int] = (float("inf"), -1)
    limit = min(max_candidates, ranking.vocab)
    while tried < limit:
        ids = ranking.first(min(limit, tried + size))[tried:]
        hit, distance, index = matcher.match(target, ids)
        tried += len(ids)
        if hit is not None:
            return int(ids[hit]), True, tried
        best = min(best, (distance, int(ids[index])))
        size = min(batch_size, 8 * size)
    token = torch.tensor([best[1]])
    state, cache = matcher.states(token)
    matcher.extend(token, 0, cache, state[0])
    return best[1], False, tried


def recover(
    public: SplitModel,
    uplink: torch.Tensor,
    *,
    first_batch: int = 16,
    batch_size: int = 1024,
    max_candidates: int = 4096,
    wire_dtype: torch.dtype = torch.float32,
    atol: float = 0.0,
    chunk: int = 128,
    view: View | None = None,
    language_model: bool = False,
    stop_at_miss: bool = False,
) -> Recovery:
    """Recover the token at every row of ``uplink`` (T, D), left to right from position 0.

    Similarities are computed ``chunk`` rows at a time: (chunk, V) per table. ``view``: compare (and rank
    candidates by) this function of the states instead of the states themselves. ``language_model``: rank
    by the public model's own next-token logits after the recovered prefix as well (one body and tail
    step per position; needs a public split holding all three parts). That is what keeps the search short
    when the tables rank poorly, as they do for sorted values. ``stop_at_miss``: return at the first
    position without an exact match (the rows after it rarely match once the prefix is wrong).
    """
    tables = list(context_free_tables(public).values())
    if view is not None:
        tables = [view(table) for table in tables]
    matcher = PrefixMatcher(public, wire_dtype=wire_dtype, atol=atol, view=view)
    predictor = NextToken(public) if language_model else None
    found = Recovery()
    with torch.inference_mode():
        for begin in range(0, uplink.shape[0], chunk):
            rows = uplink[begin : begin + chunk]
            viewed = rows if view is None else view(rows.float())
            scores = [similarity(table, viewed) for table in tables]  # each (chunk, V)
            for i, row in enumerate(rows):
                lead = [] if predictor is None or predictor.logits is None else [predictor.logits]
                token, hit, tried = search(
                    matcher,
                    row,
                    Ranking(lead + [s[i] for s in scores]),
                    first_batch=first_batch,
                    batch_size=batch_size,
                    max_candidates=max_candidates,
                )
                found.ids.append(token)
                found.hits.append(hit)
                found.tried.append(tried)
                if stop_at_miss and not hit:
                    return found
                if predictor is not None and matcher.last is not None:
                    predictor.step(matcher.last)
    return found


class NextToken:
    """The public model's next-token logits after the prefix, one body and tail step per token."""

    def __init__(self, public: SplitModel) -> None:
        if public.body is None or public.tail is None:
            raise ValueError("ranking by the language model needs the public split's body and tail")
        self.public = public
        self.caches = (public.body.new_cache(), public.tail.new_cache())
        self.logits: torch.Tensor | None = None  # (V,) after the prefix; None before the first token

    def step(self, state: torch.Tensor) -> None:
        """Append the prefix's newest token, given by its head ``state`` (D,)."""
        assert self.public.body is not None and self.public.tail is not None
        hidden = self.public.body(state[None, None].to(self.public.runtime.dtype), self.caches[0])
        self.logits = self.public.tail(hidden, self.caches[1])[0, -1].float()

    def fork(self) -> NextToken:
        """An independent copy (its own caches) sharing the public model."""
        other = copy.copy(self)
        other.caches = copy.deepcopy(self.caches)
        return other


def exact_matching(
    public: SplitModel,
    intercepts: Sequence[Intercept],
    *,
    side: Side = "prompt",
    first_batch: int = 16,
    batch_size: int = 1024,
    max_candidates: int = 4096,
    wire_dtype: torch.dtype = torch.float32,
    atol: float = 0.0,
) -> list[AttackResult]:
    """Recover ``side``'s tokens from each intercept's uplink; one result per intercept.

    The output side needs the prompt as prefix, so it is searched too (``details["prompt_recovered"]``).
    ``max_candidates`` caps the head forward passes per position; ``wire_dtype`` and ``atol`` widen the
    tolerance for lossy wire formats (see ``tolerance``). ``details``: ``misses`` (indices into
    ``recovered`` with no exact match), ``tried`` (candidates per position), ``table_seconds``.
    """
    start = time.perf_counter()
    context_free_tables(public)
    table_seconds = time.perf_counter() - start
    results = []
    for item in intercepts:
        start = time.perf_counter()
        rows, target = positions(item, side)
        found = recover(
            public,
            item.uplink[: rows.stop],
            first_batch=first_batch,
            batch_size=batch_size,
            max_candidates=max_candidates,
            wire_dtype=wire_dtype,
            atol=atol,
        )
        p = rows.start
        details = {
            "misses": [i - p for i in found.misses if i >= p],
            "tried": found.tried[p:],
            "table_seconds": table_seconds,
        }
        if side == "output":
            details["prompt_recovered"] = found.ids[:p]
            details["prompt_misses"] = [i for i in found.misses if i < p]
        results.append(
            AttackResult(
                attack="exact_matching",
                side=side,
                recovered=found.ids[p:],
                target=target,
                seconds=time.perf_counter() - start,
                details=details,
            )
        )
    return results
