"""``lambdasplit developer``: the tools of STIP's model developer, who holds a private model. ``developer
finetune`` makes one from a base model and private text; ``developer package`` ships it as bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from lambdasplit.cli.options import quiet_pipeline_loading
from lambdasplit.config import LAYOUTS
from lambdasplit.developer import DEFAULT_LR, METHODS, REPORT_FILE, FinetuneSettings, finetune, package
from lambdasplit.privacy.keys import INNER, KINDS

app = typer.Typer(
    help="The STIP model developer's tools: make a private model from a public base, ship it as bundles.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
_out = Console(highlight=False, soft_wrap=True)  # paths stay whole, to copy
_err = Console(stderr=True, highlight=False)


@app.command("finetune")
def finetune_command(
    model: Annotated[str, typer.Argument(help="Base model: embedded model name, checkpoint folder, .gguf or hub id.")],
    text: Annotated[
        Path, typer.Option("--text", help="Private UTF-8 text; documents are paragraphs separated by a blank line.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for the fine-tuned checkpoint (new or empty).")],
    method: Annotated[str, typer.Option(help=f"{' or '.join(METHODS)}: adapters merged after, or every weight.")] = (
        "lora"
    ),
    rank: Annotated[int, typer.Option(help="LoRA rank r.")] = 8,
    alpha: Annotated[float, typer.Option(help="LoRA alpha (the adapters are scaled by alpha / r).")] = 16.0,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 100,
    lr: Annotated[
        float | None,
        typer.Option(help="Learning rate.", show_default=", ".join(f"{m}: {v:g}" for m, v in DEFAULT_LR.items())),
    ] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per training block.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Blocks per step.")] = 4,
    held_out: Annotated[float, typer.Option(help="Fraction of documents held out to measure perplexity.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the held-out draw, block order and adapter initialisation.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists and is not empty.")] = False,
) -> None:
    """Fine-tune MODEL on private text (CPU, float32) and write it as a plain checkpoint folder.

    Measures held-out perplexity before and after, and records in `OUT/finetune.json` how far every weight
    moved (||W_after - W_before|| / ||W_before||): how far a private model is from its public base decides
    what a cloud holding the base can recover (`lambdasplit audit`). Split it like any model:
    `lambdasplit generate PROMPT --model OUT`.
    """
    settings = FinetuneSettings(
        method=method,  # type: ignore[arg-type]  # checked by FinetuneSettings against METHODS
        rank=rank,
        alpha=alpha,
        steps=steps,
        lr=lr,
        seq_len=seq_len,
        batch_size=batch_size,
        held_out=held_out,
        seed=seed,
    )
    quiet_pipeline_loading()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TextColumn("{task.fields[loss]}"), console=_err, transient=True) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(phase: str, done: int, total: int, loss: float | None) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total, loss="")
            bar.update(tasks[phase], completed=done, loss="" if loss is None else f"loss {loss:.3f}")

        report = finetune(model, text, settings, out=out, overwrite=force, progress=progress)
    _out.print(
        f"{report.settings.method}, {report.steps} steps in {report.train_seconds:.0f} s on "
        f"{report.train_tokens} training tokens\n"
        f"held-out perplexity {report.perplexity_before:.3f} -> {report.perplexity_after:.3f} "
        f"({report.heldout_tokens} tokens)\n"
        f"relative weight change of the {len(report.trained)} trained tensors: mean "
        f"{report.relative_change_mean:.3g}, max {report.relative_change_max:.3g}\n"
        f"wrote {escape(str(out))} (report: {escape(str(out / REPORT_FILE))})"
    )


@app.command("package")
def package_command(
    model: Annotated[str, typer.Argument(help="The private model: a checkpoint folder (e.g. from `finetune`).")],
    server_out: Annotated[
        Path, typer.Option("--server-out", help="Folder for the server bundle (give it to the model server).")
    ],
    user_out: Annotated[
        Path, typer.Option("--user-out", help="Folder for the user bundles, one per group (USER_OUT/g0, ...).")
    ],
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers", "-l", help="Split points X:Y; default 2:-2 (head-tail), 0:N (stip: every layer in the cloud)."
        ),
    ] = None,
    layout: Annotated[
        str,
        typer.Option(
            help=f"Who runs what: {' or '.join(LAYOUTS)} (STIP's own: the device runs the embedding alone, the "
            "cloud every layer and the LM head, and logits come back)."
        ),
    ] = "head-tail",
    groups: Annotated[int, typer.Option(min=1, help="User groups, each with its own secrets and body.")] = 1,
    kind: Annotated[str, typer.Option(help=f"Hidden-dimension secret: {' or '.join(KINDS)}.")] = "permutation",
    inner: Annotated[
        str, typer.Option(help=f"Inner secrets, comma-separated: {', '.join(INNER)} (or none).")
    ] = ",".join(INNER),
    seed: Annotated[int | None, typer.Option(help="Seed (reproducible secrets, for tests); default: fresh.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace output folders that are not empty.")] = False,
) -> None:
    """Package MODEL for STIP's three parties: a server bundle with each group's transformed body and nothing else,
    and per group a user bundle with the ends (embedding, first and last layers, LM head; with --layout stip the
    embedding alone), the tokenizer and the group's key without its inner secrets.

    Serve with `lambdasplit serve --model SERVER_OUT`; a device of group g uses
    `lambdasplit generate PROMPT --model USER_OUT/g --cloud URL`. What the transform protects, and from whom, is in
    docs/threat-model.md.
    """
    names = tuple(n.strip() for n in inner.split(",") if n.strip() and n.strip() != "none")
    if layout not in LAYOUTS:
        raise typer.BadParameter(f"--layout is {' or '.join(LAYOUTS)}, got {layout!r}")
    if kind not in KINDS:
        raise typer.BadParameter(f"--kind is {' or '.join(KINDS)}, got {kind!r}")
    with _err.status(f"packaging {model}") as status:
        report = package(
            model,
            layers,
            server_out,
            user_out,
            layout=layout,
            groups=groups,
            kind=kind,  # checked against KINDS above
            inner=names,
            seed=seed,
            force=force,
            progress=lambda message: status.update(message),
        )
    _out.print(f"server bundle (layers {report.points}) -> {report.server_out}")
    for group, folder in report.user_out.items():
        _out.print(f"user bundle of group {group} (fingerprint {report.fingerprints[group]}) -> {folder}")
    _out.print(
        f"serve it:  lambdasplit serve --model {report.server_out}\n"
        f"use it:    lambdasplit generate PROMPT --model {next(iter(report.user_out.values()))} --cloud URL"
    )
