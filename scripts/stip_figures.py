"""STIP's own figures (Yuan et al., "Secure Transformer Inference Protocol") measured on a lambdasplit model.

    PYTHONPATH=src python scripts/stip_figures.py [--model smollm2-135m-instruct] [--layers 0:] [--samples 1000]
                                                  [--json out.json] [--markdown out.md] [--quick]

STIP runs every layer on the server, so the default cut is ``0:`` (the device holds the embedding, the
final norm and the LM head). One run measures, for a permutation key with every inner secret and for a
rotation key:

- Fig. 6a: distance correlation (dCor) between each body weight matrix and (a) its transformed copy,
  (b) a random projection of it of the same shape, per matrix type, averaged over layers.
- Fig. 6b: dCor between plaintext embeddings and the transformed embeddings the device sends, against
  the hidden size (the model's own at its size; random embeddings initialised as the model's config
  does at other sizes: the embedding is a table lookup, so only its statistics matter there).
- Table 4: what the transformed body generates when the device has no key (plain embeddings in, plain
  tail), beside the output with the key.
- Table 5: over ``--samples`` windows of the public corpus, the sum over the vocabulary of
  |logit difference| at the last position (transformed split vs plain model), and top-1 agreement.
- Throughput: greedy generation, plain vs transformed, interleaved, best of ``--repeats``.

STIP does not say which axis of a matrix its dCor treats as the samples. Both are reported: ``rows``
(samples = the rows of W as HF stores it (out, in), or the tokens of an embedding) and ``cols``
(samples = the columns of W, or the hidden dimensions of an embedding); and both estimators: the
bias-corrected one this project uses by default and the 2007 V-statistic (biased upward for few
samples). A low dCor is not privacy: see docs/stip.md and docs/threat-model.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from lambdasplit.audit.attacks.distance_correlation import distance_correlation
from lambdasplit.audit.corpus import chunks
from lambdasplit.generation import SamplingParams, generate
from lambdasplit.privacy.keys import INNER, ObfuscationKey, make_key
from lambdasplit.privacy.obfuscate import linears, protect
from lambdasplit.split import load_split
from lambdasplit.split.loader import SplitModel

MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AXES = ("rows", "cols")
ESTIMATORS = {"bias-corrected": True, "V-statistic": False}
PROMPTS = (
    "I'm a language model,",
    "The capital of France is",
    "A for loop in Python",
    "Once upon a time, there was a lighthouse keeper who",
    "The three primary colors are",
)


@dataclasses.dataclass
class Setup:
    """One key and the model split it protects (its body transformed, its wire transform set)."""

    name: str
    key: ObfuscationKey
    split: SplitModel


def _seconds(start: float) -> float:
    return round(time.perf_counter() - start, 1)


def _samples(x: torch.Tensor, axis: str) -> torch.Tensor:
    """``x`` (a, b) as samples x features: rows as they are, or columns as samples."""
    return x if axis == "rows" else x.T


def _subsample(x: torch.Tensor, y: torch.Tensor, limit: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[0] <= limit:
        return x, y
    keep = torch.randperm(x.shape[0], generator=gen)[:limit]
    return x[keep], y[keep]


def dcor_pair(x: torch.Tensor, y: torch.Tensor, axis: str, limit: int, seed: int) -> dict[str, float]:
    """dCor of ``x`` and ``y`` (same shape) with samples along ``axis``, both estimators, on <= ``limit`` samples."""
    a, b = _subsample(_samples(x, axis), _samples(y, axis), limit, torch.Generator().manual_seed(seed))
    return {name: distance_correlation(a, b, bias_corrected=bc) for name, bc in ESTIMATORS.items()}


def random_projection(x: torch.Tensor, axis: str, seed: int) -> torch.Tensor:
    """STIP's baseline: a random linear map (Gaussian, scaled 1/sqrt(p)) of the features along ``axis``."""
    s = _samples(x, axis).double()
    p = s.shape[1]
    r = torch.randn(p, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) / p**0.5
    out = (s @ r).float()
    return out if axis == "rows" else out.T


def _body_layers(split: SplitModel) -> list[nn.Module]:
    assert split.body is not None and split.body.model is not None
    return list(split.body.model.layers)  # type: ignore[arg-type]


