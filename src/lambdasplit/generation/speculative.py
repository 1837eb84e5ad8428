"""Verifying drafted tokens: which of them the model itself would have produced.

The decoder has just run ``[last token, d_1, ..., d_k]`` in one step, giving one row of logits per
token fed: row ``i`` is the model's next-token distribution after ``d_1..d_i``.

- Greedy: ``d_{i+1}`` is accepted while it equals the argmax of row ``i``; the first mismatch is replaced
  by that argmax. The output is the plain greedy output, token for token.
- Sampling: the speculative sampling rule (Leviathan et al. 2023, Chen et al. 2023) for a point-mass
  draft (every drafter here is deterministic): accept ``d`` with probability ``p(d)``; on rejection
  draw from ``p`` with ``d`` removed, renormalised. Each emitted token is distributed exactly as
  ``p``: P(t = d) = p(d), and for t != d, P(t) = (1 - p(d)) * p(t) / (1 - p(d)) = p(t).

After a fully accepted draft, one more token is drawn from the last row (the "bonus" token), so every
round trip yields at least one token, as plain decoding does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lambdasplit.generation.sampling import TokenChooser


def verify(chooser: TokenChooser, rows: torch.Tensor, context: Sequence[int], draft: Sequence[int]) -> list[int]:
    """The tokens to emit: the accepted prefix of ``draft`` plus one token from the model.

    ``rows`` is (len(draft) + 1, V); ``context`` the ids before the draft (the last one fed in this step).
    """
    if rows.shape[0] != len(draft) + 1:
        raise ValueError(f"{len(draft)} drafted tokens need {len(draft) + 1} rows of logits, got {rows.shape[0]}")
    ctx = list(context)
    out: list[int] = []
    for i, d in enumerate(draft):
        if chooser.greedy:
            token = chooser(rows[i], ctx)
            if token != d:
                return [*out, token]
        else:
            p = chooser.probs(rows[i], ctx)
            if chooser.uniform() >= float(p[d]):
                residual = p.clone()
                residual[d] = 0.0
                return [*out, chooser.sample(residual if float(residual.sum()) > 0 else p)]
        out.append(d)
        ctx.append(d)
    return [*out, chooser(rows[len(draft)], ctx)]
