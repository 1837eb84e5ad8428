"""Merge audit reports run as parallel parts into one JSON and one markdown table (docs/threat-model.md).

    python scripts/merge_audit.py a.json b.json c.json --json docs/audit/smollm2.json --markdown merged.md

Rows keep the order of the files given; the settings are the first part's, with the union of their head
and tail layers; ``seconds`` is the sum of the parts' (one-thread time when they ran side by side) and
``parts`` lists each part's layers and seconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lambdasplit.audit.report import markdown
from lambdasplit.audit.rows import AuditReport, AuditRow


def merge(parts: list[dict]) -> tuple[AuditReport, list[dict]]:
    settings = dict(parts[0]["settings"])
    for key in ("head_layers", "tail_layers"):
        settings[key] = sorted({x for p in parts for x in p["settings"][key]})
    rows = [AuditRow(**r) for p in parts for r in p["rows"]]
    report = AuditReport(settings=settings, rows=rows, seconds=sum(p["seconds"] for p in parts))
    listed = [{k: p["settings"][k] for k in ("head_layers", "tail_layers")} | {"seconds": p["seconds"]} for p in parts]
    return report, listed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="+", type=Path, help="JSON reports of `lambdasplit audit --json`")
    parser.add_argument("--json", type=Path, required=True, help="the merged report")
    parser.add_argument("--markdown", type=Path, help="the merged tables")
    args = parser.parse_args()
    report, listed = merge([json.loads(p.read_text()) for p in args.parts])
    args.json.write_text(json.dumps(report.to_dict() | {"parts": listed}, indent=1) + "\n")
    if args.markdown is not None:
        args.markdown.write_text(markdown(report))
    print(f"{len(report.rows)} rows from {len(args.parts)} parts -> {args.json}")


if __name__ == "__main__":
    main()
