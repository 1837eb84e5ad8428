"""Transform a body's weights once so it computes on ``h' = h Q`` what the plain body computes on ``h``.

The HF decoder layers are untouched code; only their parameters change (recipe checked in DESIGN.md):

- hidden dimension, permutation ``p``: layer-level norm gains ``w[p]``; input-side projections (q, k, v,
  gate, up; fused qkv / gate_up) ``W[:, p]``; output-side projections (o, down) ``W[p, :]``, bias ``b[p]``.
  Every family the split supports, pre- or post-norm.
- hidden dimension, rotation ``Q``: RMSNorm is rotation-invariant except for its gain, so each pre-norm's
  gain is folded into the projections it feeds (``W diag(g) Q``) and the gain becomes 1; output side
  ``Q^T W``. Pre-norm families only (a post-norm's gain cannot be folded: refused with the reason).
- inner secrets: FFN width permutation (gate/up rows, down columns); KV-head permutation (k/v rows, the
  query heads of each group move with it, o columns follow); V-channel permutation inside each head (v
  rows, o columns); per-plane rotations of q and k (RoPE rotates the planes (i, i + hd/2); a rotation of
  the same plane commutes with it and leaves q.k unchanged, while a plain channel permutation would not).

STIP's layout (a ``LogitsBody``: every layer, the final norm and the LM head): the final norm as a layer's
norm, the LM head's columns as an input-side projection, and its rows (and bias) permuted by the key's
vocabulary permutation, so the logits come out in a secret order (``transform_output``).

Rotation work is done in float64 and cast back, so a float32 body stays within ~1e-6 of the plain one.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import cast

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from lambdasplit.errors import ConfigError, UnsupportedModelError
from lambdasplit.models.checkpoint import OBFUSCATED_MARKER
from lambdasplit.privacy.keys import LayerSecrets, ObfuscationKey, attention_shape
from lambdasplit.split.loader import SplitModel
from lambdasplit.split.parts import Body

INPUT_SIDE = {"q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj"}
OUTPUT_SIDE = {"o_proj", "down_proj"}
PRE_NORMS = {"input_layernorm": "self_attn", "post_attention_layernorm": "mlp"}  # norm -> the block it feeds


def protect(split: SplitModel, key: ObfuscationKey) -> SplitModel:
    """Use ``key`` on ``split``: head output encoded, body output decoded, a body held here obfuscated.

    The split's fingerprint becomes the obfuscated body's, so it pairs only with a server running that body.
    """
    key.check(split.fingerprint, split.points)
    if split.body is not None:
        obfuscate_body(split.body, key, split.config)
    split.wire_transform = key
    split.fingerprint = key.body_fingerprint()
    return split


def obfuscate_body(body: Body, key: ObfuscationKey, config: PretrainedConfig) -> None:
    """Transform ``body``'s weights in place for ``key`` (its layers are global layers [start, stop))."""
    if body.model is None:
        return
    if f"{body.start}:{body.stop}" != key.points:
        raise ConfigError(f"the key was made for layers {key.points}, the body runs {body.start}:{body.stop}")
    if key.hidden_size != config.hidden_size:
        raise ConfigError(f"the key is for hidden size {key.hidden_size}, the model has {config.hidden_size}")
    layers = _layers(body.model)
    for layer in layers:  # refuse before changing anything
        _check_supported(layer, key, config)
    logits = body.output == "logits"
    if logits and key.vocab is None:
        raise ConfigError(
            "this body ends in the LM head (STIP's layout): its key needs a vocabulary permutation "
            "(make_key(..., vocabulary=True))"
        )
    if not logits and key.vocab is not None:
        raise ConfigError("this key permutes the vocabulary, for STIP's layout; this body returns hidden states")
    if logits and key.permutation is None and getattr(_final_norm(body.model), "bias", None) is not None:
        raise UnsupportedModelError("the final norm has a bias, which a rotation cannot fold: use a permutation key")
    for i, layer in enumerate(layers):
        transform_layer(layer, key, config, key.layers.get(body.start + i))
    if logits:
        transform_output(body.model, key, config)


