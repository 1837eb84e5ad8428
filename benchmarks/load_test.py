"""Load test: N concurrent devices on loopback, each generating M tokens through one body server.

    python benchmarks/load_test.py --clients 1 --clients 8 --clients 32 --new-tokens 64 [--max-batch 16]
        [--server-cpus 0-3] [--processes] [--server-device cuda] [--json artifacts/load.json]

Starts `lambdasplit serve` (SmolLM2-135M-Instruct by default), then for each N: N threads, each with its
own connection and session, start together and generate greedily with a float32 wire. Reports aggregate
tokens/s, per-token latency p50/p99 (time between a client's consecutive tokens), errors, and whether every
output equals the same prompt's single-client run (measured first, one client at a time).

`--server-cpus` pins the server to some CPUs and the devices to the others; `--processes` runs each device in
a process of its own (no shared interpreter lock). Together they model devices that do not take the cloud's
cores. `benchmarks/random_checkpoint.py` makes a same-shaped model with random weights where the real one
cannot be installed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lambdasplit.client import CloudClient, connect_device
from lambdasplit.generation import Generation, stream
from lambdasplit.models import DEFAULT_MODEL
from lambdasplit.server.process import body_server_process
from lambdasplit.split import SplitModel

TOPICS = [
    "the ocean", "volcanoes", "bread", "the moon", "bees", "trains", "rain", "chess", "coffee", "glaciers",
    "owls", "bicycles", "the desert", "music", "paper", "lighthouses", "salt", "clocks", "whales", "tea",
    "mountains", "bridges", "honey", "snow", "rivers", "maps", "candles", "forests", "kites", "stars",
    "gardens", "libraries",
]  # fmt: skip


def prompt(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Tell me three facts about {TOPICS[i % len(TOPICS)]}."}]


def token_gaps(run: Generation) -> tuple[list[int], list[float]]:
    """Generate to the end; (the tokens, seconds between consecutive tokens after the first)."""
    last, gaps = time.perf_counter(), []
    for _ in run:
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    assert run.result is not None
    return run.result.token_ids, gaps[1:]  # the first gap includes the prompt


def together(clients: list[int], client: Callable[[int, threading.Barrier], None]) -> float:
    """Run ``client(i, barrier)`` in a thread per i; each waits on the barrier once ready, then all start at
    once. Returns the wall time from that start to the last client's end."""
    barrier = threading.Barrier(len(clients) + 1)
    threads = [threading.Thread(target=client, args=(i, barrier)) for i in clients]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait(timeout=300)
    start = time.perf_counter()
    for t in threads:
        t.join(timeout=1800)
    return time.perf_counter() - start


def run_clients(url: str, split: SplitModel, prompts: list[int], new: int) -> dict:
    """One client per prompt index, all at once; returns outputs by index, latencies, errors, wall time."""
    outputs: dict[int, list[int]] = {}
    gaps: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int, barrier: threading.Barrier) -> None:
        try:
            # The head and tail are loaded once and shared by every device thread; the handshake still checks
            # the server runs their model (the fingerprint).
            with CloudClient(url, fingerprint=split.fingerprint) as conn:
                link = conn.open_session("float32")
                run = stream(split, prompt(i), chat=True, link=link, max_new_tokens=new, ignore_eos=True)
                barrier.wait(timeout=120)
                tokens, mine = token_gaps(run)
                with lock:
                    outputs[i] = tokens
                    gaps.extend(mine)
        except Exception as exc:
            errors.append(repr(exc))
            barrier.abort()

    wall = together(prompts, client)
    return {"outputs": outputs, "gaps": gaps, "errors": errors, "wall": wall}


def _device_process(
    url: str, model: str, device: str, i: int, new: int, threads: int, barrier: Any, results: Any
) -> None:
    """One device in its own process (no shared interpreter lock with the other devices)."""
    torch.set_num_threads(threads)
    try:
        split, conn = connect_device(url, model, device=device, dtype="float32", quiet=True)
        with conn:
            run = stream(split, prompt(i), chat=True, link=conn.open_session("float32"), max_new_tokens=new,
                         ignore_eos=True)  # fmt: skip
            barrier.wait(timeout=600)
            tokens, gaps = token_gaps(run)
            results.put((i, tokens, gaps, None))
    except Exception as exc:
        with contextlib.suppress(Exception):
            barrier.abort()
        results.put((i, None, [], repr(exc)))


