"""Token trees: several drafted continuations verified in one forward, every part's cache then keeping one branch.

A step that verifies a chain feeds ``[last token, d_1, ..., d_k]`` at consecutive positions, under the usual causal
mask. A tree feeds a block of rows in which each row follows one earlier row of the block, its parent
(``parents[i] < i``); row 0 is the last token fed, the root (parent -1). Row ``i`` sits at ``position + depth(i)``
and attends to the cache (positions before ``position``) and to the rows on its own path from the root: a 4D
attention mask and explicit ``position_ids``, given to the model's own forward (transformers takes a 4D mask as it
is), so every part (head, body, tail) computes each row exactly as if its path had been fed as a chain. A chain is
the tree whose parents are ``-1, 0, 1, ...``.

After verification one path is kept: ``keep_rows`` makes a KV cache hold, from the block's first position on, the
rows of that path only (the block's rows sit in the cache in block order), so the cache is again what a chain of
the accepted tokens would have left.

Only full-attention caches can be kept this way (a sliding-window layer's own bookkeeping would need the same):
``supports_trees`` says whether a part's cache can.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from lambdasplit.errors import SessionError

__all__ = [
    "MAX_TREE_ROWS",
    "aside_mask",
    "check_tree",
    "is_chain",
    "keep_rows",
    "path_to",
    "supports_trees",
    "tree_inputs",
]

#: The most rows one tree may have (a server refuses more: the mask grows with rows x context).
MAX_TREE_ROWS = 64


def check_tree(parents: Sequence[int], rows: int | None = None) -> list[int]:
    """The depth of every row; ``SessionError`` (code ``bad_tree``) unless ``parents`` is a tree as described above
    (and has ``rows`` rows, when given)."""
    if not isinstance(parents, Sequence) or isinstance(parents, str | bytes) or not parents:
        raise SessionError("a token tree is a non-empty list of parent rows", "bad_tree")
    if rows is not None and len(parents) != rows:
        raise SessionError(f"the token tree has {len(parents)} rows and the FORWARD {rows}", "bad_tree")
    if len(parents) > MAX_TREE_ROWS:
        raise SessionError(f"a token tree has at most {MAX_TREE_ROWS} rows, got {len(parents)}", "bad_tree")
    if parents[0] != -1:
        raise SessionError(f"a token tree's first row is its root (parent -1), got parent {parents[0]!r}", "bad_tree")
    out = [0]
    for i, p in enumerate(parents[1:], start=1):
        if not isinstance(p, int) or isinstance(p, bool) or not 0 <= p < i:
            raise SessionError(
                f"row {i} of a token tree must follow an earlier row (0..{i - 1}), not {p!r}", "bad_tree"
            )
        out.append(out[p] + 1)
    return out


def is_chain(parents: Sequence[int]) -> bool:
    return all(p == i - 1 for i, p in enumerate(parents))


def path_to(parents: Sequence[int], row: int) -> list[int]:
    """The rows from the root to ``row``, both included."""
    path = [row]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


def tree_inputs(
    parents: Sequence[int], position: int, dtype: torch.dtype, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4D additive attention mask (1, 1, T, position + T) and ``position_ids`` (1, T) for a block of rows in the
    tree ``parents`` whose root is at ``position``, after a cache of ``position`` positions."""
    d = check_tree(parents)
    t = len(parents)
    allowed = torch.zeros(t, position + t, dtype=torch.bool)
    allowed[0, : position + 1] = True  # the root: the cache and itself
    for i in range(1, t):  # a row sees what its parent sees, and itself
        allowed[i] = allowed[parents[i]]
        allowed[i, position + i] = True
    positions = torch.tensor([[position + x for x in d]], device=device)
    return _additive(allowed, dtype, device), positions


def _additive(allowed: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """The 4D additive attention mask (1, 1, T, K) of a (T, K) boolean one, as the models' forward takes it."""
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None].to(device)


def aside_mask(seen: Sequence[int], held: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """The 4D additive attention mask (1, 1, R, held + R) for R rows fed after a cache of ``held`` positions, row
    ``r`` seeing the cache's first ``seen[r]`` positions and itself only: rows that branch off what the cache holds
    (a drafter's runners-up, each after a prefix of its own chain), computed side by side in one forward."""
    if any(not 0 <= n <= held for n in seen):
        raise SessionError(f"rows after a cache of {held} positions cannot see {list(seen)} of them")
    t = len(seen)
    allowed = torch.arange(held + t)[None, :] < torch.tensor(seen)[:, None]
    allowed[torch.arange(t), held + torch.arange(t)] = True
    return _additive(allowed, dtype, device)


def supports_trees(cache: Cache | None) -> bool:
    """Whether ``keep_rows`` can keep a branch of ``cache`` (every layer a full-attention ``DynamicLayer``)."""
    return cache is None or all(type(layer) is DynamicLayer for layer in cache.layers)


def keep_rows(cache: Cache | None, start: int, rows: Sequence[int]) -> None:
    """Make ``cache`` hold its first ``start`` positions, then the block rows ``rows`` (offsets from ``start``, in
    order); positions after them go. ``rows`` of ``[0, 1, ..., n - 1]`` is a plain rollback to ``start + n``."""
    if cache is None:
        return
    if not supports_trees(cache):
        raise SessionError("token trees need full-attention KV caches (this model has sliding-window layers)")
    held = cache.get_seq_length()
    if any(r < 0 or start + r >= held for r in rows) or start > held:
        raise SessionError(f"cannot keep rows {list(rows)} after position {start}: the cache holds {held} positions")
    for layer in cast(list[DynamicLayer], cache.layers):  # checked above
        if layer.keys is None or not layer.is_initialized:
            continue
        index = torch.tensor([start + r for r in rows], dtype=torch.long, device=layer.keys.device)
        layer.keys = torch.cat([layer.keys[..., :start, :], layer.keys.index_select(-2, index)], dim=-2)
        assert layer.values is not None
        layer.values = torch.cat([layer.values[..., :start, :], layer.values.index_select(-2, index)], dim=-2)
