"""Show an audit: a rich table per side for the terminal, markdown for docs/threat-model.md, JSON for machines."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from lambdasplit.audit.rows import AuditReport, AuditRow

_COLUMNS = (
    "split",
    "defence",
    "attacker",
    "attack",
    "tokens",
    "user",
    "ROUGE-L",
    "exact",
    "secrets",
    "key",
    "ppl x",
    "greedy =",
    "s",
)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _split(row: AuditRow, side: str) -> str:
    return f"X={row.head_layers}" if side == "prompt" else f"tail {row.tail_layers}"


def cells(row: AuditRow) -> list[str]:
    attack = row.attack + (f" (dCor {row.dcor:.3f})" if row.dcor is not None else "")
    return [
        _split(row, row.side),
        row.defence,
        row.attacker,
        attack + (f" [{row.note}]" if row.note else ""),
        _pct(row.token_accuracy),
        _pct(row.user_accuracy),
        _num(row.rouge_l, ".3f"),
        _pct(row.exact_rate),
        _pct(row.secret_rate),
        _pct(row.key_accuracy),
        _num(row.perplexity_ratio, ".3f"),
        _pct(row.greedy_agreement),
        _num(row.seconds, ".1f"),
    ]


def _sides(report: AuditReport) -> list[tuple[str, list[AuditRow]]]:
    out = []
    for side, title in (("prompt", "prompt side (uplink)"), ("output", "output side (downlink, fed-back uplink)")):
        rows = [r for r in report.rows if r.side == side]
        if rows:
            out.append((title, rows))
    return out


def rich_tables(report: AuditReport) -> list[Table]:
    tables = []
    for title, rows in _sides(report):
        table = Table(title=title, title_justify="left")
        for name in _COLUMNS:
            table.add_column(name, justify="left" if name in ("split", "defence", "attacker", "attack") else "right")
        for row in rows:
            table.add_row(*cells(row))
        tables.append(table)
    return tables


def markdown(report: AuditReport) -> str:
    """The tables as markdown, with what was run above them."""
    s = report.settings
    lines = [
        f"Model `{s['model']}`, {len(s['prompts'])} prompts with planted secrets, {s['max_new_tokens']} generated "
        f"tokens each (greedy; B3: sampled at T={s['sample_temperature']}), inverter trained on "
        f"{s['inverter_tokens']:,} public tokens, seed {s['seed']}; {report.seconds / 60:.1f} min on this machine.",
        "",
        "Columns: tokens = token accuracy (pooled); user = token accuracy over the user's own tokens (prompt side: "
        "the user's message without the chat template and system prompt; output side: all generated tokens); "
        "ROUGE-L (token LCS F1, mean); exact = prompts (or outputs) "
        "recovered whole; secrets = planted secrets found in the decoded recovery; key = hidden dimensions "
        "mapped right by A4; ppl x = perplexity through the split / plain split; greedy = = greedy agreement "
        "with the unsplit model; s = attack seconds.",
    ]
    for title, rows in _sides(report):
        lines += ["", f"#### {title[0].upper()}{title[1:]}", ""]
        lines.append("| " + " | ".join(_COLUMNS) + " |")
        lines.append("|" + "---|" * len(_COLUMNS))
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write(report: AuditReport, json_path: Path | None, markdown_path: Path | None) -> None:
    if json_path is not None:
        json_path.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    if markdown_path is not None:
        markdown_path.write_text(markdown(report))
