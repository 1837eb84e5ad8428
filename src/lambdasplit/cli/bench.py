"""``lambdasplit bench``: measured benchmarks. ``bench llm`` is the paper's Table I for your model and links,
``bench t2i`` its text-to-image traffic and quantization table (Fig. 5(c))."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from lambdasplit.bench.links import parse_link
from lambdasplit.bench.llm import METHODS, PAPER_PROMPT, TableConfig, run_table
from lambdasplit.bench.report import caching_savings, markdown, plot, rich_tables, speculative_lines, step_lines
from lambdasplit.cli.options import DEFAULTS, DraftTokens, Model, quiet_pipeline_loading
from lambdasplit.diffusion.protocol import DEFAULT_PIPELINE, GRANULARITIES, POLICIES, Policy
from lambdasplit.errors import ConfigError
from lambdasplit.wire import WireDtype

app = typer.Typer(
    help="Measured benchmarks (traffic at the socket and on the wire, latency, tokens/s).", rich_markup_mode="markdown"
)
_out = Console(width=max(Console().width, 170))  # the table has the paper's 14 columns

# Kept in step with lambdasplit.bench.links.LINKS by a test.
_LINK_HELP = (
    "Link to measure on (repeatable): loopback; gigabit (1000/1000 Mbit/s, 1 ms RTT); 5g (60 up/100 down "
    "Mbit/s, 30 ms RTT); wireless (10/10 Mbit/s, 250 ms RTT); or UP/DOWN/RTT in Mbit/s, Mbit/s, ms "
    "(e.g. 60/100/30). Emulated links need root (network namespaces, veth pairs, a packet delay line)."
)


@app.command("llm")
def llm(
    model: Model = DEFAULTS["model"],
    prompt: Annotated[str, typer.Option(help="Prompt, sent as a chat message.")] = PAPER_PROMPT,
    prompt_file: Annotated[
        Path | None, typer.Option(help="Read the prompt from this file instead (e.g. benchmarks/prompts/*.txt).")
    ] = None,
    new_tokens: Annotated[int, typer.Option(min=2, help="Tokens generated per row (EOS ignored).")] = 300,
    link: Annotated[list[str] | None, typer.Option(help=_LINK_HELP, show_default="loopback")] = None,
    local_layers: Annotated[
        list[int] | None,
        typer.Option(
            help="Layers on the device per split row (repeatable), halved between head and tail.", show_default="2 8 16"
        ),
    ] = None,
    method: Annotated[
        list[str] | None, typer.Option(help=f"Rows to run (repeatable): {', '.join(METHODS)}.", show_default="all")
    ] = None,
    wire_dtype: Annotated[str, typer.Option(help="Hidden-state dtype on the wire.")] = "float16",
    device_threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads of the device (this process); --device-cpus makes it weaker.")
    ] = None,
    device_cpus: Annotated[
        float | None,
        typer.Option(help="Cap the device's CPU time while it generates, in CPUs (e.g. 0.25; a cgroup quota, root)."),
    ] = None,
    cloud_threads: Annotated[int | None, typer.Option(min=1, help="CPU threads of the server process.")] = None,
    speculative: Annotated[
        list[str] | None,
        typer.Option(
            help="Add a cached split row with speculative steps per drafter (repeatable): lookup (prompt n-grams), "
            "self (head and tail without the body) or model:PATH. Output must equal the plain row's."
        ),
    ] = None,
    draft_tokens: DraftTokens = 4,
    stop_at_eos: Annotated[
        bool,
        typer.Option(help="Stop at the end-of-sequence token (default: always generate --new-tokens, as the paper)."),
    ] = False,
    capture: Annotated[
        Path | None,
        typer.Option(
            help="Record a pcap per row into this folder (tcpdump, root) and report IP bytes; beside each NAME.pcap, "
            "NAME.txt shows what it carried as text (streams reassembled, WebSocket unmasked, frames decoded)."
        ),
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write every figure to this JSON file.")] = None,
    markdown_path: Annotated[Path | None, typer.Option("--markdown", help="Write the tables as markdown.")] = None,
    plot_path: Annotated[Path | None, typer.Option("--plot", help="Draw latency and tokens/s to this PNG.")] = None,
) -> None:
    """The paper's Table I, measured: cloud-only, Λ-Split without and with caching, local-only.

    Every split row runs against a real `lambdasplit serve` subprocess. On an emulated link the server
    sits in its own network namespace, reached through a delay line that paces and delays every packet
    at the link's rates and round-trip time; all of it is made and removed here.
    """
    links = [parse_link(x) for x in (link or ["loopback"])]
    if prompt_file is not None:
        try:
            prompt = prompt_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --prompt-file {prompt_file}: {exc}") from exc
    config = TableConfig(
        model=model,
        prompt=prompt,
        new_tokens=new_tokens,
        local_layers=tuple(local_layers or (2, 8, 16)),
        methods=tuple(method or METHODS),
        wire_dtype=wire_dtype,
        device_threads=device_threads,
        device_cpus=device_cpus,
        cloud_threads=cloud_threads,
        capture_dir=capture,
        speculative=tuple(speculative or ()),
        draft_tokens=draft_tokens,
        stop_at_eos=stop_at_eos,
    )
    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise ConfigError("--plot needs matplotlib: pip install 'lambdasplit[bench]'") from exc
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=_out, transient=True) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(link_name: str, label: str, done: int, total: int) -> None:
            key = f"{link_name} · {label}"
            if key not in tasks:
                tasks[key] = bar.add_task(key, total=total)
            bar.update(tasks[key], completed=done)

        result = run_table(config, links, progress)
    for table in rich_tables(result):
        _out.print(table)
    for line in [*step_lines(result), *caching_savings(result), *speculative_lines(result)]:
        _out.print(line)
    for name, reason in result.skipped.items():
        _out.print(f"[yellow]skipped link {name}[/]: {reason}")
    m = result.machine
    _out.print(
        f"machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']}; device threads {m['device_threads']}, "
        f"device CPU quota {m['device_cpus']}, cloud threads {m['cloud_threads']}; wire {config.wire_dtype}"
    )
    if json_path:
        result.write_json(json_path)
        _out.print(f"wrote {json_path}")
    if markdown_path:
        markdown_path.write_text(markdown(result))
        _out.print(f"wrote {markdown_path}")
    if plot_path:
        plot(result, plot_path)
        _out.print(f"wrote {plot_path}")


@app.command("t2i")
def t2i(
    pipeline: Annotated[
        str, typer.Option(help="diffusers SD/SDXL pipeline: folder, hub id or shapes-t2i (the embedded default).")
    ] = DEFAULT_PIPELINE,
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps per image (the paper: 50).")] = 50,
    seed: Annotated[int, typer.Option(help="Seed of every image (the paper: 42).")] = 42,
    guidance_scale: Annotated[float, typer.Option(help="Classifier-free guidance.")] = 4.0,
    prompts: Annotated[int, typer.Option(min=1, max=8, help="Prompts averaged per wire dtype (of 8).")] = 8,
    policy: Annotated[
        list[str] | None,
        typer.Option(
            help=f"Policies measured over loopback (repeatable): {', '.join(POLICIES)}; none skips this part.",
            show_default="all",
        ),
    ] = None,
    wire_dtype: Annotated[
        list[str] | None, typer.Option(help="Noise dtypes of the quantization table (repeatable).", show_default="all")
    ] = None,
    granularity: Annotated[str, typer.Option(help="Quantization scales: tensor, channel or row.")] = "channel",
    adherence: Annotated[
        int, typer.Option(min=0, help="shapes-t2i only: captions drawn and read back by the detector (0: skip).")
    ] = 0,
    cloud_threads: Annotated[int | None, typer.Option(min=1, help="CPU threads of the server process.")] = None,
    grid: Annotated[
        Path | None, typer.Option(help="PNG of the images: unsplit FP32 first row, then one row per wire dtype.")
    ] = None,
    samples: Annotated[
        Path | None, typer.Option(help="PNG of split samples: one row per prompt, seeds 0-3 (float16 wire).")
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write every figure to this JSON file.")] = None,
    markdown_path: Annotated[Path | None, typer.Option("--markdown", help="Write the tables as markdown.")] = None,
) -> None:
    """Split text-to-image measured: traffic and latency per policy over a real server on loopback, and the
    paper's quantization table (PSNR/SSIM of the final image against the FP32 unsplit pipeline per wire dtype)."""
    from lambdasplit.bench.t2i import PROMPTS as T2I_PROMPTS
    from lambdasplit.bench.t2i import WIRE_DTYPES as T2I_WIRE_DTYPES
    from lambdasplit.bench.t2i import markdown as t2i_markdown
    from lambdasplit.bench.t2i import run_t2i

    quiet_pipeline_loading()
    wanted = [p for p in policy if p != "none"] if policy is not None else list(POLICIES)
    policies: list[Policy] = []
    for p in wanted:
        if p not in POLICIES:
            raise ConfigError(f"unknown policy {p!r}; choose from {', '.join(POLICIES)}")
        policies.append(p)
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity is one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if adherence and pipeline != DEFAULT_PIPELINE:
        raise ConfigError("--adherence reads images with the shapes detector: it needs --pipeline shapes-t2i")
    try:
        import skimage  # noqa: F401
    except ImportError as exc:
        raise ConfigError("bench t2i needs scikit-image for PSNR/SSIM: pip install 'lambdasplit[bench]'") from exc
    dtypes = [WireDtype.parse(d).name.lower().removeprefix("q") for d in (wire_dtype or T2I_WIRE_DTYPES)]
    with _out.status("measuring") as status:
        result = run_t2i(
            pipeline,
            steps=steps,
            seed=seed,
            guidance_scale=guidance_scale,
            prompts=T2I_PROMPTS[:prompts],
            policies=policies,
            wire_dtypes=dtypes,
            granularity=granularity,
            adherence_samples=adherence,
            cloud_threads=cloud_threads,
            on_progress=lambda what: status.update(f"measuring: {what}"),
            grid=grid,
            samples=samples,
        )
    text = t2i_markdown(result)
    _out.print(text)
    if json_path:
        json_path.write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n")
        _out.print(f"wrote {json_path}")
    if markdown_path:
        markdown_path.write_text(text)
        _out.print(f"wrote {markdown_path}")
    for path in (grid, samples):
        if path:
            _out.print(f"wrote {path}")
