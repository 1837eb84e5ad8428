"""T2: frequency analysis of the traffic as a substitution cipher, with no model weights at all.

The attacker (T2: a curious cloud serving a proprietary model with no public relative) holds the
transformed body and the traffic, and nothing of the original weights. What it also holds is public: the
tokenizer (every user bundle ships it; the cloud sees the vocabulary size) and public text tokenized with it.

Why the traffic is a cipher: in STIP's own layout (X = 0) the device sends ``key.encode(embed(id))``, so
each token id maps to one fixed vector, every time it occurs: distinct vectors are distinct tokens (a
*code book*), and the uplink is a substitution cipher over the vocabulary. The downlink of STIP's layout is
logits under a secret vocabulary permutation, so the argmax index of each returned row is the generated
token under a fixed substitution: the same cipher. Classical decipherment applies:

1. ``codebook``: number the distinct intercepted vectors (uplink) or argmax indices (downlink) in order;
2. ``language_statistics``: unigram and bigram counts of public text over the ``candidates`` most frequent
   token ids (the rest pooled in one "other" class);
3. ``decipher``: start from frequency ranks (the i-th most frequent code is the i-th most frequent token),
   then climb the bigram log-likelihood of the decoded traffic: each round scores every (code, token) pair
   by ``sum log P(token | decoded previous) + sum log P(decoded next | token)`` over the code's
   occurrences, and re-assigns all codes at once under the one constraint the code book gives (distinct
   codes are distinct tokens: an optimal assignment). The best round by log-likelihood is kept. (Updating
   the codes in two alternating halves climbs higher but fits noise: on SmolLM2's tokenizer and 50k tokens
   of traffic it recovered 31% against 42% for all at once.)

What it cannot do: a code seen once has almost no statistics, so rare tokens stay guesses; the figures
depend on how well the public text matches the traffic's language. At X >= 1 states depend on context and
do not repeat, so this module does not apply there as it is (states would first have to be clustered by
token; not implemented).

Shapes: ``N`` intercepted rows, ``C`` distinct codes, ``K`` candidate tokens (+1 for "other").
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


def codebook(traffic: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    """Code sequences for intercepted conversations, and the number of distinct codes ``C``.

    Each item is (N_i, D) uplink rows, whose distinct rows get codes, or (N_i,) integer indices (the argmax
    of each downlink logits row), which are codes already and are renumbered densely. Codes count from 0
    in order of first appearance, the same across all conversations (one key throughout).
    """
    if not traffic:
        raise ValueError("no traffic to read a code book from")
    lengths = [len(t) for t in traffic]
    rows = torch.cat([t if t.dim() > 1 else t[:, None] for t in traffic])
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    order = torch.full((int(inverse.max()) + 1,), len(inverse), dtype=torch.long)
    order.scatter_reduce_(0, inverse, torch.arange(len(inverse)), "amin")  # first position of each code
    rank = torch.empty_like(order)
    rank[order.argsort()] = torch.arange(len(order))
    codes = rank[inverse]
    return list(codes.split(lengths)), len(order)


@dataclass
class LanguageStatistics:
    """Public text's statistics over its ``K`` most frequent token ids (``tokens``, most frequent first).

    ``log_next`` (K + 1, K + 1): ``log P(b | a)``, row a, column b, index K for every other token;
    interpolated with the unigram (``smoothing`` of it), so unseen pairs are unlikely but possible.
    ``unigram`` (K + 1,): counts, ``other`` last.
    """

    tokens: torch.Tensor
    unigram: torch.Tensor
    log_next: torch.Tensor
    text_tokens: int

    @property
    def candidates(self) -> int:
        return len(self.tokens)


def language_statistics(
    streams: Sequence[torch.Tensor], *, candidates: int = 4096, smoothing: float = 0.1
) -> LanguageStatistics:
    """Unigram and bigram statistics of public token streams (each a 1-D id tensor; pairs only within one)."""
    if not streams or sum(len(s) for s in streams) == 0:
        raise ValueError("language statistics need some public text")
    if not 0 < smoothing < 1:
        raise ValueError(f"smoothing must be in (0, 1), got {smoothing}")
    ids = torch.cat([s.long() for s in streams])
    counts = torch.bincount(ids)
    k = min(candidates, int((counts > 0).sum()))
    tokens = counts.argsort(descending=True, stable=True)[:k]
    index = torch.full((len(counts),), k, dtype=torch.long)  # token id -> class (K: other)
    index[tokens] = torch.arange(k)
    unigram = torch.bincount(index[ids], minlength=k + 1).double()
    pairs = torch.zeros(k + 1, k + 1, dtype=torch.float64)
    for s in streams:
        c = index[s.long()]
        if len(c) > 1:
            pairs.index_put_((c[:-1], c[1:]), torch.ones(len(c) - 1, dtype=torch.float64), accumulate=True)
    p_uni = (unigram + 0.5) / (unigram + 0.5).sum()
    p_next = pairs / pairs.sum(dim=1, keepdim=True).clamp_min(1)
    log_next = torch.log((1 - smoothing) * p_next + smoothing * p_uni[None, :]).float()
    return LanguageStatistics(tokens, unigram, log_next, len(ids))


@dataclass
class Decipherment:
    """A code -> token id mapping (``mapping`` (C,), -1 where no candidate was left) and how it was found.

    ``unigram_mapping``: the frequency-rank start, kept to report what unigrams alone recover.
    ``details``: ``log_likelihood`` per round (per decoded pair), ``best_round``, ``codes``, ``rows``.
    """

    mapping: torch.Tensor
    unigram_mapping: torch.Tensor
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def decode(self, codes: torch.Tensor, *, unigram_only: bool = False) -> list[int]:
        """Token ids for a code sequence (N,)."""
        table = self.unigram_mapping if unigram_only else self.mapping
        return table[codes].tolist()


def _pair_counts(sequences: Sequence[torch.Tensor], c: int) -> torch.Tensor:
    """(C, C) sparse counts of code a followed by code b within one conversation."""
    firsts = torch.cat([s[:-1] for s in sequences])
    seconds = torch.cat([s[1:] for s in sequences])
    values = torch.ones(len(firsts), dtype=torch.float32)
    return torch.sparse_coo_tensor(torch.stack([firsts, seconds]), values, (c, c), check_invariants=False).coalesce()


def _classes(mapping: torch.Tensor, stats: LanguageStatistics) -> torch.Tensor:
    """(C,) candidate class of each code's token under ``mapping`` (K: other or unmapped)."""
    index = torch.full((int(stats.tokens.max()) + 2,), stats.candidates, dtype=torch.long)
    index[stats.tokens] = torch.arange(stats.candidates)
    safe = mapping.clamp(min=0, max=len(index) - 1)
    return torch.where(mapping >= 0, index[safe], stats.candidates)


