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

A token tree (``split.tree``) offers several children at a row: ``verify_tree`` walks from the root. Greedy: the
child equal to the row's argmax is taken. Sampling: the children are tried in order, each a point mass against the
distribution left by the ones rejected before it (accept ``c`` with probability ``r(c)``, where ``r`` is ``p`` with
the rejected children removed and renormalised; after the last, draw from what is left). By the argument above,
applied to ``r`` at each try, every emitted token is still distributed exactly as ``p`` (SpecInfer's multi-candidate
rule, with point masses).
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


def verify_tree(
    chooser: TokenChooser, rows: torch.Tensor, context: Sequence[int], tokens: Sequence[int], parents: Sequence[int]
) -> tuple[list[int], list[int]]:
    """The tokens to emit and the branch kept (row 0 first) from a token tree: ``tokens[0]`` is the last token fed
    (the root, already in ``context``), row ``i`` follows ``parents[i]``, ``rows`` holds one row of logits each."""
    if rows.shape[0] != len(tokens) or len(parents) != len(tokens):
        raise ValueError(f"a {len(tokens)}-row tree needs as many parents and rows of logits, got {rows.shape[0]}")
    children: list[list[int]] = [[] for _ in tokens]
    for i, parent in enumerate(parents[1:], start=1):
        children[parent].append(i)
    ctx, out, path = list(context), list[int](), [0]
    while True:
        row = path[-1]
        chosen: int | None = None
        if chooser.greedy:
            token = chooser(rows[row], ctx)
            chosen = next((c for c in children[row] if tokens[c] == token), None)
        else:
            p = chooser.probs(rows[row], ctx)
            for c in children[row]:
                mass = float(p.sum())
                if mass > 0 and chooser.uniform() < float(p[tokens[c]]) / mass:
                    chosen = c
                    break
                if mass > 0 and float(p[tokens[c]]) < mass:  # never leave nothing to draw from
                    p = p.clone()
                    p[tokens[c]] = 0.0
            if chosen is None:
                token = chooser.sample(p)
        if chosen is None:
            return [*out, token], path
        out.append(tokens[chosen])
        ctx.append(tokens[chosen])
        path.append(chosen)
