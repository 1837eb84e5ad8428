"""Typed, frozen configuration: where the model is cut, and where and how it runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from lambdasplit.errors import ConfigError, SplitPointError

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


#: Who runs what. ``head-tail`` (Λ-Split): the device runs the embedding, layers [0, X), layers [Y, N), the final
#: norm and the LM head; hidden states cross the wire both ways. ``stip`` (STIP's own layout): the device runs
#: the embedding alone, the cloud every layer, the final norm and the LM head; logits come back (points 0:N).
Layout = Literal["head-tail", "stip"]
LAYOUTS: tuple[Layout, ...] = get_args(Layout)


def check_layout(layout: str) -> Layout:
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r} is not available; choose from {', '.join(LAYOUTS)}")
    return layout


@dataclass(frozen=True)
class SplitPoints:
    """Where a model of ``num_layers`` decoder layers is cut: ``0 <= head_layers <= body_end <= num_layers``.

    head = embeddings + layers [0, head_layers)            on the device
    body = layers [head_layers, body_end)                  in the cloud
    tail = layers [body_end, num_layers) + norm + LM head  on the device

    Layer indices are global: layer ``i`` of the body is layer ``i`` of the unsplit model.
    """

    head_layers: int
    body_end: int
    num_layers: int

    def __post_init__(self) -> None:
        x, y, n = self.head_layers, self.body_end, self.num_layers
        if n < 0 or not 0 <= x <= y <= n:
            raise SplitPointError(
                f"split points X={x}, Y={y} are invalid for a model of N={n} layers: "
                f"need 0 <= X <= Y <= N (for example {min(1, n)}:{max(n - 1, min(1, n))})"
            )

    @classmethod
    def parse(cls, spec: str | tuple[int, int] | SplitPoints, num_layers: int) -> SplitPoints:
        """Accept ``"X:Y"``, ``"X:"`` (``X:N``), ``":Y"`` (``0:Y``), ``(X, Y)`` or an existing ``SplitPoints``.

        Negative indices count from the end, like Python slices: ``"2:-2"`` on 30 layers is ``2:28``.
        """
        if isinstance(spec, SplitPoints):
            if spec.num_layers != num_layers:
                raise SplitPointError(
                    f"split points were made for N={spec.num_layers} layers but the model has {num_layers}"
                )
            return spec
        if isinstance(spec, str):
            parts = spec.split(":")
            if len(parts) != 2:
                raise SplitPointError(f"layers must look like 'X:Y' (e.g. '2:28'), got {spec!r}")
            try:
                x = int(parts[0]) if parts[0].strip() else 0
                y = int(parts[1]) if parts[1].strip() else num_layers
            except ValueError:
                raise SplitPointError(f"layers must be two integers 'X:Y' (e.g. '2:28'), got {spec!r}") from None
        else:
            try:
                x, y = (int(v) for v in spec)
            except (TypeError, ValueError):
                raise SplitPointError(f"layers must be 'X:Y' or a pair (X, Y), got {spec!r}") from None
        x = x + num_layers if x < 0 else x
        y = y + num_layers if y < 0 else y
        return cls(x, y, num_layers)

    @classmethod
    def balanced(cls, num_layers: int, device_layers: int) -> SplitPoints:
        """Give ``device_layers`` layers to the device, split as evenly as possible between head and tail
        (the paper's 'computation ratio'; the head gets the extra layer when odd)."""
        if not 0 <= device_layers <= num_layers:
            raise SplitPointError(f"device_layers must be in [0, {num_layers}], got {device_layers}")
        head = (device_layers + 1) // 2
        return cls(head, num_layers - (device_layers - head), num_layers)

    @property
    def tail_layers(self) -> int:
        return self.num_layers - self.body_end

    @property
    def body_layers(self) -> int:
        return self.body_end - self.head_layers

    def __str__(self) -> str:
        return f"{self.head_layers}:{self.body_end}"


def parse_dtype(value: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` means float32 on CPU and bfloat16 on CUDA (the usual fast-and-safe choice there)."""
    if value is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(value, torch.dtype):
        if value not in _DTYPES.values():
            raise ConfigError(f"dtype {value} is not supported; use one of float32, float16, bfloat16")
        return value
    try:
        return _DTYPES[value.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {value!r}; use one of float32, float16, bfloat16") from None


def parse_device(value: str | torch.device | None) -> torch.device:
    """``None`` means CUDA when available, else CPU. A CUDA device that is absent is a clear error."""
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {value!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {value!r} was asked for but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device type {device.type!r} is not supported; use 'cpu', 'cuda' or 'mps'")
    return device


@dataclass(frozen=True)
class Runtime:
    """Where and in which precision a part runs. Chosen at load time."""

    device: torch.device
    dtype: torch.dtype

    @classmethod
    def resolve(cls, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> Runtime:
        dev = parse_device(device)
        return cls(dev, parse_dtype(dtype, dev))
