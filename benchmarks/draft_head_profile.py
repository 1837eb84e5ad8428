"""What the head drafter's sending rule rests on: how well the head's own probabilities predict acceptance, and what
a verification step over n rows costs on this machine (both in process, no network).

    PYTHONPATH=src python benchmarks/draft_head_profile.py [--prompts 10] [--new-tokens 128] [--head PATH]
        [--no-trees] [--json artifacts/draft-head/profile.json]

1. Calibration: ``--prompts`` MT-Bench prompts (``draft_head.spread``: the benchmark's own) are answered greedily by
   the split model (2:28, float32) with the head sending all 8 of its guesses every step, so that every guess is
   judged. Per step the head's probability of each prefix of its draft (the product of its guesses' probabilities)
   is recorded with the count the model accepted. Printed: acceptance of the first guess by its probability, of
   whole prefixes by their product, tokens per step per prompt (the most the head can keep at 8 guesses), and
   the median time a step's drafting of 8 guesses took (with a head reading the first layers' states, their
   look-ahead included).
2. Token trees: the same prompts with every guess the head would consider sent each step (its chain and, at each
   position, its next 2 guesses: ``HeadDrafter(alternatives=2)`` with rows priced at nothing), so every guess is
   judged. Printed: tokens per step, and how often a chain guess and an alternative were on the branch the model kept,
   by the worth the drafter gave them (the chain's prefix probability; for an alternative, the prefix before it
   times its own probability).
3. Row cost: the unsplit model's forward over n new rows after a 256-token context (KV cache cropped back after
   each), and the LM head alone over n rows; median of ``--repeats``, one torch thread as on the benchmark's device.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, DynamicCache

from draft_head import spread
from lambdasplit.generation import (
    DraftLength,
    Generation,
    LocalBodyLink,
    SamplingParams,
    SplitDecoder,
    StepCost,
    generate,
    prompt_ids,
)
from lambdasplit.generation.drafthead.drafter import HeadDrafter, head_drafter
from lambdasplit.models import DEFAULT_MODEL, resolve_checkpoint
from lambdasplit.split import load_split
from lambdasplit.split.parts import rewind, with_cache

BINS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01)
ROWS = (1, 2, 3, 4, 6, 9, 16)


class RecordingDrafter(HeadDrafter):
    """The head drafter, keeping each step's prefix probabilities and the count the model accepted."""

    def __init__(self, base: HeadDrafter, length: DraftLength) -> None:
        super().__init__(base.head, length, info=base.info)
        self.steps: list[tuple[list[float], int]] = []
        self.drafting: list[float] = []  # seconds each step's drafting took (8 guesses, but at the answer's end)

    def propose(self, ids: Sequence[int], k: int) -> list[int]:
        started = time.perf_counter()
        out = super().propose(ids, k)
        if len(out) == self.length.k:
            self.drafting.append(time.perf_counter() - started)
        return out

    def update(
        self, accepted: int, drafted: int, seconds: float | None = None, kept: Sequence[int] | None = None
    ) -> None:
        if drafted:
            self.steps.append((list(self._sure[:drafted]), accepted))
        super().update(accepted, drafted, seconds, kept)


class FreeRows(StepCost):
    """Every count of drafted rows priced the same: the drafter sends every guess it considers."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds.update(dict.fromkeys(range(64), 0.01))
        self.measured.update(dict.fromkeys(range(64), 0))

    def observe(self, drafted: int, seconds: float) -> None:
        self.steps += 1
        self.measured = dict.fromkeys(self.seconds, self.steps)


class TreeRecording(HeadDrafter):
    """The head drafter sending token trees, keeping each tree's guesses (worth, alternative or not)."""

    def __init__(self, base: HeadDrafter) -> None:
        super().__init__(base.head, info=base.info, cost=FreeRows(), lookup=False, alternatives=2)
        self.trees: list[list[tuple[float, bool]]] = []

    def draft_tree(self, ids: Sequence[int], limit: int) -> tuple[list[int], list[int]]:
        tokens, parents = super().draft_tree(ids, limit)
        self.trees.append([(node.sure or 0.0, not node.chain) for node in self._sent])
        return tokens, parents


