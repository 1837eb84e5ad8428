"""What every attack returns: the ids it recovered for one conversation, the truth, the time it took."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lambdasplit.audit import metrics

#: Which tokens an attack went after: the prompt's, or the generated ones.
Side = Literal["prompt", "output"]


@dataclass
class AttackResult:
    """One attack on one ``Intercept``.

    ``target`` is the ground truth for the tokens the attack went after (scoring only). ``seconds`` is the
    wall time of the attack on this conversation; one-off precomputation shared by many conversations
    (a nearest-neighbour table) is reported in ``details`` instead. ``details`` holds attack-specific
    figures (candidates tried, misses, top-k lists); JSON-serialisable.
    """

    attack: str
    side: Side
    recovered: list[int]
    target: list[int]
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def token_accuracy(self) -> float:
        return metrics.token_accuracy(self.recovered, self.target)

    @property
    def rouge_l(self) -> float:
        return metrics.rouge_l(self.recovered, self.target)

    @property
    def exact(self) -> bool:
        return metrics.exact(self.recovered, self.target)
