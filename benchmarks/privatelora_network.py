"""PrivateLoRA over real and emulated links: bytes per token at the socket, tokens/s against RTT, training steps.

    PYTHONPATH=src python benchmarks/privatelora_network.py [--links loopback,1000/1000/1,60/100/30]
        [--rank 32] [--dtype float16] [--new-tokens 16] [--train-steps 4] [--json out.json]

For each link (``bench.links``: loopback, or a veth pair through the packet delay line, RATE_UP/RATE_DOWN/RTT in
Mbit/s and ms) a ``lambdasplit serve --privatelora`` process serves SmolLM2's 30 layers (X = 0, the paper's
layout) behind the link; the device (this process) reaches it through a ``bench.relay.CountingRelay`` that counts
the bytes at the socket. It decodes ``--new-tokens`` greedy tokens of a chat prompt (M = 0: the values do not
change the cost) and runs ``--train-steps`` fine-tuning steps on a 64-token block.

Reported per link: seconds per decoded token and per training step, round trips per token, bytes per token at
the socket against the paper's formula (layers x 3 projections x r values each way, plus one hidden row each way
and the framing), beside full-width per-layer transmission (one hidden row each way per layer, the paper's
baseline) and Λ-Split's one row per boundary. Prints a table and JSON.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from lambdasplit.bench.links import open_link, parse_link
from lambdasplit.bench.relay import CountingRelay
from lambdasplit.generation import stream
from lambdasplit.privatelora import AdapterLink, SplitTrainer
from lambdasplit.privatelora import messages as M
from lambdasplit.server.process import body_server_process
from lambdasplit.split import load_split
from lambdasplit.tls import TlsTrust  # the relay is on loopback: no --insecure needed on the device

PROMPT = "Write a short note to my landlord about the broken heating in flat 4B."
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def measure(spec: str, args: argparse.Namespace, device: Any) -> dict[str, Any]:
    link_spec = parse_link(spec)
    with ExitStack() as stack:
        ends = stack.enter_context(open_link(link_spec))
        wrap = ends.cloud_command if link_spec.emulated else None
        serve_args = ["--privatelora", "--host", ends.cloud_host, "--insecure", "--adapter-rank", str(args.rank)]
        url = stack.enter_context(body_server_process(serve_args, timeout=300, wrap=wrap))
        host, port = url.removeprefix("ws://").rsplit(":", 1)
        relay = stack.enter_context(CountingRelay((host, int(port))))
        link = AdapterLink(relay.url(), dtype=args.dtype, timeout=120, trust=TlsTrust())
        run = stream(device, PROMPT, chat=True, link=link, max_new_tokens=args.new_tokens, ignore_eos=True)
        marks = []
        for _ in run:
            marks.append((time.perf_counter(), relay.up, relay.down, link.exchanges))
        result = run.result
        assert result is not None
        steps = len(marks) - 1
        (t0, up0, down0, x0), (t1, up1, down1, x1) = marks[0], marks[-1]
        block = device.tokenizer(PROMPT * 8, return_tensors="pt").input_ids[:, :64]
        # generation closed its session: a second one for the training steps
        trainer_link = stack.enter_context(AdapterLink(relay.url(), dtype=args.dtype, timeout=120))
        trainer = SplitTrainer(device, trainer_link.adapters, trainer_link)
        train = [trainer.step(block).seconds for _ in range(args.train_steps)]
    layers = len(link.adapters.layers)
    groups = [len(g) for g in link.adapters.layout.groups()]
    formula = M.forward_bytes(groups, layers, device.hidden_size, 1, (args.rank, args.rank), ITEMSIZE[args.dtype])
    return {
        "link": link_spec.description or link_spec.name,
        "rtt_ms": link_spec.rtt_ms,
        "prompt_tokens": result.prompt_tokens,
        "prefill_seconds": result.prefill_seconds,
        "decode_steps": steps,
        "seconds_per_token": (t1 - t0) / steps,
        "round_trips_per_token": (x1 - x0) / steps + 1,
        "socket_up_per_token": (up1 - up0) / steps,
        "socket_down_per_token": (down1 - down0) / steps,
        "formula_up_per_token": formula[0],
        "formula_down_per_token": formula[1],
        "train_step_seconds_median": statistics.median(train),
        "train_steps": len(train),
        "text": result.text,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--links", default="loopback,1000/1000/1,60/100/30")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--dtype", choices=sorted(ITEMSIZE), default="float16")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = load_split(layers="0:", parts=("head", "tail"), device="cpu", dtype="float32", quiet=True)
    rows = []
    for spec in args.links.split(","):
        Console(stderr=True).print(f"link {spec} ...")
        rows.append(measure(spec, args, device))
    width, itemsize, layers = device.hidden_size, ITEMSIZE[args.dtype], device.points.num_layers
    adapter_per_layer = 3 * args.rank * 2 * itemsize  # the paper's formula, both directions
    references = {
        "privatelora_formula_per_layer": adapter_per_layer,
        "full_width_per_layer": 2 * width * itemsize,
        "lambda_split_per_token": 2 * width * itemsize,
        "privatelora_formula_per_token": layers * adapter_per_layer + 2 * width * itemsize,
    }
    table = Table(title=f"PrivateLoRA on SmolLM2 (30 layers in the cloud, q/k/v at rank {args.rank}, {args.dtype})")
    for column in ("link", "s/token", "tok/s", "round trips/token", "socket B/token up+down", "formula", "train step"):
        table.add_column(column, justify="right")
    for r in rows:
        measured = r["socket_up_per_token"] + r["socket_down_per_token"]
        formula = r["formula_up_per_token"] + r["formula_down_per_token"]
        table.add_row(
            r["link"], f"{r['seconds_per_token']:.3f}", f"{1 / r['seconds_per_token']:.2f}",
            f"{r['round_trips_per_token']:.0f}", f"{measured:,.0f}", f"{formula:,}",
            f"{r['train_step_seconds_median']:.2f} s",
        )  # fmt: skip
    Console(width=140).print(table)
    out = {"settings": vars(args) | {"json": None}, "references": references, "links": rows, "torch": torch.__version__}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
