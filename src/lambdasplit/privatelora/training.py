"""Fine-tuning the device's M across the split, and the same computation in one process for comparison.

A step (``SplitTrainer.step``), for token ids (1, T):

1. the device's head embeds them (and runs layers [0, X), frozen): hidden (1, T, D);
2. ``train_forward``: the body runs in the cloud; at each adapted layer the device answers ``u`` with ``u M``
   and keeps the graph; the body's output (1, T, D) comes back;
3. the device's tail (layers [Y, N), norm, LM head, frozen) gives the next-token loss; autograd gives
   dL/d(output);
4. ``train_backward``: the cloud backpropagates through its frozen layers, A and B; at each adapted layer
   (last first) it sends dL/dv and the device answers dL/du = dL/dv M^T while ``M.grad`` accumulates
   dL/dM = u^T dL/dv;
5. the device clips the gradients and its optimizer (AdamW) updates M.

``LocalAdapterBody`` runs the cloud's side in this process (same modules, ``LocalExchange``): the local
baseline for timing and the reference the split's gradients are checked against.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.nn import functional as F

from lambdasplit.errors import ConfigError, SessionError
from lambdasplit.privatelora.cloud import CloudAdapters, LocalExchange, exchanging, forward_for_training
from lambdasplit.privatelora.private import PrivateAdapters
from lambdasplit.split import SplitModel
from lambdasplit.split.state import BodyState
from lambdasplit.traffic import Traffic

#: AdamW's learning rate for M: the best of 3e-3, 1e-2 and 3e-2 for SmolLM2 on the private-facts corpus (rank 32,
#: q/k/v, blocks of 64 tokens; docs/privatelora.md). M's entries are O(1): A and B are scaled so ``u`` and ``v B``
#: keep the scale of their inputs.
DEFAULT_LR = 1e-2


class TrainableBody(Protocol):
    """Where the body runs for a training step: ``AdapterLink`` (the cloud) or ``LocalAdapterBody`` (here)."""

    def train_forward(self, hidden: torch.Tensor) -> tuple[int, torch.Tensor]: ...

    def train_backward(self, step: int, grad: torch.Tensor) -> None: ...


class LocalAdapterBody:
    """The cloud's body with A and B (``CloudAdapters``) answered by ``adapters`` in this process.

    A ``BodyLink`` for generation (one session's KV cache) and a ``TrainableBody`` for training.
    """

    def __init__(self, cloud: CloudAdapters, adapters: PrivateAdapters) -> None:
        self.cloud, self.adapters = cloud, adapters
        self.state = BodyState(cloud.body)
        self.traffic = Traffic()
        self.step = 0
        self._pending: dict[int, tuple[torch.Tensor, LocalExchange]] = {}

    def forward(self, hidden: torch.Tensor, position: int, reset: bool = False, last: bool = False) -> torch.Tensor:
        with exchanging(LocalExchange(self.adapters)):
            return self.state.forward(hidden, position, reset, last)

    def train_forward(self, hidden: torch.Tensor) -> tuple[int, torch.Tensor]:
        exchange = LocalExchange(self.adapters, keep=True)
        with exchanging(exchange):
            out, _ = forward_for_training(self.cloud.body, hidden)
        step, self.step = self.step, self.step + 1
        self._pending[step] = (out, exchange)
        return step, out.detach()

    def train_backward(self, step: int, grad: torch.Tensor) -> None:
        if step not in self._pending:
            raise SessionError(f"no training forward {step} awaits a backward", "unknown_step")
        out, exchange = self._pending.pop(step)
        with exchanging(exchange), torch.inference_mode(False):
            torch.autograd.backward(out, grad)

    def close(self) -> None:
        self._pending.clear()


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of ids[t+1] given positions <= t; ``mask`` (1, T) marks the tokens that count (1)."""
    targets = ids[0, 1:]
    losses = F.cross_entropy(logits[0, :-1].float(), targets, reduction="none")
    if mask is None:
        return losses.mean()
    weights = mask[0, 1:].to(losses.dtype)
    return (losses * weights).sum() / weights.sum().clamp_min(1)


@dataclass(frozen=True)
class StepReport:
    step: int
    loss: float
    tokens: int
    seconds: float


class SplitTrainer:
    """Fine-tunes ``adapters`` (the device's M) with the head and tail of ``split`` here and the body in ``body``.

    ``split`` holds the head and tail (the device's parts); only M is trained, with AdamW at ``lr``, gradients
    clipped to norm ``clip``.
    """

    def __init__(
        self,
        split: SplitModel,
        adapters: PrivateAdapters,
        body: TrainableBody,
        *,
        lr: float = DEFAULT_LR,
        clip: float = 1.0,
    ) -> None:
        if split.head is None or split.tail is None or split.tail.model is None:
            raise ConfigError("a PrivateLoRA trainer runs on the device: it needs the split's head and tail")
        self.split, self.adapters, self.body, self.clip = split, adapters, body, clip
        self.optimizer = torch.optim.AdamW(adapters.parameters(), lr=lr, weight_decay=0.0)
        self.steps = 0

    def loss_and_grads(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """One forward and backward across the split: the loss; ``M.grad`` accumulates dL/dM."""
        assert self.split.head is not None and self.split.tail is not None and self.split.tail.model is not None
        hidden = self.split.head(ids)
        step, out = self.body.train_forward(hidden)
        with torch.inference_mode(False), torch.enable_grad():
            out = out.detach().clone().requires_grad_(True)
            logits = self.split.tail.model(inputs_embeds=out, use_cache=False).logits
            loss = next_token_loss(logits, ids, mask)
            loss.backward()
        assert out.grad is not None
        self.body.train_backward(step, out.grad)
        return loss.detach()

    def step(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> StepReport:
        """One optimisation step on token ids (1, T)."""
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_and_grads(ids, mask)
        torch.nn.utils.clip_grad_norm_(self.adapters.parameters(), self.clip)
        self.optimizer.step()
        self.steps += 1
        return StepReport(self.steps, float(loss), int(ids.shape[1]), time.perf_counter() - start)

    def fit(
        self,
        batches: list[tuple[torch.Tensor, torch.Tensor | None]],
        epochs: int,
        progress: Callable[[StepReport], None] | None = None,
        seed: int = 0,
    ) -> list[StepReport]:
        """``epochs`` passes over ``batches`` (ids, mask) in a seeded order; one report per step."""
        order = torch.Generator().manual_seed(seed)
        reports = []
        for _ in range(epochs):
            for i in torch.randperm(len(batches), generator=order).tolist():
                report = self.step(*batches[i])
                reports.append(report)
                if progress is not None:
                    progress(report)
        return reports
