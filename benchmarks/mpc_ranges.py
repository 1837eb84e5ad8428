"""The ranges SmolLM2's body actually computes on: what the secret-shared body's fixed point must hold.

    PYTHONPATH=src python benchmarks/mpc_ranges.py [--layers 2:28] [--length 128] [--count 4] [--json out.json]

Runs the plain split's body (eager attention, float32) on ``--count`` windows of public text and ``--count``
public-text conversations in the chat template (``lambdasplit.audit.corpus``), each ``--length`` tokens,
and records, over every body layer and position:

    hidden      a decoder layer's input (the residual stream, what the device shares)
    ms_attn     mean(h^2) over the hidden dim at input_layernorm (what rsqrt gets, before eps)
    ms_mlp      mean(h^2) at post_attention_layernorm
    normed      a norm's output (what the public q/k/v and gate/up weights multiply)
    q, k, v     projections after RoPE (q, k) or plain (v): the operands of the shared products
    scores      q.k * scaling on the causal positions (before softmax)
    centred     scores minus their row's maximum (what exp sees when the max is subtracted)
    rowmax      a row's maximum score
    max-s0      a row's maximum minus its score at position 0 (rows > 0): the gap if the sink's score is the shift
    max-mean    a row's maximum minus its mean over the causal positions
    rowsum      sum over a row of exp(centred) (what the softmax's reciprocal gets)
    attn_out    the attention-weighted values (o_proj's input)
    gate, up    MLP pre-activations (SiLU's input, and the other factor of gate*up)
    act         silu(gate) * up (down_proj's input)

Each row gives min, max, the 0.1% and 99.9% quantiles, and max |x| at position 0 vs elsewhere (the first
token of a sequence carries the largest activations in many LMs). Prints a table and, with ``--json``, the
figures as JSON. docs/secret-sharing.md quotes its output.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
from collections import defaultdict
from typing import Any

import torch
import transformers.models.llama.modeling_llama as llama
from rich.console import Console
from rich.table import Table

from lambdasplit.audit.corpus import chat_chunks, chunks
from lambdasplit.split import load_split

_SAMPLE = 200_000  # elements kept per record for the quantiles (torch.quantile caps its input size)


class Ranges:
    """Running min/max/|x| at position 0 and elsewhere, plus a random sample for the quantiles, per name."""

    def __init__(self) -> None:
        self.stats: dict[str, dict[str, float]] = defaultdict(
            lambda: {"min": float("inf"), "max": float("-inf"), "pos0": 0.0, "rest": 0.0}
        )
        self.samples: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.gen = torch.Generator().manual_seed(0)

    def add(self, name: str, x: torch.Tensor, pos_dim: int | None = None) -> None:
        """Record ``x``; ``pos_dim`` is its sequence dimension (None: no position split)."""
        x = x.detach().float()
        s = self.stats[name]
        s["min"] = min(s["min"], x.min().item())
        s["max"] = max(s["max"], x.max().item())
        if pos_dim is not None and x.shape[pos_dim] > 1:
            s["pos0"] = max(s["pos0"], x.narrow(pos_dim, 0, 1).abs().max().item())
            s["rest"] = max(s["rest"], x.narrow(pos_dim, 1, x.shape[pos_dim] - 1).abs().max().item())
        flat = x.flatten()
        keep = torch.randint(0, flat.numel(), (min(flat.numel(), 20_000),), generator=self.gen)
        self.samples[name].append(flat[keep])

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for name, s in self.stats.items():
            sample = torch.cat(self.samples[name])
            sample = sample[torch.randperm(sample.numel(), generator=self.gen)[:_SAMPLE]]
            lo, hi = torch.quantile(sample, torch.tensor([0.001, 0.999])).tolist()
            out.append({"name": name, **s, "q001": lo, "q999": hi})
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="2:28")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    split = load_split("smollm2-135m-instruct", args.layers, attn_implementation="eager", quiet=True)
    assert split.head is not None and split.body is not None and split.tokenizer is not None
    ranges = Ranges()
    body_model = split.body.model
    assert body_model is not None

    original = llama.eager_attention_forward

    def recording_attention(
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        **kwargs: Any,
    ) -> Any:
        # query (B, H, T, d), key/value (B, KV, S, d) after RoPE; the mask is additive (0 or -inf) (B, 1, T, S)
        ranges.add("q", query, pos_dim=2)
        ranges.add("k", key, pos_dim=2)
        ranges.add("v", value, pos_dim=2)
        keys = llama.repeat_kv(key, module.num_key_value_groups)
        scores = torch.matmul(query, keys.transpose(2, 3)) * scaling
        valid = torch.ones_like(scores, dtype=torch.bool).tril() if attention_mask is None else attention_mask == 0
        valid = valid.expand_as(scores)
        ranges.add("scores", scores[valid])
        rowmax = scores.masked_fill(~valid, float("-inf")).amax(-1, keepdim=True)
        centred = (scores - rowmax).masked_fill(~valid, 0.0)
        ranges.add("centred", centred[valid])
        ranges.add("rowsum", (centred.exp() * valid).sum(-1))
        ranges.add("rowmax", rowmax)
        # Shifts that need no comparison under MPC: the score of position 0 (the attention sink), the row's mean.
        gap = (rowmax[..., 0] - scores[..., 0])[..., 1:]  # (B, H, T-1)
        ranges.add("max-s0", gap)
        for h in range(gap.shape[1]):
            lo, hi = head_gap[(module.layer_idx, h)]
            head_gap[(module.layer_idx, h)] = (min(lo, gap[:, h].min().item()), max(hi, gap[:, h].max().item()))
        rowmean = scores.masked_fill(~valid, 0.0).sum(-1) / valid.sum(-1)
        ranges.add("max-mean", rowmax[..., 0] - rowmean)
        return original(module, query, key, value, attention_mask, scaling, **kwargs)

    # (global layer, head) -> (min, max) of rowmax - s0: whether a public per-head offset after the sink's score
    # could stand in for the row's maximum
    head_gap: dict[tuple[int, int], tuple[float, float]] = defaultdict(lambda: (float("inf"), float("-inf")))
    llama.eager_attention_forward = recording_attention
    hooks = []
    # (layer, ms_attn|ms_mlp, pos0|rest) -> (min, max) of the mean square: rsqrt's input range per layer
    per_layer: dict[tuple[int, str, str], tuple[float, float]] = defaultdict(lambda: (float("inf"), float("-inf")))
    for index, layer in enumerate(body_model.layers):
        if isinstance(layer, torch.nn.Identity):
            continue

        def pre(module: Any, a: tuple[Any, ...], kw: dict[str, Any]) -> None:
            hidden = a[0] if a else kw["hidden_states"]
            ranges.add("hidden", hidden, pos_dim=1)

        def norm_hook(name: str, index: int) -> Any:
            def hook(module: Any, a: tuple[Any, ...], out: torch.Tensor) -> None:
                ms = a[0].float().pow(2).mean(-1)  # (B, T)
                ranges.add(name, ms, pos_dim=1)
                for where, part in (("pos0", ms[:, :1]), ("rest", ms[:, 1:])):
                    lo, hi = per_layer[(index, name, where)]
                    per_layer[(index, name, where)] = (min(lo, part.min().item()), max(hi, part.max().item()))
                ranges.add("normed", out, pos_dim=1)

            return hook

        def out_hook(name: str) -> Any:
            def hook(module: Any, a: tuple[Any, ...], out: torch.Tensor) -> None:
                ranges.add(name, out, pos_dim=1)

            return hook

        def in_hook(name: str) -> Any:
            def hook(module: Any, a: tuple[Any, ...]) -> None:
                ranges.add(name, a[0], pos_dim=1)

            return hook

        hooks += [
            layer.register_forward_pre_hook(pre, with_kwargs=True),
            layer.input_layernorm.register_forward_hook(norm_hook("ms_attn", index)),
            layer.post_attention_layernorm.register_forward_hook(norm_hook("ms_mlp", index)),
            layer.self_attn.o_proj.register_forward_pre_hook(in_hook("attn_out")),
            layer.mlp.gate_proj.register_forward_hook(out_hook("gate")),
            layer.mlp.up_proj.register_forward_hook(out_hook("up")),
            layer.mlp.down_proj.register_forward_pre_hook(in_hook("act")),
        ]
    prompts = torch.cat(
        [chunks(split.tokenizer, args.length, args.count), chat_chunks(split.tokenizer, args.length, args.count)]
    )
    with torch.inference_mode():
        for ids in prompts:
            hidden = split.head(ids[None])
            split.body(hidden)
    for h in hooks:
        h.remove()
    llama.eager_attention_forward = original

    rows = ranges.rows()
    table = Table(title=f"SmolLM2 body {args.layers}: {len(prompts)} prompts x {args.length} tokens")
    for col in ("", "min", "max", "q 0.1%", "q 99.9%", "|x| pos 0", "|x| pos>0"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["name"], *(f"{r[k]:.4g}" for k in ("min", "max", "q001", "q999", "pos0", "rest")))
    Console().print(table)
    layers = sorted({i for i, _, _ in per_layer})
    by_layer = Table(title="mean square (rsqrt's input) per layer: min-max at position 0 | positions > 0")
    for col in ("layer", "attn pos 0", "attn pos>0", "mlp pos 0", "mlp pos>0"):
        by_layer.add_column(col, justify="right")
    for i in layers:
        cells = [per_layer[(i, n, w)] for n in ("ms_attn", "ms_mlp") for w in ("pos0", "rest")]
        by_layer.add_row(str(i), *(f"{lo:.3g}-{hi:.3g}" for lo, hi in cells))
    Console().print(by_layer)
    spreads = sorted(hi - lo for lo, hi in head_gap.values())
    print(
        f"per (layer, head): spread of rowmax - s0 over rows: median {spreads[len(spreads) // 2]:.3g}, "
        f"90% {spreads[int(len(spreads) * 0.9)]:.3g}, max {spreads[-1]:.3g} ({len(spreads)} heads)"
    )
    if args.json:
        with open(args.json, "w") as f:
            per = [{"layer": i, "norm": n, "where": w, "min": v[0], "max": v[1]} for (i, n, w), v in per_layer.items()]
            json.dump(
                {
                    "layers": args.layers,
                    "prompts": len(prompts),
                    "length": args.length,
                    "rows": rows,
                    "mean_square_per_layer": per,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
