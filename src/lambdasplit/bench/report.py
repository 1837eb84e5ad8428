"""Show a Table I result: a rich table per link, a markdown table for the docs, a PNG chart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from rich.table import Table

from lambdasplit.bench.llm import Row, TableResult
from lambdasplit.errors import ConfigError

MB = 1e6  # the paper's MB
_SHORT = {"cloud-only": "cloud-only", "no-cache": "no cache", "cache": "cache", "local-only": "local-only"}


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / MB:.3f}"


def _pair(up: int | None, down: int | None) -> str:
    return "-" if up is None or down is None else f"{_mb(up)} / {_mb(down)}"


def _same(row: Row) -> str:
    return {None: "-", True: "yes", False: "no"}[row.same_text_as_local]


def _by_link(result: TableResult) -> Iterator[tuple[str, list[Row]]]:
    for link in result.links:
        rows = [r for r in result.rows if r.link == link.name]
        if rows:
            yield link.name, rows


def _link_title(result: TableResult, name: str) -> str:
    link = next(x for x in result.links if x.name == name)
    if not link.emulated:
        return f"{name} (127.0.0.1, not shaped)"
    up = "unlimited" if link.up_mbit is None else f"{link.up_mbit:g}"
    down = "unlimited" if link.down_mbit is None else f"{link.down_mbit:g}"
    return f"{name} ({up} Mbit/s up, {down} Mbit/s down, {link.rtt_ms:g} ms RTT; netns, veth, delay line)"


COLUMNS = (
    "Method",
    "Local:Cloud",
    "Transmitted",
    "Up MB",
    "Down MB",
    "Total MB",
    "Server socket MB up/down",
    "pcap IP MB up/down",
    "Comm. s",
    "Local s",
    "Cloud s",
    "Total s",
    "tok/s",
    "Drafts accepted",
    "= local text",
)


def _drafts(row: Row) -> str:
    if row.drafter is None or row.tokens_per_step is None:
        return "-"
    rate = "-" if row.acceptance_rate is None else f"{100 * row.acceptance_rate:.0f}%"
    return f"{rate}, {row.tokens_per_step:.2f} tok/step"


def _cells(row: Row) -> list[str]:
    return [
        row.label,
        row.ratio,
        row.transmitted,
        _mb(row.client_up),
        _mb(row.client_down),
        _mb(row.client_up + row.client_down),
        _pair(row.server_up, row.server_down),
        _pair(row.pcap_up, row.pcap_down),
        f"{row.communication_s:.2f}",
        f"{row.local_s:.2f}",
        f"{row.cloud_s:.2f}",
        f"{row.total_s:.2f}",
        f"{row.tokens_per_second:.2f}",
        _drafts(row),
        _same(row),
    ]


def rich_tables(result: TableResult) -> list[Table]:
    tables = []
    c = result.config
    for name, rows in _by_link(result):
        tokens = f"up to {c.new_tokens} new tokens (stops at EOS)" if c.stop_at_eos else f"{c.new_tokens} new tokens"
        title = f"{c.model}: {tokens}, {result.prompt_tokens}-token prompt"
        title += f" — {_link_title(result, name)}"
        table = Table(title=title, title_justify="left")
        for col in COLUMNS:
            table.add_column(col, justify="left" if col in ("Method", "Transmitted") else "right")
        for row in rows:
            table.add_row(*_cells(row))
        tables.append(table)
    return tables


def step_lines(result: TableResult) -> list[str]:
    """Per decode step traffic of the cached rows against their tensor payload (the 3% framing budget)."""
    lines = []
    for row in result.rows:
        if row.method != "cache" or row.drafter or row.step_payload is None or row.step_client_up is None:
            continue
        down = row.step_client_down or 0.0
        line = (
            f"{row.link} {row.ratio}: per decode step {row.step_client_up:.0f} B up / {down:.0f} B down at the socket "
            f"for a {row.step_payload:.0f} B {result.config.wire_dtype} hidden state "
            f"(+{100 * (row.step_client_up / row.step_payload - 1):.1f}% / +{100 * (down / row.step_payload - 1):.1f}%)"
        )
        if row.pcap_up and row.pcap_down and row.client_up and row.client_down:
            up_pct, down_pct = 100 * (row.pcap_up / row.client_up - 1), 100 * (row.pcap_down / row.client_down - 1)
            line += (
                f"; in the pcap the whole request is {row.pcap_up:,} B up / {row.pcap_down:,} B down at IP level, "
                f"+{up_pct:.1f}% / +{down_pct:.1f}% over the socket (IP and TCP headers, ACKs)"
            )
        lines.append(line)
    return lines


def caching_savings(result: TableResult) -> list[str]:
    """How much traffic caching removes against no caching, per link and ratio (measured at the socket)."""
    lines = []
    for row in result.rows:
        if row.method != "cache" or row.drafter:
            continue
        base = next(
            (r for r in result.rows if r.link == row.link and r.method == "no-cache" and r.ratio == row.ratio), None
        )
        if base is None or base.client_up + base.client_down == 0:
            continue
        cut = 1 - (row.client_up + row.client_down) / (base.client_up + base.client_down)
        lines.append(f"{row.link} {row.ratio}: caching cuts traffic by {100 * cut:.2f}%")
    return lines


def speculative_lines(result: TableResult) -> list[str]:
    """Each speculative row against the plain cached row of the same link and ratio: speed-up and acceptance."""
    lines = []
    for row in result.rows:
        if row.drafter is None:
            continue
        base = next(
            (
                r
                for r in result.rows
                if r.link == row.link and r.method == "cache" and r.drafter is None and r.ratio == row.ratio
            ),
            None,
        )
        line = f"{row.link} {row.ratio} {row.drafter} drafts: {row.tokens_per_second:.2f} tok/s"
        if base is not None and base.tokens_per_second > 0:
            line += f" vs {base.tokens_per_second:.2f} plain ({row.tokens_per_second / base.tokens_per_second:.2f}x)"
            line += ", same text" if row.text == base.text else ", TEXT DIFFERS from the plain split"
        line += f"; {row.steps} decode steps, {_drafts(row)}"
        lines.append(line)
    return lines


def markdown(result: TableResult) -> str:
    """The tables as GitHub markdown, one per link, for docs/benchmarks.md."""
    out = []
    for name, rows in _by_link(result):
        out.append(f"**{_link_title(result, name)}**\n")
        out.append("| " + " | ".join(COLUMNS) + " |")
        out.append("|" + "---|" * len(COLUMNS))
        out.extend("| " + " | ".join(_cells(r)) + " |" for r in rows)
        out.append("")
    return "\n".join(out)


def plot(result: TableResult, path: Path) -> None:
    """Per link: stacked latency (communication, local, cloud) and tokens/s for every row."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib: pip install 'lambdasplit[bench]'") from exc
    groups = list(_by_link(result))
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, 3.6 * len(groups)), squeeze=False)
    for (name, rows), (ax_lat, ax_tps) in zip(groups, axes, strict=True):
        labels = [f"{_SHORT[r.method]}{'+' + r.drafter if r.drafter else ''}\n{r.ratio}" for r in rows]
        x = range(len(rows))
        bottom = [0.0] * len(rows)
        for part, color in (("communication_s", "#d62728"), ("local_s", "#1f77b4"), ("cloud_s", "#2ca02c")):
            values = [getattr(r, part) for r in rows]
            ax_lat.bar(x, values, bottom=bottom, color=color, label=part.removesuffix("_s"))
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax_lat.set_title(f"{name}: latency (s)")
        ax_lat.set_xticks(list(x), labels, fontsize=7)
        ax_lat.legend(fontsize=7)
        ax_tps.bar(x, [r.tokens_per_second for r in rows], color="#7f7f7f")
        ax_tps.set_title(f"{name}: tokens/s")
        ax_tps.set_xticks(list(x), labels, fontsize=7)
    fig.suptitle(f"{result.config.model}, {result.config.new_tokens} new tokens (lambdasplit bench llm)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
