"""What the configurations of one audit share (``AuditResources``): the splits it loads, the victim under each defence,
the intercepted conversations, the unsplit reference for the utility columns and the cached A3 inverters.

The runner (``audit.run``) plans the configurations; the attack table (``audit.table``) reads this state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from lambdasplit.audit.attacks.inverter import RECIPE, Inverter, train_inverter
from lambdasplit.audit.corpus import token_stream
from lambdasplit.audit.settings import AuditSettings, Defence
from lambdasplit.audit.utility import greedy_agreement, perplexity
from lambdasplit.models.checkpoint import Checkpoint
from lambdasplit.models.resolve import lambdasplit_home, resolve_checkpoint
from lambdasplit.privacy.intercept import Intercept, intercept
from lambdasplit.privacy.keys import make_key
from lambdasplit.privacy.noise import GaussianNoise
from lambdasplit.privacy.obfuscate import protect
from lambdasplit.split.loader import SplitModel, load_split

#: What a progress display is told: a stage description, then (done, total) units of work within it.
Progress = Callable[[str, int, int], None]


@dataclass
class Configuration:
    """One split of the model and what is measured on it: ``head`` device layers, ``tail`` device layers."""

    head: int
    tail: int
    sides: tuple[str, ...]


class AuditResources:
    """What every configuration of one audit shares: settings, progress, the unsplit reference, cached inverters."""

    def __init__(self, settings: AuditSettings, progress: Progress | None) -> None:
        self.settings = settings
        self.progress = progress or (lambda stage, done, total: None)
        self.reference: PreTrainedModel | None = None
        self.utility_ids: torch.Tensor | None = None

    @property
    def wire_dtype(self) -> torch.dtype:
        """The torch dtype of the wire, for the attacks' rounding tolerances."""
        dtype = self.settings.wire().torch_dtype
        assert dtype is not None  # settings.wire() admits raw float dtypes only
        return dtype

    def stage(self, text: str, done: int = 0, total: int = 1) -> None:
        self.progress(text, done, total)

    def load(self, config: Configuration) -> SplitModel:
        n = self.num_layers()
        return load_split(self.settings.model, f"{config.head}:{n - config.tail}", dtype="float32", quiet=True)

    def num_layers(self) -> int:
        return int(Checkpoint(resolve_checkpoint(self.settings.model, quiet=True)).config.num_hidden_layers)

    def victim(self, config: Configuration, defence: Defence) -> tuple[SplitModel, Any]:
        """The user's split under ``defence``, and the secret it uses (a key or the noise), for scoring."""
        split = self.load(config)
        if defence.kind in ("permutation", "rotation"):
            key = make_key(
                split.config,
                split.points,
                split.fingerprint,
                kind=defence.kind,
                inner=defence.inner,
                seed=self.settings.seed + 1,
            )
            protect(split, key)
            return split, key
        if defence.kind == "noise":
            split.wire_transform = GaussianNoise(defence.sigma, seed=self.settings.seed + 1)
            return split, split.wire_transform
        return split, None

    def conversations(self, split: SplitModel, **sampling: Any) -> list[Intercept]:
        out = []
        for i, p in enumerate(self.settings.prompts):
            out.append(
                intercept(
                    split,
                    p.text,
                    chat=self.settings.chat,
                    max_new_tokens=self.settings.max_new_tokens,
                    wire_dtype=self.settings.wire(),
                    **sampling,
                )
            )
            self.stage("generating", i + 1, len(self.settings.prompts))
        return out

    def utility(self, split: SplitModel, plain_ppl: float) -> tuple[float, float]:
        if self.reference is None:
            self.reference = AutoModelForCausalLM.from_pretrained(split.path, dtype=torch.float32).eval()
        ppl = perplexity(split, self._utility_ids(split))
        prompts = [p.text for p in self.settings.prompts]
        agree = greedy_agreement(
            split, self.reference, prompts, max_new_tokens=self.settings.max_new_tokens, chat=self.settings.chat
        )
        return ppl / plain_ppl, agree

    def plain_perplexity(self, split: SplitModel) -> float:
        return perplexity(split, self._utility_ids(split))

    def _utility_ids(self, split: SplitModel) -> torch.Tensor:
        """Held-out public text for the perplexity column, tokenized once per audit."""
        if self.utility_ids is None:
            assert split.tokenizer is not None
            self.utility_ids = token_stream(split.tokenizer, self.settings.utility_tokens, split="heldout")
        return self.utility_ids

    def inverter(self, public: SplitModel, noise: GaussianNoise | None) -> Inverter:
        """A3's inverter for ``public``'s X, trained once (cached on disk by recipe, model, X, noise, budget, seed)."""
        s = self.settings
        sigma = 0.0 if noise is None else noise.sigma
        x = public.points.head_layers
        name = f"inverter-r{RECIPE}-{public.fingerprint}-x{x}-s{sigma:g}-t{s.inverter_tokens}-{s.seed}"
        path = lambdasplit_home() / "audit" / f"{name}.safetensors"
        if path.is_file():
            return Inverter.load(path, public)
        self.stage(f"training the inverter (X={public.points.head_layers}, sigma {sigma:g})", 0, 1)
        transform = None if noise is None else GaussianNoise(noise.sigma, seed=s.seed + 2)  # the attacker's own draws
        inverter = train_inverter(
            public,
            tokens=s.inverter_tokens,
            transform=transform,
            seed=s.seed,
            progress=lambda done, total: self.stage(
                f"training the inverter (X={public.points.head_layers}, sigma {sigma:g})", done, total
            ),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        inverter.save(path)
        return inverter