def _layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a body's model, a base model or (STIP's layout) a ``ForCausalLM`` around one
    (nn.Module types an undeclared submodule as ``Tensor | Module``)."""
    return cast(nn.ModuleList, getattr(model, "base_model", model).layers)


def _final_norm(model: nn.Module) -> nn.Module:
    return cast(nn.Module, cast(nn.Module, model.base_model).norm)


@torch.no_grad()
def transform_output(model: nn.Module, key: ObfuscationKey, config: PretrainedConfig) -> None:
    """STIP's layout: the final norm and the LM head of ``model`` (a ``ForCausalLM``) for ``key``, whose logits
    then come out in the order of ``key.vocab`` (row j is the plain row ``vocab[j]``).

    The hidden side is done as in a layer: a permutation moves the norm's gain and the head's columns; a rotation
    folds the gain into the head (``W diag(g) Q``). The LM head gets a new tensor, so an embedding tied to it in
    this process (a local split holding every part) stays as it was.
    """
    assert key.vocab is not None
    norm, head = _final_norm(model), cast(nn.Linear, cast(PreTrainedModel, model).get_output_embeddings())
    weight = head.weight.detach().double()  # (V, D)
    if key.permutation is not None:
        perm = key.permutation.to(weight.device)
        _set(_weight(norm), _weight(norm)[perm])
        if getattr(norm, "bias", None) is not None:
            _set(cast(torch.Tensor, norm.bias), cast(torch.Tensor, norm.bias)[perm])
        weight = weight[:, perm]
    else:
        offset = norm_offset(config)
        gain = _weight(norm).double() + offset
        weight = (weight * gain) @ key.matrix.double().to(weight.device)
        _set(_weight(norm), torch.full_like(gain, 1.0 - offset))
    vocab = key.vocab.to(weight.device)
    head.weight = nn.Parameter(weight[vocab].to(head.weight.dtype).contiguous(), requires_grad=False)
    if head.bias is not None:
        head.bias = nn.Parameter(head.bias.detach()[vocab].contiguous(), requires_grad=False)


def _sub(module: nn.Module, name: str) -> nn.Module:
    """The submodule ``name`` of ``module`` (a layer's ``self_attn``, an attention's ``o_proj``, ...)."""
    return cast(nn.Module, getattr(module, name))


def _weight(module: nn.Module) -> torch.Tensor:
    """The gain of a norm that ``hidden_norms`` found (it checked the weight is a tensor)."""
    return cast(torch.Tensor, module.weight)


def _check_supported(layer: nn.Module, key: ObfuscationKey, config: PretrainedConfig) -> None:
    linears(layer)
    norms = hidden_norms(layer, config.hidden_size)
    if key.permutation is None and set(norms) != set(PRE_NORMS):
        raise UnsupportedModelError(
            f"{config.model_type!r} layers have the norms {sorted(norms)}; a rotation key needs exactly the pre-norms "
            f"{sorted(PRE_NORMS)} (a post-norm's gain cannot be folded into a rotation). Use a permutation key."
        )
    if "qk-planes" in key.inner:
        if hasattr(layer.self_attn, "q_norm"):
            raise UnsupportedModelError(
                f"{config.model_type!r} normalises q and k per channel after projecting them; a per-plane rotation "
                "does not commute with that gain (unless it is equal within each plane). Drop the qk-planes secret."
            )
        if float(getattr(config, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
            raise UnsupportedModelError("qk-planes needs RoPE over the whole head (partial_rotary_factor == 1)")


@torch.no_grad()
def transform_layer(
    layer: nn.Module, key: ObfuscationKey, config: PretrainedConfig, inner: LayerSecrets | None
) -> None:
    if inner is not None:
        _inner_secrets(layer, config, inner)
    if key.permutation is not None:
        _permute_hidden(layer, key.permutation, config)
    else:
        _rotate_hidden(layer, key.matrix.double(), config)


def linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The layer's projections by their last name component; an unknown one is an unsupported layout."""
    found: dict[str, nn.Linear] = {}
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear):
            short = name.rsplit(".", 1)[-1]
            if short not in INPUT_SIDE | OUTPUT_SIDE:
                raise UnsupportedModelError(
                    f"obfuscation does not know the projection {name!r} of {type(layer).__name__}"
                )
            found[name] = module
    return found


