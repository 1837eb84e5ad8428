"""The planner's predictions against `lambdasplit bench llm` measurements, on several links, in one run.

    PYTHONPATH=src python benchmarks/plan_vs_bench.py [--links loopback,5g,wireless] [--local-layers 2,8,16]
        [--new-tokens 64] [--device-threads 1] [--cloud-threads N] [--repeats 48] [--rounds 1] [--measure-once]
        [--json out.json] [--markdown out.md]

1. The planner's inputs are measured first, in this process, as `lambdasplit plan --measure-overhead` does: the
   model's decoder layers timed with the device's and the server's thread counts (the server's as a stand-in in a
   process of its own: it is this machine), then the protocol's per-token overhead against a real server on
   loopback (one-layer body). On a shared machine the load drifts, so the layers are timed again just before each
   link's rows (not with --measure-once); with --rounds K every link is measured and predicted K times and the
   table shows, per row, the round with the median measured speed (every round is in the JSON).
2. For each link, `bench llm`'s cached split rows (`--method cache`, the product's normal mode) are measured at the
   given device layer counts (halved between head and tail, as `bench llm --local-layers` does), each against its
   own `lambdasplit serve` behind the emulated link.
3. Each row's tokens/s is predicted by the planner from step 1's inputs and the link's nominal RTT and rates,
   and compared: error = predicted / measured - 1. The goal is within ±20%.

Prints a markdown table (and writes it with --markdown) and every figure as JSON (--json). Emulated links need
root; a link that cannot be emulated here is listed as skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from lambdasplit.bench.links import parse_link
from lambdasplit.bench.llm import PAPER_PROMPT, TableConfig, run_table
from lambdasplit.bench.plan import Costs, Workload, predict
from lambdasplit.bench.planner import link_spec
from lambdasplit.bench.profile import (
    device_parameter_bytes,
    frame_bytes,
    kv_cache_bytes,
    measure_costs,
    measure_overhead,
)
from lambdasplit.config import SplitPoints
from lambdasplit.generation.text import encode_prompt
from lambdasplit.models import DEFAULT_MODEL
from lambdasplit.models.checkpoint import Checkpoint
from lambdasplit.models.resolve import resolve_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--links", default="loopback,5g,wireless", help="comma-separated bench links")
    parser.add_argument("--local-layers", default="2,8,16", help="device layer counts, halved between head and tail")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device-threads", type=int, default=1)
    parser.add_argument("--cloud-threads", type=int, default=None, help="default: torch's (the server's default)")
    parser.add_argument("--wire-dtype", default="float16")
    parser.add_argument("--repeats", type=int, default=48, help="decode steps timed per side (median)")
    parser.add_argument("--rounds", type=int, default=1, help="measure and predict each link this often; the median")
    parser.add_argument("--measure-once", action="store_true", help="time the layers once, not again before each link")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    started = time.time()

    path = resolve_checkpoint(args.model, quiet=True)
    config = Checkpoint(path).config
    n, hidden = int(config.num_hidden_layers), int(config.hidden_size)
    prompt_tokens = len(encode_prompt(AutoTokenizer.from_pretrained(path), PAPER_PROMPT, chat=True))
    workload = Workload(prompt_tokens, args.new_tokens)
    server_threads = args.cloud_threads or torch.get_num_threads()  # what `serve` gets without --threads

    print("measuring the layers...", flush=True)

    def measure() -> Costs:
        return measure_costs(
            path, workload, device_threads=args.device_threads, server_threads=server_threads, repeats=args.repeats
        )

    costs = measure()
    print("measuring the protocol's overhead on loopback...", flush=True)
    overhead = measure_overhead(
        args.model,
        workload,
        wire_dtype=args.wire_dtype,
        device_threads=args.device_threads,
        server_threads=args.cloud_threads,
    )
    costs = dataclasses.replace(costs, overhead_ms=overhead, overhead_source="measured here on loopback")
    print(f"device {costs.device}\nserver {costs.server}\noverhead {overhead:.2f} ms", flush=True)

    local_layers = tuple(int(x) for x in args.local_layers.split(","))
    links = [parse_link(x) for x in args.links.split(",")]
    table = TableConfig(
        model=args.model,
        new_tokens=args.new_tokens,
        local_layers=local_layers,
        methods=("cache",),
        wire_dtype=args.wire_dtype,
        device_threads=args.device_threads,
        cloud_threads=args.cloud_threads,
    )
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    per_link: dict[str, dict[str, Any]] = {}
    runs = [(link, r) for link in links for r in range(args.rounds)]
    for i, (link, round_) in enumerate(runs):
        if i > 0 and not args.measure_once:  # the load of a shared machine drifts: measure again, just before
            print("measuring the layers again...", flush=True)
            costs = dataclasses.replace(measure(), overhead_ms=overhead, overhead_source="measured here on loopback")
        per_link[f"{link.name} round {round_ + 1}"] = dataclasses.asdict(costs)
        print(f"bench llm on {link.name} (round {round_ + 1} of {args.rounds})...", flush=True)
        measured = run_table(table, [link])
        skipped |= measured.skipped
        for row in measured.rows:
            assert row.layers is not None
            points = SplitPoints(row.layers[0], row.layers[1], n)
            cand = predict(
                costs,
                link_spec(link),
                workload,
                num_layers=n,
                head_layers=points.head_layers,
                tail_layers=points.tail_layers,
                up_bytes=frame_bytes(hidden, args.wire_dtype)[0],
                down_bytes=frame_bytes(hidden, args.wire_dtype)[1],
                prefill_up_bytes=frame_bytes(hidden, args.wire_dtype, prompt_tokens)[0],
                prefill_down_bytes=frame_bytes(hidden, args.wire_dtype, prompt_tokens)[1],
                device_memory_bytes=device_parameter_bytes(path, points.head_layers, points.body_end)
                + kv_cache_bytes(config, points.head_layers + points.tail_layers, prompt_tokens + args.new_tokens),
            )
            rows.append(
                {
                    "link": link.name,
                    "round": round_ + 1,
                    "layers": str(points),
                    "local_cloud": row.ratio,
                    "predicted_tokens_per_second": cand.tokens_per_second,
                    "measured_tokens_per_second": row.tokens_per_second,
                    "error": cand.tokens_per_second / row.tokens_per_second - 1,
                    "predicted_seconds": workload.new_tokens / cand.tokens_per_second,
                    "measured_seconds": row.total_s,
                    "predicted_step_ms": cand.step_ms,
                    "predicted_device_ms": cand.device_ms,
                    "predicted_server_ms": cand.server_ms,
                    "predicted_link_ms": cand.link_ms,
                    "predicted_prefill_ms": cand.prefill_ms,
                    "measured_step_bytes": [row.step_client_up, row.step_client_down],
                    "predicted_step_bytes": [cand.up_bytes_per_token, cand.down_bytes_per_token],
                    "measured_local_s": row.local_s,
                    "measured_cloud_s": row.cloud_s,
                    "measured_communication_s": row.communication_s,
                }
            )
            print(f"  {rows[-1]['layers']}: predicted {cand.tokens_per_second:.2f}, measured "
                  f"{row.tokens_per_second:.2f} tokens/s ({rows[-1]['error']:+.1%})", flush=True)  # fmt: skip

    summary = median_rounds(rows)
    machine = {
        "platform": platform.platform(),
        "cpus": __import__("os").cpu_count(),
        "torch": torch.__version__,
        "device_threads": args.device_threads,
        "server_threads": server_threads,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": list(__import__("os").getloadavg()),
        "seconds": round(time.time() - started, 1),
    }
    text = markdown(summary, skipped, machine, args)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        out = {
            "settings": vars(args) | {"json": str(args.json), "markdown": str(args.markdown)},
            "workload": dataclasses.asdict(workload),
            "costs": per_link,
            "machine": machine,
            "skipped": skipped,
            "rows": summary,
            "all_rounds": rows,
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")


def median_rounds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per link and split, the round whose measured tokens/s is the median (the lower one of an even count), whole:
    a load spike on a shared machine moves one round, not the row."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["link"], r["layers"]), []).append(r)
    picked = []
    for group in groups.values():
        ranked = sorted(group, key=lambda r: r["measured_tokens_per_second"])
        picked.append(ranked[(len(ranked) - 1) // 2])
    return picked


def markdown(rows: list[dict[str, Any]], skipped: dict[str, str], machine: dict[str, Any], args: Any) -> str:
    lines = [
        "| Link | --layers | Local:Cloud | Predicted tok/s | Measured tok/s | Error | Predicted s | Measured s "
        "| ms per token, predicted: device + server + link | measured: local + cloud + comm. |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    n = args.new_tokens
    for r in rows:
        lines.append(
            f"| {r['link']} | {r['layers']} | {r['local_cloud']} | {r['predicted_tokens_per_second']:.2f} | "
            f"{r['measured_tokens_per_second']:.2f} | {r['error']:+.1%} | {r['predicted_seconds']:.2f} | "
            f"{r['measured_seconds']:.2f} | {r['predicted_device_ms']:.0f} + {r['predicted_server_ms']:.0f} + "
            f"{r['predicted_link_ms']:.0f} | {1e3 * r['measured_local_s'] / n:.0f} + "
            f"{1e3 * r['measured_cloud_s'] / n:.0f} + {1e3 * r['measured_communication_s'] / n:.0f} |"
        )
    worst = max((abs(r["error"]) for r in rows), default=0.0)
    lines.append("")
    lines.append(
        f"{len(rows)} rows, largest error {worst:.1%}; median of {args.rounds} round(s); {args.new_tokens} new tokens, "
        f"device threads "
        f"{machine['device_threads']}, server threads {machine['server_threads']}; {machine['platform']}, "
        f"{machine['cpus']} CPUs, torch {machine['torch']}; {machine['date']}, load average at the end "
        f"{', '.join(f'{x:.2f}' for x in machine['load_average'])}; {machine['seconds']:.0f} s in all."
    )
    lines.append(
        "Measured ms per token are the row's totals over its tokens (the prompt's share included); predicted are one "
        "decode step's."
    )
    for name, why in skipped.items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
