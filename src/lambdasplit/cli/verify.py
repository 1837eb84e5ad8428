"""``lambdasplit verify``: is the split of *this* checkpoint exact? Prefill + greedy steps vs the unsplit model."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lambdasplit.cli.options import DEFAULTS, Device, Dtype, Layers, Model
from lambdasplit.generation import prompt_ids
from lambdasplit.generation.verify import verify_split
from lambdasplit.split import load_split

_out = Console()


def verify(
    model: Model = DEFAULTS["model"],
    layers: Layers = DEFAULTS["layers"],
    prompt: Annotated[str, typer.Option(help="Prompt to decode from.")] = "The three most useful facts about",
    steps: Annotated[int, typer.Option(help="Greedy decode steps after the prefill.")] = 20,
    atol: Annotated[float, typer.Option(help="Largest allowed logit difference.")] = 1e-4,
    device: Device = None,
    dtype: Dtype = None,
) -> None:
    """Compare the split with the unsplit model: logits at every step and greedy tokens. Exit 1 if they differ."""
    with _out.status(f"loading {model}, layers {layers}"):
        split = load_split(model, layers, device=device, dtype=dtype)
    with _out.status(f"decoding {steps} steps split and unsplit"):
        report = verify_split(split, prompt_ids(split, prompt), steps)
    table = Table(title=f"{split.name} · layers {split.points} · {split.runtime.dtype}")
    table.add_column("check")
    table.add_column("result", justify="right")
    table.add_row("max |logit diff|, prefill", f"{report.max_abs_diff[0]:.2e}")
    table.add_row(f"max |logit diff|, {steps} decode steps", f"{max(report.max_abs_diff[1:], default=0):.2e}")
    same = sum(a == b for a, b in zip(report.split_tokens, report.unsplit_tokens, strict=True))
    table.add_row("greedy tokens equal", f"{same}/{len(report.split_tokens)}")
    _out.print(table)
    ok = report.passed(atol)
    _out.print("[green]exact within tolerance[/]" if ok else f"[red]NOT exact (atol {atol})[/]")
    raise typer.Exit(0 if ok else 1)
