"""Plain `lambdasplit serve` against the body on Ray Serve (1 and 2 replicas), at 1, 8 and 32 devices, in one run.

    PYTHONPATH=src python benchmarks/ray_serve.py [--model smollm2-135m-instruct] [--layers 2:-2]
        [--clients 1,8,32] [--new-tokens 32] [--hop-steps 200] [--cpus 2] [--json artifacts/ray/serve.json]

For each target: `lambdasplit serve` in a process of its own (torch on --cpus threads), then a local Ray (--cpus
logical CPUs) with the body deployed as 1 replica (--cpus CPUs, so as many torch threads) and as 2 replicas
(--cpus/2 each): the same compute budget split differently.

Two measurements per target:
- **hop**: one client sends the body random hidden states, a prompt then --hop-steps single-row steps, with no head
  or tail to run: the per-step round trip of the server path alone (body compute included). Ray's proxy hop is the
  difference between a Ray row and the plain row.
- **clients**: N real devices (SmolLM2's head and tail in this process, one thread each) generate --new-tokens
  greedily with a float32 wire, all at once. Per-step latency is the time between a device's consecutive tokens
  (p50, p95), aggregate tokens/s is all devices' tokens over the wall time, and every output is checked against the
  same prompt's single-device run on the plain server.

This machine has 2 cores: the devices, the server (or Ray's proxy and replicas) share them, so the aggregate figures
say how the serving paths compare on one machine, not what a cluster of machines does.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lambdasplit.models import DEFAULT_MODEL
from lambdasplit.server.process import body_server_process
from lambdasplit.split import load_split

sys.path.insert(0, str(Path(__file__).parent))  # load_test is a sibling script
from load_test import run_clients, run_synthetic


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def plain_server(model: str, layers: str, cpus: int) -> Iterator[str]:
    with body_server_process(["--model", model, "--layers", layers, "--threads", str(cpus)], timeout=300) as url:
        yield url


@contextmanager
def ray_replicas(model: str, layers: str, replicas: int, cpus: int, port: int) -> Iterator[str]:
    from ray import serve

    from lambdasplit.rayserve import ReplicaSpec, Scaling, deploy
    from lambdasplit.rayserve.deployment import APP_NAME
    from lambdasplit.server import ServerSettings

    spec = ReplicaSpec(model, layers, ServerSettings(port=port))
    url = deploy(spec, Scaling(replicas=replicas, cpus_per_replica=cpus / replicas))
    try:
        yield url
    finally:
        serve.delete(APP_NAME)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def measure(
    name: str, url: str, split: Any, clients: list[int], new: int, hop_steps: int, expected: dict
) -> list[dict[str, Any]]:
    rows = []
    hop = run_synthetic(url, split.hidden_size, 1, 32, hop_steps)
    assert not hop["errors"], hop["errors"]
    rows.append({"target": name, "kind": "hop", "clients": 1, "p50_ms": statistics.median(hop["gaps"]) * 1e3,
                 "p95_ms": percentile(hop["gaps"], 95) * 1e3})  # fmt: skip
    print(f"{name:>14} hop: p50 {rows[-1]['p50_ms']:.2f} ms, p95 {rows[-1]['p95_ms']:.2f} ms", flush=True)
    for n in clients:
        run = run_clients(url, split, list(range(n)), new)
        tokens = sum(len(t) for t in run["outputs"].values())
        same = all(run["outputs"].get(i) == expected[i] for i in range(n))
        row = {
            "target": name, "kind": "clients", "clients": n, "errors": len(run["errors"]), "identical": same,
            "p50_ms": statistics.median(run["gaps"]) * 1e3, "p95_ms": percentile(run["gaps"], 95) * 1e3,
            "tokens_per_s": tokens / run["wall"],
        }  # fmt: skip
        rows.append(row)
        print(
            f"{name:>14} {n:>2} clients: {row['tokens_per_s']:.1f} tok/s, step p50 {row['p50_ms']:.1f} ms, "
            f"p95 {row['p95_ms']:.1f} ms, errors {row['errors']}, identical {same}",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--layers", default="2:-2")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--hop-steps", type=int, default=200)
    ap.add_argument("--cpus", type=int, default=2, help="threads of the plain server; Ray's CPUs for the replicas")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    clients = [int(x) for x in args.clients.split(",")]
    torch.set_num_threads(1)  # each device: one thread, as the load test's devices
    split = load_split(args.model, args.layers, parts=["head", "tail"], quiet=True)
    rows: list[dict[str, Any]] = []
    started = time.time()
    with plain_server(args.model, args.layers, args.cpus) as url:
        runs = [run_clients(url, split, [i], args.new_tokens) for i in range(max(clients))]
        single = {i: run["outputs"][i] for i, run in enumerate(runs)}
        rows += measure("plain serve", url, split, clients, args.new_tokens, args.hop_steps, single)
    import ray

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        for replicas in (1, 2):
            with ray_replicas(args.model, args.layers, replicas, args.cpus, port) as url:
                name = f"ray {replicas} replica{'s' * (replicas > 1)}"
                rows += measure(name, url, split, clients, args.new_tokens, args.hop_steps, single)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    table(rows, lambda line: print(line))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"model": args.model, "layers": args.layers, "cpus": args.cpus, "new_tokens": args.new_tokens,
                "hop_steps": args.hop_steps, "machine": platform.platform(),
                "seconds": time.time() - started}  # fmt: skip
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


def table(rows: list[dict[str, Any]], out: Callable[[str], None]) -> None:
    plain = {r["clients"]: r for r in rows if r["target"] == "plain serve" and r["kind"] == "hop"}
    out("\n| Target | Clients | Step p50 (ms) | Step p95 (ms) | Aggregate tok/s | Errors | Identical |")
    out("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["kind"] == "hop":
            extra = r["p50_ms"] - plain[1]["p50_ms"]
            note = "" if r["target"] == "plain serve" else f" (+{extra:.2f} ms)"
            out(f"| {r['target']} (hop) | 1 | {r['p50_ms']:.2f}{note} | {r['p95_ms']:.2f} | | | |")
        else:
            out(
                f"| {r['target']} | {r['clients']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['tokens_per_s']:.1f} "
                f"| {r['errors']} | {'yes' if r['identical'] else 'NO'} |"
            )


if __name__ == "__main__":
    main()
