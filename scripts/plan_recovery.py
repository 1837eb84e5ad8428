"""Extract the planner's recovery figures from a recorded audit (docs/audit/smollm2.json) into package data.

    python scripts/plan_recovery.py docs/audit/smollm2.json src/lambdasplit/bench/recovery.json

The planner (``lambdasplit plan``) may not import the audit suite; it reads this JSON instead. For the defence
``none`` (the plain split) it keeps, per head-layer count, the strongest prompt attack (the highest token
accuracy) and, per tail-layer count, the strongest attack on the generated tokens. Splits the audit did not run
stay absent: the planner shows them as not audited.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def strongest(rows: list[dict[str, Any]], side: str, key: str) -> dict[str, dict[str, Any]]:
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["defence"] != "none" or row["side"] != side or row["token_accuracy"] is None:
            continue
        layers = str(row[key])
        if layers not in best or row["token_accuracy"] > best[layers]["token_accuracy"]:
            best[layers] = {"token_accuracy": row["token_accuracy"], "attack": row["attack"]}
    return dict(sorted(best.items(), key=lambda kv: int(kv[0])))


def extract(report: dict[str, Any], source: str) -> dict[str, Any]:
    rows = report["rows"]
    return {
        "model": report["settings"]["model"],
        "source": source,
        "defence": "none",
        "wire_dtype": report["settings"]["wire_dtype"],
        "prompts": len(report["settings"]["prompts"]),
        "prompt_by_head_layers": strongest(rows, "prompt", "head_layers"),
        "output_by_tail_layers": strongest(rows, "output", "tail_layers"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("audit", type=Path, help="a report of `lambdasplit audit --json`")
    parser.add_argument("out", type=Path, help="the planner's recovery JSON")
    args = parser.parse_args()
    data = extract(json.loads(args.audit.read_text()), str(args.audit))
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(
        f"{args.out}: prompt at head layers {list(data['prompt_by_head_layers'])}, "
        f"output at tail layers {list(data['output_by_tail_layers'])}"
    )


if __name__ == "__main__":
    main()
