"""``lambdasplit audit``: measure what an eavesdropper and a curious cloud recover, per split and defence."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from lambdasplit.audit import DEFAULT_DEFENCES, DEFAULT_PROMPTS, AuditSettings, Defence, load_prompts, run_audit
from lambdasplit.audit.report import rich_tables, write
from lambdasplit.cli.options import DEFAULTS, Model
from lambdasplit.errors import ConfigError

_err = Console(stderr=True)


def _ints(value: str, name: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{name} takes comma-separated layer counts, e.g. 0,1,2,4,8; got {value!r}") from None
    if any(v < 0 for v in out):
        raise ConfigError(f"{name} must be >= 0, got {value!r}")
    return out


def audit(
    model: Model = DEFAULTS["model"],
    head_layers: Annotated[
        str, typer.Option(help="Prompt-side rows: device layers before the body (X), comma-separated.")
    ] = "0,1,2,4,8",
    tail_layers: Annotated[str, typer.Option(help="Output-side rows: device layers after the body.")] = "1,2,4",
    layers: Annotated[
        str | None,
        typer.Option(help="Audit one deployed split X:Y, both sides (replaces --head-layers and --tail-layers)."),
    ] = None,
    defence: Annotated[
        list[str] | None,
        typer.Option(
            help="Repeatable: none, permutation, permutation+inner, rotation, rotation+inner, noise:SIGMA, tls "
            f"(default: {', '.join(DEFAULT_DEFENCES)})."
        ),
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="Prompts file: one per line, or JSON lines {prompt, secret}.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1)] = 24,
    wire_dtype: Annotated[
        str, typer.Option(help="What the link carries: float16 (the default of generate), bfloat16 or float32.")
    ] = "float16",
    inverter_tokens: Annotated[
        int, typer.Option(min=0, help="Public tokens to train the A3 inverter on (0 skips A3).")
    ] = 60_000,
    seed: Annotated[int, typer.Option()] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON.")] = None,
    markdown_out: Annotated[Path | None, typer.Option("--markdown", help="Write the tables as markdown.")] = None,
) -> None:
    """Run the attack suite on split inference of MODEL and print what each attacker recovers.

    Every figure comes from real split generations of the prompts and real attacks holding the public weights:
    token accuracy, ROUGE-L, whole-prompt rate and planted-secret recovery, beside each defence's utility cost
    (perplexity, greedy agreement with the unsplit model). docs/threat-model.md is this command's output.
    """
    settings = AuditSettings(
        model=model,
        head_layers=_ints(head_layers, "--head-layers"),
        tail_layers=_ints(tail_layers, "--tail-layers"),
        layers=layers,
        defences=tuple(d.name for d in (Defence.parse(x) for x in (defence or DEFAULT_DEFENCES))),
        prompts=tuple(load_prompts(prompts)) if prompts is not None else DEFAULT_PROMPTS,
        max_new_tokens=max_new_tokens,
        wire_dtype=wire_dtype,
        inverter_tokens=inverter_tokens,
        seed=seed,
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=_err,
        transient=True,
    ) as bar:
        task: TaskID = bar.add_task("starting", total=1)

        def progress(stage: str, done: int, total: int) -> None:
            bar.update(task, description=stage, completed=done, total=max(total, 1))

        report = run_audit(settings, progress, on_config=lambda partial: write(partial, json_out, markdown_out))
    for table in rich_tables(report):
        Console().print(table)
    write(report, json_out, markdown_out)
    _err.print(f"[dim]audit of {model}: {len(report.rows)} rows in {report.seconds / 60:.1f} min[/]")
