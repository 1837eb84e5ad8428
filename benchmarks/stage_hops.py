"""What a hop costs: a decode step through a body split into 1, 2 and 3 stage actors on a local two-node Ray cluster,
against the same layers in this process.

    python benchmarks/stage_hops.py [--steps 100] [--repeats 5] [--prompt 32] [--no-smollm2] [--json out.json]

Rows: a body of k one-layer stages (k = 1, 2, 3) of a random checkpoint with SmolLM2-135M's shapes (hidden 576,
so each hop carries a real 2.3 KB row), and SmolLM2-135M-Instruct's body 2:28 as two stages of 13 layers (its
real weights; ``--no-smollm2`` skips it). Three stages on two nodes are packed (two share a node: one of their
hops stays on the node). Each run opens a session, sends a ``--prompt``-position prefill and then ``--steps``
one-row decode steps, timing each step; the in-process row runs the same layers in a ``BodyState`` here with one
torch thread, as each stage actor has (Ray gives an actor of one CPU one OpenMP thread). Runs are interleaved
round-robin over the rows, ``--repeats`` times; the table gives the median over runs of each run's median step.

``per hop`` is (chain step - in-process step) / stages: what each stage call adds beyond its compute (the
replica's submit, Ray's scheduling of the call, the tensor passed between processes and nodes, the result back).
The chain passes each hop's Ray reference to the next hop and waits once per step (``ChainState``); the
``hop-by-hop`` columns time the alternative, the replica waiting for each hop's output before submitting the next.
Every chain output is compared with the in-process output (``max diff``; exact in float32 means 0).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoConfig, AutoModelForCausalLM

from lambdasplit.models import resolve_checkpoint
from lambdasplit.models.registry import DEFAULT_MODEL
from lambdasplit.rayserve.chain import ChainBody, ChainState
from lambdasplit.rayserve.local import local_cluster
from lambdasplit.rayserve.stages import staged_split
from lambdasplit.split import load_split
from lambdasplit.split.state import BodyState


@dataclass
class Row:
    label: str
    model: str
    layers: tuple[int, int]
    stages: int
    spread: bool
    chain: ChainBody | None = None
    local: Any = None  # the in-process Body
    ms: dict[str, list[float]] = field(default_factory=dict)  # kind -> each run's median step
    max_diff: float = 0.0


def tiny_checkpoint(folder: Path, layers: int) -> Path:
    """SmolLM2-135M's config with ``layers`` layers and random weights: one-layer stages of real width."""
    config = AutoConfig.from_pretrained(resolve_checkpoint(DEFAULT_MODEL, quiet=True))
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return folder


class HopByHop(ChainState):
    """The same chain, but the replica waits for each hop's output and submits the next hop with it (the
    alternative to passing Ray references from hop to hop, which ``ChainState`` does)."""

    def forward(self, hidden: torch.Tensor, position: int, reset: bool = False, last: bool = False) -> torch.Tensor:
        self.check(position, reset)
        x = hidden[0]
        for stage in self.chain.actors:
            x = ray.get(stage.forward.remote(self.session, x, position, reset, False))
        self.length, self.steps = position + hidden.shape[1], self.steps + 1
        return x.unsqueeze(0)


KINDS = {"local": BodyState, "chain": ChainState, "hop_by_hop": HopByHop}