def run_processes(url: str, model: str, device: str, prompts: list[int], new: int, threads: int) -> dict:
    """Like ``run_clients``, one process per device."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(len(prompts) + 1), ctx.Queue()
    procs = [
        ctx.Process(target=_device_process, args=(url, model, device, i, new, threads, barrier, results))
        for i in prompts
    ]
    for proc in procs:
        proc.start()
    outputs: dict[int, list[int]] = {}
    gaps: list[float] = []
    errors: list[str] = []
    try:
        barrier.wait(timeout=900)
    except threading.BrokenBarrierError:
        errors.append("a device failed to start")
    start = time.perf_counter()
    for _ in prompts:
        i, tokens, mine, error = results.get(timeout=1800)
        if error:
            errors.append(error)
        else:
            outputs[i] = tokens
            gaps.extend(mine)
    wall = time.perf_counter() - start
    for proc in procs:
        proc.join(timeout=60)
    return {"outputs": outputs, "gaps": gaps, "errors": errors, "wall": wall}


def run_synthetic(url: str, hidden_size: int, clients: int, prompt_len: int, new: int) -> dict:
    """Server capacity alone: each client sends the body random hidden states (a prompt, then one row per
    step) with no head or tail to run, so the devices cost (almost) nothing on this machine."""
    gaps: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int, barrier: threading.Barrier) -> None:
        try:
            with CloudClient(url) as conn:
                link = conn.open_session("float16")
                gen = torch.Generator().manual_seed(i)
                link.forward(torch.randn(1, prompt_len, hidden_size, generator=gen), 0)
                barrier.wait(timeout=120)
                last, mine = time.perf_counter(), []
                for step in range(new):
                    link.forward(torch.randn(1, 1, hidden_size, generator=gen), prompt_len + step)
                    now = time.perf_counter()
                    mine.append(now - last)
                    last = now
                with lock:
                    gaps.extend(mine)
        except Exception as exc:
            errors.append(repr(exc))
            barrier.abort()

    wall = together(list(range(clients)), client)
    return {"gaps": gaps, "errors": errors, "wall": wall, "steps": clients * new}


def cpu_list(spec: str) -> set[int]:
    """'0-3,8' -> {0, 1, 2, 3, 8}"""
    cpus: set[int] = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def server_metrics(url: str) -> dict:
    with urllib.request.urlopen(url.replace("ws://", "http://").removesuffix("/v1/split") + "/metrics") as r:
        return json.loads(r.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--layers", default="2:28")
    ap.add_argument("--clients", type=int, action="append", help="concurrent clients per round (repeatable)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16, help="server --max-batch (1: no batching)")
    ap.add_argument("--device-threads", type=int, default=1, help="torch threads of this (device) process")
    ap.add_argument("--server-threads", type=int, help="serve --threads (default: torch's, one per core)")
    ap.add_argument(
        "--server-cpus",
        help="CPUs of the server, e.g. 0-3 (its torch threads: one per CPU); the devices get the other CPUs, so the "
        "cloud and the devices stop competing for cores",
    )
    ap.add_argument("--server-device", help="serve --device (default: serve's own, cuda if available)")
    ap.add_argument("--server-dtype", default="float32", help="serve --dtype")
    ap.add_argument("--device", default="cpu", help="where the devices run their head and tail (float32)")
    ap.add_argument("--processes", action="store_true", help="each device in its own process instead of a thread")
    ap.add_argument(
        "--synthetic",
        action="store_true",
        help="also measure the server alone: clients send random hidden states, no head or tail (no output check)",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    counts = args.clients or [1, 8, 32]
    torch.set_num_threads(args.device_threads)
    rows = []
    serve = ["--model", args.model, "--layers", args.layers, "--max-batch", str(args.max_batch)]
    serve += ["--max-sessions", "256", "--dtype", args.server_dtype]
    if args.server_device:
        serve += ["--device", args.server_device]
    threads = args.server_threads
    wrap = None
    if args.server_cpus:
        mine = cpu_list(args.server_cpus)
        os.sched_setaffinity(0, os.sched_getaffinity(0) - mine)  # this process and the devices it spawns
        threads = threads or len(mine)
        wrap = lambda command: ["taskset", "-c", args.server_cpus, *command]  # noqa: E731
    if threads:
        serve += ["--threads", str(threads)]
    with body_server_process(serve, env={"OMP_WAIT_POLICY": "PASSIVE"}, wrap=wrap) as url:
        split, conn = connect_device(url, args.model, device=args.device, dtype="float32", quiet=True)
        conn.close()
        print(
            f"server {url}, {args.model} layers {args.layers}, max batch {args.max_batch}, {os.cpu_count()} CPUs"
            f"{f' (server on {args.server_cpus})' if args.server_cpus else ''}, devices on {args.device}",
            flush=True,
        )
        reference: dict[int, list[int]] = {}
        single_rates = []
        for i in range(max(counts)):  # the single-client runs every output is checked against
            r = run_clients(url, split, [i], args.new_tokens)
            if r["errors"]:
                raise SystemExit(f"single-client run {i} failed: {r['errors']}")
            reference[i] = r["outputs"][i]
            single_rates.append(args.new_tokens / r["wall"])
            print(f"  single-client reference {i + 1}/{max(counts)}: {single_rates[-1]:.2f} tok/s", flush=True)
        single = statistics.median(single_rates)
        for n in counts:
            before = server_metrics(url)
            if args.processes:
                r = run_processes(url, args.model, args.device, list(range(n)), args.new_tokens, args.device_threads)
            else:
                r = run_clients(url, split, list(range(n)), args.new_tokens)
            after = server_metrics(url)
            correct = sum(r["outputs"].get(i) == reference[i] for i in range(n))
            gaps = sorted(r["gaps"]) or [0.0]
            tokens = sum(len(v) for v in r["outputs"].values())
            row = {
                "clients": n,
                "tokens": tokens,
                "wall_s": round(r["wall"], 3),
                "aggregate_tok_s": round(tokens / r["wall"], 2),
                "vs_single": round(tokens / r["wall"] / single, 2),
                "p50_ms": round(1000 * gaps[len(gaps) // 2], 1),
                "p99_ms": round(1000 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))], 1),
                "errors": len(r["errors"]),
                # The server's own compute per generated token: its capacity, whatever the devices cost here.
                "server_ms_per_token": round(1000 * (after["compute_seconds"] - before["compute_seconds"]) / tokens, 2),
                "batched_steps": after["batched_steps"] - before["batched_steps"],
                "correct": f"{correct}/{n}",
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        synthetic = []
        for n in counts if args.synthetic else []:
            before = server_metrics(url)
            r = run_synthetic(url, split.hidden_size, n, 40, args.new_tokens)
            after = server_metrics(url)
            gaps = sorted(r["gaps"]) or [0.0]
            synthetic.append(
                {
                    "clients": n,
                    "steps_per_s": round(r["steps"] / r["wall"], 2),
                    "p50_ms": round(1000 * gaps[len(gaps) // 2], 1),
                    "errors": len(r["errors"]),
                    "batched_steps": after["batched_steps"] - before["batched_steps"],
                    "batches": after["batches"] - before["batches"],
                }
            )
            print(json.dumps(synthetic[-1]), flush=True)
    print(f"\nsingle client (median of {len(single_rates)}): {single:.2f} tok/s")
    print("| clients | tokens | wall s | aggregate tok/s | x single | p50 ms/token | p99 ms/token | errors | equal "
          "| server compute ms/token | steps batched |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['clients']} | {r['tokens']} | {r['wall_s']} | {r['aggregate_tok_s']} | {r['vs_single']}x "
            f"| {r['p50_ms']} | {r['p99_ms']} | {r['errors']} | {r['correct']} | {r['server_ms_per_token']} "
            f"| {r['batched_steps']} |"
        )
    if synthetic:
        base = synthetic[0]["steps_per_s"]
        print("\nserver alone (random hidden states, no device compute):")
        print("| clients | body steps/s | x 1 client | p50 ms/step | errors | mean batch |")
        print("|---|---|---|---|---|---|")
        for r in synthetic:
            mean = r["batched_steps"] / r["batches"] if r["batches"] else 1.0
            print(f"| {r['clients']} | {r['steps_per_s']} | {r['steps_per_s'] / base:.2f}x | {r['p50_ms']} "
                  f"| {r['errors']} | {mean:.1f} |")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "single": single, "rows": rows,
                                                    "synthetic": synthetic},
                                        indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
