"""What an audit returns: one ``AuditRow`` per attack and configuration, scored from the attacks' results."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from lambdasplit.audit import metrics
from lambdasplit.audit.attacks.result import AttackResult
from lambdasplit.audit.prompts import AuditPrompt

Attacker = Literal["eavesdropper", "cloud", "eavesdropper = cloud"]


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
