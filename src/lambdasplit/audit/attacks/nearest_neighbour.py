"""A2: one-shot nearest neighbour of each intercepted state among context-free head outputs.

The attacker runs the public head on every vocabulary token *alone* and keeps the (V, D) table of what
comes out; each uplink row is read as its most similar table row (cosine similarity). This is the
nearest-neighbour embedding inversion of split-learning attacks (e.g. Song & Raghunathan, "Information
Leakage in Embedding Models", CCS 2020) and the cheap ordering of candidates that exact matching (A1,
``exact_matching.py``) refines.

Tokens alone, at position 0: a single token attends only to itself, so its attention output is
``o_proj(v_proj(x))`` whatever rotary position it sits at (RoPE turns q and k by the same angle). The
lone-token state is therefore the same at position 0 and at any observed position, and one table
serves all positions. What it lacks is the context, which is why exactness needs A1.

Which depth: one batched pass gives the lone-token state after every head layer, and the table after
the *first* layer (depth 1) is kept beside the one after the last (depth X). On SmolLM2 the uplink at
X = 2, 4 and 8 is closest to the depth-1 table far more often (top-1 66-70% against 3-14% at depth X):
layer 0 writes a token-specific signature that later layers keep. The attack reads depth 1 by default;
A1 interleaves both rankings.

Cosine, not L2: hidden states carry a few very large channels whose size varies with context; cosine
ranks the true token higher (SmolLM2, X = 2, depth X: top-1 14% against 1%).

Shapes: ``V`` vocabulary, ``D`` hidden size, ``T`` intercepted positions.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence

import torch

from lambdasplit.audit.attacks.result import AttackResult, Side
from lambdasplit.privacy.intercept import Intercept
from lambdasplit.split.loader import SplitModel
from lambdasplit.split.parts import Head

# Tables per public head module and depth (dropped with the module): X layers over V tokens.
_TABLES: weakref.WeakKeyDictionary[Head, dict[int, torch.Tensor]] = weakref.WeakKeyDictionary()


def public_head(public: SplitModel) -> Head:
    """The attacker's head; an error that says what to load when it is missing."""
    if public.head is None:
        raise ValueError(f"the attacker's public model {public.name!r} must hold its head (load all three parts)")
    return public.head


_head = public_head  # the name other attack modules import


def default_depths(head: Head) -> tuple[int, ...]:
    """The table depths kept: after the first head layer and after the last (just 0 for an embedding-only head)."""
    return tuple(sorted({min(1, head.num_layers), head.num_layers}))


@torch.inference_mode()
def context_free_tables(public: SplitModel, *, batch_size: int = 8192) -> dict[int, torch.Tensor]:
    """Depth -> (V, D) float32 lone-token head states, for ``default_depths``; cached per head.

    Depth ``d`` is the state after the head's first ``d`` layers (0: the embedding as the family applies it).
    """
    head = public_head(public)
    tables = _TABLES.get(head)
    if tables is None:
        depths = default_depths(head)
        vocab, device = int(public.config.vocab_size), public.runtime.device
        rows: dict[int, list[torch.Tensor]] = {d: [] for d in depths}
        assert head.model is not None
        for start in range(0, vocab, batch_size):
            ids = torch.arange(start, min(vocab, start + batch_size), device=device)[:, None]  # (B, 1)
            out = head.model(input_ids=ids, use_cache=False, output_hidden_states=True)
            for d in depths:  # hidden_states[d]: after d layers; the head's final norm is the identity
                state = out.last_hidden_state if d == head.num_layers else out.hidden_states[d]
                rows[d].append(state[:, 0].float())
        tables = {d: torch.cat(r) for d, r in rows.items()}
        _TABLES[head] = tables
    return tables


def context_free_table(public: SplitModel) -> torch.Tensor:
    """(V, D) float32 head output of every token run alone (depth X): exact at position 0 of any prompt."""
    return context_free_tables(public)[public_head(public).num_layers]


@torch.inference_mode()
def similarity(table: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (T, V) of intercepted ``states`` (T, D) with every ``table`` row (V, D)."""
    states = torch.nn.functional.normalize(states.to(table.device, torch.float32), dim=-1)
    return (states @ table.T) / table.norm(dim=-1).clamp_min(1e-12)


def positions(item: Intercept, side: Side) -> tuple[slice, list[int]]:
    """The uplink rows holding ``side``'s tokens, and those tokens (ground truth, for scoring).

    The prompt length is visible on the wire: the prefill frame carries P rows, each decode step one.
    Output tokens are seen only when fed back, so the last generated token is not in the uplink.
    """
    p = item.prompt_length
    if side == "prompt":
        return slice(0, p), list(item.prompt_ids)
    return slice(p, item.uplink.shape[0]), item.fed_ids[p:]


def nearest_neighbour(
    public: SplitModel,
    intercepts: Sequence[Intercept],
    *,
    side: Side = "prompt",
    depth: int | None = None,
    top_k: int = 10,
) -> list[AttackResult]:
    """Read each uplink row of ``side`` as its nearest lone-token head state; one result per intercept.

    ``depth``: which table (see ``default_depths``; default the shallowest, which reads best on SmolLM2).
    ``details["top_k"]``: per position, the ``top_k`` most similar token ids, best first.
    ``details["table_seconds"]``: time spent building tables in this call (0 once cached).
    """
    start = time.perf_counter()
    tables = context_free_tables(public)
    table_seconds = time.perf_counter() - start
    depth = min(tables) if depth is None else depth
    if depth not in tables:
        raise ValueError(f"depth must be one of {sorted(tables)} for this head, got {depth}")
    results = []
    for item in intercepts:
        start = time.perf_counter()
        rows, target = positions(item, side)
        scores = similarity(tables[depth], item.uplink[rows])
        best = scores.topk(min(top_k, scores.shape[-1]), dim=-1).indices.cpu()  # (T, k)
        results.append(
            AttackResult(
                attack="nearest_neighbour",
                side=side,
                recovered=best[:, 0].tolist(),
                target=target,
                seconds=time.perf_counter() - start,
                details={"depth": depth, "top_k": best.tolist(), "table_seconds": table_seconds},
            )
        )
    return results
