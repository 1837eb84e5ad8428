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
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import Cache, DynamicCache, PreTrainedModel

from lambdasplit.errors import SessionError
from lambdasplit.split.loader import SplitModel
from lambdasplit.split.parts import Body


@dataclass
class Traffic:
    """What crossed the device/cloud boundary, counted by the link that carried it.

    ``*_bytes`` are whole messages as sent (for a network link: wire frames, header included);
    ``*_payload_bytes`` are the hidden-state tensors alone. In process, both are the tensor bytes.
    """

    up_bytes: int = 0
    down_bytes: int = 0
    up_payload_bytes: int = 0
    down_payload_bytes: int = 0
    messages: int = 0  # round trips
    seconds: float = 0.0  # wall time waiting on the body: its compute plus, over a network, the transfer

    def add(
        self, up: int, down: int, up_payload: int | None = None, down_payload: int | None = None, seconds: float = 0.0
    ) -> None:
        self.seconds += seconds
        self.up_bytes += up
        self.down_bytes += down
        self.up_payload_bytes += up if up_payload is None else up_payload
        self.down_payload_bytes += down if down_payload is None else down_payload
        self.messages += 1


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class BodyLink(Protocol):
    """How the device reaches the body. One link serves one generation session and counts its traffic."""

    traffic: Traffic

    def forward(self, hidden: torch.Tensor, position: int, reset: bool = False) -> torch.Tensor:
        """Run the body on ``hidden`` (1, T, D) whose first row is at absolute ``position``.

        ``reset`` drops the body's cache first (no-cache mode). Returns (1, T, D).
        """
        ...

    def close(self) -> None: ...


class LocalBodyLink:
    """The body in this process, with its own KV cache for one session."""

    def __init__(self, body: Body) -> None:
        self.body = body
        self.cache: Cache | None = body.new_cache()
        self.traffic = Traffic()

    def forward(self, hidden: torch.Tensor, position: int, reset: bool = False) -> torch.Tensor:
        if reset:
            self.cache = self.body.new_cache()
        cached = self.cache.get_seq_length() if self.cache is not None else position
        if position != cached and not reset:
            raise SessionError(f"body got position {position} but its cache holds {cached} positions")
        start = time.perf_counter()
        out = self.body(hidden, self.cache)
        self.traffic.add(tensor_bytes(hidden), tensor_bytes(out), seconds=time.perf_counter() - start)
        return out

    def close(self) -> None:
        self.cache = None


class Decoder(Protocol):
    """One generation session: ``prefill`` the prompt, then ``step`` one token at a time. Logits (V,)."""

    traffic: Traffic

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def step(self, token_id: int) -> torch.Tensor: ...

    def close(self) -> None: ...


class SplitDecoder:
    """Head and tail here, the body behind ``link``; logits only for the last position."""

    def __init__(self, split: SplitModel, link: BodyLink, *, use_cache: bool = True) -> None:
        if split.head is None or split.tail is None:
            raise SessionError("a split decoder needs the head and the tail in this process")
        self.split, self.link, self.use_cache = split, link, use_cache
        self.head_cache = split.head.new_cache() if use_cache else None
        self.tail_cache = split.tail.new_cache() if use_cache else None
        self.ids: list[int] = []  # every token fed so far (the no-cache baseline re-runs all of them)

    @property
    def traffic(self) -> Traffic:
        return self.link.traffic

    def _run(self, new_ids: list[int]) -> torch.Tensor:
        assert self.split.head is not None and self.split.tail is not None
        device = self.split.runtime.device
        position = len(self.ids)
        self.ids.extend(new_ids)
        if self.use_cache:
            x = torch.tensor([new_ids], device=device)
            hidden = self.split.head(x, self.head_cache)  # (1, T_new, D)
            out = self.link.forward(hidden, position)
            logits = self.split.tail(out, self.tail_cache)
        else:
            x = torch.tensor([self.ids], device=device)
            hidden = self.split.head(x)  # (1, T_all, D): the whole sequence crosses again
            out = self.link.forward(hidden, 0, reset=True)
            logits = self.split.tail(out)
        return logits[0, -1]

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.ids:
            raise SessionError("prefill must come first in a session")
        ids = input_ids.reshape(-1).tolist()
        if not ids:
            raise SessionError("the prompt is empty: at least one token is needed")
        return self._run(ids)

    def step(self, token_id: int) -> torch.Tensor:
        if not self.ids:
            raise SessionError("step before prefill")
        return self._run([int(token_id)])

    def close(self) -> None:
        self.link.close()
        self.head_cache = self.tail_cache = None


class ModelDecoder:
    """The unsplit HF causal LM with one DynamicCache: the reference and the ``--unsplit`` mode."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.cache: Cache = DynamicCache(config=model.config)
        self.traffic = Traffic()
        self._device = next(model.parameters()).device

    @torch.inference_mode()
    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids.to(self._device), past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._run(input_ids.reshape(1, -1))

    def step(self, token_id: int) -> torch.Tensor:
        return self._run(torch.tensor([[int(token_id)]]))

    def close(self) -> None:
        self.cache = DynamicCache(config=self.model.config)
