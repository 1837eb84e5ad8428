"""What an audit is asked to measure: the model, split points, defences, prompts and budgets (``AuditSettings``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lambdasplit.audit.prompts import DEFAULT_PROMPTS, AuditPrompt
from lambdasplit.errors import ConfigError
from lambdasplit.models.registry import DEFAULT_MODEL
from lambdasplit.privacy.keys import INNER
from lambdasplit.wire.tensors import WireDtype


@dataclass(frozen=True)
class Defence:
    """``none``, ``permutation[+inner]``, ``rotation[+inner]``, ``noise:SIGMA`` or ``tls``."""

    name: str
    kind: Literal["none", "permutation", "rotation", "noise", "tls"]
    inner: tuple[str, ...] = ()
    sigma: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> Defence:
        spec = spec.strip().lower()
        if spec in ("none", "tls"):
            return cls(spec, spec)  # type: ignore[arg-type]
        if spec.startswith("noise:"):
            try:
                sigma = float(spec.removeprefix("noise:"))
            except ValueError:
                raise ConfigError(f"noise takes a relative sigma, e.g. noise:0.5, got {spec!r}") from None
            if sigma <= 0:
                raise ConfigError(f"noise sigma must be > 0, got {sigma}")
            return cls(spec, "noise", sigma=sigma)
        base, _, extra = spec.partition("+")
        if base in ("permutation", "rotation") and extra in ("", "inner"):
            return cls(spec, base, INNER if extra else ())  # type: ignore[arg-type]
        raise ConfigError(
            f"unknown defence {spec!r}; use none, permutation, permutation+inner, rotation, rotation+inner, "
            "noise:SIGMA or tls"
        )


DEFAULT_DEFENCES = ("none", "permutation", "permutation+inner", "rotation", "rotation+inner", "noise:0.5", "tls")


@dataclass(frozen=True)
class AuditSettings:
    model: str = DEFAULT_MODEL
    head_layers: tuple[int, ...] = (0, 1, 2, 4, 8)  # prompt-side rows: X device layers before the body
    tail_layers: tuple[int, ...] = (1, 2, 4)  # output-side rows: layers after the body
    layers: str | None = None  # one deployed split "X:Y": both sides there (replaces head_layers, tail_layers)
    defences: tuple[str, ...] = DEFAULT_DEFENCES
    prompts: tuple[AuditPrompt, ...] = DEFAULT_PROMPTS
    max_new_tokens: int = 24
    wire_dtype: str = "float16"  # what the link carries (the CLI's default); float32, float16 or bfloat16
    inverter_tokens: int = 60_000  # public training tokens for A3; 0 skips A3
    sample_temperature: float = 0.8  # B3's sampled generations
    utility_tokens: int = 2048  # held-out public tokens for the perplexity column
    seed: int = 0
    chat: bool = True

    def wire(self) -> WireDtype:
        """``wire_dtype`` as the codec names it: a raw float dtype only.

        The attacks' tolerances (A1, A4, B3) model a float wire's rounding; a quantized wire would need its own.
        """
        try:
            wire = WireDtype.parse(self.wire_dtype)
        except ConfigError:
            wire = None
        if wire is None or wire.torch_dtype is None:
            raise ConfigError(f"the audit's wire dtype must be float32, float16 or bfloat16, got {self.wire_dtype!r}")
        return wire
