"""One stage of a body split across machines: global layers [a, b) and one KV cache per session (Petals' server).

A ``Stage`` is a plain class; ``chain.StageChain`` runs it as a Ray actor, one per node. It loads only its own
layers (``load_split(model, (a, b), parts=["body"])``: layer indices stay global, so stage [2, 4) of a body
[1, 5) holds the checkpoint's ``model.layers.2`` and ``.3``), and keeps a ``BodyState`` per session, so the
position rules, rollback of rejected drafts, the no-cache reset and ``undo`` after a failed forward are the ones
every other body runs.

A session is opened by its first forward (at position 0 or with ``reset``), so a step costs one call per stage
and opening costs none. A forward at a later position for a session this stage does not hold (it was evicted
here, or the stage is new) is refused with ``unknown_session``: the device replays its history into a new
session, as after any other lost session. Sessions idle for ``idle_ttl`` seconds are dropped on the next call;
the replica normally closes them first (its own ``idle_ttl`` is shorter), this is the backstop.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from lambdasplit.errors import ConfigError, SessionError
from lambdasplit.split.loader import load_split
from lambdasplit.split.state import BodyState
from lambdasplit.split.tree import supports_trees


@dataclass(frozen=True)
class StageInfo:
    """What a stage reports about itself: where it runs and what it holds (what the replica's WELCOME is made of)."""

    layers: tuple[int, int]  # global [a, b)
    node_id: str  # the Ray node it runs on ("" outside Ray)
    pid: int
    name: str  # the model as the caller named it
    fingerprint: str  # of the whole checkpoint: every stage of one chain must agree
    config: PretrainedConfig
    device: str
    dtype: str  # "float32", "bfloat16", ...
    sessions: int
    parameters: int  # unique parameters held by this stage
    trees: bool  # whether its caches can keep a branch of a token tree (full attention only)


@dataclass
class _Session:
    state: BodyState
    last_used: float


class Stage:
    """Global layers [a, b) of a body with a KV cache per session: hidden (T, D) in, hidden (T, D) out.

    ``model`` is resolved on the stage's own machine (an embedded name, a checkpoint folder or a hub id), so the
    replica needs no copy of the weights. Tensors come in and go out on the CPU (what Ray serialises); the stage
    moves them to its device and dtype.
    """

    def __init__(
        self,
        model: str,
        layers: tuple[int, int],
        *,
        device: str | None = None,
        dtype: str | None = None,
        idle_ttl: float = 600.0,
        node_id: str = "",
    ) -> None:
        a, b = layers
        if not 0 <= a < b:
            raise ConfigError(f"a stage holds a non-empty layer range [a, b) with 0 <= a < b, got [{a}, {b})")
        split = load_split(model, (a, b), parts=["body"], device=device, dtype=dtype, quiet=True)
        if split.layout != "head-tail":
            raise ConfigError(
                f"{model} is a {split.layout} checkpoint; stages hold layer ranges of a head/tail body only "
                "(STIP's body ends in the LM head)"
            )
        assert split.body is not None  # parts=["body"]
        self.split, self.body = split, split.body
        self.layers = (a, b)
        self.idle_ttl, self.node_id = idle_ttl, node_id
        self._sessions: dict[str, _Session] = {}
        self.evicted = 0

    def info(self) -> StageInfo:
        rt = self.split.runtime
        return StageInfo(
            layers=self.layers,
            node_id=self.node_id,
            pid=os.getpid(),
            name=self.split.name,
            fingerprint=self.split.fingerprint,
            config=self.split.config,
            device=str(rt.device),
            dtype=str(rt.dtype).removeprefix("torch."),
            sessions=len(self._sessions),
            parameters=self.split.parameter_count("body"),
            trees=supports_trees(self.body.new_cache()),
        )

    def forward(
        self, session: str, hidden: torch.Tensor, position: int, reset: bool, last: bool, tree: list[int] | None = None
    ) -> torch.Tensor:
        """Run layers [a, b) on ``hidden`` (T, D), whose first row is at ``position`` of ``session``; returns (T, D),
        or (1, D) with ``last`` (only the chain's last stage is asked for that: the next stage needs every row).
        ``tree``: the rows' parents, a token tree (``split.tree``) whose root is at ``position``."""
        self.evict_idle()
        held = self._sessions.get(session)
        if held is None:
            if position != 0 and not reset:
                raise self._unknown(session, f"to continue at position {position}")
            held = self._sessions[session] = _Session(BodyState(self.body), time.monotonic())
        held.last_used = time.monotonic()
        rt = self.split.runtime
        x = hidden.to(device=rt.device, dtype=rt.dtype).unsqueeze(0)  # (1, T, D)
        return held.state.forward(x, position, reset, last, tree)[0].cpu()

    def keep(self, session: str, start: int, rows: list[int]) -> None:
        """Keep ``session``'s positions [0, start), then the rows ``rows`` of the block from ``start`` (the branch of
        its last token tree that was accepted)."""
        held = self._sessions.get(session)
        if held is None:
            raise self._unknown(session, "to keep a branch of")
        held.last_used = time.monotonic()
        held.state.keep(start, rows)

    def _unknown(self, session: str, what: str) -> SessionError:
        return SessionError(
            f"stage [{self.layers[0]}, {self.layers[1]}) holds no session {session!r} {what} (evicted after "
            f"{self.idle_ttl:.0f} s idle, or the stage was restarted)",
            "unknown_session",
        )

    def close(self, session: str) -> bool:
        """Drop ``session``'s cache; whether this stage held it (a session never forwarded here was not)."""
        return self._sessions.pop(session, None) is not None

    def evict_idle(self, now: float | None = None) -> int:
        """Drop the sessions idle longer than ``idle_ttl``; how many."""
        now = time.monotonic() if now is None else now
        stale = [s for s, held in self._sessions.items() if now - held.last_used > self.idle_ttl]
        for s in stale:
            del self._sessions[s]
        self.evicted += len(stale)
        return len(stale)

    def held_positions(self, session: str) -> int:
        """Positions ``session``'s cache holds here (0 when not held): for tests of rollback across stages."""
        held = self._sessions.get(session)
        return 0 if held is None else held.state.length
