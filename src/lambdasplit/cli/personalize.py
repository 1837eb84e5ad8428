"""``lambdasplit personalize``: fine-tune this device's private PrivateLoRA adapters M across the split.

The body and its frozen A and B stay on the server (``serve --privatelora``); the text, the head, the tail and M
stay here. Each step is a forward and a backward across the connection (one low-rank round trip per layer each
way); M and its checkpoints are written only to ``--out``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lambdasplit.cli.cloud import device_trust
from lambdasplit.cli.options import (
    DEFAULTS,
    CloudTimeout,
    Insecure,
    Model,
    TlsCa,
    TlsFingerprint,
    Token,
    device_token,
)
from lambdasplit.developer.data import read_documents, token_blocks
from lambdasplit.errors import ConfigError
from lambdasplit.privatelora import AdapterLink, PrivateAdapters, SplitTrainer
from lambdasplit.privatelora.training import DEFAULT_LR
from lambdasplit.split import load_split

_err = Console(stderr=True, highlight=False)


def personalize(
    text: Annotated[
        Path, typer.Argument(help="Private UTF-8 text; documents are paragraphs separated by a blank line.")
    ],
    cloud: Annotated[str, typer.Option(help="The PrivateLoRA body server (`serve --privatelora`): ws(s)://HOST:PORT.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the adapters (.safetensors), here only.")],
    model: Model = DEFAULTS["model"],
    adapters: Annotated[
        Path | None, typer.Option(help="Continue from these adapters (default: new ones, M = 0).", show_default=False)
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the text.")] = 3,
    lr: Annotated[float, typer.Option(help="AdamW learning rate of M.")] = DEFAULT_LR,
    seq_len: Annotated[int, typer.Option(min=8, help="Tokens per training block.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the block order.")] = 0,
    wire_dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16 on the wire.")] = "float32",
    tls_fingerprint: TlsFingerprint = None,
    tls_ca: TlsCa = None,
    insecure: Insecure = False,
    token: Token = None,
    cloud_timeout: CloudTimeout = 60.0,
) -> None:
    """Fine-tune private adapters on TEXT with the body in the cloud; write them to --out.

    Then generate with them: `lambdasplit generate PROMPT --cloud URL --privatelora OUT`.
    """
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out is a .safetensors file, got {out}")
    start = PrivateAdapters.load(adapters) if adapters is not None else None
    trust = device_trust(tls_fingerprint, tls_ca, insecure)
    with _err.status(f"connecting to {cloud}"):
        link = AdapterLink(
            cloud, start, dtype=wire_dtype, timeout=cloud_timeout, trust=trust, token=device_token(token)
        )
    try:
        layers = link.adapters.layers
        with _err.status(f"loading the head and tail of {model} around layers [{layers[0]}, {layers[-1] + 1})"):
            split = load_split(model, f"{layers[0]}:{layers[-1] + 1}", parts=("head", "tail"), device="cpu")
        link.check_model(split)
        if split.tokenizer is None:
            raise ConfigError(f"{model} has no tokenizer to read the text with")
        blocks = token_blocks(split.tokenizer, read_documents(text), seq_len)
        if len(blocks) == 0:
            raise ConfigError(
                f"{text} is shorter than one block of {seq_len} tokens: give more text or a lower --seq-len"
            )
        layout = link.adapters.layout
        _err.print(
            f"{len(blocks)} blocks of {seq_len} tokens · adapters on {', '.join(layout.targets)} of layers "
            f"[{layers[0]}, {layers[-1] + 1}), ranks {layout.rank_c2d}/{layout.rank_d2c} · "
            f"{sum(p.numel() for p in link.adapters.parameters()):,} private parameters"
        )
        trainer = SplitTrainer(split, link.adapters, link, lr=lr)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=_err) as bar:
            task = bar.add_task("training", total=epochs * len(blocks))

            def show(report: object) -> None:
                bar.update(task, advance=1, description=f"training · loss {getattr(report, 'loss', 0.0):.3f}")

            reports = trainer.fit([(b.unsqueeze(0), None) for b in blocks], epochs, progress=show, seed=seed)
        link.adapters.save(out)
    finally:
        link.close()
    first, last = reports[0].loss, reports[-1].loss
    traffic = link.traffic
    _err.print(
        f"loss {first:.3f} -> {last:.3f} over {len(reports)} steps · {link.exchanges:,} round trips, "
        f"{traffic.up_bytes:,} B up / {traffic.down_bytes:,} B down · adapters written to {out}"
    )
