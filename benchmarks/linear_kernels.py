"""What a forward of the whole model costs by the number of rows it carries: MKL (``F.linear``) against oneDNN on
pre-packed weights (``models.packing``, the default on a CPU), and how far their logits differ.

    python benchmarks/linear_kernels.py --threads 1 --json artifacts/linear-kernels.json

A decode step carries 1 row, a speculative step 1 + its drafted rows, a prefill the prompt. Each forward follows a
256-token context in the KV cache (rewound after each), the two kernels alternating ``--rounds`` times; the median
of each is printed, with the LM head alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from lambdasplit.config import Runtime
from lambdasplit.models.packing import ENV, PackedLinear
from lambdasplit.models.resolve import resolve_checkpoint
from lambdasplit.models.unsplit import load_unsplit
from lambdasplit.split.parts import rewind


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", default="1,2,3,4,6,8,12,16,64,256")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=8, help="forwards timed per row count, kernel and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_checkpoint(args.model, quiet=True)
    runtime = Runtime.resolve("cpu", "float32")
    os.environ[ENV] = "0"
    models = {"mkl": load_unsplit(path, runtime)}
    os.environ.pop(ENV)
    models["onednn"] = load_unsplit(path, runtime)
    if not any(isinstance(m, PackedLinear) for m in models["onednn"].modules()):
        raise SystemExit("oneDNN is not available in this PyTorch build: nothing to compare")
    rows = [int(r) for r in args.rows.split(",")]
    g = torch.Generator().manual_seed(0)
    vocab = int(models["mkl"].config.vocab_size)
    context = torch.randint(0, vocab, (1, args.context), generator=g)
    inputs = {r: torch.randint(0, vocab, (1, r), generator=g) for r in rows}
    times: dict[str, dict[int, list[float]]] = {k: {r: [] for r in rows} for k in models}
    head_times: dict[str, dict[int, list[float]]] = {k: {r: [] for r in rows} for k in models}
    logits: dict[str, dict[int, torch.Tensor]] = {k: {} for k in models}
    with torch.inference_mode():
        caches = {}
        for name, model in models.items():
            caches[name] = DynamicCache(config=model.config)
            model(context, past_key_values=caches[name], use_cache=True)
        for _ in range(args.rounds):
            for name, model in models.items():
                cache = caches[name]
                for r in rows:
                    pos = torch.arange(args.context, args.context + r)[None]
                    hidden = torch.randn(1, r, model.config.hidden_size, generator=g)
                    for i in range(args.repeats + 1):
                        start = time.perf_counter()
                        out = model(inputs[r], past_key_values=cache, use_cache=True, position_ids=pos)
                        took = time.perf_counter() - start
                        rewind(cache, args.context)
                        start = time.perf_counter()
                        model.lm_head(hidden)
                        head_took = time.perf_counter() - start
                        if i:  # the first is a warm-up
                            times[name][r].append(took * 1e3)
                            head_times[name][r].append(head_took * 1e3)
                    logits[name][r] = out.logits
    print(f"{args.model}, {args.threads} thread(s), after a {args.context}-token context; median ms")
    print("| rows | MKL forward | oneDNN forward | MKL LM head | oneDNN LM head | max logit difference |")
    print("|---|---|---|---|---|---|")
    record = []
    for r in rows:
        entry = {
            "rows": r,
            "mkl_ms": statistics.median(times["mkl"][r]),
            "onednn_ms": statistics.median(times["onednn"][r]),
            "mkl_lm_head_ms": statistics.median(head_times["mkl"][r]),
            "onednn_lm_head_ms": statistics.median(head_times["onednn"][r]),
            "max_logit_diff": float((logits["mkl"][r] - logits["onednn"][r]).abs().max()),
        }
        record.append(entry)
        print(
            f"| {r} | {entry['mkl_ms']:.1f} | {entry['onednn_ms']:.1f} | {entry['mkl_lm_head_ms']:.1f} | "
            f"{entry['onednn_lm_head_ms']:.1f} | {entry['max_logit_diff']:.1e} |"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": args.model, "threads": args.threads, "rows": record}, indent=1))


if __name__ == "__main__":
    main()
