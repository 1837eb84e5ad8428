"""Latency against generated tokens for both bundle layouts, over emulated links: what STIP's logits cost.

    python benchmarks/stip_layouts.py [--model smollm2-135m-instruct] [--tokens 64] [--links 100/100/10 wireless]
                                      [--wire-dtype float16] [--threads 1] [--json out.json]

Packages the model twice (``developer package``: head/tail at 2:28, and STIP's layout, every layer in the cloud),
then for each link (``lambdasplit.bench.links``: the server in its own network namespace behind a paced, delayed
path; root and ``ip netns`` needed) and each layout serves the server bundle there, connects a device with the
user bundle and generates ``--tokens`` greedy tokens of one chat prompt, recording when each token arrived.
Per row: prefill time, time to token 1, 16, 32, ..., the mean per-token time after the first, and the bytes each
way per decode step, and the link's share of a step (the round trip: frames, the link and the body's compute).
Device and server each use ``--threads`` torch threads (one each: on two cores they do not fight). The tokens
of the two layouts are compared (float16 logits on the wire can break a near tie differently).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lambdasplit.bench.links import open_link, parse_link
from lambdasplit.client import CloudClient, connect_device
from lambdasplit.developer import package
from lambdasplit.generation import SamplingParams, stream
from lambdasplit.server.process import body_server_process
from lambdasplit.split import SplitModel
from lambdasplit.tls import TlsTrust

PROMPT = "Explain in a few sentences why the sky is blue."
LAYOUTS = {"head-tail": "2:-2", "stip": None}


def run(
    model: str, links: list[str], tokens: int, wire_dtype: str, threads: int, folder: Path
) -> list[dict[str, object]]:
    console = Console(stderr=True)
    bundles = {}
    for layout, layers in LAYOUTS.items():
        console.print(f"packaging {model} ({layout})")
        report = package(model, layers, folder / layout / "server", folder / layout / "users", layout=layout, seed=1)
        bundles[layout] = (report.server_out, report.user_out["g0"])
    rows: list[dict[str, object]] = []
    for spec in links:
        link = parse_link(spec)
        with open_link(link) as ends:
            for layout, (server, user) in bundles.items():
                console.print(f"{link.name}: {layout}")
                argv = ["--model", str(server), "--host", ends.cloud_host, "--insecure", "--threads", str(threads)]
                with body_server_process(argv, timeout=300, wrap=ends.cloud_command) as url:
                    split, client = connect_device(url, user, quiet=True, trust=TlsTrust(insecure=True))
                    with client:
                        rows.append(_measure(split, client, link.name, layout, tokens, wire_dtype))
    return rows


def _measure(
    split: SplitModel, client: CloudClient, link: str, layout: str, tokens: int, wire_dtype: str
) -> dict[str, object]:
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    session = client.open_session(wire_dtype)
    start = time.perf_counter()
    arrived: list[float] = []
    ids: list[int] = []
    after_prompt = (0, 0, 0, 0.0)
    for event in stream(split, PROMPT, chat=True, link=session, params=params):
        if event.token_id is not None:
            arrived.append(time.perf_counter() - start)
            ids.append(event.token_id)
            if len(ids) == 1:  # the prompt's round trip is done; every later message is one decode step
                t = session.traffic
                after_prompt = (t.up_bytes, t.down_bytes, t.messages, t.seconds)
    traffic = session.traffic
    session.close()
    steps = max(traffic.messages - after_prompt[2], 1)
    marks = [k for k in (1, 16, 32, 64, 128, 256) if k <= len(arrived)]
    return {
        "link": link,
        "layout": layout,
        "tokens": len(ids),
        "token_ids": ids,
        "first_token_s": round(arrived[0], 4),
        "time_to_token_s": {str(k): round(arrived[k - 1], 4) for k in marks},
        "per_token_ms": round(1000 * (arrived[-1] - arrived[0]) / max(len(arrived) - 1, 1), 2),
        "link_ms_per_step": round(1000 * (traffic.seconds - after_prompt[3]) / steps, 2),
        "up_bytes_per_step": round((traffic.up_bytes - after_prompt[0]) / steps),
        "down_bytes_per_step": round((traffic.down_bytes - after_prompt[1]) / steps),
        "total_bytes": traffic.up_bytes + traffic.down_bytes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--links", nargs="+", default=["100/100/10", "wireless"])
    ap.add_argument("--wire-dtype", default="float16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="stip-layouts-") as tmp:
        rows = run(args.model, args.links, args.tokens, args.wire_dtype, args.threads, Path(tmp))
    table = Table(title=f"{args.model}, {args.tokens} greedy tokens, {args.wire_dtype} wire")
    columns = ("link", "layout", "first token s", "time to token k (s)", "ms/token", "link ms/step", "up B/step")
    for column in (*columns, "down B/step"):
        table.add_column(column)
    for r in rows:
        marks = ", ".join(f"{k}: {v}" for k, v in r["time_to_token_s"].items())  # type: ignore[union-attr]
        table.add_row(
            str(r["link"]),
            str(r["layout"]),
            str(r["first_token_s"]),
            marks,
            str(r["per_token_ms"]),
            str(r["link_ms_per_step"]),
            str(r["up_bytes_per_step"]),
            str(r["down_bytes_per_step"]),
        )
    Console(width=200).print(table)
    by_link: dict[str, dict[str, list[int]]] = {}
    for r in rows:
        by_link.setdefault(str(r["link"]), {})[str(r["layout"])] = r["token_ids"]  # type: ignore[assignment]
    for link, ids in by_link.items():
        same = sum(a == b for a, b in zip(ids["head-tail"], ids["stip"], strict=False))
        print(f"{link}: the layouts agree on {same} of {len(ids['stip'])} tokens")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