def one_run(row: Row, prompt: int, steps: int, seed: int) -> None:
    """One session through the local body and one through the chain, the same inputs; each decode step's time."""
    assert row.chain is not None
    gen = torch.Generator().manual_seed(seed)
    d = int(row.local.model.config.hidden_size)
    inputs = [torch.randn(1, prompt, d, generator=gen)] + [torch.randn(1, 1, d, generator=gen) for _ in range(steps)]
    outs: dict[str, list[torch.Tensor]] = {}
    medians: dict[str, float] = {}
    for kind, make in KINDS.items():
        state = make(row.local if kind == "local" else row.chain)
        times, outs[kind], position = [], [], 0
        for i, hidden in enumerate(inputs):
            start = time.perf_counter()
            outs[kind].append(state.forward(hidden, position))
            if i:  # decode steps only
                times.append((time.perf_counter() - start) * 1000)
            position += hidden.shape[1]
        state.close()
        medians[kind] = statistics.median(times)
    for kind, median in medians.items():
        row.ms.setdefault(kind, []).append(median)
    for kind in ("chain", "hop_by_hop"):
        diff = max(float((a - b).abs().max()) for a, b in zip(outs[kind], outs["local"], strict=True))
        row.max_diff = max(row.max_diff, diff)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="decode steps per run")
    ap.add_argument("--prompt", type=int, default=32, help="positions of the prefill before them")
    ap.add_argument("--repeats", type=int, default=5, help="runs per row, interleaved round-robin")
    ap.add_argument("--no-smollm2", action="store_true", help="skip SmolLM2's body 2:28 in two stages")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    console = Console(stderr=True)
    torch.set_num_threads(1)  # as each stage actor has
    with tempfile.TemporaryDirectory() as tmp:
        tiny = str(tiny_checkpoint(Path(tmp), 3))
        rows = [Row(f"{k} one-layer stage{'s' * (k > 1)}", tiny, (0, k), k, spread=k <= 2) for k in (1, 2, 3)]
        if not args.no_smollm2:
            rows.append(Row("SmolLM2 body 2:28, 2 stages", DEFAULT_MODEL, (2, 28), 2, spread=True))
        console.print("starting a local Ray cluster of two nodes")
        with local_cluster(nodes=2, cpus_per_node=6, object_store_bytes=128 << 20) as cluster:
            for row in rows:
                console.print(f"placing {row.label}")
                options = dict(device="cpu", dtype="float32", spread=row.spread)
                split = staged_split(row.model, row.layers, row.stages, **options)
                assert isinstance(split.body, ChainBody)
                row.chain = split.body
                row.local = load_split(row.model, row.layers, parts=["body"], device="cpu", dtype="float32").body
                one_run(row, args.prompt, 5, seed=-1)  # warm-up: kernels, Ray's worker connections
                row.ms.clear()
            for r in range(args.repeats):
                for row in rows:
                    console.print(f"run {r + 1}/{args.repeats}: {row.label}")
                    one_run(row, args.prompt, args.steps, seed=r)
            results = [result(row) for row in rows]
            nodes = len(cluster.node_ids)
            for row in rows:
                assert row.chain is not None
                row.chain.chain.shutdown()
    table = Table(title=f"A decode step through stage actors on a local {nodes}-node Ray cluster (median of runs)")
    columns = ("body", "layers", "stages", "on nodes", "in process ms", "chain ms", "per hop ms")
    for col in (*columns, "hop-by-hop ms", "its per hop ms", "max diff"):
        table.add_column(col, justify="left" if col == "body" else "right")
    for x in results:
        table.add_row(
            x["label"], x["layers"], str(x["stages"]), str(x["nodes"]), f"{x['local_ms']:.2f}",
            f"{x['chain_ms']:.2f}", f"{x['per_hop_ms']:.2f}", f"{x['hop_by_hop_ms']:.2f}",
            f"{x['per_hop_ms_hop_by_hop']:.2f}", f"{x['max_diff']:.1e}",
        )  # fmt: skip
    Console(width=160).print(table)
    if args.json_path:
        meta = {"steps": args.steps, "prompt": args.prompt, "repeats": args.repeats, "loadavg": os.getloadavg()}
        Path(args.json_path).write_text(json.dumps({"meta": meta, "rows": results}, indent=2) + "\n")


def result(row: Row) -> dict[str, Any]:
    assert row.chain is not None
    ms = {kind: statistics.median(runs) for kind, runs in row.ms.items()}
    return {
        "label": row.label,
        "layers": f"{row.layers[0]}:{row.layers[1]}",
        "stages": row.stages,
        "nodes": len({info.node_id for info in row.chain.chain.infos}),
        "ranges": [list(r) for r in row.chain.chain.ranges],
        "local_ms": round(ms["local"], 3),
        "chain_ms": round(ms["chain"], 3),
        "per_hop_ms": round((ms["chain"] - ms["local"]) / row.stages, 3),
        "hop_by_hop_ms": round(ms["hop_by_hop"], 3),
        "per_hop_ms_hop_by_hop": round((ms["hop_by_hop"] - ms["local"]) / row.stages, 3),
        "runs_ms": {kind: [round(x, 3) for x in runs] for kind, runs in row.ms.items()},
        "max_diff": row.max_diff,
    }


if __name__ == "__main__":
    main()