def _log_likelihood(pairs: torch.Tensor, classes: torch.Tensor, stats: LanguageStatistics) -> float:
    """Mean ``log P(b | a)`` over the traffic's pairs, decoded to classes."""
    a, b = pairs.indices()
    w = pairs.values()
    return float((w * stats.log_next[classes[a], classes[b]]).sum() / w.sum().clamp_min(1))


def decipher(
    sequences: Sequence[torch.Tensor], stats: LanguageStatistics, *, codes: int | None = None, rounds: int = 12
) -> Decipherment:
    """Map codes to token ids by unigram rank, then by bigram log-likelihood (``rounds`` re-assignments).

    ``sequences``: code sequences from ``codebook`` (one per conversation; pairs never cross two).
    ``codes``: how many distinct codes (default: max + 1). Codes beyond ``stats.candidates`` distinct ones
    cannot all be placed; the least frequent are left at -1.
    """
    start = time.perf_counter()
    c = codes if codes is not None else int(max(int(s.max()) for s in sequences if len(s)) + 1)
    k = stats.candidates
    count = torch.bincount(torch.cat(list(sequences)), minlength=c).double()
    by_count = count.argsort(descending=True, stable=True)
    unigram_mapping = torch.full((c,), -1, dtype=torch.long)
    placed = by_count[:k]
    unigram_mapping[placed] = stats.tokens[: len(placed)]
    pairs = _pair_counts(sequences, c)
    transposed = pairs.t().coalesce()
    mapping, best = unigram_mapping, unigram_mapping
    history = [_log_likelihood(pairs, _classes(mapping, stats), stats)]
    best_ll, best_round = history[0], 0
    for r in range(1, rounds + 1):
        classes = _classes(mapping, stats)  # (C,)
        # next[c, t] = sum_b n(c, b) log P(class(b) | t);  prev[c, t] = sum_a n(a, c) log P(t | class(a))
        by_next = torch.sparse.mm(_to_classes(pairs, classes, k), stats.log_next.T)  # (C, K + 1)
        by_prev = torch.sparse.mm(_to_classes(transposed, classes, k), stats.log_next)  # (C, K + 1)
        score = (by_next + by_prev)[placed][:, :k]  # (placed, K): "other" is not a guess
        new = unigram_mapping.clone()
        new[placed] = stats.tokens[_best_distinct(score)]
        ll = _log_likelihood(pairs, _classes(new, stats), stats)
        history.append(ll)
        if ll > best_ll:
            best, best_ll, best_round = new, ll, r
        if torch.equal(new, mapping):
            break
        mapping = new
    details = {"log_likelihood": history, "best_round": best_round, "codes": c, "rows": int(count.sum())}
    return Decipherment(best, unigram_mapping, time.perf_counter() - start, details)


def _to_classes(pairs: torch.Tensor, classes: torch.Tensor, k: int) -> torch.Tensor:
    """(C, C) sparse code-pair counts -> (C, K + 1) sparse counts of code a followed by class(b)."""
    a, b = pairs.indices()
    return torch.sparse_coo_tensor(
        torch.stack([a, classes[b]]), pairs.values(), (pairs.shape[0], k + 1), check_invariants=False
    ).coalesce()


def _best_distinct(score: torch.Tensor) -> torch.Tensor:
    """For a (P, K) score with P <= K, distinct columns maximising the total (P,): one per row.

    Optimal (``scipy.optimize.linear_sum_assignment``, rectangular) when scipy is installed; else greedy,
    rows in order (the caller puts the most frequent codes first).
    """
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        taken = torch.zeros(score.shape[1], dtype=torch.bool)
        out = torch.empty(score.shape[0], dtype=torch.long)
        for i, row in enumerate(score):
            t = int(row.masked_fill(taken, -float("inf")).argmax())
            taken[t], out[i] = True, t
        return out
    rows, cols = linear_sum_assignment(score.double().numpy(), maximize=True)
    out = torch.empty(score.shape[0], dtype=torch.long)
    out[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return out
