"""Error, rounds and bytes of the secret-shared primitives, and of one SmolLM2 body layer at decode.

    PYTHONPATH=src python benchmarks/mpc_costs.py [--json out.json]

Each primitive runs on both parties in one process (threads, ``LocalPair``-style queues) over inputs drawn from
the ranges measured on SmolLM2-135M's body at 2:28 (docs/secret-sharing.md); the error is against float64.
``sent`` is what one party sends its peer, ``dealt`` what the device deals one party. The last rows chain the
interactive steps of one decoder layer at decode (hidden 576, 9 heads of 64, MLP 1536) for a context of T
tokens: the public-weight linear layers and RoPE are local and cost no round, so random shares of the right
shapes give the exact count. docs/secret-sharing.md quotes the output.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "mpc"))
from mpc_helpers import compute

from lambdasplit.mpc import compare as C
from lambdasplit.mpc import functions as F
from lambdasplit.mpc.beaver import matmul, mul
from lambdasplit.mpc.party import Party

HIDDEN, HEADS, HEAD_DIM, MLP = 576, 9, 64, 1536


def primitive_rows() -> list[dict[str, object]]:
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int, lo: float, hi: float) -> torch.Tensor:
        return torch.rand(*shape, generator=g, dtype=torch.float64) * (hi - lo) + lo

    def fixed(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        return lambda p, *s: C.to_fixed(p, fn(p, *s))

    gate = torch.linspace(-60, 60, 2048, dtype=torch.float64)
    near_zero = torch.cat([torch.tensor([0.0, 2**-16, -(2**-16)], dtype=torch.float64), gate[:1021]])
    cases: list[tuple[str, Callable[..., torch.Tensor], list[torch.Tensor], Callable[..., torch.Tensor] | None]] = [
        ("ltz 1024, [-60, 60] + 0, +-1 ulp", fixed(C.ltz), [near_zero], lambda x: (x < 0).double()),
        ("relu 1024 [-60, 60]", C.relu, [gate[:1024]], lambda x: x.clamp(min=0)),
    ]
    for n in (64, 256):
        scores = rand(HEADS, 1, n, lo=-58.6, hi=28.4)
        cases.append((f"max (9,1,{n}) scores", lambda p, s: C.maximum(p, s, keepdim=True), [scores], None))
        cases.append((f"softmax (9,1,{n}) own max", F.softmax, [scores], lambda s: s.softmax(-1)))
    cases.append(("sigmoid 2048 [-60, 60]", F.sigmoid, [gate], torch.sigmoid))
    cases.append(("silu 2048 [-60, 60]", F.silu, [gate], torch.nn.functional.silu))
    cases.append(("silu 2048 [-4, 4]", F.silu, [gate / 15], torch.nn.functional.silu))
    rows = []
    for name, program, inputs, ref in cases:
        out, counter = compute(program, *inputs)
        # the maximum: against the encoded inputs' maximum
        encoded_max = (inputs[0] * 2**16).round().div(2**16).amax(-1, keepdim=True)
        expected = encoded_max if ref is None else ref(*inputs)
        err = (out - expected).abs().max().item()
        rows.append({"name": name, "abs_err": err, **vars(counter)})
    return rows


def layer_at_decode(context: int) -> Callable[..., torch.Tensor]:
    """The interactive steps of one decoder layer for one new token (shares in, share out)."""

    def program(p: Party, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        normed = mul(p, h, F.rsqrt(p, F.mean_square(p, h), scale=8.0).expand_as(h).contiguous())
        q = normed[..., : HEADS * HEAD_DIM].reshape(1, HEADS, 1, HEAD_DIM)  # stands for q_proj + RoPE (local)
        probs = F.softmax(p, matmul(p, q, k.transpose(-1, -2)))
        attn = matmul(p, probs, v).reshape(1, 1, HEADS * HEAD_DIM)
        h2 = h + attn[..., :HIDDEN]  # stands for o_proj and the residual (local)
        normed2 = mul(p, h2, F.rsqrt(p, F.mean_square(p, h2), scale=8.0).expand_as(h2).contiguous())
        act = mul(p, F.silu(p, gate + normed2[..., :1].expand_as(gate)), gate)  # silu(gate) * up
        return act[..., :HIDDEN] + normed2

    return program


def layer_rows() -> list[dict[str, object]]:
    g = torch.Generator().manual_seed(1)
    rows = []
    for t in (64, 256):
        h = torch.randn(1, 1, HIDDEN, generator=g, dtype=torch.float64) * 5
        k = torch.randn(1, HEADS, t, HEAD_DIM, generator=g, dtype=torch.float64) / 4
        v = torch.randn(1, HEADS, t, HEAD_DIM, generator=g, dtype=torch.float64)
        gate = torch.randn(1, 1, MLP, generator=g, dtype=torch.float64) * 2
        _, counter = compute(layer_at_decode(t), h, k, v, gate)
        rows.append({"name": f"one layer at decode, T={t}", "abs_err": math.nan, **vars(counter)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = primitive_rows() + layer_rows()
    table = Table(title="secret-shared primitives: one party's traffic")
    for column in ("primitive", "abs err", "rounds", "sent B", "dealt B"):
        table.add_column(column, justify="left" if column == "primitive" else "right")
    for r in rows:
        err = "" if math.isnan(float(r["abs_err"])) else f"{r['abs_err']:.2e}"  # type: ignore[arg-type]
        table.add_row(str(r["name"]), err, str(r["rounds"]), f"{r['sent']:,}", f"{r['dealt']:,}")
    Console(width=120).print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
