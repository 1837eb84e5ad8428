"""Build one part (head, body or tail) holding only its own weights.

The recipe, the same for every family the generic split handles:

1. Copy the model config and give it ``num_hidden_layers = stop - start`` (and the matching slice of
   ``layer_types`` for sliding-window / hybrid models), so the model's own forward sizes masks and KV
   caches for exactly this part.
2. Instantiate the model's own ``ForCausalLM`` class from that config with parameters on the ``meta``
   device (nothing allocated), then drop what the part does not run (embeddings on the body and tail,
   final norm on the head and body, LM head everywhere but the tail).
3. Read only the remaining tensors from the checkpoint, renaming local ``model.layers.i`` to global
   ``model.layers.{start + i}``, and assign them in place.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
from typing import Literal, cast

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from lambdasplit.config import Runtime, SplitPoints
from lambdasplit.errors import UnsupportedModelError
from lambdasplit.models.checkpoint import Checkpoint
from lambdasplit.models.packing import pack_linears
from lambdasplit.split.families import check_family
from lambdasplit.split.parts import Body, Head, LogitsBody, Tail

Role = Literal["head", "body", "tail"]
_log = logging.getLogger(__name__)
_BUILD_LOCK = threading.Lock()
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def layer_range(role: Role, points: SplitPoints) -> tuple[int, int]:
    """Global layer indices [start, stop) that ``role`` runs."""
    return {
        "head": (0, points.head_layers),
        "body": (points.head_layers, points.body_end),
        "tail": (points.body_end, points.num_layers),
    }[role]


def part_config(config: PretrainedConfig, start: int, stop: int) -> PretrainedConfig:
    """The model config, re-indexed so its layers are global layers [start, stop)."""
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = stop - start
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        cfg.layer_types = list(layer_types[start:stop])
    return cfg


def _global_key(local: str, start: int) -> str:
    """``model.layers.3.mlp.up_proj.weight`` of a part starting at global layer 10 -> ``model.layers.13...``."""
    m = _LAYER_KEY.match(local)
    if m is None:
        return local
    return f"model.layers.{int(m.group(1)) + start}.{local[m.end() :]}"


def _checkpoint_key(key: str, checkpoint: Checkpoint, tied: bool) -> str:
    if key in checkpoint:
        return key
    if key == "lm_head.weight" and tied:
        return _checkpoint_key("model.embed_tokens.weight", checkpoint, tied)
    bare = key.removeprefix("model.")  # some checkpoints store the base model without its prefix
    if bare in checkpoint:
        return bare
    raise UnsupportedModelError(
        f"the checkpoint at {checkpoint.path} has no tensor {key!r} (nor {bare!r}); "
        "its weight names do not follow the `model.layers.N` layout the generic split expects"
    )


def _skeleton(config: PretrainedConfig, attn_implementation: str | None) -> PreTrainedModel:
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    # Parameters on meta (no memory); buffers such as rotary inv_freq are computed for real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    base = model.base_model
    for attr in ("embed_tokens", "layers", "norm"):
        if not hasattr(base, attr):
            raise UnsupportedModelError(
                f"{type(base).__name__} has no `{attr}`; the generic split needs embed_tokens, layers and norm"
            )
    return model


def build_part(
    role: Role,
    checkpoint: Checkpoint,
    points: SplitPoints,
    runtime: Runtime,
    *,
    attn_implementation: str | None = None,
    loaded: dict[str, torch.Tensor] | None = None,
    logits: bool = False,
) -> Head | Body | Tail:
    """Build ``role`` with only its own weights, on ``runtime.device`` in ``runtime.dtype``.

    ``logits`` (body only): the body keeps the final norm and the LM head and returns logits (``LogitsBody``,
    STIP's layout, where the device holds only the embedding and there is no tail).

    ``loaded`` maps checkpoint keys to tensors already materialised by another part of this process;
    they are reused (not copied), so a device holding head and tail keeps one tied embedding matrix.
    New tensors are added to it.
    """
    config = checkpoint.config
    check_family(config)
    start, stop = layer_range(role, points)
    if role == "body" and start == stop and not logits:
        return Body(None, start, stop)

    # init_empty_weights patches nn.Module.register_parameter process-wide, which would also send another
    # thread's parameter assignment to meta: concurrent builds take turns for skeleton and assignment.
    with _BUILD_LOCK:
        return _build_locked(role, checkpoint, start, stop, runtime, attn_implementation, loaded, logits)


def _build_locked(
    role: Role,
    checkpoint: Checkpoint,
    start: int,
    stop: int,
    runtime: Runtime,
    attn_implementation: str | None,
    loaded: dict[str, torch.Tensor] | None,
    logits: bool,
) -> Head | Body | Tail:
    config = checkpoint.config
    ends_in_lm_head = role == "tail" or (role == "body" and logits)
    model = _skeleton(part_config(config, start, stop), attn_implementation)
    base = model.base_model
    if role != "head":
        # = `base.embed_tokens = None`, which mypy refuses: it types nn.Module attributes as Tensor | Module
        base.register_module("embed_tokens", None)
    if not ends_in_lm_head:
        base.norm = nn.Identity()
        module: nn.Module = base  # head and body run the base model and return hidden states
        prefix = "model."
    else:
        module = model
        prefix = ""

    tied = bool(getattr(config, "tie_word_embeddings", False))
    loaded = {} if loaded is None else loaded
    wanted = {
        name: _checkpoint_key(_global_key(prefix + name, start), checkpoint, tied)
        for name, _ in module.named_parameters(remove_duplicate=False)
    }
    missing = sorted({k for k in wanted.values() if k not in loaded})
    for key, tensor in checkpoint.load(missing).items():
        target = runtime.dtype if tensor.is_floating_point() else tensor.dtype
        # copy=True: safetensors tensors are memory-mapped; without a copy a same-dtype CPU load would page
        # the weights in lazily during the first forward (seconds on a cold cache) instead of at load time.
        loaded[key] = tensor.to(device=runtime.device, dtype=target, copy=True)
    module.load_state_dict({name: loaded[key] for name, key in wanted.items()}, strict=True, assign=True)
    module.to(runtime.device)  # non-persistent buffers (rotary inv_freq) keep their float32 dtype
    module.eval().requires_grad_(False)
    if runtime.device.type == "cpu":
        pack_linears(module)  # oneDNN for products of 2+ rows on a CPU (models.packing)
    _log.debug("built %s [%d, %d) with %d tensors", role, start, stop, len(wanted))
    parts: dict[Role, type[Head] | type[Body] | type[Tail]] = {
        "head": Head,
        "body": LogitsBody if logits else Body,
        "tail": Tail,
    }
    return parts[role](cast(PreTrainedModel, module), start, stop)  # base_model is typed nn.Module
