"""The device's private part of PrivateLoRA: one matrix ``M`` (``r_c2d x r_d2c``) per adapted projection.

``M`` never leaves the device: it answers the cloud's ``u = x A`` with ``v = u M`` (``answer``) and, in training,
the cloud's ``dL/dv`` with ``dL/du = dL/dv M^T`` (``gradient``) while autograd accumulates ``dL/dM = u^T dL/dv``
into ``M.grad`` for the device's optimizer. ``M`` starts at zero, so an untrained device runs the base model.

Shapes: ``n`` projections in a group, ``B`` batch, ``T`` positions; ``u`` is (n, B, T, r_c2d), ``v`` (n, B, T, r_d2c).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lambdasplit.errors import ConfigError, WireError
from lambdasplit.privatelora.layout import AdapterLayout


def key(layer: int, target: str) -> str:
    return f"layers.{layer}.{target}"


class PrivateAdapters(nn.Module):
    """``M`` for every target of ``layout`` in each of the global ``layers``, float32 (trained on the device)."""

    def __init__(self, layout: AdapterLayout, layers: range | list[int], *, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.layout, self.layers = layout, list(layers)
        self.groups = layout.groups()
        shape = (layout.rank_c2d, layout.rank_d2c)
        self.m = nn.ParameterDict(
            {
                key(i, t).replace(".", "_"): nn.Parameter(torch.zeros(shape, device=device))
                for i in self.layers
                for t in layout.targets
            }
        )
        self._saved: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def matrix(self, layer: int, target: str) -> nn.Parameter:
        return self.m[key(layer, target).replace(".", "_")]

    def _group(self, layer: int, group: int, what: str) -> tuple[str, ...]:
        if layer not in self.layers or not 0 <= group < len(self.groups):
            raise WireError(
                f"the cloud asked for {what} of layer {layer}, group {group}; this device adapts layers "
                f"{self.layers[0]}..{self.layers[-1]} in {len(self.groups)} groups",
                code="bad_adapter",
            )
        return self.groups[group]

    def answer(self, layer: int, group: int, u: torch.Tensor, keep: bool = False) -> torch.Tensor:
        """``v = u M`` for each projection of ``group`` in ``layer``: u (n, B, T, r_c2d) -> v (n, B, T, r_d2c).

        ``keep``: a training forward; the graph is kept until ``gradient`` is asked for this layer and group.
        """
        targets = self._group(layer, group, "an answer")
        if u.dim() != 4 or u.shape[0] != len(targets) or u.shape[-1] != self.layout.rank_c2d:
            raise WireError(
                f"layer {layer}, group {group} takes ({len(targets)}, B, T, {self.layout.rank_c2d}), got "
                f"{tuple(u.shape)}",
                code="bad_adapter",
            )
        if not keep:
            with torch.no_grad():
                ms = torch.stack([self.matrix(layer, t) for t in targets])  # (n, r_c2d, r_d2c)
                return u.to(ms.dtype) @ ms.unsqueeze(1)
        # The cloud's exchange runs inside its autograd function's forward (grad off): turn it on for M's graph.
        with torch.inference_mode(False), torch.enable_grad():
            ms = torch.stack([self.matrix(layer, t) for t in targets])
            u = u.detach().clone().to(ms.dtype).requires_grad_(True)
            v = u @ ms.unsqueeze(1)
        self._saved[(layer, group)] = (u, v)
        return v.detach()

    def gradient(self, layer: int, group: int, grad_v: torch.Tensor) -> torch.Tensor:
        """``dL/du`` for the kept forward of ``layer``/``group`` given ``dL/dv``; ``dL/dM`` goes into ``M.grad``."""
        saved = self._saved.pop((layer, group), None)
        if saved is None:
            raise WireError(
                f"the cloud sent a gradient for layer {layer}, group {group}, which has no training forward "
                "waiting for one",
                code="unknown_step",
            )
        u, v = saved
        if grad_v.shape != v.shape:
            raise WireError(
                f"a gradient of shape {tuple(grad_v.shape)} for values {tuple(v.shape)}", code="bad_adapter"
            )
        torch.autograd.backward(v, grad_v.to(v.dtype))
        assert u.grad is not None
        return u.grad

    def forget(self) -> None:
        """Drop kept training forwards (a step abandoned before its backward)."""
        self._saved.clear()

    @property
    def pending(self) -> int:
        return len(self._saved)

    # checkpoints stay on the device: safetensors, with the layout in the metadata

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            key(i, t): self.matrix(i, t).detach().cpu().contiguous() for i in self.layers for t in self.layout.targets
        }
        meta = {
            "format": "lambdasplit-privatelora",
            "targets": ",".join(self.layout.targets),
            "rank": f"{self.layout.rank_c2d}/{self.layout.rank_d2c}",
            "seed": str(self.layout.seed),
        }
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: torch.device | str = "cpu") -> PrivateAdapters:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "lambdasplit-privatelora":
            raise ConfigError(f"{path} is not a PrivateLoRA adapter file (no lambdasplit-privatelora metadata)")
        layout = AdapterLayout.parse(meta["targets"], meta["rank"], int(meta["seed"]))
        tensors = load_file(str(path))
        layers = sorted({int(k.split(".")[1]) for k in tensors})
        adapters = cls(layout, layers, device=device)
        with torch.no_grad():
            for name, tensor in tensors.items():
                _, layer, target = name.split(".")
                adapters.matrix(int(layer), target).copy_(tensor)
        return adapters