def hidden_norms(layer: nn.Module, hidden: int) -> dict[str, nn.Module]:
    """Norms applied to the residual stream: the layer's direct children with a (D,) gain."""
    return {
        name: child
        for name, child in layer.named_children()
        if "norm" in name
        and isinstance(getattr(child, "weight", None), torch.Tensor)
        and child.weight.shape == (hidden,)
    }


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


def _permute_hidden(layer: nn.Module, perm: torch.Tensor, config: PretrainedConfig) -> None:
    perm = perm.to(next(layer.parameters()).device)
    for norm in hidden_norms(layer, config.hidden_size).values():
        _set(_weight(norm), _weight(norm)[perm])
    for name, lin in linears(layer).items():
        if name.rsplit(".", 1)[-1] in OUTPUT_SIDE:
            _set(lin.weight, lin.weight[perm, :])
            if lin.bias is not None:
                _set(lin.bias, lin.bias[perm])
        else:
            _set(lin.weight, lin.weight[:, perm])


def norm_offset(config: PretrainedConfig) -> float:
    """Gemma's RMSNorm multiplies by ``1 + weight``; the others by ``weight``."""
    return 1.0 if str(getattr(config, "model_type", "")).startswith("gemma") else 0.0


def _rotate_hidden(layer: nn.Module, q: torch.Tensor, config: PretrainedConfig) -> None:
    norms = hidden_norms(layer, config.hidden_size)
    q = q.to(next(layer.parameters()).device)
    offset = norm_offset(config)
    projections = linears(layer)
    for norm_name, block in PRE_NORMS.items():
        norm = norms[norm_name]
        gain = _weight(norm).double() + offset
        for name, lin in projections.items():
            if name.startswith(block + ".") and name.rsplit(".", 1)[-1] in INPUT_SIDE:
                _set(lin.weight, (lin.weight.double() * gain) @ q)
        _set(_weight(norm), torch.full_like(gain, 1.0 - offset))
    for name, lin in projections.items():
        if name.rsplit(".", 1)[-1] in OUTPUT_SIDE:
            _set(lin.weight, q.T @ lin.weight.double())
            if lin.bias is not None:
                _set(lin.bias, lin.bias.double() @ q)


# --- inner secrets -------------------------------------------------------------------------------------------


def _rows(module: nn.Linear, index: torch.Tensor, start: int = 0, stop: int | None = None) -> None:
    """Reorder rows [start, stop) of a projection (and its bias) by ``index`` (relative to ``start``)."""
    stop = module.weight.shape[0] if stop is None else stop
    _set(module.weight[start:stop], module.weight[start:stop][index])
    if module.bias is not None:
        _set(module.bias[start:stop], module.bias[start:stop][index])


def _plane_rotate(module: nn.Linear, angles: torch.Tensor, n_rep: int, head_dim: int, start: int, stop: int) -> None:
    """Rotate each RoPE plane (i, i + hd/2) of every head in rows [start, stop) by its group's angle.

    ``angles`` (KV, hd/2); a block of ``n_rep`` consecutive heads shares one KV group's angles.
    """
    half = head_dim // 2
    heads = (stop - start) // head_dim
    theta = angles.double().repeat_interleave(n_rep, dim=0)[:heads].to(module.weight.device)  # (heads, hd/2)
    cos, sin = theta.cos()[..., None], theta.sin()[..., None]

    def rotate(t: torch.Tensor) -> torch.Tensor:  # (heads * hd, ...) -> same, planes rotated
        x = t.double().reshape(heads, 2, half, -1)
        a, b = x[:, 0], x[:, 1]
        return torch.stack((cos * a - sin * b, sin * a + cos * b), dim=1).reshape(t.shape)

    _set(module.weight[start:stop], rotate(module.weight[start:stop]))
    if module.bias is not None:
        _set(module.bias[start:stop], rotate(module.bias[start:stop][:, None])[:, 0])


