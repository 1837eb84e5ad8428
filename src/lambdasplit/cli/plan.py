"""``lambdasplit plan``: the paper's preparation phase. Predict every candidate split and recommend one."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lambdasplit.bench.links import LINKS, parse_link
from lambdasplit.bench.plan import DEFAULT_HEADS, DEFAULT_TAILS, Constraints, LinkSpec, parse_size
from lambdasplit.bench.planner import PlanConfig, PlanResult, link_spec, run_plan
from lambdasplit.cli.options import DEFAULTS, Model
from lambdasplit.errors import ConfigError

_out = Console(width=max(Console().width, 150))

_LINK_HELP = (
    "The link: "
    + "; ".join(f"{name} ({link.description})" for name, link in LINKS.items())
    + "; or UP/DOWN/RTT in Mbit/s, Mbit/s, ms. --rtt-ms and --bandwidth-mbit override its figures."
)


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--{what} takes comma-separated layer counts (e.g. 0,1,2,4,8), got {text!r}") from None
    if not values or min(values) < 0:
        raise ConfigError(f"--{what} needs layer counts >= 0, got {text!r}")
    return values


def plan(
    model: Model = DEFAULTS["model"],
    link: Annotated[str, typer.Option(help=_LINK_HELP)] = "loopback",
    rtt_ms: Annotated[float | None, typer.Option(min=0, help="Round-trip time of the link, ms.")] = None,
    bandwidth_mbit: Annotated[
        float | None, typer.Option(help="The link's rate in both directions, Mbit/s (default: the link's).")
    ] = None,
    new_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per answer.")] = 128,
    prompt_tokens: Annotated[
        int | None,
        typer.Option(min=1, help="Prompt length in tokens.", show_default="the paper's prompt as a chat message"),
    ] = None,
    head_layers: Annotated[str, typer.Option(help="Candidate head-layer counts.")] = ",".join(map(str, DEFAULT_HEADS)),
    tail_layers: Annotated[str, typer.Option(help="Candidate tail-layer counts.")] = ",".join(map(str, DEFAULT_TAILS)),
    min_tokens_per_second: Annotated[
        float | None, typer.Option(min=0, help="Recommend only splits predicted at least this fast.")
    ] = None,
    max_device_memory: Annotated[
        str | None, typer.Option(help="Recommend only splits whose device part fits, e.g. 200MB or 1.5GB.")
    ] = None,
    device_layer_ms: Annotated[
        float | None,
        typer.Option(
            help="The device's cost of one decoder layer per token, ms (default: measured on this machine). Its "
            "other costs (embedding, LM head, prompt) scale with it."
        ),
    ] = None,
    server_layer_ms: Annotated[
        float | None,
        typer.Option(
            help="The server's cost of one decoder layer per token, ms (default: measured on this machine as its "
            "stand-in, with --server-threads)."
        ),
    ] = None,
    device_threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads the device's costs are measured with.")
    ] = None,
    server_threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads the server's costs are measured with.")
    ] = None,
    step_overhead_ms: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Per-token cost of the protocol itself (framing, sockets, the server's event loop), ms.",
            show_default="2.6, Table I's loopback figure on a 2-CPU machine",
        ),
    ] = None,
    measure_overhead: Annotated[
        bool,
        typer.Option(help="Measure the protocol's per-token cost against a real server on loopback (about a minute)."),
    ] = False,
    wire_dtype: Annotated[str, typer.Option(help="Hidden-state dtype on the wire.")] = "float16",
    dtype: Annotated[str, typer.Option(help="The device's weights and KV cache, for its memory.")] = "float32",
    json_out: Annotated[bool, typer.Option("--json", help="Print every figure as JSON instead of the table.")] = False,
) -> None:
    """Pick the split: predict tokens/s, device memory, bytes per token and audited recovery of each candidate,
    and recommend one under your constraints (the paper's preparation phase).

    Per-layer costs are measured here by timing the model's own decoder layers (or given); the link is a named one
    or your RTT and bandwidth. Recovery figures are the audit's recorded ones (docs/audit/smollm2.json) for the
    default model; other models show "not audited". Predictions are checked against `bench llm` in
    docs/benchmarks.md ("Planner").
    """
    spec = link_spec(parse_link(link))
    if rtt_ms is not None or bandwidth_mbit is not None:
        up, down = (spec.up_mbit, spec.down_mbit) if bandwidth_mbit is None else (bandwidth_mbit, bandwidth_mbit)
        spec = LinkSpec(f"{link} with your figures", spec.rtt_ms if rtt_ms is None else rtt_ms, up, down)
    config = PlanConfig(
        model=model,
        link=spec,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        wire_dtype=wire_dtype,
        dtype=dtype,
        heads=_ints(head_layers, "head-layers"),
        tails=_ints(tail_layers, "tail-layers"),
        device_threads=device_threads,
        server_threads=server_threads,
        device_layer_ms=device_layer_ms,
        server_layer_ms=server_layer_ms,
        overhead_ms=step_overhead_ms,
        measure_overhead=measure_overhead,
        constraints=Constraints(
            min_tokens_per_second,
            None if max_device_memory is None else parse_size(max_device_memory),
        ),
    )
    if json_out:
        result = run_plan(config)
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        with _out.status("measuring the model's layers"):
            result = run_plan(config)
        _print(result)
    if result.error is not None:
        raise ConfigError(result.error)


def _pct(value: float | None) -> str:
    return "not audited" if value is None else f"{value:.0%}"


def _print(result: PlanResult) -> None:
    cfg, w, c = result.config, result.workload, result.costs
    rate = "unlimited" if cfg.link.up_mbit is None else f"{cfg.link.up_mbit:g} up / {cfg.link.down_mbit:g} down Mbit/s"
    table = Table(
        title=f"Candidate splits of {cfg.model} ({result.num_layers} layers) on {cfg.link.name}: "
        f"{cfg.link.rtt_ms:g} ms RTT, {rate}; {w.prompt_tokens}-token prompt, {w.new_tokens} new tokens",
        title_justify="left",
    )
    for name in ("", "--layers", "head/body/tail", "tok/s", "step ms (dev+srv+link)", "prompt ms", "device MB",
                 "B/token up/down", "prompt recovered", "answer recovered"):  # fmt: skip
        table.add_column(
            name, justify="left" if name in ("", "--layers", "prompt recovered", "answer recovered") else "right"
        )
    for cand in result.candidates:
        chosen = result.choice is not None and cand.layers == result.choice.layers
        r = cand.recovery
        table.add_row(
            "→" if chosen else "",
            cand.layers,
            f"{cand.head_layers}/{cand.body_layers}/{cand.tail_layers}",
            f"{cand.tokens_per_second:.1f}",
            f"{cand.step_ms:.1f} ({cand.device_ms:.1f}+{cand.server_ms:.1f}+{cand.link_ms:.1f})",
            f"{cand.prefill_ms:.0f}",
            f"{cand.device_memory_bytes / 1e6:.1f}",
            f"{cand.up_bytes_per_token}/{cand.down_bytes_per_token}",
            f"{_pct(r.prompt)} {r.prompt_attack.split(' ')[0]}".strip(),
            f"{_pct(r.output)} {r.output_attack.split(' ')[0]}".strip(),
            style="bold" if chosen else None,
        )
    _out.print(table)
    _out.print(
        f"costs: device {c.device.layer_ms:.2f} ms/layer ({c.device.source}), server {c.server.layer_ms:.2f} ms/layer "
        f"({c.server.source}), protocol {c.overhead_ms:.1f} ms per token ({c.overhead_source}); device memory = "
        f"weights + KV cache for {w.prompt_tokens + w.new_tokens} positions in {cfg.dtype}; recovery: share of tokens "
        "the audit's strongest attack read (docs/audit/smollm2.json, no defence; A1 exact matching, A2 nearest "
        "neighbour, A3 learned inverter, B1 tail replay, B2 logit lens, B3 sampled tokens)"
    )
    for line in result.advice:  # none when a constraint cannot be met: the error line says which
        _out.print(line)
