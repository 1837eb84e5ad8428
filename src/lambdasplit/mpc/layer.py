"""One Llama-family decoder layer, stated once over ``ops.Ops``: on plain float64 tensors or on one party's shares.

Secret sharing cannot call HF's forward (its arithmetic runs on floats), so the layer's arithmetic is re-stated
here, as little of it as there is: pre-norm attention with RoPE, grouped-query heads and a causal mask, then a
pre-norm SiLU-gated MLP, each added to the residual stream. The weights are read from the untouched HF modules
(``LayerWeights.from_hf``); ``tests/mpc/test_body.py`` holds the plaintext run of this code to the HF body's own
forward, which keeps the re-statement honest.

Shapes: ``B`` batch, ``T`` new positions, ``S`` cached + new positions, ``D`` hidden, ``H`` query heads, ``KV``
key/value heads, ``G = H / KV`` query heads per KV head, ``d`` head dim, ``M`` MLP width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lambdasplit.errors import ConfigError
from lambdasplit.mpc.ops import Ops

#: Layer classes whose forward is exactly what ``decoder_layer`` computes (Qwen2: the same, with q/k/v biases).
SUPPORTED = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer")


@dataclass(frozen=True)
class Linear:
    weight: torch.Tensor  # (out, in), float64
    bias: torch.Tensor | None

    @classmethod
    def from_hf(cls, module: Any) -> Linear:
        """From an ``nn.Linear``: weight (out, in) and bias (out,) or None, as float64."""
        bias = getattr(module, "bias", None)
        return cls(module.weight.detach().to(torch.float64), None if bias is None else bias.detach().to(torch.float64))


@dataclass(frozen=True)
class LayerWeights:
    """A layer's public weights, float64, read from its HF module."""

    q: Linear
    k: Linear
    v: Linear
    o: Linear
    gate: Linear
    up: Linear
    down: Linear
    input_norm: torch.Tensor  # (D,)
    post_norm: torch.Tensor  # (D,)
    eps: float
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float  # 1 / sqrt(d) for these families

    @classmethod
    def from_hf(cls, layer: nn.Module) -> LayerWeights:
        name = type(layer).__name__
        if name not in SUPPORTED:
            raise ConfigError(f"the secret-shared body runs {SUPPORTED} layers, not {name}")
        hf: Any = layer  # HF's modules: attributes typed only at run time
        attn, mlp = hf.self_attn, hf.mlp
        if getattr(attn, "sliding_window", None) is not None:
            raise ConfigError(f"layer {attn.layer_idx} uses sliding-window attention, not supported on shares yet")
        if type(mlp.act_fn).__name__ not in ("SiLU", "SiLUActivation"):
            raise ConfigError(f"the secret-shared MLP computes SiLU, this layer uses {type(mlp.act_fn).__name__}")
        return cls(
            q=Linear.from_hf(attn.q_proj),
            k=Linear.from_hf(attn.k_proj),
            v=Linear.from_hf(attn.v_proj),
            o=Linear.from_hf(attn.o_proj),
            gate=Linear.from_hf(mlp.gate_proj),
            up=Linear.from_hf(mlp.up_proj),
            down=Linear.from_hf(mlp.down_proj),
            input_norm=hf.input_layernorm.weight.detach().to(torch.float64),
            post_norm=hf.post_attention_layernorm.weight.detach().to(torch.float64),
            eps=float(hf.input_layernorm.variance_epsilon),
            heads=int(attn.config.num_attention_heads),
            kv_heads=int(attn.config.num_key_value_heads),
            head_dim=int(attn.head_dim),
            scaling=float(attn.scaling),
        )


@dataclass(frozen=True)
class Rope:
    """Public rotary tables for the new positions: cos, sin (T, d), as the model's ``rotary_emb`` gives them."""

    cos: torch.Tensor
    sin: torch.Tensor

    def apply(self, ops: Ops, x: torch.Tensor) -> torch.Tensor:
        """x (B, heads, T, d) -> x * cos + rotate_half(x) * sin (HF's ``apply_rotary_pos_emb``): local."""
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return ops.scale(x, self.cos) + ops.scale(rotated, self.sin)


KV = tuple[torch.Tensor, torch.Tensor]  # this layer's cached keys and values (B, KV, S, d), after RoPE

Shape = tuple[int, ...]


def attention_products(rows: int, context: int, heads: int, kv_heads: int, head_dim: int) -> list[tuple[Shape, Shape]]:
    """The operands' shapes of the two matrix products ``decoder_layer`` takes Beaver triples for, in order, for
    ``rows`` new positions after which the cache holds ``context`` (B = 1): ``q @ k^T`` then ``probs @ v``. The
    device deals their triples ahead from these (``mpc.device``); a test checks them against the program."""
    g, t, s, d = heads // kv_heads, rows, context, head_dim
    return [((1, kv_heads, g * t, d), (1, kv_heads, d, s)), ((1, kv_heads, g * t, s), (1, kv_heads, s, d))]


def decoder_layer(
    ops: Ops,
    w: LayerWeights,
    h: torch.Tensor,
    past: KV | None,
    rope: Rope,
    positions: torch.Tensor,
) -> tuple[torch.Tensor, KV]:
    """h (B, T, D) at ``positions`` (T,) -> (the layer's output (B, T, D), the keys and values to cache)."""
    B, T, _ = h.shape
    H, KVH, d = w.heads, w.kv_heads, w.head_dim
    G = H // KVH

    x = ops.rms_norm(h, w.input_norm, w.eps, positions)
    q = ops.linear(x, w.q.weight, w.q.bias).view(B, T, H, d).transpose(1, 2)  # (B, H, T, d)
    k = ops.linear(x, w.k.weight, w.k.bias).view(B, T, KVH, d).transpose(1, 2)  # (B, KV, T, d)
    v = ops.linear(x, w.v.weight, w.v.bias).view(B, T, KVH, d).transpose(1, 2)
    q, k = rope.apply(ops, q), rope.apply(ops, k)
    if past is not None:
        k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)  # (B, KV, S, d)
    S = k.shape[2]

    # Each KV head serves its G query heads: rows (g, t) of one (G*T, d) block, no copy of k or v.
    q = ops.scale(q, w.scaling).reshape(B, KVH, G * T, d)
    scores = ops.matmul(q, k.transpose(2, 3).contiguous())  # (B, KV, G*T, S)
    # causal: new row t (position S - T + t) sees keys 0 .. S - T + t; one new row sees everything
    mask = None if T == 1 else (torch.arange(S) <= torch.arange(S - T, S)[:, None]).repeat(G, 1)  # (G*T, S)
    probs = ops.softmax(scores, mask)
    attn = ops.matmul(probs, v).view(B, KVH, G, T, d).reshape(B, H, T, d).transpose(1, 2).reshape(B, T, H * d)
    h = h + ops.linear(attn, w.o.weight, w.o.bias)

    x = ops.rms_norm(h, w.post_norm, w.eps, positions)
    gate = ops.linear(x, w.gate.weight, w.gate.bias)  # (B, T, M)
    up = ops.linear(x, w.up.weight, w.up.bias)
    h = h + ops.linear(ops.mul(ops.silu(gate), up), w.down.weight, w.down.bias)
    return h, (k, v)
