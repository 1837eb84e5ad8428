"""SmolLM2's body on secret shares, end to end: greedy agreement with the plain split, perplexity, cost per token.

    PYTHONPATH=src nice -n 10 python benchmarks/mpc_body.py [--layers 2:28] [--prompts 8] [--new-tokens 64]
        [--ppl-tokens 64] [--wide] [--json out.json]

The device's head and tail run in plaintext (``load_split``); only the body runs on shares, both parties and the
device's dealer in one process (``mpc.body.TwoPartyBody``: threads and queues, no network). For each prompt (the
audit's six private requests and two public questions, in the chat template) it decodes ``--new-tokens`` greedy
tokens twice, through the plain body and through the shared one, and reports the share of positions whose tokens
agree and where they first differ. Along the shared run the plain body runs on the same inputs, so the body's
own error (max |shared - plain| of its output, at position 0 and elsewhere) is measured without the drift of
diverging texts. Perplexity: one window of ``--ppl-tokens`` tokens of held-out public text
(``audit.corpus.token_stream``), prefilled through both. Cost per decode step (party 0's counter; party 1's is
the same by symmetry): seconds, rounds, bytes sent to the peer, bytes the device deals party 1 (party 0 draws its own),
forwards redone (wide) because their output was out of range (a truncation wrap, a row beyond its norm plan).
Prints progress, a table, and JSON with ``--json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from lambdasplit.audit.corpus import token_stream
from lambdasplit.audit.prompts import DEFAULT_PROMPTS
from lambdasplit.mpc.body import BodyWeights, TwoPartyBody
from lambdasplit.split import SplitModel, load_split

PUBLIC_PROMPTS = (
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for learning to play the guitar.",
)


def prompt_ids(split: SplitModel, count: int) -> list[torch.Tensor]:
    assert split.tokenizer is not None
    texts = [p.text for p in DEFAULT_PROMPTS] + list(PUBLIC_PROMPTS)
    out = []
    for text in texts[:count]:
        ids = split.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=False
        )
        out.append(torch.tensor([list(ids)]))
    return out


def plain_greedy(split: SplitModel, ids: torch.Tensor, new_tokens: int) -> list[int]:
    assert split.head is not None and split.body is not None and split.tail is not None
    caches = split.head.new_cache(), split.body.new_cache(), split.tail.new_cache()
    tokens: list[int] = []
    x = ids
    for _ in range(new_tokens):
        logits = split.tail(split.body(split.head(x, caches[0]), caches[1]), caches[2])
        tokens.append(int(logits[0, -1].argmax()))
        x = torch.tensor([[tokens[-1]]])
    return tokens


def shared_greedy(
    split: SplitModel, shared: TwoPartyBody, ids: torch.Tensor, new_tokens: int, session: str
) -> dict[str, Any]:
    """Greedy decoding through the shared body, the plain body alongside on the same inputs; per-step costs."""
    assert split.head is not None and split.body is not None and split.tail is not None
    head_cache, plain_cache, tail_cache = split.head.new_cache(), split.body.new_cache(), split.tail.new_cache()
    tokens: list[int] = []
    steps: list[dict[str, float]] = []
    err0, err_rest, scale_rest = 0.0, 0.0, 0.0
    x, position = ids, 0
    for _ in range(new_tokens):
        hidden = split.head(x, head_cache)
        before = [c.snapshot() for c in shared.counters]
        start = time.perf_counter()
        out = shared.forward(hidden, position, session)
        seconds = time.perf_counter() - start
        p0, p1 = (c.since(b) for c, b in zip(shared.counters, before, strict=True))
        steps.append(
            {"rows": x.shape[1], "seconds": seconds, "rounds": p0.rounds, "sent0": p0.sent, "sent1": p1.sent,
             "dealt0": p0.dealt, "dealt1": p1.dealt}
        )  # fmt: skip
        ref = split.body(hidden, plain_cache)
        diff = (out - ref).abs()
        if position == 0:
            err0 = max(err0, diff[0, 0].max().item())
            diff, ref = diff[:, 1:], ref[:, 1:]
        if diff.numel():
            err_rest = max(err_rest, diff.max().item())
            scale_rest = max(scale_rest, ref.abs().max().item())
        logits = split.tail(out, tail_cache)
        tokens.append(int(logits[0, -1].argmax()))
        position += x.shape[1]
        x = torch.tensor([[tokens[-1]]])
    shared.bodies[0].close(session), shared.bodies[1].close(session)
    return {"tokens": tokens, "steps": steps, "err_pos0": err0, "err_rest": err_rest, "max_abs_rest": scale_rest}


def perplexities(split: SplitModel, shared: TwoPartyBody, length: int) -> dict[str, Any]:
    assert split.head is not None and split.body is not None and split.tail is not None
    assert split.tokenizer is not None
    ids = token_stream(split.tokenizer, length, split="heldout")[None]
    hidden = split.head(ids)
    start = time.perf_counter()
    out = shared.forward(hidden, 0, "ppl")
    seconds = time.perf_counter() - start
    shared.bodies[0].close("ppl"), shared.bodies[1].close("ppl")
    result: dict[str, Any] = {"tokens": length, "prefill_seconds": seconds}
    for name, body_out in (("plain", split.body(hidden)), ("shared", out)):
        logits = split.tail(body_out, logits_to_keep=length)[0, :-1].double()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
        result[name] = math.exp(nll.item())
    result["change"] = result["shared"] / result["plain"] - 1
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="2:28")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--ppl-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wide", action="store_true", help="every forward's norms fit any row (SharedOps.wide)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    torch.set_num_threads(1)  # one core per party thread
    split = load_split("smollm2-135m-instruct", args.layers, device="cpu", dtype="float32", quiet=True)
    assert split.body is not None and split.body.model is not None
    shared = TwoPartyBody(BodyWeights.from_hf(split.body.model), seed=args.seed, wide=args.wide)
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        ppl = perplexities(split, shared, args.ppl_tokens) if args.ppl_tokens > 1 else None
        if ppl is not None:
            print(f"perplexity over {args.ppl_tokens} tokens: plain {ppl['plain']:.4f}, shared {ppl['shared']:.4f} "
                  f"({100 * ppl['change']:+.3f}%), prefill {ppl['prefill_seconds']:.1f} s", flush=True)  # fmt: skip
        for i, ids in enumerate(prompt_ids(split, args.prompts)):
            plain = plain_greedy(split, ids, args.new_tokens)
            retries = shared.retries
            run = shared_greedy(split, shared, ids, args.new_tokens, f"prompt-{i}")
            same = sum(a == b for a, b in zip(plain, run["tokens"], strict=True))
            first = next((j for j, (a, b) in enumerate(zip(plain, run["tokens"], strict=True)) if a != b), None)
            decode = run["steps"][1:]
            row = {
                "prompt": i,
                "prompt_tokens": ids.shape[1],
                "agree": same / len(plain),
                "first_difference": first,
                "retries": shared.retries - retries,  # forwards redone wide: output out of range (body.computed_again)
                "err_pos0": run["err_pos0"],
                "err_rest": run["err_rest"],
                "max_abs_rest": run["max_abs_rest"],
                "prefill": run["steps"][0],
                "decode_per_token": {k: sum(s[k] for s in decode) / max(len(decode), 1) for k in decode[0]}
                if decode
                else None,
                "plain_tokens": plain,
                "shared_tokens": run["tokens"],
            }
            rows.append(row)
            per = row["decode_per_token"] or {}
            print(f"prompt {i}: {ids.shape[1]} tokens, agree {100 * row['agree']:.1f}% (first difference at "
                  f"{first}), body err pos0 {run['err_pos0']:.3g} rest {run['err_rest']:.3g}, "
                  f"retries {row['retries']}, {per.get('seconds', math.nan):.2f} s/token", flush=True)  # fmt: skip

    table = Table(title=f"SmolLM2 body {args.layers} on shares: {len(rows)} prompts x {args.new_tokens} new tokens")
    columns = (
        "prompt",
        "agree",
        "1st diff",
        "err pos 0",
        "err pos>0",
        "s/token",
        "rounds",
        "sent B",
        "dealt B",
        "retries",
    )
    for col in columns:
        table.add_column(col, justify="right")
    for r in rows:
        per = r["decode_per_token"] or {}
        table.add_row(
            str(r["prompt"]), f"{100 * r['agree']:.1f}%", str(r["first_difference"]), f"{r['err_pos0']:.3g}",
            f"{r['err_rest']:.3g}", f"{per.get('seconds', math.nan):.2f}", f"{per.get('rounds', 0):.0f}",
            f"{per.get('sent0', 0):,.0f}", f"{per.get('dealt1', 0):,.0f}", str(r["retries"]),
        )  # fmt: skip
    Console(width=140).print(table)
    agree = sum(r["agree"] for r in rows) / max(len(rows), 1)
    print(f"tokens agreeing over all prompts: {100 * agree:.1f}%")
    if args.json:
        args.json.write_text(json.dumps({"layers": args.layers, "perplexity": ppl, "agree": agree, "prompts": rows},
                                        indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
