"""What a fine-tune is asked to do (``FinetuneSettings``) and what it did (``FinetuneReport``, ``finetune.json``)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from lambdasplit.errors import ConfigError

Method = Literal["lora", "full"]
METHODS: tuple[str, ...] = get_args(Method)
#: Every linear projection of a Llama/Mistral/Qwen-style decoder layer: attention (q, k, v, o) and MLP.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Learning rate per method when none is given: adapters start at zero and need a larger step than whole
#: pretrained matrices, which a large step wrecks.
DEFAULT_LR: dict[str, float] = {"lora": 2e-4, "full": 5e-5}
REPORT_FILE = "finetune.json"


@dataclass(frozen=True)
class FinetuneSettings:
    """Hyper-parameters of one fine-tune; checked when made, recorded in ``finetune.json``.

    ``method``: ``lora`` trains rank-``rank`` adapters ``B @ A`` (scaled by ``alpha / rank``) on the
    ``target_modules`` (names of linear layers, matched at the end of a module's name) and merges them into
    the weights; ``full`` trains every parameter. ``lr`` ``None`` takes ``DEFAULT_LR[method]``. Each of the
    ``steps`` optimiser steps sees ``batch_size`` blocks of ``seq_len`` tokens; ``held_out`` is the fraction of
    documents kept out of training to measure perplexity on. ``seed`` fixes the held-out draw, the block order,
    the adapters' initialisation and dropout.
    """

    method: Method = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    steps: int = 100
    lr: float | None = None
    seq_len: int = 256
    batch_size: int = 4
    held_out: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name, value, low in (("rank", self.rank, 1), ("steps", self.steps, 1), ("batch_size", self.batch_size, 1)):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ConfigError(f"seq_len must be an integer >= 2 (one token predicts the next), got {self.seq_len!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be > 0 (or None for the method's default), got {self.lr!r}")
        if not 0.0 < self.held_out < 1.0:
            raise ConfigError(f"held_out must be a fraction in (0, 1), got {self.held_out!r}")
        targets = self.target_modules
        if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(f"target_modules must be a non-empty tuple of module names, got {targets!r}")

    @property
    def learning_rate(self) -> float:
        """The learning rate used: ``lr``, else the method's default."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


@dataclass(frozen=True)
class FinetuneReport:
    """What one fine-tune did, as written to ``finetune.json`` in the output folder.

    ``relative_change[name]`` is ``||W_after - W_before||_F / ||W_before||_F`` for every parameter tensor of
    the model (tied tensors once, under the input embedding's name), computed in float64 from the float32
    weights before training and the weights saved; ``None`` where ``W_before`` is all zeros (undefined).
    ``trained`` names the tensors the method updates (LoRA: the adapted matrices; full: all), and
    ``relative_change_mean``/``_max`` are over those. Everything else is exactly 0 by construction.
    Perplexities are exp(mean next-token NLL) over the held-out blocks, before training and after (merged).
    ``train_seconds`` is the training loop; ``seconds`` the whole run from reading the text to the last
    perplexity (writing the folder not included).
    """

    base: str
    path: Path
    settings: FinetuneSettings
    steps: int
    train_seconds: float
    seconds: float
    documents: dict[str, int]
    train_tokens: int
    heldout_tokens: int
    perplexity_before: float
    perplexity_after: float
    losses: list[float]
    trained: list[str]
    relative_change: dict[str, float | None]
    tied_embeddings: bool
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def relative_change_mean(self) -> float:
        values = [v for n in self.trained if (v := self.relative_change[n]) is not None]
        return sum(values) / len(values) if values else 0.0

    @property
    def relative_change_max(self) -> float:
        return max((v for n in self.trained if (v := self.relative_change[n]) is not None), default=0.0)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        out["settings"] = {**asdict(self.settings), "lr": self.settings.learning_rate}
        out["relative_change_mean"] = self.relative_change_mean
        out["relative_change_max"] = self.relative_change_max
        return out

    def write(self, folder: Path) -> Path:
        path = folder / REPORT_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path