def _matrices(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {name.rsplit(".", 1)[-1]: m.weight.detach().float() for name, m in linears(layer).items()}


def fig6a(plain: SplitModel, setups: list[Setup], limit: int, layer_stride: int) -> dict[str, Any]:
    """Per matrix type, axis and estimator: mean dCor over layers of W vs its transformed copy and vs a projection."""
    sums: dict[tuple[str, str, str, str], list[float]] = {}
    plain_layers = _body_layers(plain)
    picked = list(range(0, len(plain_layers), layer_stride))
    for i in picked:
        original = _matrices(plain_layers[i])
        others = {s.name: _matrices(_body_layers(s.split)[i]) for s in setups}
        for m in MATRICES:
            for axis in AXES:
                seed = 1000 * i + MATRICES.index(m)
                compared = {name: mats[m] for name, mats in others.items()}
                compared["random projection"] = random_projection(original[m], axis, seed)
                for name, w in compared.items():
                    for est, value in dcor_pair(original[m], w, axis, limit, seed).items():
                        sums.setdefault((name, m, axis, est), []).append(value)
    rows = [
        {"transform": n, "matrix": m, "axis": a, "estimator": e, "dcor": statistics.fmean(v), "layers": len(v)}
        for (n, m, a, e), v in sums.items()
    ]
    return {"layers_used": [plain.points.head_layers + i for i in picked], "max_samples": limit, "rows": rows}


def fig6b(plain: SplitModel, setups: list[Setup], sizes: list[int], tokens: int, seed: int) -> dict[str, Any]:
    """dCor between plaintext embeddings and what the device sends, against the hidden size."""
    assert plain.head is not None and plain.tokenizer is not None
    ids = chunks(plain.tokenizer, tokens, 1, seed=seed)  # (1, tokens): one public window
    rows = []
    std = float(getattr(plain.config, "initializer_range", 0.02))
    for size in sorted({*sizes, plain.hidden_size}):
        if size == plain.hidden_size:
            source = "model's embeddings"
            x = plain.head(ids)[0].float()  # (tokens, D): the head's output (X = 0: the embedding)
        else:
            source = f"random N(0, {std:g}) embeddings"
            gen = torch.Generator().manual_seed(seed + size)
            table = torch.randn(int(ids.max()) + 1, size, generator=gen) * std
            x = table[ids[0]]
        config = copy.deepcopy(plain.config)
        config.hidden_size = size
        for s in setups:
            key = s.key if size == plain.hidden_size else make_key(
                config, plain.points, plain.fingerprint, kind=s.key.kind, seed=seed + size
            )  # fmt: skip
            sent = key.encode(x)
            for axis in AXES:
                for est, value in dcor_pair(x, sent, axis, 10**9, seed).items():
                    rows.append({"hidden": size, "source": source, "transform": s.name, "axis": axis,
                                 "estimator": est, "dcor": value})  # fmt: skip
        for axis in AXES:
            for est, value in dcor_pair(x, random_projection(x, axis, seed + size), axis, 10**9, seed).items():
                rows.append({"hidden": size, "source": source, "transform": "random projection", "axis": axis,
                             "estimator": est, "dcor": value})  # fmt: skip
    return {"tokens": tokens, "rows": rows}


def table4(plain: SplitModel, setups: list[Setup], prompts: tuple[str, ...], new_tokens: int) -> list[dict[str, Any]]:
    """Greedy continuations: plain model, transformed split with the key, transformed body without it."""
    rows = []
    for prompt in prompts:
        row: dict[str, Any] = {"prompt": prompt, "plain": generate(plain, prompt, max_new_tokens=new_tokens).text}
        for s in setups:
            keyless = dataclasses.replace(s.split, wire_transform=None)  # the same body, no encode/decode
            row[f"{s.name} with key"] = generate(s.split, prompt, max_new_tokens=new_tokens).text
            row[f"{s.name} without key"] = generate(keyless, prompt, max_new_tokens=new_tokens).text
        rows.append(row)
    return rows


@torch.inference_mode()
def last_logits(split: SplitModel, ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits (B, V) after each window of ``ids`` (B, T), through head, wire transform, body, tail."""
    assert split.head is not None and split.body is not None and split.tail is not None
    hidden = split.head(ids)
    t = split.wire_transform
    hidden = split.body(hidden if t is None else t.encode(hidden))
    return split.tail(hidden if t is None else t.decode(hidden), logits_to_keep=1)[:, -1].float()


def table5(plain: SplitModel, setups: list[Setup], samples: int, length: int, batch: int) -> list[dict[str, Any]]:
    """Sum of |logit difference| over the vocabulary at the last position, and top-1 agreement, vs the plain model."""
    assert plain.tokenizer is not None
    ids = chunks(plain.tokenizer, length, samples, seed=0)
    diffs: dict[str, list[float]] = {s.name: [] for s in setups}
    maxima: dict[str, float] = {s.name: 0.0 for s in setups}
    agree: dict[str, int] = {s.name: 0 for s in setups}
    for start in range(0, samples, batch):
        window = ids[start : start + batch]
        reference = last_logits(plain, window)
        for s in setups:
            out = last_logits(s.split, window)
            delta = (out - reference).abs()
            diffs[s.name].extend(delta.sum(-1).tolist())
            maxima[s.name] = max(maxima[s.name], float(delta.max()))
            agree[s.name] += int((out.argmax(-1) == reference.argmax(-1)).sum())
    return [
        {"transform": name, "samples": samples, "length": length, "sum_abs_diff_mean": statistics.fmean(d),
         "sum_abs_diff_max": max(d), "max_abs_diff": maxima[name], "top1_agreement": agree[name] / samples}
        for name, d in diffs.items()
    ]  # fmt: skip


def throughput(plain: SplitModel, setups: list[Setup], new_tokens: int, repeats: int) -> list[dict[str, Any]]:
    """Greedy generation of exactly ``new_tokens``, plain then each transformed split, round-robin, best of repeats."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    runs: dict[str, Callable[[], list[int]]] = {"plain": lambda: generate(plain, PROMPTS[0], params=params).token_ids}
    for s in setups:
        runs[s.name] = lambda split=s.split: generate(split, PROMPTS[0], params=params).token_ids
    times: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, list[int]] = {}
    for name, run in runs.items():  # warm-up, and the tokens each produces
        tokens[name] = run()
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    best_plain = new_tokens / min(times["plain"])
    return [
        {"run": name, "tokens_per_s_best": new_tokens / min(t),
         "tokens_per_s_median": new_tokens / statistics.median(t),
         "ratio_best": new_tokens / min(t) / best_plain, "same_tokens_as_plain": tokens[name] == tokens["plain"]}
        for name, t in times.items()
    ]  # fmt: skip


def build(model: str, layers: str, inner: tuple[str, ...], seed: int) -> tuple[SplitModel, list[Setup]]:
    """The plain split and one protected copy per key (permutation with ``inner`` secrets, rotation)."""
    plain = load_split(model, layers, device="cpu", dtype="float32", quiet=True)
    setups = []
    for i, (name, kind, secrets) in enumerate(
        [(f"permutation + {'+'.join(inner) or 'no inner'}", "permutation", inner), ("rotation", "rotation", ())]
    ):
        split = load_split(model, layers, device="cpu", dtype="float32", quiet=True)
        key = make_key(split.config, split.points, split.fingerprint, kind=kind, inner=secrets, seed=seed + i)  # type: ignore[arg-type]
        setups.append(Setup(name, key, protect(split, key)))
    return plain, setups


def run(args: argparse.Namespace) -> dict[str, Any]:
    timings: dict[str, float] = {}
    start = time.perf_counter()
    plain, setups = build(args.model, args.layers, tuple(args.inner), args.seed)
    timings["load"] = _seconds(start)
    out: dict[str, Any] = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "markdown")}
        | {"points": str(plain.points), "hidden_size": plain.hidden_size},
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    parts: list[tuple[str, Callable[[], Any]]] = [
        ("fig6a", lambda: fig6a(plain, setups, args.dcor_samples, args.layer_stride)),
        ("fig6b", lambda: fig6b(plain, setups, args.hidden_sizes, args.embed_tokens, args.seed)),
        ("table4", lambda: table4(plain, setups, PROMPTS[: args.prompts], args.table4_tokens)),
        ("table5", lambda: table5(plain, setups, args.samples, args.length, args.batch)),
        ("throughput", lambda: throughput(plain, setups, args.new_tokens, args.repeats)),
    ]
    for name, part in parts:
        if name in args.skip:
            continue
        start = time.perf_counter()
        out[name] = part()
        timings[name] = _seconds(start)
    out["seconds"] = timings
    return out


