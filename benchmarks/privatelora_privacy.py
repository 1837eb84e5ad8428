"""What a PrivateLoRA cloud can read: the audit's attacks on its traffic, and its private M fitted by least squares.

    PYTHONPATH=src python benchmarks/privatelora_privacy.py [--adapters artifacts/privatelora-facts.safetensors]
        [--people 12 --relations 4 --seed 0] [--new-tokens 24] [--json out.json]

A PrivateLoRA deployment of SmolLM2 in the paper's layout (X = 0: the embedding on the device, all 30 layers in
the cloud, q/k/v adapted) serves the audit's six private prompts over a real loopback connection. The server
keeps what it holds (``AdapterServer(tap=...)``): every body input and output row and every exchange's ``u``
(which it computes) and ``v`` (which the device returns). With ``--adapters`` (the trained M of
``benchmarks/privatelora_facts.py --save``) the device runs the personalised model; without, a random M.

1. **The audit's attacks on the states the cloud receives**: A1 exact matching on the uplink (prompt tokens),
   B1 tail replay on the downlink (output tokens: the device's tail is public SmolLM2's norm and LM head).
2. **M from the traffic**: for each adapted projection, ``M_hat = lstsq(U[:T], V[:T])`` over the first T
   exchanged rows, against M: relative error by T.
3. **The cloud runs the personalised model**: with ``--adapters``, ``M_hat`` (all rows) merged into its own copy
   of the public model recalls the private facts as the device does (teacher-forced, ``privatelora.facts``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from lambdasplit.audit.attacks.exact_matching import exact_matching
from lambdasplit.audit.attacks.tail_replay import tail_replay
from lambdasplit.audit.prompts import DEFAULT_PROMPTS
from lambdasplit.privacy.intercept import intercept
from lambdasplit.privatelora import AdapterLayout, AdapterLink, AdapterServer, PrivateAdapters, merge_into
from lambdasplit.privatelora.facts import make_facts, recall
from lambdasplit.split import load_split

console = Console(stderr=True)
ROWS = (4, 8, 16, 24, 31, 32, 33, 48, 64, 128, 256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=Path)
    parser.add_argument("--people", type=int, default=12)
    parser.add_argument("--relations", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    device = load_split(layers="0:", parts=("head", "tail"), device="cpu", dtype="float32", quiet=True)
    cloud = load_split(layers="0:", parts=("body",), device="cpu", dtype="float32", quiet=True)
    public = load_split(layers="0:", device="cpu", dtype="float32", quiet=True)  # the attacker's public copy
    if args.adapters:
        adapters = PrivateAdapters.load(args.adapters)
    else:
        adapters = PrivateAdapters(AdapterLayout(seed=args.seed), range(30))
        with torch.no_grad():
            for p in adapters.parameters():
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(args.seed))
    layout = adapters.layout
    seen: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)

    def tap(layer: int, group: int, u: torch.Tensor, v: torch.Tensor) -> None:
        for i, target in enumerate(layout.groups()[group]):  # u (n, 1, T, r_c2d), v (n, 1, T, r_d2c)
            seen[(layer, target)].append((u[i, 0].float().clone(), v[i, 0].float().clone()))

    with AdapterServer(cloud, layout, timeout=120, tap=tap) as server:
        intercepts = []
        for prompt in DEFAULT_PROMPTS:  # one session per conversation: generation closes its link
            console.print(f"generating for: {prompt.text[:60]}")
            link = AdapterLink(server.url, adapters)
            item = intercept(device, prompt.text, chat=True, link=link, max_new_tokens=args.new_tokens)
            intercepts.append(item)
    console.print("running A1 (prompt) and B1 (output) on the cloud's view")
    a1 = exact_matching(public, intercepts, side="prompt")
    b1 = tail_replay(public, intercepts)

    def share(results: list[Any]) -> tuple[int, int]:
        hits = sum(sum(int(r == t) for r, t in zip(x.recovered, x.target, strict=False)) for x in results)
        return hits, sum(len(x.target) for x in results)

    prompt_hits, prompt_total = share(a1)
    output_hits, output_total = share(b1)

    errors: dict[int, list[float]] = {t: [] for t in ROWS}
    fitted = PrivateAdapters(layout, adapters.layers)
    rows_seen = 0
    for (layer, target), pairs in seen.items():
        u = torch.cat([p[0] for p in pairs])
        v = torch.cat([p[1] for p in pairs])
        rows_seen = u.shape[0]
        m = adapters.matrix(layer, target).detach()
        for t in ROWS:
            if t <= u.shape[0]:
                m_hat = torch.linalg.lstsq(u[:t].double(), v[:t].double()).solution.float()
                errors[t].append(float((m_hat - m).norm() / m.norm().clamp_min(1e-12)))
        with torch.no_grad():
            fitted.matrix(layer, target).copy_(torch.linalg.lstsq(u.double(), v.double()).solution.float())
    curve = {t: {"median": float(torch.tensor(e).median()), "max": max(e)} for t, e in errors.items() if e}
    result: dict[str, Any] = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "prompt_tokens_read": [prompt_hits, prompt_total],
        "output_tokens_read": [output_hits, output_total],
        "rows_seen_per_projection": rows_seen,
        "projections": len(seen),
        "m_relative_error_by_rows": curve,
    }
    if args.adapters:
        facts = make_facts(args.people, args.relations, seed=args.seed)
        assert device.tokenizer is not None
        whole = AutoModelForCausalLM.from_pretrained(device.path, dtype=torch.float32).eval()
        device_model = merge_into(AutoModelForCausalLM.from_pretrained(device.path, dtype=torch.float32), adapters)
        cloud_model = merge_into(whole, fitted)
        with torch.no_grad():
            mine = recall(lambda ids: device_model(ids).logits, device.tokenizer, facts)
            theirs = recall(lambda ids: cloud_model(ids).logits, device.tokenizer, facts)
        result["facts_recalled_by_device"] = [mine.exact, mine.facts]
        result["facts_recalled_by_cloud_with_fitted_m"] = [theirs.exact, theirs.facts]

    table = Table(title="What a PrivateLoRA cloud reads (SmolLM2, X = 0, q/k/v, audit prompts)")
    table.add_column("measurement")
    table.add_column("result", justify="right")
    table.add_row("A1 prompt tokens from the uplink", f"{prompt_hits}/{prompt_total}")
    table.add_row("B1 output tokens from the downlink", f"{output_hits}/{output_total}")
    for t, c in curve.items():
        table.add_row(f"M fitted from {t} rows: relative error median / max", f"{c['median']:.2e} / {c['max']:.2e}")
    if args.adapters:
        table.add_row("private facts recalled by the device", "{}/{}".format(*result["facts_recalled_by_device"]))
        table.add_row(
            "... by the cloud with its fitted M", "{}/{}".format(*result["facts_recalled_by_cloud_with_fitted_m"])
        )
    Console(width=120).print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
