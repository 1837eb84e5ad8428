"""The head drafter in process with the cost model's prices frozen at a link's: what a drafting rule keeps and sends.

    PYTHONPATH=src python benchmarks/draft_head_priced.py [--prompts 10] [--new-tokens 128] [--grow 0,8]
        [--prices 5g=78.8+6.1,wireless=305+10,free=300+0] [--json artifacts/draft-head/priced.json]

A live run over a link (``draft_head.py``) measures speed, with the link's and the machine's noise in it. This one
asks a narrower question of a drafting rule, without either: given what a step costs over a link (a plain step, and
so much more a drafted row: ``NAME=PLAIN+ROW`` in ms, by default what the live run of 2026-12-05's fifth session
measured, 78.8 ms + 6.1 ms a row over 5g and 305 + 10 over wireless; ``free`` prices every row at nothing, so that
every guess the drafter considers is sent), how many tokens does each verification step keep and how many rows does
it send? The split model (SmolLM2-135M-Instruct, 2:28, float32, 1 thread) answers the benchmark's MT-Bench prompts
(``draft_head.spread``) greedily in process with the head drafter (its defaults, trees and the copy included; ``--grow
N`` as ``HeadDrafter(grow=N)``), its cost model frozen at the link's prices. Printed per price and rule: tokens per
step (the bonus token included), drafted rows per step, the milliseconds a step spent growing the runners-up
(measured), and the speed-up over plain steps that the prices give: tokens per step x PLAIN / (PLAIN + ROW x rows +
growing). The row price stands for everything a row adds to a live step (drafting it, the wire, both sides'
compute), as the live run's step times gave it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from draft_head import spread
from lambdasplit.generation import Generation, LocalBodyLink, SamplingParams, SplitDecoder, StepCost, prompt_ids
from lambdasplit.generation.drafthead.drafter import HeadDrafter, head_drafter
from lambdasplit.models import DEFAULT_MODEL
from lambdasplit.split import SplitModel, load_split


class Frozen(StepCost):
    """A plain step and each drafted row at fixed prices, never updated by the clock."""

    def __init__(self, plain: float, row: float) -> None:
        super().__init__()
        self.seconds.update({j: plain + row * j for j in range(65)})
        self.measured.update(dict.fromkeys(self.seconds, 0))

    def observe(self, drafted: int, seconds: float) -> None:
        self.steps += 1
        self.measured = dict.fromkeys(self.seconds, self.steps)


class Growing(HeadDrafter):
    """The head drafter, timing its growing of runners-up."""

    growing = 0.0

    def _grow(self, runners_up: list[Any]) -> list[Any]:
        started = time.perf_counter()
        try:
            return super()._grow(runners_up)
        finally:
            self.growing += time.perf_counter() - started


def parse_prices(spec: str) -> dict[str, tuple[float, float]]:
    out = {}
    for item in spec.split(","):
        name, _, price = item.partition("=")
        plain, _, row = price.partition("+")
        out[name] = (float(plain) / 1000, float(row) / 1000)
    return out


def run(
    split: SplitModel, prompts: Sequence[str], new_tokens: int, plain: float, row: float, grow: int
) -> dict[str, Any]:
    steps = tokens = drafted = 0
    growing = 0.0
    base = head_drafter(split)
    for prompt in prompts:
        drafter = Growing(base.head, info=base.info, cost=Frozen(plain, row), grow=grow)
        decoder = SplitDecoder(split, LocalBodyLink(split.body))
        params = SamplingParams(max_new_tokens=new_tokens)
        ids = prompt_ids(split, prompt, chat=True)
        r = Generation(decoder, ids, params, eos_token_ids=split.eos_token_ids(), drafter=drafter).run()
        steps, tokens, drafted = steps + r.steps, tokens + r.new_tokens - 1, drafted + r.drafted_tokens
        growing += drafter.growing
    per_step, rows, grown = tokens / steps, drafted / steps, growing / steps
    return {
        "plain_ms": 1000 * plain,
        "row_ms": 1000 * row,
        "grow": grow,
        "steps": steps,
        "tokens_per_step": per_step,
        "drafted_per_step": rows,
        "growing_ms_per_step": 1000 * grown,
        "modelled_speedup": per_step * plain / (plain + row * rows + grown),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--grow", default="0,8", help="HeadDrafter(grow=N) values to compare")
    parser.add_argument("--prices", default="5g=78.8+6.1,wireless=305+10,free=300+0")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    console = Console(stderr=True)
    prompts = spread(args.prompts)
    split = load_split(DEFAULT_MODEL, "2:28", device="cpu", dtype="float32")
    results = []
    for name, (plain, row) in parse_prices(args.prices).items():
        for grow in (int(g) for g in args.grow.split(",")):
            results.append({"prices": name, **run(split, prompts, args.new_tokens, plain, row, grow)})
            r = results[-1]
            console.print(
                f"{name} grow={grow}: {r['tokens_per_step']:.3f} tokens/step, {r['drafted_per_step']:.2f} rows"
            )
    table = Table(title=f"The head drafter at frozen prices ({len(prompts)} MT-Bench prompts, in process, greedy)")
    for column in ("prices", "plain + row ms", "grow", "tokens/step", "rows/step", "growing ms/step", "modelled"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            r["prices"],
            f"{r['plain_ms']:.1f} + {r['row_ms']:.1f}",
            str(r["grow"]),
            f"{r['tokens_per_step']:.3f}",
            f"{r['drafted_per_step']:.2f}",
            f"{r['growing_ms_per_step']:.2f}",
            f"{r['modelled_speedup']:.3f}x",
        )
    Console(width=130).print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, "prompts": prompts}, indent=1))
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
