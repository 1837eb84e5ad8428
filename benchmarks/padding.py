"""What padding the prefill costs (``PaddedLink``): bytes and prefill time against the prompt's length.

    python benchmarks/padding.py [--model smollm2-135m-instruct] [--layers 2:28] [--multiples 32 64]
                                 [--lengths 9 23 41 63 90] [--repeats 3] [--json out.json]

A body server on 127.0.0.1 (float16 wire); for each prompt length (tokens of a fixed public sentence,
repeated and cut) and each multiple, the best of ``--repeats`` prefills and the bytes sent for the prompt plus
16 greedy tokens. Tokens are checked equal to the unpadded run's.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json

from rich.console import Console
from rich.table import Table

from lambdasplit.client import connect_device
from lambdasplit.generation import generate
from lambdasplit.privacy.padding import PaddedLink
from lambdasplit.server.process import body_server_process

TEXT = "The quick brown fox jumps over the lazy dog while the lighthouse keeper watches the storm. " * 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layers", default="2:28")
    ap.add_argument("--multiples", nargs="+", type=int, default=[32, 64])
    ap.add_argument("--lengths", nargs="+", type=int, default=[9, 23, 41, 63, 90])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    rows = []
    with body_server_process(["--model", args.model, "--layers", args.layers]) as url:
        split, client = connect_device(url, args.model, quiet=True)
        assert split.tokenizer is not None
        ids = split.tokenizer(TEXT)["input_ids"]
        with client:
            for length in args.lengths:
                prompt = ids[:length]
                base = None
                for multiple in [None, *args.multiples]:
                    best, up, tokens = float("inf"), 0, None
                    for _ in range(args.repeats):
                        session = client.open_session("float16")
                        link = PaddedLink(session, multiple) if multiple else session
                        r = generate(split, prompt, max_new_tokens=16, ignore_eos=True, link=link)
                        link.close()
                        best, up, tokens = min(best, r.prefill_seconds), r.traffic.up_bytes, r.token_ids
                    base = base or (best, up, tokens)
                    rows.append(
                        {
                            "prompt_tokens": length,
                            "multiple": multiple,
                            "sent_rows": -(-length // multiple) * multiple if multiple else length,
                            "prefill_ms": round(best * 1000, 1),
                            "prefill_x": round(best / base[0], 2),
                            "up_bytes": up,
                            "up_x": round(up / base[1], 2),
                            "tokens_equal": tokens == base[2],
                        }
                    )
    table = Table(title=f"{args.model} {args.layers}: padding the prefill (best of {args.repeats})")
    for col in rows[0]:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console(width=140).print(table)
    print(json.dumps(rows))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
