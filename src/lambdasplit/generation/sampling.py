"""Choosing the next token: greedy or sampled, with transformers' own logits processors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lambdasplit.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How to generate. ``temperature == 0`` means greedy (argmax), the mode the exactness tests use."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # keep going past EOS (benchmarks that need an exact token count)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class TokenChooser:
    """Applies the processors for ``params`` to (V,) logits given the ids so far, then picks a token."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.params = params
        self.processors = LogitsProcessorList()
        if params.repetition_penalty not in (None, 1.0):
            self.processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if not params.greedy:
            if params.temperature != 1.0:
                self.processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k is not None:
                self.processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p is not None and params.top_p < 1.0:
                self.processors.append(TopPLogitsWarper(params.top_p))
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    @property
    def greedy(self) -> bool:
        return self.generator is None

    def scores(self, logits: torch.Tensor, ids_so_far: list[int]) -> torch.Tensor:
        """(V,) logits after the processors (penalty, temperature, top-k, top-p) for this context."""
        scores = logits.float().unsqueeze(0)  # (1, V)
        if self.processors:
            ids = cast(torch.LongTensor, torch.tensor([ids_so_far], device=scores.device))  # int64 ids
            scores = self.processors(ids, scores)
        return scores[0]

    def probs(self, logits: torch.Tensor, ids_so_far: list[int]) -> torch.Tensor:
        """(V,) the distribution the next token is drawn from."""
        return torch.softmax(self.scores(logits, ids_so_far), dim=-1)

    def sample(self, probs: torch.Tensor) -> int:
        """One token from ``probs`` (need not be normalised), with this chooser's generator."""
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def uniform(self) -> float:
        """A draw from U[0, 1) with this chooser's generator (speculative acceptance)."""
        return float(torch.rand((), generator=self.generator, device=self.generator.device if self.generator else None))

    def __call__(self, logits: torch.Tensor, ids_so_far: list[int]) -> int:
        scores = self.scores(logits, ids_so_far)
        if self.generator is None:
            return int(scores.argmax())
        return self.sample(torch.softmax(scores, dim=-1))
