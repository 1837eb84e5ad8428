"""Chains against token trees for the draft head: tokens per step from a replay, verification cost measured.

    PYTHONPATH=src python benchmarks/draft_shapes.py [--prompts 20] [--new-tokens 128] [--json F]

A token tree drafts several candidates per level and verifies them all in one forward (a tree attention mask);
a chain drafts one. Whether a tree pays depends on two figures, both measured here for SmolLM2-135M-Instruct
and the shipped head, on the same MT-Bench prompts as ``benchmarks/draft_head.py``:

1. tokens per verification step: the model's greedy answers (with its hidden states) are replayed, and at every
   position the head drafts along the true continuation; the rank of the true token at each level says how far a
   chain of k, or a tree with w_i branches at level i, would have been accepted (``drafthead.truth_ranks``);
2. the cost of one verification step with T drafted positions: the body (layers 2:28) and the tail (2 layers, the
   final norm and the LM head for T + 1 rows) over T + 1 new positions after a 200-position cache, one thread
   each, as the server and the device run them, median of 15.

Projected tokens/s = tokens per step / (RTT + body + tail + drafting), drafting being one head forward per drafted
token (for a tree an upper bound: a real tree drafter would run each level's nodes in one forward). This is a
projection from measured parts, not a run over a link: the chain's projection is checked against
``benchmarks/draft_head.py``'s measured chain in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lambdasplit.generation import LocalBodyLink, SplitDecoder
from lambdasplit.generation.drafthead import HEAD_FILE, DraftHead, answer_prompts, chat_prompts
from lambdasplit.generation.drafthead.model import target_matrices
from lambdasplit.generation.drafthead.train import accepted_length, tree_size, truth_ranks
from lambdasplit.split import SplitModel, load_split

SHAPES = {
    "chain 2": (1, 1),
    "chain 4": (1,) * 4,
    "chain 6": (1,) * 6,
    "chain 8": (1,) * 8,
    "tree 2-1-1-1-1": (2, 1, 1, 1, 1),
    "tree 2-2-1-1-1-1": (2, 2, 1, 1, 1, 1),
    "tree 3-2-1-1-1-1": (3, 2, 1, 1, 1, 1),
    "tree 4-2-2-1-1-1": (4, 2, 2, 1, 1, 1),
    "tree 4-3-2-2-1-1-1": (4, 3, 2, 2, 1, 1, 1),
}


def step_cost(split: SplitModel, positions: int, repeats: int = 15) -> float:
    """Seconds for body + tail over ``positions`` new positions after a 200-position cache (median)."""
    decoder = SplitDecoder(split, LocalBodyLink(split.body))
    decoder.prefill(torch.arange(10, 210)[None])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        decoder.extend(list(range(300, 300 + positions)))
        times.append(time.perf_counter() - start)
        decoder.truncate(200)
    decoder.close()
    return statistics.median(times)


def draft_cost(head: DraftHead, levels: int, repeats: int = 30) -> float:
    """Seconds for the head to draft ``levels`` tokens (one forward and one draft-vocabulary product per level)."""
    d = head.hidden_size
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            cache = head.new_cache()
            head(torch.tensor([[5] * 100]), torch.randn(1, 100, d), torch.arange(1, 101)[None], cache)
            start = time.perf_counter()
            h = torch.randn(1, 1, d)
            for i in range(levels):
                token = int(head.draft_ids[head.logits(h[0, -1]).argmax()])
                h = head(torch.tensor([[token]]), h, torch.tensor([[101 + i]]), cache)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--json", type=Path, default=Path("artifacts/draft-head/shapes.json"))
    args = parser.parse_args()
    from draft_head import spread  # the same prompts as the link benchmark

    torch.set_num_threads(1)
    split = load_split(layers="2:-2", device="cpu", dtype="float32", quiet=True)
    assert split.head is not None and split.tail is not None and split.head.model and split.tail.model
    head, _ = DraftHead.load(HEAD_FILE, split.config, *target_matrices(split.head.model, split.tail.model))
    from lambdasplit.models.unsplit import load_unsplit

    model = load_unsplit(split.path, split.runtime)
    assert split.tokenizer is not None
    ids = chat_prompts(split.tokenizer, spread(args.prompts))
    answers = answer_prompts(model, ids, max_new_tokens=args.new_tokens, batch_size=len(ids))
    ranks = truth_ranks(head, answers, 8)
    costs = {t: step_cost(split, t + 1) for t in sorted({tree_size(s) for s in SHAPES.values()} | {0})}
    rows = []
    for name, shape in SHAPES.items():
        lengths = [accepted_length(r, shape) for r in ranks]
        tau = 1 + sum(lengths) / len(lengths)
        size = tree_size(shape)
        draft = draft_cost(head, size)  # a tree: one forward per node, an upper bound (batched levels cost less)
        row = {"shape": name, "drafted": size, "tokens_per_step": tau, "verify_s": costs[size], "draft_s": draft}
        for rtt in (30, 250):
            row[f"tok_s_{rtt}"] = tau / (rtt / 1000 + costs[size] + draft)
        rows.append(row)
    plain = {f"tok_s_{rtt}": 1 / (rtt / 1000 + costs[0]) for rtt in (30, 250)}
    table = Table(title=f"Draft shapes, {len(answers)} MT-Bench answers replayed (projection: see the docstring)")
    for column in ("shape", "drafted", "tokens/step", "verify ms", "draft ms", "tok/s 30 ms", "tok/s 250 ms"):
        table.add_column(column, justify="right")
    table.add_row(
        "plain", "0", "1.00", f"{costs[0] * 1e3:.1f}", "0", f"{plain['tok_s_30']:.2f}", f"{plain['tok_s_250']:.2f}"
    )
    for r in rows:
        table.add_row(
            r["shape"],
            str(r["drafted"]),
            f"{r['tokens_per_step']:.2f}",
            f"{r['verify_s'] * 1e3:.1f}",
            f"{r['draft_s'] * 1e3:.1f}",
            f"{r['tok_s_30']:.2f}",
            f"{r['tok_s_250']:.2f}",
        )
    Console(width=130).print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"plain": plain, "shapes": rows, "step_cost_s": costs}, indent=1))


if __name__ == "__main__":
    main()
