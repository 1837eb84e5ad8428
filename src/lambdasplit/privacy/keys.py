"""Obfuscation keys: the device's secret transform of the body's hidden dimension (STIP-style).

The device sends ``h' = h Q`` instead of the head's output ``h`` (B, T, D) and un-does it on what comes
back (``h = h' Q^T``); the body's weights are transformed once to match (``privacy.obfuscate``), so the
split's output is unchanged. ``Q`` is either a permutation (``h[..., p]``: exact, no rounding) or a
Haar-random orthogonal rotation (exact up to float rounding). The optional inner secrets change how
the cloud's weights look (FFN width, KV heads with their query groups, V channels, q/k per-plane
rotations) without changing what they compute, so the cloud's copy matches the public weights less
directly.

What a key protects is a measured figure, not a property: see ``lambdasplit audit`` and
``docs/threat-model.md`` (an attacker with the public weights recovers permutation keys from the
body's weights, and from enough intercepted traffic).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from transformers import PretrainedConfig

from lambdasplit.config import SplitPoints
from lambdasplit.errors import ConfigError

KeyKind = Literal["permutation", "rotation"]
KINDS: tuple[KeyKind, ...] = ("permutation", "rotation")
#: Inner secrets a key may add to every body layer.
INNER: tuple[str, ...] = ("ffn", "kv-heads", "v-channels", "qk-planes")


@dataclass
class LayerSecrets:
    """Secrets inside one body layer; each ``None`` when not used. ``KV`` key/value heads of ``hd`` channels."""

    ffn: torch.Tensor | None = None  # (I,) permutation of the FFN width
    kv_heads: torch.Tensor | None = None  # (KV,) new head g holds old head kv_heads[g]; query heads follow
    v_channels: torch.Tensor | None = None  # (KV, hd) channel permutation of each (new) V head
    qk_angles: torch.Tensor | None = None  # (KV, hd/2) rotation angle of each q/k RoPE plane, per KV group

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("ffn", "kv_heads", "v_channels", "qk_angles")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass
class ObfuscationKey:
    """A secret for one model cut at ``points``; ``matrix`` (D, D) is orthogonal, ``permutation`` (D,) is
    set for permutation keys (``h[..., p] == h @ matrix``)."""

    kind: KeyKind
    matrix: torch.Tensor
    points: str
    base_fingerprint: str
    permutation: torch.Tensor | None = None
    layers: dict[int, LayerSecrets] = field(default_factory=dict)
    #: The fingerprint of the body made with the full key, kept by a key stripped of its inner secrets (a
    #: user's copy, ``for_user``), which can no longer derive it; None: derived from the key's tensors.
    paired_fingerprint: str | None = None
    #: STIP's layout: (V,) the vocabulary permutation of the body's LM head. Its logits row j is the plain row
    #: ``vocab[j]``; ``decode`` puts them back in order. None: the body returns hidden states.
    vocab: torch.Tensor | None = None

    @property
    def hidden_size(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def inner(self) -> list[str]:
        """Which inner secrets the key holds (names from ``INNER``)."""
        used = {n for s in self.layers.values() for n in s.tensors()}
        names = {"ffn": "ffn", "kv_heads": "kv-heads", "v_channels": "v-channels", "qk_angles": "qk-planes"}
        return [names[n] for n in names if n in used]

    @property
    def key_id(self) -> str:
        """A short hash of the key's tensors: names a key without revealing it."""
        h = hashlib.sha256(self.kind.encode())
        for name, t in sorted(self._tensors().items()):
            h.update(name.encode())
            h.update(t.contiguous().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def body_fingerprint(self) -> str:
        """The fingerprint of a body obfuscated with this key: a device pairs with it only when holding the key."""
        if self.paired_fingerprint is not None:
            return self.paired_fingerprint
        return hashlib.sha256(f"{self.base_fingerprint}:{self.key_id}".encode()).hexdigest()[:16]

    def for_user(self) -> ObfuscationKey:
        """What a user's device needs of this key: the hidden-dimension transform only. The inner secrets
        stay with the developer (and folded into the server's weights); the body's fingerprint is kept."""
        return ObfuscationKey(
            self.kind,
            self.matrix,
            self.points,
            self.base_fingerprint,
            self.permutation,
            {},
            self.body_fingerprint(),
            self.vocab,
        )

    def check(self, fingerprint: str, points: object) -> None:
        """Refuse to use this key on another model or other split points than it was made for."""
        if fingerprint != self.base_fingerprint:
            raise ConfigError(
                f"this key was made for the model with fingerprint {self.base_fingerprint}, not {fingerprint}"
            )
        if str(points) != self.points:
            raise ConfigError(f"this key was made for layers {self.points}, not {points}")

    # --- the device side -------------------------------------------------------------------------------
    def encode(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the device sends instead of the head's output ``hidden`` (..., D)."""
        if self.permutation is not None:
            return hidden[..., self.permutation.to(hidden.device)]
        work = torch.promote_types(hidden.dtype, torch.float32)  # half precisions rotate in float32
        return (hidden.to(work) @ self.matrix.to(hidden.device, work)).to(hidden.dtype)

    def decode(self, hidden: torch.Tensor) -> torch.Tensor:
        """The body's output (..., D) back in the model's own basis, for the tail; for a STIP key (``vocab``), the
        body's logits (..., V) back in the vocabulary's order."""
        if self.vocab is not None:
            return hidden[..., torch.argsort(self.vocab).to(hidden.device)]
        if self.permutation is not None:
            return hidden[..., torch.argsort(self.permutation).to(hidden.device)]
        work = torch.promote_types(hidden.dtype, torch.float32)
        return (hidden.to(work) @ self.matrix.to(hidden.device, work).T).to(hidden.dtype)

    # --- storage -----------------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {"matrix": self.matrix}
        if self.permutation is not None:
            out["permutation"] = self.permutation
        if self.vocab is not None:
            out["vocab"] = self.vocab
        for layer, s in self.layers.items():
            out.update({f"layers.{layer}.{n}": t for n, t in s.tensors().items()})
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the key as a safetensors file (readable by the device only: mode 0600)."""
        path = Path(path)
        meta = {"kind": self.kind, "points": self.points, "base_fingerprint": self.base_fingerprint}
        if self.paired_fingerprint is not None:
            meta["paired_fingerprint"] = self.paired_fingerprint
        save_file(
            {k: v.contiguous().cpu() for k, v in self._tensors().items()}, str(path), {"lambdasplit": json.dumps(meta)}
        )
        path.chmod(0o600)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ObfuscationKey:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no key file at {path}; make one with `lambdasplit obfuscate`")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("lambdasplit")
        if raw is None:
            raise ConfigError(f"{path} is not a lambdasplit key (no 'lambdasplit' metadata)")
        meta = json.loads(raw)
        tensors = load_file(str(path))
        layers: dict[int, LayerSecrets] = {}
        for name, t in tensors.items():
            if name.startswith("layers."):
                _, index, attr = name.split(".", 2)
                setattr(layers.setdefault(int(index), LayerSecrets()), attr, t)
        return cls(
            kind=meta["kind"],
            matrix=tensors["matrix"],
            points=meta["points"],
            base_fingerprint=meta["base_fingerprint"],
            permutation=tensors.get("permutation"),
            layers=layers,
            paired_fingerprint=meta.get("paired_fingerprint"),
            vocab=tensors.get("vocab"),
        )


def attention_shape(config: PretrainedConfig) -> tuple[int, int, int]:
    """(query heads H, key/value heads KV, head dim hd) of a decoder config."""
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, int(head_dim)


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random (n, n) orthogonal matrix: QR of a Gaussian with the signs of R's diagonal folded in."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float().contiguous()  # LAPACK returns q column-major


def make_key(
    config: PretrainedConfig,
    points: SplitPoints,
    base_fingerprint: str,
    *,
    kind: KeyKind = "permutation",
    inner: tuple[str, ...] | list[str] = (),
    seed: int | None = None,
    vocabulary: bool = False,
) -> ObfuscationKey:
    """A new key for ``config`` cut at ``points``. ``seed=None`` draws a fresh key from the OS's randomness.

    ``vocabulary``: also permute the LM head's vocabulary (STIP's layout, where the body returns logits).
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown key kind {kind!r}; use one of {', '.join(KINDS)}")
    unknown = sorted(set(inner) - set(INNER))
    if unknown:
        raise ConfigError(f"unknown inner secret(s) {', '.join(unknown)}; choose from {', '.join(INNER)}")
    gen = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
    d = int(config.hidden_size)
    if kind == "permutation":
        perm = torch.randperm(d, generator=gen)
        matrix = torch.eye(d)[:, perm]  # h @ matrix == h[..., perm]
    else:
        perm, matrix = None, random_orthogonal(d, gen)
    _, kv, head_dim = attention_shape(config)
    width = int(config.intermediate_size)
    layers: dict[int, LayerSecrets] = {}
    for layer in range(points.head_layers, points.body_end):
        s = LayerSecrets()
        if "ffn" in inner:
            s.ffn = torch.randperm(width, generator=gen)
        if "kv-heads" in inner:
            s.kv_heads = torch.randperm(kv, generator=gen)
        if "v-channels" in inner:
            s.v_channels = torch.stack([torch.randperm(head_dim, generator=gen) for _ in range(kv)])
        if "qk-planes" in inner:
            s.qk_angles = torch.rand(kv, head_dim // 2, generator=gen, dtype=torch.float64).float() * 2 * torch.pi
        if s.tensors():
            layers[layer] = s
    vocab = torch.randperm(int(config.vocab_size), generator=gen) if vocabulary else None
    return ObfuscationKey(kind, matrix, str(points), base_fingerprint, perm, layers, vocab=vocab)