# --- printing ------------------------------------------------------------------------------------------------


def _md(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def tables(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, headers, rows) for every part measured."""
    out = []
    if "fig6a" in result:
        rows = result["fig6a"]["rows"]
        names = list(dict.fromkeys(r["transform"] for r in rows))
        cols = [(a, e) for a in AXES for e in ESTIMATORS]
        body = []
        for n in names:
            for m in MATRICES:
                cells = {
                    (r["axis"], r["estimator"]): r["dcor"] for r in rows if r["transform"] == n and r["matrix"] == m
                }
                body.append([n, m] + [f"{cells[c]:.3f}" for c in cols])
            mine = [r for r in rows if r["transform"] == n]
            mean = [statistics.fmean(r["dcor"] for r in mine if (r["axis"], r["estimator"]) == c) for c in cols]
            body.append([n, "**mean**"] + [f"**{v:.3f}**" for v in mean])
        layers = result["fig6a"]["layers_used"]
        limit = result["fig6a"]["max_samples"]
        title = f"Fig. 6a: dCor(W, transformed W), mean over {len(layers)} layers, <= {limit} samples"
        out.append((title, ["transform", "matrix"] + [f"{a}, {e}" for a, e in cols], body))
    if "fig6b" in result:
        rows = result["fig6b"]["rows"]
        cols = [(a, e) for a in AXES for e in ESTIMATORS]
        keys = list(dict.fromkeys((r["hidden"], r["source"], r["transform"]) for r in rows))
        body = []
        for h, src, n in keys:
            mine = [r for r in rows if (r["hidden"], r["source"], r["transform"]) == (h, src, n)]
            cells = {(r["axis"], r["estimator"]): r["dcor"] for r in mine}
            body.append([str(h), src, n] + [f"{cells[c]:.3f}" for c in cols])
        title = f"Fig. 6b: dCor(embeddings, what the device sends), {result['fig6b']['tokens']} tokens"
        out.append((title, ["hidden", "embeddings", "transform"] + [f"{a}, {e}" for a, e in cols], body))
    if "table4" in result:
        rows = result["table4"]
        headers = list(rows[0])
        out.append(("Table 4: greedy continuations", headers, [[repr(r[h]) for h in headers] for r in rows]))
    if "table5" in result:
        body = [[r["transform"], str(r["samples"]), str(r["length"]), f"{r['sum_abs_diff_mean']:.3g}",
                 f"{r['sum_abs_diff_max']:.3g}", f"{r['max_abs_diff']:.3g}", f"{100 * r['top1_agreement']:.2f}%"]
                for r in result["table5"]]  # fmt: skip
        headers = ["transform", "samples", "tokens", "sum |Δlogit| mean", "sum |Δlogit| max", "max |Δlogit|", "top-1"]
        out.append(("Table 5: transformed split vs plain model, next-token logits", headers, body))
    if "throughput" in result:
        body = [[r["run"], f"{r['tokens_per_s_best']:.2f}", f"{r['tokens_per_s_median']:.2f}",
                 f"{r['ratio_best']:.3f}x", str(r["same_tokens_as_plain"])] for r in result["throughput"]]  # fmt: skip
        headers = ["run", "tokens/s (best)", "tokens/s (median)", "ratio (best)", "same tokens"]
        out.append(("Throughput: greedy generation", headers, body))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--layers", default="0:", help="X:Y; STIP puts every layer on the server (0:)")
    parser.add_argument("--samples", type=int, default=1000, help="Table 5 windows of the public corpus")
    parser.add_argument("--length", type=int, default=32, help="Table 5 tokens per window")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument(
        "--inner", nargs="*", default=list(INNER), choices=INNER, help="inner secrets of the permutation key"
    )
    parser.add_argument("--dcor-samples", type=int, default=512, help="Fig. 6a: sub-sample rows/cols above this")
    parser.add_argument("--layer-stride", type=int, default=3, help="Fig. 6a: every k-th body layer")
    parser.add_argument("--hidden-sizes", type=int, nargs="*", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--embed-tokens", type=int, default=256, help="Fig. 6b tokens")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--table4-tokens", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[], choices=["fig6a", "fig6b", "table4", "table5", "throughput"])
    parser.add_argument("--quick", action="store_true", help="a tiny run: few samples, layers, sizes, tokens")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--markdown", help="write the tables here")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.batch, args.dcor_samples, args.layer_stride = 8, 4, 64, 8
        args.hidden_sizes, args.embed_tokens, args.prompts = [32, 64], 32, 2
        args.table4_tokens, args.new_tokens, args.repeats = 6, 8, 2
    return args


def main() -> None:
    args = parse_args()
    result = run(args)
    console = Console()
    markdown = []
    for title, headers, rows in tables(result):
        table = Table(title=title)
        for h in headers:
            table.add_column(h)
        for r in rows:
            table.add_row(*r)
        console.print(table)
        markdown.append(f"### {title}\n\n{_md(headers, rows)}\n")
    console.print(f"seconds per part: {result['seconds']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(markdown))


if __name__ == "__main__":
    main()
