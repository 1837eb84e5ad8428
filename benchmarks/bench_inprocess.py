"""In-process split vs unsplit greedy decoding speed on the embedded default model.

    python benchmarks/bench_inprocess.py [--new-tokens 128] [--repeats 5] [--layers 1:29 4:26] [--json out.json]

Rows: the unsplit model through transformers' own ``model.generate`` (what users compare against), the
unsplit model through lambdasplit's generation loop, and the three-part split (all in this process) at
each split point. Runs are interleaved round-robin so drift in machine speed hits every row alike; the
median over repeats is reported. Every run generates exactly ``--new-tokens`` tokens (EOS ignored), and
the split's tokens are checked equal to the unsplit model's.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from lambdasplit.generation import Generation, ModelDecoder, SamplingParams, generate, prompt_ids
from lambdasplit.split import load_split

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layers", nargs="+", default=["1:29", "2:28", "4:26"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", dest="json_path", default=None, help="also write the results to this file")
    args = ap.parse_args()
    console = Console()

    splits = {layers: load_split(args.model, layers, device="cpu", dtype="float32") for layers in args.layers}
    first = next(iter(splits.values()))
    model = AutoModelForCausalLM.from_pretrained(first.path, dtype=torch.float32).eval()
    ids = prompt_ids(first, PROMPT)
    n = args.new_tokens
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)

    def hf_generate() -> list[int]:
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2
            )
        return out[0, len(ids) :].tolist()

    def our_unsplit() -> list[int]:
        return Generation(ModelDecoder(model), ids, params).run().token_ids

    runs: dict[str, Callable[[], list[int]]] = {
        "unsplit, HF model.generate": hf_generate,
        "unsplit, lambdasplit loop": our_unsplit,
    }
    for layers, split in splits.items():
        runs[f"split {layers}, in process"] = lambda split=split: generate(split, ids, params=params).token_ids

    times: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, list[int]] = {}
    for name, fn in runs.items():  # warm-up: first-call allocations and thread pools
        tokens[name] = fn()
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    reference = tokens["unsplit, HF model.generate"]
    base = n / statistics.median(times["unsplit, HF model.generate"])
    table = Table(title=f"{args.model}: greedy, {n} new tokens, prompt {len(ids)} tokens, median of {args.repeats}")
    for col in ("run", "tokens/s", "vs HF generate", "tokens equal"):
        table.add_column(col, justify="left" if col == "run" else "right")
    rows = []
    for name in runs:
        tps = n / statistics.median(times[name])
        same = tokens[name] == reference
        rows.append({"run": name, "tokens_per_second": round(tps, 2), "ratio": round(tps / base, 3), "equal": same})
        table.add_row(name, f"{tps:.1f}", f"{tps / base:.3f}x", "yes" if same else "[red]NO[/]")
    console.print(table)
    meta = {
        "model": args.model,
        "new_tokens": n,
        "prompt_tokens": len(ids),
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    console.print_json(json.dumps({"meta": meta, "rows": rows}))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