class BranchKept(SplitDecoder):
    """A split decoder recording the rows of each tree's branch it kept."""

    branches: list[list[int]]

    def accept(self, rows: Sequence[int]) -> None:
        self.branches.append(list(rows))
        super().accept(rows)


def binned(pairs: list[tuple[float, bool]]) -> list[dict[str, Any]]:
    out = []
    for lo, hi in itertools.pairwise(BINS):
        hits = [ok for p, ok in pairs if lo <= p < hi]
        if hits:
            out.append({"from": lo, "to": min(hi, 1.0), "count": len(hits), "accepted": sum(hits) / len(hits)})
    return out


def calibration(prompts: list[str], new_tokens: int, head: str | None, console: Console) -> dict[str, Any]:
    split = load_split(DEFAULT_MODEL, "2:28", device="cpu", dtype="float32")
    every = DraftLength(k=8, k_min=8, k_max=8, adaptive=False)
    first: list[tuple[float, bool]] = []
    prefix: list[tuple[float, bool]] = []
    per_prompt = []
    drafting: list[float] = []
    for i, prompt in enumerate(prompts):
        drafter = RecordingDrafter(head_drafter(split, head), every)
        r = generate(split, prompt, chat=True, max_new_tokens=new_tokens, drafter=drafter)
        drafting += drafter.drafting[1:]  # the first step also takes in the prompt's last position
        for sure, accepted in drafter.steps:
            first.append((sure[0], accepted >= 1))
            prefix.extend((p, accepted >= n) for n, p in enumerate(sure, start=1))
        per_prompt.append((r.new_tokens - 1) / max(1, r.steps))
        console.print(f"prompt {i + 1}/{len(prompts)}: {r.new_tokens} tokens, {per_prompt[-1]:.2f} tokens/step")
    return {
        "steps": len(first),
        "drafting_ms": 1000 * statistics.median(drafting),  # a step's 8 guesses, look-ahead included
        "first_guess": binned(first),
        "prefix": binned(prefix),
        "tokens_per_step": {
            "mean": statistics.mean(per_prompt),
            "min": min(per_prompt),
            "max": max(per_prompt),
            "per_prompt": per_prompt,
        },
    }


def tree_calibration(prompts: list[str], new_tokens: int, head: str | None, console: Console) -> dict[str, Any]:
    split = load_split(DEFAULT_MODEL, "2:28", device="cpu", dtype="float32")
    chain: list[tuple[float, bool]] = []
    alternatives: list[tuple[float, bool]] = []
    per_prompt, rows = [], []
    for i, prompt in enumerate(prompts):
        drafter = TreeRecording(head_drafter(split, head))
        decoder = BranchKept(split, LocalBodyLink(split.body))
        decoder.branches = []
        ids = prompt_ids(split, prompt, chat=True)
        params = SamplingParams(max_new_tokens=new_tokens)
        eos = split.eos_token_ids()
        r = Generation(decoder, ids, params, tokenizer=split.tokenizer, eos_token_ids=eos, drafter=drafter).run()
        branches = iter(decoder.branches)
        for guesses in drafter.trees:
            if not any(alt for _, alt in guesses):
                continue  # sent as a chain: no branch recorded (its guesses are in the chain calibration above)
            kept = set(next(branches))
            for row, (sure, alt) in enumerate(guesses, start=1):
                (alternatives if alt else chain).append((sure, row in kept))
            rows.append(len(guesses))
        per_prompt.append((r.new_tokens - 1) / max(1, r.steps))
        console.print(f"trees, prompt {i + 1}/{len(prompts)}: {r.new_tokens} tokens, {per_prompt[-1]:.2f} tokens/step")
    return {
        "trees": len(rows),
        "rows_per_tree": statistics.mean(rows),
        "chain_guess": binned(chain),
        "alternative": binned(alternatives),
        "tokens_per_step": {"mean": statistics.mean(per_prompt), "min": min(per_prompt), "max": max(per_prompt)},
    }


