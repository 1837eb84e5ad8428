"""Options shared by several commands, so they read the same everywhere."""

from __future__ import annotations

from typing import Annotated

import typer

from lambdasplit.models import DEFAULT_MODEL
from lambdasplit.split import DEFAULT_LAYERS

Model = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="Embedded model name, checkpoint folder, .gguf file or hub id.", show_default=True
    ),
]
Layers = Annotated[
    str,
    typer.Option(
        "--layers",
        "-l",
        help="Split points X:Y: head = layers [0,X), body = [X,Y), tail = [Y,N). Negative counts from the end.",
    ),
]
Device = Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: cuda if available).")]
Dtype = Annotated[
    str | None, typer.Option(help="float32, float16 or bfloat16 (default: float32 on CPU, bfloat16 on CUDA).")
]

DEFAULTS = {"model": DEFAULT_MODEL, "layers": DEFAULT_LAYERS}
Speculative = Annotated[
    str | None,
    typer.Option(
        help="Draft tokens and verify several per round trip, output unchanged: lookup (n-grams of the prompt and "
        "text so far), self (head and tail without the body) or model:PATH (a small model, same tokenizer).",
    ),
]
DraftTokens = Annotated[int, typer.Option(min=1, max=16, help="Tokens drafted per step at first (then adapted).")]
CloudTimeout = Annotated[
    float,
    typer.Option(
        min=0.1,
        help="Seconds without an answer from the body server before the connection counts as lost; the device "
        "then reconnects and replays its session (for up to --reconnect-deadline seconds).",
    ),
]
ReconnectDeadline = Annotated[
    float, typer.Option(min=0, help="Seconds to keep trying to reach a lost body server (0: one immediate attempt).")
]
Key = Annotated[
    str | None,
    typer.Option(
        help="Obfuscation key file from `lambdasplit obfuscate`: the device sends permuted/rotated hidden states and "
        "the body server must run the body obfuscated with the same key. What it hides is measured by "
        "`lambdasplit audit` (docs/threat-model.md).",
    ),
]


def quiet_pipeline_loading() -> None:
    """No per-component progress bars from diffusers and transformers: the commands show their own status."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
