"""``lambdasplit serve``: the cloud body server. Loads only the body's weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console

from lambdasplit.cli.options import DEFAULTS, Device, Dtype, Layers, Model, quiet_pipeline_loading
from lambdasplit.server import READY, ServerSettings, serve
from lambdasplit.split import load_split

_err = Console(stderr=True)
_d = ServerSettings()


def serve_command(
    model: Model = DEFAULTS["model"],
    layers: Layers = DEFAULTS["layers"],
    host: Annotated[
        str, typer.Option(help="Address to bind. Keep 127.0.0.1 unless TLS and a token are set.")
    ] = _d.host,
    port: Annotated[int, typer.Option(help="Port (0 picks a free one; the ready line names it).")] = _d.port,
    token: Annotated[
        list[str] | None,
        typer.Option(help="Accepted bearer token (repeatable). Also read from $LAMBDASPLIT_TOKEN.", show_default=False),
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate (PEM); serves wss://.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    max_sessions: Annotated[int, typer.Option(help="Sessions held at once; more are refused.")] = _d.max_sessions,
    max_context: Annotated[int, typer.Option(help="Positions per session's KV cache.")] = _d.max_context,
    idle_ttl: Annotated[float, typer.Option(help="Seconds before an unused session is freed.")] = _d.idle_ttl,
    max_frame_bytes: Annotated[int, typer.Option(help="Largest frame accepted.")] = _d.max_frame_bytes,
    kv_budget_mb: Annotated[
        float, typer.Option(help="MiB all sessions' KV caches may hold together; more is refused (memory_full).")
    ] = _d.kv_budget_bytes / (1 << 20),
    max_batch: Annotated[
        int, typer.Option(help="Most decode steps of different sessions batched into one forward (1: no batching).")
    ] = _d.max_batch,
    ws_ping_interval: Annotated[
        float,
        typer.Option(
            help="Seconds between pings to each client; one silent as long again is dropped, its sessions freed."
        ),
    ] = _d.ws_ping_interval,
    cloud_only: Annotated[
        bool,
        typer.Option(
            "--cloud-only",
            help="Baseline mode: hold the whole model and answer prompts sent as text (the server sees them). "
            "--layers is ignored; split clients are refused.",
        ),
    ] = False,
    pipeline: Annotated[
        str | None,
        typer.Option(
            help="Serve the U-Net of a diffusers SD/SDXL text-to-image pipeline (folder, hub id or shapes-t2i, the "
            "embedded default) to `lambdasplit imagine` devices instead of an LLM body. --model/--layers are ignored.",
            show_default=False,
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads for compute (default: torch's, one per core).")
    ] = None,
    device: Device = None,
    dtype: Dtype = None,
) -> None:
    """Serve the body (layers X..Y-1) of a model to devices over WebSocket.

    Devices connect with `lambdasplit generate --cloud ws://HOST:PORT/v1/split` (or `chat`); the split points
    come from this server. GET /health is public; GET /metrics needs the token when one is set.
    """
    tokens = tuple(token or ()) + ((os.environ["LAMBDASPLIT_TOKEN"],) if os.environ.get("LAMBDASPLIT_TOKEN") else ())
    settings = ServerSettings(
        host=host,
        port=port,
        tokens=tokens,
        max_sessions=max_sessions,
        max_context=max_context,
        idle_ttl=idle_ttl,
        max_frame_bytes=max_frame_bytes,
        kv_budget_bytes=int(kv_budget_mb * (1 << 20)),
        max_batch=max_batch,
        ws_ping_interval=ws_ping_interval,
        tls_cert=tls_cert,
        tls_key=tls_key,
        cloud_only=cloud_only,
    )
    if threads is not None:
        torch.set_num_threads(threads)
    if host not in ("127.0.0.1", "localhost", "::1") and not (tokens and tls_cert):
        _err.print("[yellow]warning[/]: serving beyond loopback without TLS and a token exposes hidden states")
    if pipeline is not None:
        _serve_pipeline(pipeline, settings, device, dtype)
        return
    if cloud_only:
        with _err.status(f"loading all of {model} (cloud-only: prompts arrive as text)"):
            split = load_split(model, "0:", device=device, dtype=dtype)
        what = f"whole model, {sum(split.parameter_count(r) for r in ('head', 'body', 'tail')):,} parameters"
    else:
        with _err.status(f"loading the body of {model} (layers {layers})"):
            split = load_split(model, layers, parts=["body"], device=device, dtype=dtype)
        p = split.points
        what = f"body: layers [{p.head_layers}, {p.body_end}) of {p.num_layers}"
        what += f" · {split.parameter_count('body'):,} parameters"
    rt = split.runtime
    _err.print(
        f"{what} · {rt.device} {str(rt.dtype).removeprefix('torch.')} · {torch.get_num_threads()} threads"
        f" · fingerprint {split.fingerprint}"
    )
    serve(split, settings, on_ready=lambda url: print(f"{READY}{url}", flush=True))


def _serve_pipeline(pipeline: str, settings: ServerSettings, device: str | None, dtype: str | None) -> None:
    from lambdasplit.diffusion import DiffusionBody, load_unet
    from lambdasplit.server import DiffusionServer, serve_app

    quiet_pipeline_loading()

    with _err.status(f"loading the U-Net of {pipeline}"):
        unet = load_unet(pipeline, device=device, dtype=dtype)
    body = DiffusionBody(unet, pipeline)
    params = sum(p.numel() for p in unet.parameters())
    _err.print(
        f"diffusion body: U-Net of {pipeline} · {params:,} parameters · {unet.device} "
        f"{str(unet.dtype).removeprefix('torch.')} · {torch.get_num_threads()} threads · fingerprint {body.fingerprint}"
    )
    serve_app(DiffusionServer(body, settings), settings, on_ready=lambda url: print(f"{READY}{url}", flush=True))