@torch.inference_mode()
def row_cost(repeats: int) -> list[dict[str, float]]:
    model = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(DEFAULT_MODEL), dtype=torch.float32).eval()
    context = torch.randint(100, 40000, (1, 256), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache()
    model(context, **with_cache(model, cache))
    lm_head = model.get_output_embeddings()
    out = []
    for n in ROWS:
        rows = torch.randint(100, 40000, (1, n), generator=torch.Generator().manual_seed(n))
        hidden = torch.randn(1, n, model.config.hidden_size)
        forward, head = [], []
        for _ in range(repeats + 1):  # the first of each is a warm-up
            t = time.perf_counter()
            model(rows, **with_cache(model, cache))
            forward.append(time.perf_counter() - t)
            rewind(cache, 256)
            t = time.perf_counter()
            lm_head(hidden)
            head.append(time.perf_counter() - t)
        out.append(
            {
                "rows": n,
                "forward_ms": 1000 * statistics.median(forward[1:]),
                "lm_head_ms": 1000 * statistics.median(head[1:]),
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--head", default=None, help="a head's weights (default: the shipped one)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-trees", action="store_true", help="skip the token-tree calibration")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    console = Console(width=120)
    cal = calibration(spread(args.prompts), args.new_tokens, args.head, console)
    trees = None if args.no_trees else tree_calibration(spread(args.prompts), args.new_tokens, args.head, console)
    cost = row_cost(args.repeats)

    for name, rows in (("first guess", cal["first_guess"]), ("whole prefix", cal["prefix"])):
        table = Table(title=f"Acceptance by the head's probability of its {name} ({cal['steps']} steps, 8 sent)")
        for col in ("probability", "count", "accepted"):
            table.add_column(col, justify="right")
        for b in rows:
            table.add_row(f"{b['from']:.1f}-{b['to']:.1f}", str(b["count"]), f"{100 * b['accepted']:.0f}%")
        console.print(table)
    tps = cal["tokens_per_step"]
    console.print(
        f"tokens per step with every guess sent: mean {tps['mean']:.2f} (prompts {tps['min']:.2f}-{tps['max']:.2f}); "
        f"drafting 8 guesses took {cal['drafting_ms']:.1f} ms a step (median)"
    )
    if trees is not None:
        title = f"Token trees, every guess sent ({trees['trees']} trees, {trees['rows_per_tree']:.1f} rows each)"
        table = Table(title=title)
        for col in ("worth", "chain guesses", "kept", "alternatives", "kept "):
            table.add_column(col, justify="right")
        by = {kind: {b["from"]: b for b in trees[kind]} for kind in ("chain_guess", "alternative")}
        for lo in sorted(set(by["chain_guess"]) | set(by["alternative"])):
            cells = []
            for kind in ("chain_guess", "alternative"):
                b = by[kind].get(lo)
                cells += [str(b["count"]), f"{100 * b['accepted']:.0f}%"] if b else ["", ""]
            table.add_row(f"{lo:.1f}-{min(lo + 0.1, 1.0):.1f}", *cells)
        console.print(table)
        tps = trees["tokens_per_step"]
        console.print(f"tokens per step with every guess of the tree sent: mean {tps['mean']:.2f}")
    table = Table(title="A step's price by rows (in process, 1 thread, after a 256-token context)")
    for col in ("rows", "forward ms", "LM head ms"):
        table.add_column(col, justify="right")
    for c in cost:
        table.add_row(str(c["rows"]), f"{c['forward_ms']:.1f}", f"{c['lm_head_ms']:.1f}")
    console.print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        out = {"calibration": cal, "trees": trees, "row_cost": cost}
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
