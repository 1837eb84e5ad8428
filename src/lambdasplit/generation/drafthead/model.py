"""The draft head: one transformer layer that guesses the target's next hidden state on the device.

EAGLE (Li et al. 2024) drafts at the feature level: the target's last hidden state ``f_j`` (the input of its LM
head, which the device's tail already computes) and the token that followed, ``x_{j+1}``, go through
``fc(concat(embed(x_{j+1}), f_j))`` and one decoder layer; the output guesses ``f_{j+1}``, and the target's
own frozen LM head turns the guess into the next token. Fed its own guess, it drafts k tokens with no round trip.

A split device holds more than the tail: its head runs the target's first layers on every token, the guessed ones
included, with the whole context in their KV cache (the prompt too). So the head here can also read, for the token
``x_{j+1}``, what the device's first ``head_layers`` layers made of it (``states``): ``fc(concat(embed(x_{j+1}),
norm(s_{j+1}), f_j))``. On 1,200 training answers (2 epochs) that raised held-out first-token accuracy from 24.5% to
34.3% and a chain of 8 from 1.34 to 1.70 tokens per step; it ties the head to splits with that many head layers.

Here the layer, its rotary embedding, causal mask and KV cache are a one-layer ``LlamaModel`` from
transformers, unmodified (its token embedding has a vocabulary of one and is never used: the input comes in as
``inputs_embeds``). The LM head is the target's, restricted to a draft vocabulary (the tokens the model's own
answers use most), so a draft step costs a 576 x ``len(draft vocab)`` product, not the full vocabulary's.

The file holds the trained weights only (``fc``, the layer, the final norm; float16) and the draft vocabulary;
the embedding and the LM head come from the target model at load time, and a fingerprint of them is checked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Cache, LlamaConfig, LlamaModel, PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lambdasplit.errors import ConfigError
from lambdasplit.split.parts import with_cache


def head_config(target: PretrainedConfig) -> LlamaConfig:
    """A one-layer Llama config shaped like ``target``'s layers (hidden size, heads, MLP, rotary)."""
    text = target.get_text_config()
    rope = getattr(text, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0}
    return LlamaConfig(
        vocab_size=1,  # inputs come as embeddings: the base model's own token embedding is never used
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=getattr(text, "num_key_value_heads", text.num_attention_heads),
        head_dim=getattr(text, "head_dim", text.hidden_size // text.num_attention_heads),
        max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
        rope_parameters=dict(rope),
        hidden_act=getattr(text, "hidden_act", "silu"),
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def target_matrices(model: nn.Module, lm_model: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The token embedding of ``model`` and the LM head of ``lm_model`` (default: ``model``, a causal LM; a split
    device passes its head's model and its tail's)."""
    embed = cast(Any, model).get_input_embeddings()
    head = cast(Any, lm_model if lm_model is not None else model).get_output_embeddings()
    if embed is None or head is None:
        raise ConfigError(f"{type(model).__name__} has no token embedding or LM head for a draft head to use")
    return embed.weight, head.weight


def fingerprint(embed: torch.Tensor, lm_head: torch.Tensor) -> list[float]:
    """A few sums over the target's embedding and LM head: a head trained on another model is refused."""
    rows = torch.tensor([0, 1, 2, embed.shape[0] // 2, embed.shape[0] - 1])
    return [round(float(w[rows].detach().double().sum()), 3) for w in (embed, lm_head)]


@dataclass(frozen=True)
class HeadInfo:
    """What the weights file says of itself."""

    target: str  # the model it was trained for (its registry name or path)
    vocab_size: int  # the target's
    hidden_size: int
    fingerprint: list[float]
    training: dict[str, Any]  # recipe and figures, as recorded by the trainer
    head_layers: int = 0  # it reads the output of the target's first head_layers layers (0: the embedding only)

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


class DraftHead(nn.Module):
    """``fc`` + a one-layer ``LlamaModel``; the target's embedding and LM head rows (draft vocabulary) frozen.

    ``forward(tokens, features, position_ids, cache, states=...)`` -> guessed next features (B, T, D), post-norm
    like the target's LM-head input; ``logits(h)`` -> (B, T, len(draft_ids)) over the draft vocabulary. With
    ``head_layers`` > 0 it also reads ``states`` (B, T, D): the output of the target's first ``head_layers`` layers
    at the tokens' positions (what a split device's head computes for them).
    """

    draft_ids: torch.Tensor  # (V_draft,) target token ids, a buffer saved with the weights
    embed: torch.Tensor  # the target's token embedding (V, D), not saved
    vocab_head: torch.Tensor  # the target's LM head rows of the draft vocabulary (V_draft, D), not saved

    def __init__(
        self,
        target: PretrainedConfig,
        draft_ids: torch.Tensor,
        embed: torch.Tensor,
        lm_head: torch.Tensor,
        *,
        head_layers: int = 0,
    ) -> None:
        super().__init__()
        config = head_config(target)
        d = config.hidden_size
        if embed.shape[1] != d or lm_head.shape[1] != d:
            raise ConfigError(f"the target's embedding/LM head are {embed.shape}/{lm_head.shape}, hidden size {d}")
        if head_layers < 0:
            raise ConfigError(f"head_layers must be >= 0, got {head_layers}")
        self.head_layers = head_layers
        self.fc = nn.Linear((3 if head_layers else 2) * d, d, bias=False)
        # The residual stream after a few layers is not normalised: its scale varies by position and model.
        self.states_norm = LlamaRMSNorm(d, eps=config.rms_norm_eps) if head_layers else None
        self.layers = LlamaModel(config)
        self.register_buffer("draft_ids", draft_ids.to(torch.long), persistent=True)
        self.register_buffer("embed", embed.detach(), persistent=False)
        self.register_buffer("vocab_head", lm_head.detach()[draft_ids.to(lm_head.device)], persistent=False)
        self.target_vocab = int(lm_head.shape[0])
        self._fingerprint = fingerprint(embed, lm_head)
        self.vocab_int8: nn.Module | None = None  # the draft vocabulary's LM-head rows in int8 (``quantize``)

    @property
    def hidden_size(self) -> int:
        return int(self.fc.out_features)

    @property
    def dtype(self) -> torch.dtype:
        """What the head computes in (``load``'s ``dtype``); the target's embedding keeps its own."""
        return self.layers.norm.weight.dtype

    def quantize(self) -> int:
        """Int8 weights for drafting (``quantized``): ``fc``, the layer's linear layers and the draft vocabulary's
        LM-head rows, where the kernel takes their sizes; returns how many products were quantized. Inference only:
        a quantized head does not train or save."""
        from lambdasplit.generation.drafthead.quantized import Int8Linear, quantize_linears

        done = quantize_linears(self)
        try:
            self.vocab_int8 = Int8Linear(self.vocab_head)
        except (ValueError, RuntimeError):  # sizes or a device the kernel does not take: the float product stays
            return done
        return done + 1

    def trainable(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("layers.embed_tokens")]

    def new_cache(self) -> Cache:
        from transformers import DynamicCache

        return DynamicCache(config=self.layers.config)

    def forward(
        self,
        tokens: torch.Tensor,
        features: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``tokens`` (B, T) are the tokens that followed the positions whose ``features`` (B, T, D) are given;
        ``states`` (B, T, D), needed with ``head_layers``: the target's first layers' output at those tokens."""
        inputs = [self.embed[tokens].to(self.dtype)]
        if self.states_norm is not None:
            if states is None:
                raise ConfigError(
                    f"this draft head reads the output of the model's first {self.head_layers} layers: pass states"
                )
            inputs.append(self.states_norm(states.to(self.dtype)))
        x = self.fc(torch.cat([*inputs, features.to(self.dtype)], dim=-1))
        out = self.layers(
            inputs_embeds=x,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=cache is not None,
            **with_cache(self.layers, cache),
        )
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.vocab_int8 is not None:
            return self.vocab_int8(hidden)
        return hidden @ self.vocab_head.to(hidden.dtype).T

    def save(self, path: str | Path, info: HeadInfo) -> int:
        """Write the trained weights (float16) and the draft vocabulary; returns the file's size in bytes."""
        from lambdasplit.generation.drafthead.quantized import Int8Linear

        if any(isinstance(m, Int8Linear) for m in self.modules()):  # the vocabulary's rows too: a submodule
            raise ConfigError("this draft head was quantized for drafting (int8 weights): save the head as loaded")
        tensors = {
            n: (t.detach().to(torch.float16) if t.is_floating_point() else t.detach()).contiguous().cpu()
            for n, t in self.state_dict().items()
            if not n.startswith("layers.embed_tokens")
        }
        save_file(tensors, str(path), metadata={"lambdasplit_draft_head": info.to_json()})
        return Path(path).stat().st_size

    @classmethod
    def load(
        cls,
        path: str | Path,
        target: PretrainedConfig,
        embed: torch.Tensor,
        lm_head: torch.Tensor,
        dtype: torch.dtype | None = None,
    ) -> tuple[DraftHead, HeadInfo]:
        """Load a head for ``target``, computing in ``dtype`` (default: the embedding's); refuses one trained for
        another model (shapes or fingerprint)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no draft head at {path}")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if "lambdasplit_draft_head" not in meta:
            raise ConfigError(f"{path} is not a lambdasplit draft head (no metadata)")
        info = HeadInfo(**json.loads(meta["lambdasplit_draft_head"]))
        if info.vocab_size != lm_head.shape[0] or info.hidden_size != lm_head.shape[1]:
            raise ConfigError(
                f"the draft head {path.name} was trained for {info.target} (vocabulary {info.vocab_size}, hidden "
                f"size {info.hidden_size}); this model has {lm_head.shape[0]} and {lm_head.shape[1]}"
            )
        if not all(
            abs(a - b) <= 1e-2 * max(1.0, abs(b))
            for a, b in zip(fingerprint(embed, lm_head), info.fingerprint, strict=True)
        ):
            raise ConfigError(f"the draft head {path.name} was trained for {info.target}, a model with other weights")
        tensors = load_file(str(path))
        head = cls(target, tensors["draft_ids"], embed, lm_head, head_layers=info.head_layers)
        missing, unexpected = head.load_state_dict(
            {n: t.to(embed.dtype) if t.is_floating_point() else t for n, t in tensors.items()}, strict=False
        )
        missing = [n for n in missing if not n.startswith("layers.embed_tokens")]
        if missing or unexpected:
            raise ConfigError(
                f"{path.name} does not match the draft head's layout: missing {missing}, extra {unexpected}"
            )
        head = head.to(dtype or embed.dtype).eval()  # the weights and the draft vocabulary's LM-head rows
        head.embed = embed  # the target's own, shared: the rows looked up are cast
        return head, info
