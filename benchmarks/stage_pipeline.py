"""Sessions in flight on a chain of stage actors: decode steps of N sessions one at a time against overlapped.

    python benchmarks/stage_pipeline.py [--sessions 1,2,4] [--steps 40] [--repeats 3] [--json out.json]

SmolLM2-135M-Instruct's body 2:28 as two stage actors of 13 layers on a local two-node Ray cluster (one CPU and one
torch thread each, as a replica places them). N sessions are opened and prefilled with ``--prompt`` positions; then
each round gives every session one decode step (one row), ``--steps`` rounds. ``one at a time`` waits for each
session's step before submitting the next session's (what the server's batcher did before 2026-12-06); ``overlapped``
submits every session's step, then waits for them (``ChainState.start``, what it does now): while session A's step
is on stage 2, session B's runs on stage 1. Printed: session-steps per second (median over repeats, arms
interleaved) and the largest difference between the two arms' outputs (0: the same numbers).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from lambdasplit.models.registry import DEFAULT_MODEL
from lambdasplit.rayserve.chain import ChainBody, ChainState
from lambdasplit.rayserve.local import local_cluster
from lambdasplit.rayserve.stages import staged_split

ARMS = ("one at a time", "overlapped")


def one_run(chain: ChainBody, sessions: int, prompt: int, steps: int, arm: str, seed: int) -> tuple[float, list[Any]]:
    """Session-steps per second of ``steps`` rounds over ``sessions`` sessions, and every output."""
    gen = torch.Generator().manual_seed(seed)
    d = chain.chain.infos[0].config.hidden_size
    states = [ChainState(chain) for _ in range(sessions)]
    outs: list[Any] = []
    try:
        for s in states:
            s.forward(torch.randn(1, prompt, d, generator=gen), 0)
        rows = [[torch.randn(1, 1, d, generator=gen) for _ in states] for _ in range(steps)]
        start = time.perf_counter()
        for r, round_rows in enumerate(rows):
            if arm == "overlapped":
                started = [s.start(x, prompt + r) for s, x in zip(states, round_rows, strict=True)]
                outs += [finish() for finish in started]
            else:
                outs += [s.start(x, prompt + r)() for s, x in zip(states, round_rows, strict=True)]
        seconds = time.perf_counter() - start
    finally:
        for s in states:
            s.close()
    return sessions * steps / seconds, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", default="1,2,4")
    ap.add_argument("--steps", type=int, default=40, help="decode rounds per run")
    ap.add_argument("--prompt", type=int, default=32, help="positions of each session's prefill")
    ap.add_argument("--repeats", type=int, default=3, help="runs per arm and session count, interleaved")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    console = Console(stderr=True)
    counts = [int(n) for n in args.sessions.split(",")]
    rates: dict[tuple[int, str], list[float]] = {}
    diffs: dict[int, float] = {}
    console.print("starting a local Ray cluster of two nodes")
    with local_cluster(nodes=2, cpus_per_node=2, object_store_bytes=128 << 20):
        split = staged_split(DEFAULT_MODEL, (2, 28), 2, device="cpu", dtype="float32", spread=True)
        assert isinstance(split.body, ChainBody)
        chain = split.body
        one_run(chain, 2, args.prompt, 3, "overlapped", seed=-1)  # warm-up: kernels, Ray's worker connections
        for r in range(args.repeats):
            for n in counts:
                outs = {}
                for arm in ARMS:
                    rate, outs[arm] = one_run(chain, n, args.prompt, args.steps, arm, seed=r)
                    rates.setdefault((n, arm), []).append(rate)
                    console.print(f"run {r + 1}/{args.repeats}: {n} session(s), {arm}: {rate:.1f} steps/s")
                diff = max(float((a - b).abs().max()) for a, b in zip(*outs.values(), strict=True))
                diffs[n] = max(diffs.get(n, 0.0), diff)
        chain.chain.shutdown()
    table = Table(title="Decode steps of N sessions through 2 stage actors (SmolLM2 body 2:28), session-steps/s")
    for col in ("sessions", *ARMS, "gain", "max diff"):
        table.add_column(col, justify="right")
    results = []
    for n in counts:
        med = {arm: statistics.median(rates[(n, arm)]) for arm in ARMS}
        gain = med["overlapped"] / med["one at a time"]
        runs = {arm: [round(x, 2) for x in rates[(n, arm)]] for arm in ARMS}
        medians = {arm: round(v, 2) for arm, v in med.items()}
        results.append({"sessions": n, **medians, "gain": round(gain, 3), "runs": runs, "max_diff": diffs[n]})
        table.add_row(str(n), *(f"{med[arm]:.1f}" for arm in ARMS), f"{gain:.2f}x", f"{diffs[n]:.1e}")
    Console(width=120).print(table)
    if args.json_path:
        meta = {"steps": args.steps, "prompt": args.prompt, "repeats": args.repeats, "loadavg": os.getloadavg()}
        Path(args.json_path).write_text(json.dumps({"meta": meta, "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
