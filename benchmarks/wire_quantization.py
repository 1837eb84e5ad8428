"""How far each wire dtype's rounding moves a greedy generation: SmolLM2 split 2:28, 64 tokens.

For every wire dtype the split generation runs with both directions through that dtype's codec (the
bytes a frame would carry), and the output is compared with the float32 wire's (which equals the
unsplit model's): the identical prefix, the bytes per hidden-state row, and the first words.

    python benchmarks/wire_quantization.py [--layers 2:28] [--new-tokens 64] [--prompt TEXT]
"""

from __future__ import annotations

import argparse

import torch

from lambdasplit.privacy import intercept
from lambdasplit.split import load_split
from lambdasplit.wire.tensors import encode_tensor

DTYPES = ("float32", "float16", "bfloat16", "int8", "int6", "int4", "int2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="2:28")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", default="Explain in a few sentences why the sky is blue.")
    args = parser.parse_args()
    split = load_split("smollm2-135m-instruct", args.layers, device="cpu", dtype="float32", quiet=True)
    assert split.tokenizer is not None
    chat = [{"role": "user", "content": args.prompt}]
    runs = {w: intercept(split, chat, chat=True, wire_dtype=w, max_new_tokens=args.new_tokens) for w in DTYPES}
    reference = runs["float32"].output_ids
    print("| wire | bytes per row | identical greedy prefix | first 16 tokens |")
    print("|---|---|---|---|")
    for wire, run in runs.items():
        same = next((i for i, (a, b) in enumerate(zip(run.output_ids, reference, strict=False)) if a != b), None)
        same = min(len(run.output_ids), len(reference)) if same is None else same
        row_bytes = len(encode_tensor(torch.zeros(1, split.hidden_size), wire)[0])
        text = split.tokenizer.decode(run.output_ids[:16]).replace("\n", " ").replace("|", "\\|")
        print(f"| {wire} | {row_bytes:,} | {same} of {len(reference)} | {text!r} |")


if __name__ == "__main__":
    main()
