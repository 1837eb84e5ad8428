"""Decoding sessions: prefill a prompt, then one token per step, each part keeping its own KV cache.

A ``Decoder`` is what the generation loop drives. ``SplitDecoder`` runs head and tail here and reaches
the body through a ``BodyLink``: ``LocalBodyLink`` in this process, or a network link (the client).
``ModelDecoder`` runs the plain unsplit HF model, the reference everything is compared against.

With caching (the paper's "caching mechanism"), the prompt's hidden states cross each boundary once and
then exactly one position per generated token: traffic O(L*D). ``use_cache=False`` is the paper's
baseline: every step re-runs and resends the whole sequence, O(L^2*D).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from itertools import pairwise
from typing import Protocol, runtime_checkable

import torch
from transformers import Cache, DynamicCache, PreTrainedModel

from lambdasplit.errors import SessionError
from lambdasplit.split.loader import SplitModel
from lambdasplit.split.parts import Body, Head, rewind, with_cache
from lambdasplit.split.state import BodyState
from lambdasplit.split.tree import aside_mask, check_tree, is_chain, keep_rows, supports_trees, tree_inputs
from lambdasplit.traffic import Traffic

__all__ = [
    "BodyLink",
    "Decoder",
    "Keep",
    "KeptRows",
    "LocalBodyLink",
    "ModelDecoder",
    "SplitDecoder",
    "Traffic",
    "TreeLink",
    "tensor_bytes",
]

#: The branch of a token tree to keep: the block's first position and the rows kept (``split.tree.keep_rows``).
Keep = tuple[int, list[int]]


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class BodyLink(Protocol):
    """How the device reaches the body. One link serves one generation session and counts its traffic."""

    @property
    def traffic(self) -> Traffic:
        """What this link (decoder) has carried so far (read-only: an attribute or a property will do)."""
        ...

    def forward(self, hidden: torch.Tensor, position: int, reset: bool = False, last: bool = False) -> torch.Tensor:
        """Run the body on ``hidden`` (1, T, D) whose first row is at absolute ``position``.

        ``reset`` drops the body's cache first (no-cache mode). Returns (1, T, D), or logits (1, T, V) from a body
        that ends in the LM head (STIP's layout); ``last``: only the last row, (1, 1, D or V).
        """
        ...

    def close(self) -> None: ...


@runtime_checkable
class TreeLink(Protocol):
    """A ``BodyLink`` that can verify token trees (``split.tree``), when ``trees`` is true."""

    @property
    def trees(self) -> bool: ...

    def forward_tree(
        self, hidden: torch.Tensor, position: int, parents: list[int] | None, keep: Keep | None
    ) -> torch.Tensor:
        """``forward`` of a block whose rows form the tree ``parents`` (None: a chain), after keeping ``keep``, the
        branch of the last tree that was accepted (None: nothing to keep)."""
        ...


class LocalBodyLink:
    """The body in this process, with its own KV cache for one session (a ``BodyState``)."""

    def __init__(self, body: Body) -> None:
        self.body = body
        self.state = BodyState(body)
        self.traffic = Traffic()

    @property
    def length(self) -> int:
        """Positions the body's cache holds."""
        return self.state.length

    @property
    def cache(self) -> Cache | None:
        return self.state.cache

    def forward(self, hidden: torch.Tensor, position: int, reset: bool = False, last: bool = False) -> torch.Tensor:
        start = time.perf_counter()
        out = self.state.forward(hidden, position, reset, last)  # (1, T, D); position < length rolls back
        self.traffic.add(tensor_bytes(hidden), tensor_bytes(out), seconds=time.perf_counter() - start)
        return out

    @property
    def trees(self) -> bool:
        return self.state.supports_trees

    def forward_tree(
        self, hidden: torch.Tensor, position: int, parents: list[int] | None, keep: Keep | None
    ) -> torch.Tensor:
        start = time.perf_counter()
        if keep is not None:
            self.state.keep(*keep)
        out = self.state.forward(hidden, position, tree=parents)
        self.traffic.add(tensor_bytes(hidden), tensor_bytes(out), seconds=time.perf_counter() - start)
        return out

    def close(self) -> None:
        self.state.close()


class Decoder(Protocol):
    """One generation session over a growing sequence of token ids.

    ``prefill`` the prompt, then ``step`` one token at a time (logits (V,) of the next position), or
    ``extend`` by several tokens at once (logits (T, V), one row per token fed: how drafted tokens are
    verified in one round trip). ``truncate`` drops positions from the end, e.g. rejected drafts.
    """

    @property
    def traffic(self) -> Traffic:
        """What this link (decoder) has carried so far (read-only: an attribute or a property will do)."""
        ...

    ids: list[int]  # every token fed so far

    @property
    def length(self) -> int: ...

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def resume(self, input_ids: torch.Tensor | Sequence[int]) -> torch.Tensor: ...

    def step(self, token_id: int) -> torch.Tensor: ...

    def extend(self, token_ids: Sequence[int]) -> torch.Tensor: ...

    def truncate(self, length: int) -> None: ...

    @property
    def trees(self) -> bool:
        """Whether ``extend_tree`` can verify a token tree (``split.tree``) in one step."""
        ...

    def extend_tree(self, token_ids: Sequence[int], parents: Sequence[int]) -> torch.Tensor: ...

    def accept(self, rows: Sequence[int]) -> None: ...

    def close(self) -> None: ...


class DecoderBase:
    """What every decoder shares: the token ids it has fed (``ids``) and the prefill/resume/step/extend/truncate
    rules over them. A subclass supplies ``_run``, the forward over new positions."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    @property
    def length(self) -> int:
        return len(self.ids)

    def _run(self, new_ids: list[int], keep: int) -> torch.Tensor:
        raise NotImplementedError

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.ids:
            raise SessionError("prefill must come first in a session")
        ids = [int(t) for t in input_ids.reshape(-1).tolist()]
        if not ids:
            raise SessionError("the prompt is empty: at least one token is needed")
        return self._run(ids, 1)[-1]

    def resume(self, input_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Make ``input_ids`` the whole sequence and return the next position's logits (V,).

        Positions it shares with what was fed before stay in every cache (head, body, tail): only the
        rest is computed and sent. The next turn of a conversation repeats the previous turns, so it
        costs its new tokens, not the whole history. At least one position is always fed.
        """
        ids = [int(t) for t in (input_ids.reshape(-1).tolist() if isinstance(input_ids, torch.Tensor) else input_ids)]
        if not ids:
            raise SessionError("the prompt is empty: at least one token is needed")
        shared = 0
        for a, b in zip(self.ids, ids, strict=False):
            if a != b:
                break
            shared += 1
        keep = min(shared, len(ids) - 1)
        del self.ids[keep:]
        return self._run(ids[keep:], 1)[-1]

    def step(self, token_id: int) -> torch.Tensor:
        return self.extend([token_id])[-1]

    def extend(self, token_ids: Sequence[int]) -> torch.Tensor:
        if not self.ids:
            raise SessionError("step before prefill")
        if not token_ids:
            raise SessionError("extend needs at least one token")
        return self._run([int(t) for t in token_ids], len(token_ids))

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions; the caches follow at the next forward (no extra round trip)."""
        if not 1 <= length <= len(self.ids):
            raise SessionError(f"cannot truncate a {len(self.ids)}-position session to {length}")
        del self.ids[length:]

    #: The token tree fed by ``extend_tree`` and not yet settled by ``accept``: first position, tokens, parents.
    _tree: tuple[int, list[int], list[int]] | None = None

    @property
    def trees(self) -> bool:
        """Whether ``extend_tree`` can run (every part's cache can keep a branch)."""
        return False

    def extend_tree(self, token_ids: Sequence[int], parents: Sequence[int]) -> torch.Tensor:
        """Feed a token tree (``split.tree``): ``token_ids[0]`` is the next token, as ``extend``'s first, and row
        ``i`` follows row ``parents[i]``. Returns one row of logits per token (T, V); ``accept`` then says which
        branch to keep. A chain is fed with ``extend``."""
        if not self.ids:
            raise SessionError("step before prefill")
        parents = list(parents)
        check_tree(parents, len(token_ids))
        if is_chain(parents):
            return self.extend(token_ids)
        if not self.trees:
            raise SessionError("this decoder cannot verify token trees (see its ``trees``)", "bad_tree")
        position, tokens = len(self.ids), [int(t) for t in token_ids]
        logits = self._run_tree(tokens, parents, position)
        self._tree = (position, tokens, parents)
        return logits

    def accept(self, rows: Sequence[int]) -> None:
        """Keep the branch ``rows`` (row 0 first, then each row's child on the path) of the tree ``extend_tree`` fed:
        its tokens join ``ids``, as if they had been fed as a chain."""
        if self._tree is None or self._tree[0] != len(self.ids):
            raise SessionError("accept follows extend_tree")
        position, tokens, parents = self._tree
        rows = list(rows)
        if not rows or rows[0] != 0 or any(not 0 < r < len(tokens) or parents[r] != up for up, r in pairwise(rows)):
            raise SessionError(f"rows {rows} are not a branch from the root of the {len(tokens)}-row tree", "bad_tree")
        self._tree = None
        self._keep(position, rows)
        self.ids.extend(tokens[r] for r in rows)

    def _run_tree(self, tokens: list[int], parents: list[int], position: int) -> torch.Tensor:
        raise NotImplementedError

    def _keep(self, position: int, rows: list[int]) -> None:
        raise NotImplementedError


class KeptRows:
    """One row per position from ``first``, kept for a drafter as a decoder computes them; a gap or an overlap
    starts the record over."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None
        self.first = 0

    @property
    def end(self) -> int:
        """The position after the last row held."""
        return self.first + (0 if self.rows is None else int(self.rows.shape[0]))

    def add(self, rows: torch.Tensor, first: int) -> None:
        if self.rows is not None and self.end == first:
            self.rows = torch.cat([self.rows, rows])
        else:
            self.rows, self.first = rows, first

    def cut(self, position: int) -> None:
        """Forget the rows at ``position`` and after (a run recomputes them)."""
        if self.rows is not None:
            self.rows = self.rows[: max(0, position - self.first)]

    def span(self, start: int, stop: int) -> torch.Tensor | None:
        """The rows for positions ``start .. stop - 1``; None unless all of them are held."""
        if self.rows is None or not self.first <= start <= stop <= self.end:
            return None
        return self.rows[start - self.first : stop - self.first]

    def forget_before(self, position: int) -> None:
        if self.rows is not None and position > self.first:
            self.rows, self.first = self.rows[position - self.first :], position


class SplitDecoder(DecoderBase):
    """Head and tail here, the body behind ``link``; logits for the positions asked for only.

    In STIP's layout (``split.layout == "stip"``) there is no tail: the head is the embedding, the body returns
    logits, and a prompt asks the body for its last row only (one row of V on the wire, not T).
    """

    def __init__(self, split: SplitModel, link: BodyLink, *, use_cache: bool = True) -> None:
        self.stip = split.layout == "stip"
        if split.head is None or (split.tail is None and not self.stip):
            raise SessionError("a split decoder needs the head and the tail in this process")
        super().__init__()
        self.split, self.link, self.use_cache = split, link, use_cache
        self.head_cache = split.head.new_cache() if use_cache else None
        self.tail_cache = split.tail.new_cache() if use_cache and split.tail is not None else None
        #: Set by a drafter that reads the model's hidden states (``HeadDrafter``): ``features`` then holds what
        #: the LM head was given (rows for the positions the tail computed logits for: a prompt's last, then every
        #: position fed one step at a time), ``states`` what the head computed (before the wire) at every position.
        self.keep_features = False
        self.features, self.states = KeptRows(), KeptRows()
        #: What ``look_ahead`` computed (rows still in the head's KV cache) and for which ids: a run that feeds the
        #: same ids at the same positions reuses them instead of running the head over them again.
        self.ahead, self.ahead_ids = KeptRows(), list[int]()
        #: What ``look_ahead`` runs, when a drafter sets it: a cheaper copy of the head (``HeadDrafter``'s, with int8
        #: weights) whose rows serve drafting only. They are not kept for reuse: the verification runs the head itself
        #: on every row it sends, so what crosses the wire is the model's own.
        self.look_ahead_head: Head | None = None
        #: The branch of the last token tree that the body has not been told to keep yet: it goes with the next FORWARD.
        self._body_keep: Keep | None = None
        self._tree_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # the tree's states and features, kept

    @property
    def traffic(self) -> Traffic:
        return self.link.traffic

    @property
    def trees(self) -> bool:
        return (
            self.use_cache
            and not self.stip
            and isinstance(self.link, TreeLink)
            and self.link.trees
            and supports_trees(self.head_cache)
            and supports_trees(self.tail_cache)
        )

    def _body(self, hidden: torch.Tensor, position: int, last: bool = False) -> torch.Tensor:
        """The body's output for ``hidden`` at ``position``, the body first told the branch of the last tree to keep."""
        keep, self._body_keep = self._body_keep, None
        if keep is None:
            return self.link.forward(hidden, position, last=last)
        assert isinstance(self.link, TreeLink)
        return self.link.forward_tree(hidden, position, None, keep)

    def _run(self, new_ids: list[int], keep: int) -> torch.Tensor:
        assert self.split.head is not None
        device = self.split.runtime.device
        position = len(self.ids)
        self.ids.extend(new_ids)
        self._tree = None  # a tree fed and not accepted is rolled back like rejected drafts
        self.features.cut(position)  # rows for positions this run recomputes (rolled back or resumed) go
        self.states.cut(position)
        if self.use_cache:
            raw = self._head_rows(new_ids, position)  # (1, T_new, D)
            if self.keep_features:
                self.states.add(raw[0], position)
            hidden = self._encode(raw)
            return self._finish(self._body(hidden, position, last=self.stip and keep == 1), keep, position)
        x = torch.tensor([self.ids], device=device)
        hidden = self._encode(self.split.head(x))  # (1, T_all, D): the whole sequence crosses again
        return self._finish(self.link.forward(hidden, 0, reset=True, last=self.stip and keep == 1), keep, None)

    def _finish(self, out: torch.Tensor, keep: int, position: int | None) -> torch.Tensor:
        """The logits (keep, V) of what the body returned: through the tail (``position`` set: its cached
        forward at that position), or, in STIP's layout, the body's logits decoded."""
        out = self._decode(out)  # the body rewinds to `position` too
        if self.split.tail is None:
            return out[0, -keep:]
        if position is not None:
            rewind(self.tail_cache, position)
            if self.keep_features:
                logits, features = self.split.tail.forward_with_features(out, self.tail_cache, logits_to_keep=keep)
                self.features.add(features[0], position + out.shape[1] - keep)
                return logits[0]
            return self.split.tail(out, self.tail_cache, logits_to_keep=keep)[0]
        return self.split.tail(out, logits_to_keep=keep)[0]  # (keep, V)

    def look_ahead(self, ids: Sequence[int], position: int) -> torch.Tensor:
        """What the head makes of ``ids`` (drafted, not yet verified) at positions ``position ..``: (T, D), before
        the wire. The head's KV cache holds them until the next run, which reuses the rows for the ids it feeds
        at the same positions (a verification feeds the drafted ids: the head runs once on each) and rewinds the
        cache past them."""
        assert self.split.head is not None and self.use_cache
        rewind(self.head_cache, position)
        x = torch.tensor([list(ids)], device=self.split.runtime.device)
        if self.look_ahead_head is not None:  # rows for drafting only: the verification recomputes what it sends
            self.ahead, self.ahead_ids = KeptRows(), []
            return self.look_ahead_head(x, self.head_cache)[0]
        rows = self.split.head(x, self.head_cache)[0]
        self.ahead.cut(position)
        kept = self.ahead_ids[: max(0, position - self.ahead.first)]
        self.ahead.add(rows, position)
        self.ahead_ids = (kept if self.ahead.first < position else []) + list(ids)
        return rows

    def look_aside(self, ids: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """What the head makes of ``ids`` off the drafted chain, side by side: ``ids[r]`` at ``positions[r]``, after
        the cache's first ``positions[r]`` positions (the context and ``look_ahead``'s rows before it): (R, D),
        before the wire. The head's KV cache is left as it was (a verification computes such rows again)."""
        assert self.split.head is not None and self.head_cache is not None
        rt = self.split.runtime
        held = self.head_cache.get_seq_length()
        mask = aside_mask(positions, held, rt.dtype, rt.device)
        x = torch.tensor([list(ids)], device=rt.device)
        at = torch.tensor([list(positions)], device=rt.device)
        try:
            return self.split.head(x, self.head_cache, attention_mask=mask, position_ids=at)[0]
        finally:
            rewind(self.head_cache, held)

    def _head_rows(self, new_ids: list[int], position: int) -> torch.Tensor:
        """The head's output (1, T, D) for ``new_ids`` at ``position ..``, its KV cache then holding exactly them:
        the rows ``look_ahead`` computed for the leading ids that match are reused, the head runs on the rest."""
        assert self.split.head is not None
        reused = 0
        if self.ahead.first <= position <= self.ahead.end:
            for held, new in zip(self.ahead_ids[position - self.ahead.first :], new_ids, strict=False):
                if held != new:
                    break
                reused += 1
        parts = [self.ahead.span(position, position + reused)] if reused else []
        self.ahead, self.ahead_ids = KeptRows(), []  # the cache is rewound past them next
        rewind(self.head_cache, position + reused)
        if reused < len(new_ids):
            x = torch.tensor([new_ids[reused:]], device=self.split.runtime.device)
            parts.append(self.split.head(x, self.head_cache)[0])
        return torch.cat([p for p in parts if p is not None])[None]

    def _run_tree(self, tokens: list[int], parents: list[int], position: int) -> torch.Tensor:
        """Every part runs the block under the tree's mask. The rows before the first branch are a chain: the head
        reuses their look-ahead rows (``_head_rows``) and runs the rest under the mask."""
        assert self.split.head is not None and self.split.tail is not None
        self.features.cut(position)
        self.states.cut(position)
        rt = self.split.runtime
        mask, positions = tree_inputs(parents, position, rt.dtype, rt.device)
        # With nothing looked ahead to reuse, every row runs under the mask in one pass.
        chain = next((i for i, p in enumerate(parents) if p != i - 1), len(parents))
        chain = chain if self.ahead.rows is not None else 0
        parts = [self._head_rows(tokens[:chain], position)[0]] if chain else []  # the cache then holds position + chain
        if not chain:
            rewind(self.head_cache, position)
            self.ahead, self.ahead_ids = KeptRows(), []
        if chain < len(tokens):
            x = torch.tensor([tokens[chain:]], device=rt.device)
            rest = self.split.head(
                x, self.head_cache, attention_mask=mask[:, :, chain:], position_ids=positions[:, chain:]
            )
            parts.append(rest[0])
        raw = torch.cat(parts)
        keep, self._body_keep = self._body_keep, None
        assert isinstance(self.link, TreeLink)
        out = self._decode(self.link.forward_tree(self._encode(raw[None]), position, parents, keep))
        rewind(self.tail_cache, position)
        tree = {"attention_mask": mask, "position_ids": positions}
        if self.keep_features:
            logits, features = self.split.tail.forward_with_features(out, self.tail_cache, len(tokens), **tree)
            self._tree_rows = (raw, features[0])
        else:
            logits, self._tree_rows = self.split.tail(out, self.tail_cache, len(tokens), **tree), None
        return logits[0]

    def _keep(self, position: int, rows: list[int]) -> None:
        keep_rows(self.head_cache, position, rows)
        keep_rows(self.tail_cache, position, rows)
        self._body_keep = (position, rows)  # told with the next FORWARD: no round trip of its own
        self.ahead, self.ahead_ids = KeptRows(), []
        if self._tree_rows is not None:
            raw, features = self._tree_rows
            self.states.add(raw[rows], position)
            self.features.add(features[rows], position)
        self._tree_rows = None

    def _encode(self, hidden: torch.Tensor) -> torch.Tensor:
        transform = self.split.wire_transform
        return hidden if transform is None else transform.encode(hidden)

    def _decode(self, hidden: torch.Tensor) -> torch.Tensor:
        transform = self.split.wire_transform
        return hidden if transform is None else transform.decode(hidden)

    def reset(self) -> None:
        """Forget the sequence (new head and tail caches); the link is kept, so only for stateless links."""
        assert self.split.head is not None
        self.ids = []
        self.features, self.states = KeptRows(), KeptRows()
        self.ahead, self.ahead_ids = KeptRows(), []
        self._tree, self._body_keep, self._tree_rows = None, None, None
        self.head_cache = self.split.head.new_cache() if self.use_cache else None
        self.tail_cache = self.split.tail.new_cache() if self.use_cache and self.split.tail is not None else None

    def close(self) -> None:
        self.link.close()
        self.head_cache = self.tail_cache = None


class ModelDecoder(DecoderBase):
    """The unsplit HF causal LM with one DynamicCache: the reference and the ``--unsplit`` mode."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        self.cache: Cache = self._new_cache()
        self.traffic = Traffic()
        self._device = next(model.parameters()).device

    def _new_cache(self) -> Cache:
        cache = DynamicCache(config=self.model.config)
        cache.activate_past_recording()  # sliding windows can be rolled back (see split.parts.rewind)
        return cache

    @property
    def trees(self) -> bool:
        return supports_trees(self.cache)

    @torch.inference_mode()
    def _run(self, new_ids: list[int], keep: int) -> torch.Tensor:
        rewind(self.cache, len(self.ids))
        self._tree = None
        self.ids.extend(new_ids)
        ids = torch.tensor([new_ids], device=self._device)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=keep, **with_cache(self.model, self.cache))
        return out.logits[0]

    @torch.inference_mode()
    def _run_tree(self, tokens: list[int], parents: list[int], position: int) -> torch.Tensor:
        rewind(self.cache, position)
        mask, positions = tree_inputs(parents, position, self.model.dtype, self._device)
        ids = torch.tensor([tokens], device=self._device)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=len(tokens),
            **with_cache(self.model, self.cache),
        )
        return out.logits[0]

    def _keep(self, position: int, rows: list[int]) -> None:
        keep_rows(self.cache, position, rows)

    def reset(self) -> None:
        """Forget the sequence: the decoder can start again with ``prefill``."""
        self.ids = []
        self._tree = None
        self.cache = self._new_cache()

    def close(self) -> None:
        self.reset()
