"""scripts/merge_audit.py: audit parts run side by side become one report, rows in the order given."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from lambdasplit.audit.rows import AuditRow

SCRIPT = Path(__file__).parent.parent / "scripts" / "merge_audit.py"


def part(head: list[int], tail: list[int], seconds: float, attack: str) -> dict:
    row = AuditRow("none", "eavesdropper = cloud", "prompt", attack, token_accuracy=1.0, head_layers=head[0])
    settings = {"model": "m", "head_layers": head, "tail_layers": tail, "prompts": [{"text": "p", "secret": None}],
                "max_new_tokens": 4, "sample_temperature": 0.8, "inverter_tokens": 0, "seed": 0}  # fmt: skip
    return {"settings": settings, "seconds": seconds, "rows": [asdict(row)]}


def test_parts_merge_in_order_with_their_layers_and_seconds(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(part([0, 1], [1, 2], 10.0, "first")))
    b.write_text(json.dumps(part([8], [], 5.5, "second")))
    out, md = tmp_path / "m.json", tmp_path / "m.md"
    done = subprocess.run([sys.executable, str(SCRIPT), str(a), str(b), "--json", str(out), "--markdown", str(md)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    merged = json.loads(out.read_text())
    assert [r["attack"] for r in merged["rows"]] == ["first", "second"]
    assert merged["settings"]["head_layers"] == [0, 1, 8] and merged["settings"]["tail_layers"] == [1, 2]
    assert merged["seconds"] == 15.5 and [p["seconds"] for p in merged["parts"]] == [10.0, 5.5]
    assert "| X=0 | none |" in md.read_text() and "| X=8 | none |" in md.read_text()
