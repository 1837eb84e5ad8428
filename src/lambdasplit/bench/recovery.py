"""The audit's recorded recovery figures per split, read as data (the planner may not import the audit suite).

``recovery.json`` is extracted from docs/audit/smollm2.json by ``scripts/plan_recovery.py``: for the plain split
(defence ``none``), the strongest attack's token accuracy on the prompt per head-layer count (the audit ran those
with 2 tail layers) and on the generated tokens per tail-layer count (with 2 head layers). A model or a split the
audit did not run has no figures: ``Recovery()``, shown as not audited, never guessed.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from lambdasplit.bench.plan import Recovery


def recorded() -> dict[str, Any]:
    return dict(json.loads(resources.files("lambdasplit.bench").joinpath("recovery.json").read_text()))


def recovery_for(model: str, head_layers: int, tail_layers: int, data: dict[str, Any] | None = None) -> Recovery:
    """The recorded figures for ``model`` (its embedded name) at this split, or ``Recovery()`` if none."""
    data = recorded() if data is None else data
    if model != data["model"]:
        return Recovery()
    prompt = data["prompt_by_head_layers"].get(str(head_layers))
    output = data["output_by_tail_layers"].get(str(tail_layers))
    return Recovery(
        prompt=None if prompt is None else float(prompt["token_accuracy"]),
        prompt_attack="" if prompt is None else str(prompt["attack"]),
        output=None if output is None else float(output["token_accuracy"]),
        output_attack="" if output is None else str(output["attack"]),
    )
