"""Load the parts of a split model that this process runs: all three, the device's two, or the body."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from transformers import AutoTokenizer, GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from lambdasplit.config import Layout, Runtime, SplitPoints, check_layout
from lambdasplit.errors import ConfigError, ModelLoadError
from lambdasplit.models.checkpoint import Checkpoint
from lambdasplit.models.registry import DEFAULT_MODEL
from lambdasplit.models.resolve import resolve_checkpoint
from lambdasplit.split.build import Role, build_part
from lambdasplit.split.parts import Body, Head, Tail

DEFAULT_LAYERS = "2:-2"
_ROLES: tuple[Role, ...] = ("head", "body", "tail")
# A checkpoint without these files loads for token-id use only (tests, or a caller's own tokenizer).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class WireTransform(Protocol):
    """A device-side transform of what crosses the link (a secret permutation or rotation, noise).

    ``encode`` maps the head's output (B, T, D) to what is sent; ``decode`` maps what the body returns to
    what the tail runs on. A body served for such a transform has weights to match (``privacy.obfuscate``).
    """

    def encode(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def decode(self, hidden: torch.Tensor) -> torch.Tensor: ...


@dataclass
class SplitModel:
    """The parts of one model that this process holds, and what both sides must agree on.

    ``head``/``body``/``tail`` are ``None`` for parts held elsewhere (the cloud has only ``body``;
    a device has ``head`` and ``tail``). ``fingerprint`` identifies the weights, so two processes can
    refuse to pair different models. In STIP's ``layout`` there is never a tail: the body returns logits.
    """

    name: str
    path: Path
    config: PretrainedConfig
    points: SplitPoints
    runtime: Runtime
    fingerprint: str
    head: Head | None = None
    body: Body | None = None
    tail: Tail | None = None
    tokenizer: PreTrainedTokenizerBase | None = None
    generation_config: GenerationConfig | None = field(default=None, repr=False)
    wire_transform: WireTransform | None = field(default=None, repr=False)
    layout: Layout = "head-tail"

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def eos_token_ids(self) -> set[int]:
        """Every id that ends generation: the tokenizer's EOS and the generation config's (int or list)."""
        ids: set[int] = set()
        for source in (self.generation_config, self.config):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if value is not None:
                ids.update([value] if isinstance(value, int) else value)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def parameter_count(self, role: Role) -> int:
        """Unique parameters held by one part (tied tensors counted once)."""
        part = getattr(self, role)
        if part is None:
            return 0
        return sum(p.numel() for p in {id(p): p for p in part.parameters()}.values())


def load_split(
    model: str | os.PathLike[str] = DEFAULT_MODEL,
    layers: str | tuple[int, int] | SplitPoints | None = None,
    *,
    parts: Iterable[Role] = _ROLES,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    quiet: bool = False,
    layout: Layout | None = None,
) -> SplitModel:
    """Load ``model`` cut at ``layers`` (``"X:Y"``, negative counts from the end; default ``2:-2``), building only
    ``parts``.

    ``model``: an embedded model name, a checkpoint folder, a ``.gguf`` file or a hub id.
    ``device``/``dtype``: default CUDA + bfloat16 when a GPU is present, else CPU + float32.
    ``layout``: ``"head-tail"`` or ``"stip"`` (``config.LAYOUTS``); None takes the checkpoint's (a transformed
    body or a bundle says which it was made for; a plain checkpoint is cut head/tail). In STIP's layout the
    points are ``0:N`` (``layers`` must say so or be None), the head is the embedding alone, the body ends in
    the LM head (``LogitsBody``) and no tail is built, whether asked for or not.
    """
    roles = tuple(parts)
    unknown = [r for r in roles if r not in _ROLES]
    if unknown or not roles:
        raise ConfigError(f"parts must be a non-empty subset of {_ROLES}, got {roles}")
    runtime = Runtime.resolve(device, dtype)
    path = resolve_checkpoint(model, quiet=quiet)
    checkpoint = Checkpoint(path)
    config = checkpoint.config
    num_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(num_layers, int):
        raise ModelLoadError(f"{path}: config has no integer num_hidden_layers; is this a causal LM?")
    layout = check_layout(checkpoint.layout if layout is None else layout)
    if layout != checkpoint.layout and (checkpoint.obfuscation is not None or checkpoint.bundle_role is not None):
        raise ConfigError(f"{path} was made for the {checkpoint.layout} layout, not {layout}")
    if layers is None:
        layers = "0:" if layout == "stip" else DEFAULT_LAYERS
    points = SplitPoints.parse(layers, num_layers)
    if layout == "stip" and (points.head_layers, points.body_end) != (0, num_layers):
        raise ConfigError(
            f"STIP's layout runs every layer in the cloud (layers 0:{num_layers}), not {points}: the device holds "
            "the embedding only"
        )
    if checkpoint.bundle_role == "user" and "body" in roles:
        raise ConfigError(
            f"{path} is a user bundle: it holds the head and tail only, and its body runs on the model server "
            "(connect with --cloud URL)"
        )
    if checkpoint.obfuscation is not None:
        made_for = checkpoint.obfuscation.get("points")
        if roles != ("body",) or str(points) != made_for:
            raise ConfigError(
                f"{path} holds an obfuscated body for layers {made_for} only: serve it with --layers {made_for}; "
                "a device loads the plain model and the key (--key)"
            )

    split = SplitModel(
        name=str(model),
        path=path,
        config=config,
        points=points,
        runtime=runtime,
        fingerprint=checkpoint.fingerprint(),
        layout=layout,
    )
    loaded: dict[str, torch.Tensor] = {}  # shared so head and tail keep one tied embedding matrix
    stip = layout == "stip"
    for role in _ROLES:
        if role in roles and not (stip and role == "tail"):
            part = build_part(
                role, checkpoint, points, runtime, attn_implementation=attn_implementation, loaded=loaded, logits=stip
            )
            setattr(split, role, part)
    if ("head" in roles or "tail" in roles) and any((path / f).is_file() for f in _TOKENIZER_FILES):
        split.tokenizer = AutoTokenizer.from_pretrained(path)
        try:
            split.generation_config = GenerationConfig.from_pretrained(path)
        except OSError:
            split.generation_config = GenerationConfig.from_model_config(config)
    return split
