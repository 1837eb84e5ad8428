"""The audit's prompts: short private requests, each with a planted secret (a synthetic name, number or password).

Every name, number and password here is made up. A secret counts as recovered when it appears in the
text an attack decodes (``metrics.secret_recovered``, spaces ignored).

A prompts file (``lambdasplit audit --prompts FILE``) holds one prompt per line, or JSON lines
``{"prompt": "...", "secret": "..."}`` (the secret optional, and a substring of the prompt).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lambdasplit.errors import ConfigError


@dataclass(frozen=True)
class AuditPrompt:
    text: str
    secret: str | None = None


DEFAULT_PROMPTS: tuple[AuditPrompt, ...] = (
    AuditPrompt("My name is Marta Kowalczyk and my new password is tulip-7734. Is it strong enough?", "tulip-7734"),
    AuditPrompt("Patient Jonas Ebner, 38, has chest pain after running. What should he ask his doctor?", "Jonas Ebner"),
    AuditPrompt("Write a polite email asking my bank to move 4821 euros to account 5407 3249.", "5407 3249"),
    AuditPrompt("The door code for our office is 8841-2207. Suggest three ways to keep it private.", "8841-2207"),
    AuditPrompt("I am Priya Raman from Leeds and I owe 1260 pounds in rent. How do I plan a budget?", "Priya Raman"),
    AuditPrompt("Summarise in one line: the merger with Halvorsen Freight closes on 14 March.", "Halvorsen Freight"),
)


def load_prompts(path: str | Path) -> list[AuditPrompt]:
    """Read a prompts file: plain lines, or JSON lines with ``prompt`` and optional ``secret``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no prompts file at {path}")
    prompts: list[AuditPrompt] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                item = json.loads(line)
                prompt = AuditPrompt(str(item["prompt"]), item.get("secret"))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConfigError(f'{path}:{n}: expected {{"prompt": ..., "secret": ...}}: {exc}') from None
            if prompt.secret is not None and prompt.secret not in prompt.text:
                raise ConfigError(f"{path}:{n}: the secret {prompt.secret!r} is not in the prompt")
        else:
            prompt = AuditPrompt(line)
        prompts.append(prompt)
    if not prompts:
        raise ConfigError(f"{path} holds no prompts")
    return prompts
