"""One session's view of the body: its KV cache, how many positions it holds, and the position rules.

Every place that runs the body for a session goes through ``BodyState``: the device's in-process link
(``generation.session.LocalBodyLink``), the server's single steps and its continuous batching
(``server.batching``). The rules live here once:

- a forward at ``position`` needs the cache to hold at least ``position`` positions: ``position < length``
  is a rollback (rejected draft tokens; the cache is cut back first), ``position > length`` would skip
  positions the body never saw and is refused;
- ``reset`` (the paper's no-cache baseline) drops the cache and must start at position 0;
- a token tree's block (``split.tree``) runs under its tree mask, and ``keep`` then keeps one of its branches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from lambdasplit.errors import CodedError, SessionError
from lambdasplit.split.parts import Body, rewind
from lambdasplit.split.tree import check_tree, keep_rows, supports_trees, tree_inputs


def cache_layers(cache: Cache) -> list[DynamicLayer]:
    """The layers of a cache that ``Part.new_cache`` built: a DynamicCache, whose layers are ``DynamicLayer``s
    (the sliding-window kind is a subclass). transformers types ``Cache.layers`` as any layer kind."""
    return cast(list[DynamicLayer], cache.layers)


def held_positions(layer: DynamicLayer) -> int:
    """Positions a cache layer holds (0 before its first update)."""
    return 0 if layer.keys is None or not layer.is_initialized else layer.keys.shape[-2]


@dataclass
class PendingTree:
    """What a server was told for a session's next FORWARD (a TREE frame): its rows' ``parents``, or why the TREE
    frame was refused (the FORWARD is refused with it)."""

    parents: list[int] | None
    refused: CodedError | None = None


class BodyState:
    """The body of one session: ``cache`` holds exactly ``length`` positions after every forward."""

    def __init__(self, body: Body) -> None:
        self.body = body
        self.cache: Cache | None = body.new_cache()
        self.length = 0  # positions the cache holds
        self.steps = 0  # forwards run
        self.pending_tree: PendingTree | None = None  # a server's: the TREE frame for the next FORWARD

    def check(self, position: int, reset: bool = False) -> None:
        """Raise ``SessionError`` (code ``bad_position``) unless a forward may start at ``position``."""
        if reset and position != 0:
            raise SessionError(f"a reset (no-cache) forward starts at position 0, not {position}", "bad_position")
        if not reset and position > self.length:
            raise SessionError(
                f"position {position} skips ahead: the session's body holds {self.length} positions", "bad_position"
            )

    def align(self, position: int, reset: bool = False) -> None:
        """Make the cache hold exactly positions [0, position): a new cache on ``reset``, else a rollback."""
        self.check(position, reset)
        if reset:
            self.cache = self.body.new_cache()
        else:
            rewind(self.cache, position)
        self.length = position

    def advanced(self, rows: int) -> None:
        """Record that a forward appended ``rows`` positions to the cache (after ``align``)."""
        self.length += rows
        self.steps += 1

    @property
    def supports_trees(self) -> bool:
        """Whether this session's cache can keep one branch of a token tree (full attention only; an empty body has no
        cache, and nothing to keep), as the server's WELCOME says for its body."""
        return supports_trees(self.cache)

    def check_tree_rows(self, tree: list[int], rows: int, reset: bool = False) -> None:
        """Raise ``SessionError`` (code ``bad_tree``) unless a forward of ``rows`` rows may run as the token tree
        ``tree`` (their parents)."""
        if reset or not self.supports_trees:
            raise SessionError("a token tree needs a session with a full-attention cache, not reset", "bad_tree")
        check_tree(tree, rows)

    def check_keep(self, start: int, rows: list[int]) -> None:
        """Raise ``SessionError`` (code ``bad_tree``) unless ``keep(start, rows)`` may run."""
        if not self.supports_trees:
            raise SessionError("this session's body cannot keep a branch of a token tree", "bad_tree")
        if (
            not 0 <= start <= self.length
            or any(r < 0 or start + r >= self.length for r in rows)
            or rows != sorted(set(rows))
        ):
            raise SessionError(
                f"cannot keep rows {rows} after position {start}: the session's body holds {self.length} positions",
                "bad_tree",
            )

    def keep(self, start: int, rows: list[int]) -> None:
        """Keep positions [0, start), then the rows ``rows`` of the block that started at ``start`` (the branch of a
        token tree that was accepted): the cache then holds ``start + len(rows)`` positions."""
        self.check_keep(start, rows)
        keep_rows(self.cache, start, rows)
        self.length = start + len(rows)

    def forward(
        self,
        hidden: torch.Tensor,
        position: int,
        reset: bool = False,
        last: bool = False,
        tree: list[int] | None = None,
    ) -> torch.Tensor:
        """Run the body on ``hidden`` (B=1, T, D) whose first row is at ``position``; returns (1, T, D), or (1, T, V)
        for a body that ends in the LM head; ``last``: the last row only. ``tree``: the rows' parents, a token tree
        (``split.tree``) whose root is at ``position``."""
        if tree is not None:
            self.check_tree_rows(tree, hidden.shape[1], reset)
        self.align(position, reset)
        try:
            if tree is not None:
                mask, positions = tree_inputs(tree, position, hidden.dtype, hidden.device)
                out = self.body(hidden, self.cache, attention_mask=mask, position_ids=positions, last=last)
            else:
                out = self.body(hidden, self.cache, last=last)
        except BaseException:
            self.undo(position)
            raise
        self.advanced(hidden.shape[1])
        return out

    def start(
        self,
        hidden: torch.Tensor,
        position: int,
        reset: bool = False,
        last: bool = False,
        tree: list[int] | None = None,
    ) -> Callable[[], torch.Tensor]:
        """``forward``, as what gives its output: here the step runs now; a state whose body computes elsewhere (a
        chain of stage actors) submits it and returns at once, so the batcher can start other sessions' steps
        before it waits."""
        out = self.forward(hidden, position, reset, last, tree)
        return lambda: out

    def undo(self, position: int) -> None:
        """Put the cache back to ``position`` after a forward that failed part-way: the first layers may hold the
        new positions and the rest not, so each layer is cut on its own. The step can then be retried."""
        for layer in [] if self.cache is None else cache_layers(self.cache):
            extra = held_positions(layer) - position
            if extra > 0:
                layer.crop(-extra)
        self.length = position

    def close(self) -> None:
        self.cache, self.length = None, 0