def _inner_secrets(layer: nn.Module, config: PretrainedConfig, s: LayerSecrets) -> None:
    heads, kv, hd = attention_shape(config)
    n_rep = heads // kv
    attn, mlp = _sub(layer, "self_attn"), _sub(layer, "mlp")
    fused = hasattr(attn, "qkv_proj")
    q_proj = cast(nn.Linear, _sub(attn, "qkv_proj" if fused else "q_proj"))
    k_proj = cast(nn.Linear, _sub(attn, "qkv_proj" if fused else "k_proj"))
    v_proj = cast(nn.Linear, _sub(attn, "qkv_proj" if fused else "v_proj"))
    q_at, k_at, v_at = (0, heads * hd, heads * hd + kv * hd) if fused else (0, 0, 0)

    if s.ffn is not None:
        width = int(config.intermediate_size)
        down = cast(nn.Linear, _sub(mlp, "down_proj"))
        r = s.ffn.to(down.weight.device)
        if hasattr(mlp, "gate_up_proj"):
            _rows(cast(nn.Linear, _sub(mlp, "gate_up_proj")), torch.cat([r, r + width]))
        else:
            _rows(cast(nn.Linear, _sub(mlp, "gate_proj")), r)
            _rows(cast(nn.Linear, _sub(mlp, "up_proj")), r)
        _set(down.weight, down.weight[:, r])

    if s.kv_heads is not None or s.v_channels is not None:
        kv_perm = s.kv_heads if s.kv_heads is not None else torch.arange(kv)
        channels = s.v_channels if s.v_channels is not None else torch.arange(hd).repeat(kv, 1)
        ar = torch.arange(hd)
        kv_rows = torch.cat([kv_perm[g] * hd + ar for g in range(kv)])
        v_rows = torch.cat([kv_perm[g] * hd + channels[g] for g in range(kv)])
        q_rows = torch.cat([(kv_perm[g] * n_rep + j) * hd + ar for g in range(kv) for j in range(n_rep)])
        o_cols = torch.cat([(kv_perm[g] * n_rep + j) * hd + channels[g] for g in range(kv) for j in range(n_rep)])
        _rows(q_proj, q_rows, q_at, q_at + heads * hd)
        _rows(k_proj, kv_rows, k_at, k_at + kv * hd)
        _rows(v_proj, v_rows, v_at, v_at + kv * hd)
        o_proj = cast(nn.Linear, _sub(attn, "o_proj"))
        _set(o_proj.weight, o_proj.weight[:, o_cols.to(o_proj.weight.device)])
        for norm_name, rows in (("q_norm", q_rows), ("k_norm", kv_rows)):
            norm = getattr(attn, norm_name, None)  # OLMo-2 norms all heads at once: its gain follows the rows
            if norm is not None and norm.weight.shape[0] == rows.shape[0]:
                _set(norm.weight, norm.weight[rows])

    if s.qk_angles is not None:
        _plane_rotate(q_proj, s.qk_angles, n_rep, hd, q_at, q_at + heads * hd)
        _plane_rotate(k_proj, s.qk_angles, 1, hd, k_at, k_at + kv * hd)


# --- a body checkpoint for the cloud ------------------------------------------------------------------------


def write_obfuscated_body(
    body: Body, key: ObfuscationKey, config: PretrainedConfig, out: str | os.PathLike[str]
) -> Path:
    """Save ``body`` (already obfuscated with ``key``) as a checkpoint folder ``lambdasplit serve`` can load.

    It holds the config and the body's layers only (global names), and a marker with the split points and
    the fingerprint a device must present (``key.body_fingerprint()``): the key itself is not in it.
    """
    if body.model is None:
        raise ConfigError("the body is empty (X == Y): there is nothing to obfuscate")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        f"model.layers.{body.start + i}.{name}": t.detach().contiguous().cpu()
        for i, layer in enumerate(_layers(body.model))
        for name, t in layer.state_dict().items()
    }
    logits = body.output == "logits"
    if logits:  # STIP's layout: the final norm and the LM head (its own tensor: there is no embedding to tie to)
        config = copy.deepcopy(config)
        config.tie_word_embeddings = False
        state.update(
            {f"model.norm.{n}": t.detach().contiguous().cpu() for n, t in _final_norm(body.model).state_dict().items()}
        )
        head = body.model.get_output_embeddings()
        state.update({f"lm_head.{n}": t.detach().contiguous().cpu() for n, t in head.state_dict().items()})
    config.save_pretrained(out)
    save_file(state, str(out / "model.safetensors"), {"format": "pt"})
    marker = {
        "points": key.points,
        "kind": key.kind,
        "fingerprint": key.body_fingerprint(),
        "inner": key.inner,
        "layout": "stip" if logits else "head-tail",
    }
    (out / OBFUSCATED_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return out
