"""Head, body and tail: thin wrappers around a *shorter copy of the model's own Hugging Face classes*.

Each part holds an HF base model whose config says ``num_hidden_layers = (its layer count)``, with the
part's layers in it (layer ``i`` of the body is global layer ``X + i``; see ``build.py``). Calling
that model's own ``forward`` gives rotary embeddings, causal (and sliding-window) masks and KV-cache
updates exactly as in the unsplit model, so nothing of HF's forward code is copied here.

In STIP's layout (``layout="stip"``) the head is the embedding alone, the body (``LogitsBody``) runs every
layer, the final norm and the LM head, and there is no tail: logits cross the wire.

Shapes: ``B`` batch, ``T`` new positions this call, ``D`` hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import Cache, DynamicCache, PreTrainedModel

from lambdasplit.errors import SessionError


@functools.cache
def _cache_argument(model_class: type[nn.Module]) -> str:
    """The name ``model_class.forward`` takes the KV cache by: ``cache`` in newer transformers releases,
    ``past_key_values`` before (still accepted after, with a deprecation warning on every call)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def with_cache(model: nn.Module, cache: Cache | None) -> dict[str, Cache | None]:
    # mypy checks a class against Hashable by its instances' unbound __hash__; every class is hashable.
    return {_cache_argument(type(model)): cache}  # type: ignore[arg-type]


class _Part(nn.Module):
    """Common plumbing: one HF model, its layer range, and a fresh KV cache per session."""

    def __init__(self, model: PreTrainedModel | None, start: int, stop: int) -> None:
        super().__init__()
        self.model = model
        self.start, self.stop = start, stop

    @property
    def num_layers(self) -> int:
        return self.stop - self.start

    def new_cache(self) -> Cache | None:
        """A per-session KV cache for this part's layers (``None`` when it has no layers to cache).

        Sliding-window layers record their past, so positions can be rolled back (``rewind``) even
        once the window is full.
        """
        if self.model is None or self.num_layers == 0:
            return None
        cache = DynamicCache(config=self.model.config)
        cache.activate_past_recording()
        return cache

    def extra_repr(self) -> str:
        return f"layers=[{self.start}, {self.stop})"


def rewind(cache: Cache | None, length: int) -> None:
    """Make ``cache`` hold exactly its first ``length`` positions, before a forward that starts at ``length``.

    Positions past ``length`` are dropped: a rollback (rejected draft tokens). Sliding-window layers record
    their past (``new_cache``), so a rollback works once the window is full; each rollback also trims them
    back to the window. Between rollbacks they grow like full-attention layers (memory, not compute:
    attention still sees only the window), because a drafter may roll back over several forwards.
    """
    if cache is None:
        return
    held = cache.get_seq_length()
    if length > held:
        raise SessionError(f"cannot rewind to position {length}: the cache holds {held} positions")
    if length < held:
        cache.crop(length - held)  # transformers >= 5: a negative count of positions to remove


class Head(_Part):
    """Device side, first: token ids (B, T) -> hidden states (B, T, D) after global layers [0, X)."""

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        cache: Cache | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``attention_mask`` (4D) and ``position_ids`` (B, T): a token tree's rows (``split.tree``)."""
        assert self.model is not None
        # With no layers, positions and masks are unused; skipping the cache keeps it empty.
        use_cache = cache is not None and self.num_layers > 0
        kept = cache if use_cache else None
        out = self.model(
            input_ids=input_ids,
            use_cache=use_cache,
            **with_cache(self.model, kept),
            attention_mask=attention_mask,
            position_ids=position_ids,
        )
        return out.last_hidden_state


class Body(_Part):
    """Cloud side: hidden states (B, T, D) after layer X -> hidden states (B, T, D) after layer Y-1.

    An empty body (X == Y) is the identity and holds no model at all.
    """

    #: What the body returns: hidden states for the device's tail ("hidden"), or logits ("logits", ``LogitsBody``).
    output = "hidden"

    @torch.inference_mode()
    def forward(
        self,
        hidden: torch.Tensor,
        cache: Cache | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        last: bool = False,
    ) -> torch.Tensor:
        """``attention_mask`` (B, past + T) and ``position_ids`` (B, T) are for batches of sessions whose
        caches were left-padded to one length (the server's continuous batching); one session needs neither.
        ``last``: return the last position's row only (B, 1, D); every position still enters the cache."""
        if self.model is None:
            return hidden[:, -1:] if last else hidden
        out = self.model(
            inputs_embeds=hidden,
            use_cache=cache is not None,
            **with_cache(self.model, cache),
            attention_mask=attention_mask,
            position_ids=position_ids,
            **self._keep(last),
        )
        return self._returned(out, last)

    def _keep(self, last: bool) -> dict[str, int]:
        """Extra arguments of the model's forward that choose which positions it computes an output for."""
        return {}

    def _returned(self, out: Any, last: bool) -> torch.Tensor:
        """What the body sends back of ``out``, the model's output (a ``ModelOutput`` of the base or causal LM)."""
        return out.last_hidden_state[:, -1:] if last else out.last_hidden_state


class LogitsBody(Body):
    """Cloud side in STIP's layout: hidden states (B, T, D) before layer 0 -> logits (B, T, V).

    It runs every layer, the final norm and the LM head through the model's own ``ForCausalLM`` forward
    (as the tail does in the head/tail layout); the device holds only the embedding. ``last`` asks for
    the last position's logits only (a prompt's), so a prefill sends one row of V back, not T.
    """

    output = "logits"

    def _keep(self, last: bool) -> dict[str, int]:
        return {"logits_to_keep": 1 if last else 0}  # the LM head runs on the rows returned only

    def _returned(self, out: Any, last: bool) -> torch.Tensor:
        return out.logits


@contextmanager
def lm_head_inputs(model: PreTrainedModel) -> Iterator[list[torch.Tensor]]:
    """While the block runs, what ``model``'s LM head is given, one (B, T, D) tensor per call: the last hidden
    state after the final norm (the features a draft head reads and is trained on)."""
    head = model.get_output_embeddings()
    if head is None:
        raise SessionError(f"{type(model).__name__} has no LM head to read features at")
    seen: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        hook.remove()


class Tail(_Part):
    """Device side, last: hidden states (B, T, D) after layer Y-1 -> logits (B, K, V) of the last K positions.

    Runs global layers [Y, N), the final norm and the LM head through the model's own ``ForCausalLM``
    forward (so family details such as logit soft-capping or scaling are kept).
    """

    @torch.inference_mode()
    def forward(
        self,
        hidden: torch.Tensor,
        cache: Cache | None = None,
        logits_to_keep: int = 1,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``attention_mask`` (4D) and ``position_ids`` (B, T): a token tree's rows (``split.tree``)."""
        assert self.model is not None
        use_cache = cache is not None and self.num_layers > 0
        out = self.model(
            inputs_embeds=hidden,
            use_cache=use_cache,
            **with_cache(self.model, cache if use_cache else None),
            logits_to_keep=logits_to_keep,
            attention_mask=attention_mask,
            position_ids=position_ids,
        )
        return out.logits

    def forward_with_features(
        self, hidden: torch.Tensor, cache: Cache | None = None, logits_to_keep: int = 1, **tree: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward``, and what the LM head was given for those K positions (B, K, D): the model's last hidden
        state after its final norm, which a draft head reads (``generation.drafthead``)."""
        assert self.model is not None
        with lm_head_inputs(self.model) as seen:
            logits = self.forward(hidden, cache, logits_to_keep, **tree)
        return logits, seen[-1]
