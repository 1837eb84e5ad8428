"""Options shared by several commands, so they read the same everywhere."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from lambdasplit.errors import ConfigError
from lambdasplit.generation.sampling import SamplingParams
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
        "text so far), head (the trained draft head shipped for the default model, as a token tree where the server "
        "verifies trees, or a copy when one is worth more; "
        "it reads the first 2 layers' output, so the cut must be 2:...; head:PATH another head), self (head "
        "and tail without the body) or model:PATH (a small model, same tokenizer).",
    ),
]
DraftTokens = Annotated[
    int,
    typer.Option(
        min=1,
        max=16,
        help="Tokens drafted per step at first (then adapted; not `head`, which drafts up to 8 and sends what pays).",
    ),
]
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

PadPrompt = Annotated[
    int | None,
    typer.Option(
        min=2,
        help="Pad every multi-position FORWARD (the prompt, a new chat turn) to a multiple of N rows, so the size of "
        "the prefill on the wire does not give the prompt's length away (the cloud still learns it). Exact; costs "
        "the padding's bytes and compute. With --cloud.",
        show_default=False,
    ),
]

# --- connecting to a body server: the same options in every command that takes --cloud ---------------------
Token = Annotated[
    str | None,
    typer.Option(
        help="Bearer token for the server (or $LAMBDASPLIT_TOKEN); with --secret-shared, T0,T1 gives each share "
        "server its own."
    ),
]
#: The tokens a server accepts: ``server_tokens`` adds $LAMBDASPLIT_TOKEN.
ServerTokens = Annotated[
    list[str] | None,
    typer.Option(help="Accepted bearer token (repeatable). Also read from $LAMBDASPLIT_TOKEN.", show_default=False),
]


def device_token(given: str | None) -> str | None:
    """The token a device sends: ``--token``, else $LAMBDASPLIT_TOKEN, else none."""
    return given or os.environ.get("LAMBDASPLIT_TOKEN") or None


def server_tokens(given: list[str] | None) -> tuple[str, ...]:
    """The tokens a server accepts: every ``--token`` and $LAMBDASPLIT_TOKEN (none: it serves anyone)."""
    env = os.environ.get("LAMBDASPLIT_TOKEN")
    return tuple(given or ()) + ((env,) if env else ())


TlsFingerprint = Annotated[
    str | None,
    typer.Option(
        help="Trust the wss:// server whose certificate has this fingerprint (SHA256:..., as `lambdasplit serve` "
        "prints it beside its URL), and no other. Default: this machine's CAs, else trust on first use.",
        show_default=False,
    ),
]
TlsCa = Annotated[
    Path | None,
    typer.Option(
        "--tls-ca",
        help="Trust wss:// servers whose certificate this CA (PEM) signed: a private CA, or the server's own "
        "cert.pem. Checks the host name too.",
        show_default=False,
    ),
]
Insecure = Annotated[
    bool,
    typer.Option(
        "--insecure",
        help="Allow sending the token over plain ws:// to a host beyond loopback (TLS terminated elsewhere, on a "
        "path you trust).",
    ),
]

Temperature = Annotated[
    float,
    typer.Option(
        help="0 = greedy, the default (the unsplit model's argmax, token for token); above 0 samples, and only "
        "then do --top-k, --top-p and --seed apply (with 0 they are refused, not silently ignored)."
    ),
]
TopK = Annotated[int | None, typer.Option(help="Sample only from the k most likely tokens (needs --temperature).")]
TopP = Annotated[
    float | None, typer.Option(help="Nucleus sampling: the smallest set with this mass (needs --temperature).")
]
Seed = Annotated[int | None, typer.Option(help="Seed for sampling, for reproducible output (needs --temperature).")]


def sampling_params(
    *,
    max_new_tokens: int,
    temperature: float,
    greedy: bool = False,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    repetition_penalty: float | None = None,
    stop: tuple[str, ...] = (),
) -> SamplingParams:
    """The command line's sampling rules, the same in every command.

    ``temperature`` 0 is greedy; ``greedy`` (``--greedy``) says so explicitly and so contradicts a temperature
    above 0. ``top_k``, ``top_p`` and ``seed`` only shape sampling: with temperature 0 they would be ignored,
    which hides a mistake (a forgotten ``--temperature``), so they are refused. The Python API and the agent's
    OpenAI-style requests keep the lenient rule (ignored when greedy): clients send a seed with temperature 0.
    ``repetition_penalty`` changes the logits themselves, so it applies to greedy decoding too.
    """
    if greedy and temperature > 0:
        raise ConfigError(
            f"--greedy means --temperature 0, but --temperature {temperature} was given: pass one or the other"
        )
    if temperature == 0:
        options = {"--top-k": top_k, "--top-p": top_p, "--seed": seed}
        given = [name for name, value in options.items() if value is not None]
        if given:
            raise ConfigError(
                f"{', '.join(given)} only shape sampling, and --temperature is 0 (greedy, the default): "
                "add --temperature T (> 0) to sample"
            )
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=stop,
    )


def quiet_pipeline_loading() -> None:
    """No per-component progress bars from diffusers and transformers: the commands show their own status."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
