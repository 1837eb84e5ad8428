"""``lambdasplit audit``: run the attack suite on a model, per split point and defence, for both attackers.

For each configuration the audit runs real split generations (``intercept``), so what is attacked is
exactly what a wire frame carries; then every attack that applies reads it:

- prompt side (uplink, after the head's X layers): A2 nearest neighbour, A1 exact matching, A3 the learned
  inverter, STIP's distance correlation;
- output side (downlink, before the tail's layers; and the uplink, where generated tokens are fed back):
  B1 tail replay, B2 logit lens, B3 sampled tokens confirmed by the next uplink state, A1 on fed tokens;
- against a key (permutation / rotation): A4 recovers it first, the eavesdropper from the traffic, the
  curious cloud from its own weights, and the attacks above then run on the decoded states.

The eavesdropper holds the public weights and sees the link; the cloud also holds the body (obfuscated,
when a key is used). With no key both see the same states, so one row serves both. TLS leaves the
eavesdropper ciphertext only (``tests/server/test_server_tls.py`` captures it) and changes nothing for the
cloud, where TLS ends.

Each row carries the defence's utility cost, measured through the same split: perplexity on held-out
public text relative to the plain split, and greedy agreement with the unsplit model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from lambdasplit.audit import metrics
from lambdasplit.audit.attacks.result import AttackResult
from lambdasplit.audit.prompts import DEFAULT_PROMPTS, AuditPrompt
from lambdasplit.config import SplitPoints
from lambdasplit.errors import ConfigError, SplitPointError
from lambdasplit.models.registry import DEFAULT_MODEL
from lambdasplit.models.resolve import lambdasplit_home
from lambdasplit.privacy.intercept import Intercept, intercept
from lambdasplit.privacy.keys import INNER, make_key
from lambdasplit.privacy.noise import GaussianNoise
from lambdasplit.privacy.obfuscate import protect
from lambdasplit.split.loader import SplitModel, load_split

Attacker = Literal["eavesdropper", "cloud", "eavesdropper = cloud"]
_WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: What a progress display is told: a stage description, then (done, total) units of work within it.
Progress = Callable[[str, int, int], None]


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


@dataclass
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


@dataclass
class AuditRow:
    """One attack, on one configuration, scored over all prompts (token counts pooled)."""

    defence: str
    attacker: Attacker
    side: Literal["prompt", "output"]
    attack: str
    token_accuracy: float | None = None
    user_accuracy: float | None = None  # the user's own tokens only (prompt side: without the chat template)
    rouge_l: float | None = None
    exact_rate: float | None = None  # prompts (outputs) recovered whole
    secret_rate: float | None = None  # prompts whose planted secret appears in the decoded recovery
    seconds: float = 0.0
    head_layers: int = 0
    tail_layers: int = 0
    perplexity_ratio: float | None = None
    greedy_agreement: float | None = None
    key_accuracy: float | None = None  # A4: fraction of the hidden dimension mapped right
    dcor: float | None = None  # STIP's distance correlation (only the dcor row)
    note: str = ""


@dataclass
class AuditReport:
    settings: dict[str, Any]
    rows: list[AuditRow] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "seconds": round(self.seconds, 1), "rows": [asdict(r) for r in self.rows]}


# --- scoring -------------------------------------------------------------------------------------------------


def score(
    results: Sequence[AttackResult],
    prompts: Sequence[AuditPrompt],
    decode: Callable[[list[int]], str],
    encode: Callable[[str], list[int]] | None = None,
) -> dict[str, float | None]:
    """Pool token accuracy (all tokens of all prompts), mean ROUGE-L, exact rate and secret rate.

    ``user_accuracy`` pools only the user's own tokens: on the prompt side the tokens of each prompt's text
    (``encode``, found as a run inside the templated prompt; prompts where it is not found are left out),
    on the output side every generated token. None without ``encode`` on the prompt side.
    """
    total = sum(len(r.target) for r in results)
    correct = sum(metrics.token_accuracy(r.recovered, r.target) * len(r.target) for r in results)
    user_total = user_correct = 0
    for r, p in zip(results, prompts, strict=True):
        if r.side == "output":
            span: slice | None = slice(0, len(r.target))
        else:
            span = None if encode is None else metrics.find_span(r.target, encode(p.text))
        if span is not None:
            user_total += span.stop - span.start
            user_correct += sum(a == b for a, b in zip(r.recovered[span], r.target[span], strict=False))
    secrets = [
        metrics.secret_recovered(decode(r.recovered), p.secret)
        for r, p in zip(results, prompts, strict=True)
        if p.secret is not None and r.side == "prompt"
    ]
    return {
        "token_accuracy": correct / total if total else None,
        "user_accuracy": user_correct / user_total if user_total else None,
        "rouge_l": sum(r.rouge_l for r in results) / len(results) if results else None,
        "exact_rate": sum(r.exact for r in results) / len(results) if results else None,
        "secret_rate": sum(secrets) / len(secrets) if secrets else None,
    }


# --- the run -------------------------------------------------------------------------------------------------


@dataclass
class _Config:
    """One split of the model and what is measured on it."""

    head: int
    tail: int
    sides: tuple[str, ...]


def _plan(settings: AuditSettings, num_layers: int) -> list[_Config]:
    """Prompt-side rows vary X with the tail at its middle value; output-side rows vary the tail with X = 2.

    With ``settings.layers`` ("X:Y"), that one split for both sides.
    """
    if settings.layers is not None:
        try:
            points = SplitPoints.parse(settings.layers, num_layers)
        except SplitPointError as exc:
            raise ConfigError(str(exc)) from None
        return [_Config(points.head_layers, num_layers - points.body_end, ("prompt", "output"))]
    tail_fixed = sorted(settings.tail_layers)[len(settings.tail_layers) // 2] if settings.tail_layers else 2
    head_fixed = 2 if 2 in settings.head_layers or not settings.head_layers else sorted(settings.head_layers)[0]
    configs: dict[tuple[int, int], set[str]] = {}
    for x in settings.head_layers:
        configs.setdefault((x, tail_fixed), set()).add("prompt")
    for t in settings.tail_layers:
        configs.setdefault((head_fixed, t), set()).add("output")
    for x, t in configs:
        if x + t > num_layers:
            raise ConfigError(f"{x} head + {t} tail layers exceed the model's {num_layers} layers")
    return [_Config(x, t, tuple(sorted(s, reverse=True))) for (x, t), s in sorted(configs.items())]


class Run:
    """State shared by the configurations of one audit: prompts, the unsplit reference, cached inverters."""

    def __init__(self, settings: AuditSettings, progress: Progress | None) -> None:
        self.settings = settings
        self.progress = progress or (lambda stage, done, total: None)
        self.reference: PreTrainedModel | None = None
        self.utility_ids: torch.Tensor | None = None

    @property
    def wire_dtype(self) -> torch.dtype:
        """The torch dtype of the wire, for the exact-matching tolerance."""
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
            self.settings.wire_dtype
        ]

    def stage(self, text: str, done: int = 0, total: int = 1) -> None:
        self.progress(text, done, total)

    def load(self, config: _Config) -> SplitModel:
        n = self._num_layers()
        return load_split(self.settings.model, f"{config.head}:{n - config.tail}", dtype="float32", quiet=True)

    def _num_layers(self) -> int:
        from lambdasplit.models.checkpoint import Checkpoint
        from lambdasplit.models.resolve import resolve_checkpoint

        return int(Checkpoint(resolve_checkpoint(self.settings.model, quiet=True)).config.num_hidden_layers)

    def victim(self, config: _Config, defence: Defence) -> tuple[SplitModel, Any]:
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
                    wire_dtype=self.settings.wire_dtype,
                    **sampling,
                )
            )
            self.stage("generating", i + 1, len(self.settings.prompts))
        return out

    def utility(self, split: SplitModel, plain_ppl: float) -> tuple[float, float]:
        from lambdasplit.audit.corpus import token_stream
        from lambdasplit.audit.utility import greedy_agreement, perplexity

        if self.reference is None:
            self.reference = AutoModelForCausalLM.from_pretrained(split.path, dtype=torch.float32).eval()
        if self.utility_ids is None:
            assert split.tokenizer is not None
            self.utility_ids = token_stream(split.tokenizer, self.settings.utility_tokens, split="heldout")
        ppl = perplexity(split, self.utility_ids)
        prompts = [p.text for p in self.settings.prompts]
        agree = greedy_agreement(
            split, self.reference, prompts, max_new_tokens=self.settings.max_new_tokens, chat=self.settings.chat
        )
        return ppl / plain_ppl, agree

    def plain_perplexity(self, split: SplitModel) -> float:
        from lambdasplit.audit.corpus import token_stream
        from lambdasplit.audit.utility import perplexity

        if self.utility_ids is None:
            assert split.tokenizer is not None
            self.utility_ids = token_stream(split.tokenizer, self.settings.utility_tokens, split="heldout")
        return perplexity(split, self.utility_ids)

    def inverter(self, public: SplitModel, noise: GaussianNoise | None) -> Any:
        """A3's inverter for ``public``'s X, trained once (cached on disk by recipe, model, X, noise, budget, seed)."""
        from lambdasplit.audit.attacks.inverter import RECIPE, Inverter, train_inverter

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


def tls_rows(config: _Config) -> list[AuditRow]:
    """TLS leaves the eavesdropper ciphertext and the cloud what it had (TLS ends there)."""
    out = []
    for side in config.sides:
        out.append(
            AuditRow(
                "tls",
                "eavesdropper",
                side,  # type: ignore[arg-type]
                "any: the link carries TLS records only",
                note="tests/server/test_server_tls.py finds no prompt, token id or hidden-state bytes in a capture",
            )
        )
        out.append(AuditRow("tls", "cloud", side, "as with no defence", note="TLS ends at the cloud: see 'none'"))  # type: ignore[arg-type]
    return out


def run_audit(
    settings: AuditSettings,
    progress: Progress | None = None,
    on_config: Callable[[AuditReport], None] | None = None,
) -> AuditReport:
    """Run every configuration of ``settings``; rows come in the order they are measured.

    ``on_config`` is called with the report so far after each configuration (the CLI writes its files
    then, so an interrupted audit keeps what it measured).
    """
    from lambdasplit.audit import table

    if not settings.prompts:
        raise ConfigError("the audit needs at least one prompt")
    if settings.wire_dtype not in _WIRE_DTYPES:
        raise ConfigError(f"wire dtype must be one of {', '.join(_WIRE_DTYPES)}, got {settings.wire_dtype!r}")
    defences = [Defence.parse(d) for d in settings.defences]
    run = Run(settings, progress)
    report = AuditReport(settings={**asdict(settings), "prompts": [asdict(p) for p in settings.prompts]})
    start = time.perf_counter()
    for config in _plan(settings, run._num_layers()):
        public = run.load(config)
        run.stage(f"layers {public.points}: plain split", 0, 1)
        plain_ppl = run.plain_perplexity(public)
        for defence in defences:
            label = f"layers {public.points} · {defence.name}"
            run.stage(label, 0, 1)
            if defence.kind == "tls":  # nothing to run: TLS changes the link, not the states
                report.rows += [replace(r, head_layers=config.head, tail_layers=config.tail) for r in tls_rows(config)]
                continue
            victim, secret = (public, None) if defence.kind == "none" else run.victim(config, defence)
            ratio, agreement = run.utility(victim, plain_ppl)
            context = table.Context(
                run=run,
                public=public,
                victim=victim,
                secret=secret,
                defence=defence,
                sides=config.sides,
                greedy=run.conversations(victim),
                label=label,
            )
            for row in table.rows(context):
                row.perplexity_ratio, row.greedy_agreement = ratio, agreement
                row.head_layers, row.tail_layers = config.head, config.tail
                report.rows.append(row)
        report.seconds = time.perf_counter() - start
        if on_config is not None:
            on_config(report)
    return report
