"""Greedy decoding speed and traffic: unsplit vs split in process vs split over a loopback connection.

    python benchmarks/bench_speed.py [--new-tokens 128] [--repeats 5] [--layers 1:29 2:28 4:26]
                                     [--network-layers 2:28] [--wire float32 float16 int8] [--no-network]
                                     [--tls] [--json out.json]

Rows: the unsplit model through transformers' own ``model.generate`` (the baseline users know), the
unsplit model through lambdasplit's loop, the three-part split in this process at each ``--layers``,
and the split with the body in a ``lambdasplit serve`` subprocess on 127.0.0.1 for each wire dtype.
Runs are interleaved round-robin so drift in machine speed hits every row alike. Ratios use the best of
the repeats (as timeit does: interference from other load only ever adds time; on the 2-core VM this was
measured on, one configuration ranged 6.4-11.1 s); medians are printed beside them.
Every run generates exactly ``--new-tokens`` tokens (EOS ignored); tokens are compared with the unsplit
model's. Traffic columns are per decode step (after the prompt): frame bytes, tensor payload, and TCP
payload at the client socket (Linux TCP_INFO), which includes WebSocket framing. ``--tls`` adds the same
network rows against a second server with ``--tls`` (wss:// on its self-signed certificate, as ``serve``
defaults to beyond loopback; the device trusts it on first use): the cost of encryption, in time and in
socket bytes (TLS records) per step.
"""

from __future__ import annotations

import os

# Before torch loads (see lambdasplit.cli.main): idle OpenMP threads must not spin while another process computes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from lambdasplit.client import CloudClient, connect_device
from lambdasplit.generation import Generation, ModelDecoder, SamplingParams, generate, prompt_ids
from lambdasplit.server.process import body_server_process
from lambdasplit.split import load_split
from lambdasplit.tls import TlsTrust

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]


@dataclass
class Row:
    name: str
    run: Callable[[], list[int]]
    client: CloudClient | None = None
    times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    per_step: dict[str, float] = field(default_factory=dict)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layers", nargs="+", default=["1:29", "2:28", "4:26"])
    ap.add_argument("--network-layers", default="2:28")
    ap.add_argument("--wire", nargs="+", default=["float32", "float16", "int8"])
    ap.add_argument("--no-network", action="store_true")
    ap.add_argument("--tls", action="store_true", help="also measure the network rows over wss://")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", dest="json_path", default=None, help="also write the results to this file")
    args = ap.parse_args()
    console = Console(width=140)
    n = args.new_tokens
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)

    with ExitStack() as stack:
        splits = {layers: load_split(args.model, layers, device="cpu", dtype="float32") for layers in args.layers}
        first = next(iter(splits.values()))
        model = AutoModelForCausalLM.from_pretrained(first.path, dtype=torch.float32).eval()
        ids = prompt_ids(first, PROMPT)

        def hf_generate() -> list[int]:
            with torch.inference_mode():
                out = model.generate(
                    torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2
                )
            return out[0, len(ids) :].tolist()

        rows = [
            Row("unsplit, HF model.generate", hf_generate),
            Row("unsplit, lambdasplit loop", lambda: Generation(ModelDecoder(model), ids, params).run().token_ids),
        ]
        for layers, split in splits.items():
            rows.append(Row(f"split {layers}, in process", lambda s=split: generate(s, ids, params=params).token_ids))
        servers = [] if args.no_network else [("network", [])] + ([("network TLS", ["--tls"])] if args.tls else [])
        for label, tls in servers:
            with console.status(f"starting the body server subprocess ({label})"):
                serve = ["--model", args.model, "--layers", args.network_layers, *tls]
                url = stack.enter_context(body_server_process(serve))
            trust = TlsTrust(notify=lambda _: None)  # trusts the --tls server on first use
            device, client = connect_device(url, args.model, quiet=True, trust=trust)
            stack.callback(client.close)
            for wire in args.wire:
                row = Row(f"split {args.network_layers}, {label}, {wire}", lambda: [], client)

                def run(row: Row = row, wire: str = wire, device=device, client=client) -> list[int]:  # noqa: ANN001
                    before = client.socket_bytes()
                    link = client.open_session(wire)
                    result = generate(device, ids, params=params, link=link)
                    after = client.socket_bytes()
                    t, steps = result.traffic, max(result.traffic.messages - 1, 1)
                    row.per_step = {
                        "up_frame": len(link.last_sent),
                        "down_frame": len(link.last_received),
                        "payload": len(link.last_sent) - 24,
                        "total_up": t.up_bytes,
                        "total_down": t.down_bytes,
                        "frames": t.messages,
                        "steps": steps,
                    }
                    if before is not None and after is not None:
                        d = after - before
                        row.per_step["socket_up_total"], row.per_step["socket_down_total"] = d.sent, d.received
                    return result.token_ids

                row.run = run
                rows.append(row)

        for row in rows:  # warm-up: first-call allocations and thread pools
            row.tokens = row.run()
        for _ in range(args.repeats):
            for row in rows:
                start = time.perf_counter()
                row.run()
                row.times.append(time.perf_counter() - start)

    reference = rows[0].tokens
    base = n / min(rows[0].times)
    title = f"{args.model}: greedy, {n} new tokens, prompt {len(ids)} tokens, best and median of {args.repeats}"
    table = Table(title=title)
    cols = ("run", "tok/s best", "tok/s median", "vs HF generate", "tokens = unsplit", "up B/step", "down B/step")
    cols = (*cols, "socket up/frame", "socket down/frame")
    for col in (*cols, "overhead"):
        table.add_column(col, justify="left" if col == "run" else "right")
    results = []
    for row in rows:
        tps = n / min(row.times)
        median = n / statistics.median(row.times)
        same = sum(a == b for a, b in zip(row.tokens, reference, strict=True))
        p = row.per_step
        overhead = f"{(p['up_frame'] + 8) / p['payload'] - 1:.1%}" if p else ""
        table.add_row(
            row.name,
            f"{tps:.1f}",
            f"{median:.1f}",
            f"{tps / base:.3f}x",
            "all" if same == n else f"[yellow]{same}/{n}[/]",
            f"{p['up_frame']:,}" if p else "",
            f"{p['down_frame']:,}" if p else "",
            f"{p['socket_up_total'] / p['frames']:,.0f}" if "socket_up_total" in p else "",
            f"{p['socket_down_total'] / p['frames']:,.0f}" if "socket_down_total" in p else "",
            overhead,
        )
        results.append(
            {
                "run": row.name,
                "tokens_per_second": round(tps, 2),
                "tokens_per_second_median": round(median, 2),
                "seconds": [round(t, 4) for t in row.times],
                "ratio": round(tps / base, 3),
                "tokens_equal_unsplit": same,
                **({"traffic": p} if p else {}),
            }
        )
    console.print(table)
    console.print(
        "up/down B/step: one decode step's frame (24-byte header + tensor); overhead: up frame + 8-byte client "
        "WebSocket header over the tensor payload. socket up/down per frame: TCP payload bytes over the whole "
        "generation (prompt included; with TLS, its records) divided by the round trips. Totals in the JSON."
    )
    meta = {
        "model": args.model,
        "new_tokens": n,
        "prompt_tokens": len(ids),
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    console.print_json(json.dumps({"meta": meta, "rows": results}))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"meta": meta, "rows": results}, f, indent=2)


if __name__ == "__main__":
    main()
