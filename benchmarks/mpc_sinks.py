"""Which tokens make an attention sink where the secret-shared body's norm plans do not expect one.

    PYTHONPATH=src python benchmarks/mpc_sinks.py [--sample 1800] [--json out.json]

The shared body's RMSNorm plans follow the position (``mpc.ops.NormPlan``: position 0 takes the sink's, every
other row the rest's, fitted to chat text where rows after position 0 reach a mean square of 987). This puts
each token of a sample of the vocabulary (the first 200 ids, where the special and byte tokens are, and
``--sample`` drawn at random) at three places and runs SmolLM2's own forward (float32, no shares), recording the
largest and smallest mean square any body norm (layers 2-27, both norms) sees at that token's row:

    chat        a user's text in the chat template, right after ``<|im_start|>user\\n`` (position 3)
    raw-second  a raw prompt's second token, after "The" (position 1)
    raw-first   a raw prompt's first token (position 0, where the sink's plan applies)

A token whose row goes beyond the rest's plan at a position > 0 (about 2,500: docs/secret-sharing.md, "Rows
beyond their plan") makes the forward's output blow up, and the device redoes it with wide norms. Prints a table
and, with ``--json``, the figures; docs/secret-sharing.md quotes them.
"""

from __future__ import annotations

import argparse
import json

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer

from lambdasplit.config import Runtime
from lambdasplit.models.resolve import resolve_checkpoint
from lambdasplit.models.unsplit import load_unsplit

BODY = range(2, 28)  # the body's layers at the default split 2:28
REST_LIMIT = 2500.0  # the rest's plan is within 1e-3 up to about this mean square (float simulation)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", type=int, default=1800, help="token ids drawn at random beyond the first 200")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    path = resolve_checkpoint("smollm2-135m-instruct", quiet=True)
    model = load_unsplit(path, Runtime.resolve("cpu", "float32"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    vocab = int(model.config.vocab_size)
    drawn = 200 + torch.randperm(vocab - 200, generator=torch.Generator().manual_seed(args.seed))[: args.sample]
    tokens = torch.cat([torch.arange(200), drawn])

    seen: list[torch.Tensor] = []  # per norm call: the mean square of every row (B, T)

    def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        seen.append(inputs[0].double().pow(2).mean(-1))

    for i in BODY:
        layer = model.model.layers[i]
        layer.input_layernorm.register_forward_pre_hook(record)
        layer.post_attention_layernorm.register_forward_pre_hook(record)

    places = {
        "chat": tokenizer.encode("<|im_start|>user\n"),
        "raw-second": tokenizer.encode("The"),
        "raw-first": [],
    }
    after = tokenizer.encode(" is")
    console = Console(stderr=True)
    report: dict[str, dict[str, object]] = {}
    for place, before in places.items():
        largest = torch.empty(len(tokens), dtype=torch.float64)
        smallest = torch.empty(len(tokens), dtype=torch.float64)
        for start in range(0, len(tokens), args.batch):
            ids = tokens[start : start + args.batch, None]
            rows = len(ids)
            sequence = torch.cat(
                [torch.tensor(before).expand(rows, -1), ids, torch.tensor(after).expand(rows, -1)], 1
            ).long()
            seen.clear()
            with torch.no_grad():
                model.model(sequence)  # the base model: the LM head is not needed
            at = torch.stack([ms[:, len(before)] for ms in seen])  # (norm calls, rows)
            largest[start : start + rows], smallest[start : start + rows] = at.amax(0), at.amin(0)
            console.print(f"{place}: {start + rows}/{len(tokens)} tokens", highlight=False)
        order = largest.argsort(descending=True)
        beyond = [int(tokens[i]) for i in order if largest[i] > REST_LIMIT]
        others = largest[largest <= REST_LIMIT]
        report[place] = {
            "position": len(before),
            "largest": [(int(tokens[i]), tokenizer.decode([int(tokens[i])]), float(largest[i])) for i in order[:5]],
            "largest_within_rest_plan": float(others.max()) if len(others) else None,
            "beyond_rest_plan": [(t, tokenizer.decode([t])) for t in beyond[:20]],
            "beyond_count": len(beyond),
            "between_987_and_6300": int(((largest > 987) & (largest < 6300)).sum()),
            "smallest": float(smallest.min()),
        }

    table = Table(title=f"SmolLM2-135M body norms, {len(tokens)} tokens at each place")
    columns = ("place", "position", "largest mean square", f"tokens over {REST_LIMIT:,.0f}", "987-6,300", "smallest")
    for column in columns:
        table.add_column(column)
    for place, r in report.items():
        top = r["largest"][0]  # type: ignore[index]
        table.add_row(
            place,
            str(r["position"]),
            f"{top[2]:.3g} ({top[1]!r}); otherwise {r['largest_within_rest_plan']:.0f}"
            if r["largest_within_rest_plan"] is not None
            else f"{top[2]:.3g}",
            f"{r['beyond_count']}: " + ", ".join(repr(text) for _, text in r["beyond_rest_plan"][:4]),  # type: ignore[index]
            str(r["between_987_and_6300"]),
            f"{r['smallest']:.3g}",
        )
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": len(tokens), "seed": args.seed, "places": report}, f, indent=1)


if __name__ == "__main__":
    main()
