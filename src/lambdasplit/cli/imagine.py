"""``lambdasplit imagine``: one image, split between this device and a diffusion body server."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lambdasplit.cli.cloud import device_trust
from lambdasplit.cli.options import Insecure, TlsFingerprint, Token, device_token, quiet_pipeline_loading
from lambdasplit.diffusion.protocol import DEFAULT_PIPELINE, GRANULARITIES, POLICIES
from lambdasplit.errors import ConfigError, ConnectionLost

_err = Console(stderr=True)


def imagine(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the PNG.")],
    pipeline: Annotated[
        str, typer.Option(help="diffusers SD/SDXL pipeline: folder, hub id or shapes-t2i (the embedded default).")
    ] = DEFAULT_PIPELINE,
    policy: Annotated[
        str,
        typer.Option(
            help="paper: the cloud runs the U-Net, noise comes down each step; unet-lambda: the outer U-Net blocks "
            "stay here; collafuse: the cloud runs the first steps, this device the rest."
        ),
    ] = "paper",
    steps: Annotated[int, typer.Option(min=1, max=1000, help="Denoising steps.")] = 20,
    seed: Annotated[int, typer.Option(help="Seed of the initial noise (same seed, same image).")] = 0,
    guidance_scale: Annotated[float, typer.Option(help="Classifier-free guidance (1: none).")] = 4.0,
    negative_prompt: Annotated[str | None, typer.Option(help="What not to draw.")] = None,
    wire_dtype: Annotated[
        str, typer.Option(help="Per-step tensors on the wire: float32, float16, bfloat16, int8, int6, int4, int2.")
    ] = "float16",
    input_dtype: Annotated[str, typer.Option(help="The prompt embeddings and initial latent, sent once.")] = "float16",
    granularity: Annotated[str, typer.Option(help="Quantization scales: one per tensor, channel or row.")] = "channel",
    blocks: Annotated[int, typer.Option(min=1, help="unet-lambda: U-Net blocks kept at each end on the device.")] = 1,
    cut_ratio: Annotated[
        float,
        typer.Option(
            "--cut-ratio",
            min=0,
            max=1,
            help="collafuse: CollaFuse's cut ratio c, the cloud's share of the steps; the device takes over at "
            "t_c=(1-c)T (0: this device alone, 1: the cloud alone).",
        ),
    ] = 0.5,
    cut: Annotated[
        float | None,
        typer.Option("--cut", hidden=True, help="Removed: it was this device's share; use --cut-ratio (1 - cut)."),
    ] = None,
    conditioning: Annotated[
        bool,
        typer.Option(
            "--conditioning/--no-conditioning",
            help="collafuse: send the prompt's embeddings to the cloud (exact) or only the negative prompt's.",
        ),
    ] = True,
    cloud: Annotated[
        str | None,
        typer.Option(help="Diffusion body server (ws://HOST:PORT/v1/split). Without it the body runs in-process."),
    ] = None,
    token: Token = None,
    tls_fingerprint: TlsFingerprint = None,
    tls_ca: Annotated[
        Path | None,
        typer.Option(
            "--tls-ca",
            "--ca-file",  # its name before the other commands had TLS options
            help="Trust wss:// servers whose certificate this CA (PEM) signed: a private CA, or the server's own "
            "cert.pem.",
            show_default=False,
        ),
    ] = None,
    insecure: Insecure = False,
    cloud_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the server.")] = 120.0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: cuda if available).")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, float16 or bfloat16.")] = None,
    preview_every: Annotated[
        int | None,
        typer.Option(
            min=1, help="Also write the image so far every N steps, decoded by this device's VAE (OUT-stepNNN.png)."
        ),
    ] = None,
    noise_png: Annotated[
        int | None,
        typer.Option(
            "--noise-png",
            min=1,
            help="Also write what came down from the cloud at step STEP, clipped to +-3 (OUT-wire-stepNNN.png): "
            "the noise prediction under the paper policy, as the Λ-Split paper's Fig. 5(b).",
            metavar="STEP",
        ),
    ] = None,
) -> None:
    """Draw PROMPT with a split pipeline: text encoders, initial noise, scheduler and VAE here; the U-Net (or its
    middle, or the first steps) on the server.

    Example: `lambdasplit serve --pipeline shapes-t2i` then
    `lambdasplit imagine "a red circle at the top left on a blue background" --cloud ws://127.0.0.1:8765/v1/split
    --out circle.png`.
    """
    if cut is not None:
        # Not reinterpreted: the same number means the other side's share now.
        raise ConfigError(
            f"--cut is gone: it meant this device's share of the steps; --cut-ratio is CollaFuse's c, the cloud's "
            f"share: pass --cut-ratio {1 - cut:g}"
        )
    if policy not in POLICIES:
        raise ConfigError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity is one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out names a .png file, got {out}")
    if noise_png is not None and noise_png > steps:
        raise ConfigError(f"--noise-png names a step from 1 to --steps {steps}, got {noise_png}")
    from lambdasplit.client import CloudClient, RemoteDiffusionLink, restarting
    from lambdasplit.diffusion import DiffusionBody, LocalLink, SplitPipeline, load_pipeline, load_unet_config
    from lambdasplit.diffusion.device import DenoiseStep, Link
    from lambdasplit.diffusion.pictures import picture, wire_picture
    from lambdasplit.diffusion.pipeline import unet_fingerprint

    quiet_pipeline_loading()
    # A paper-policy device never runs the U-Net: with a server, its weights stay on disk.
    needs_unet = policy != "paper" or not cloud
    with _err.status(f"loading {pipeline}"):
        pipe = load_pipeline(pipeline, device=device, dtype=dtype, unet=needs_unet)
    unet_config = pipe.unet.config if needs_unet else load_unet_config(pipeline)
    client = None
    link: Link
    if cloud:
        client = CloudClient(
            cloud,
            token=device_token(token),
            fingerprint=unet_fingerprint(unet_config),
            timeout=cloud_timeout,
            trust=device_trust(tls_fingerprint, tls_ca, insecure),
        )
        link = RemoteDiffusionLink(client)
        where = cloud
    else:
        link, where = LocalLink(DiffusionBody(pipe.unet, pipeline)), "in-process body"
    before = client.socket_bytes() if client else None
    split = SplitPipeline(pipe, unet_config)
    written: list[Path] = []
    out.parent.mkdir(parents=True, exist_ok=True)

    def watch(step: DenoiseStep) -> None:
        if preview_every and step.done % preview_every == 0 and step.done < step.total:
            written.append(out.with_name(f"{out.stem}-step{step.done:03d}.png"))
            picture(split.preview(step.latents)).save(written[-1])
        if step.done == noise_png and step.received is not None:
            written.append(out.with_name(f"{out.stem}-wire-step{step.done:03d}.png"))
            wire_picture(step.received).save(written[-1])
            _err.print(f"step {step.done}: the cloud sent the {step.what} {tuple(step.received.shape)}")

    try:
        with Progress(
            TextColumn(f"[bold]{policy}[/] · {where}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=_err,
        ) as bar:
            task = bar.add_task("steps", total=steps)

            def restart(lost: ConnectionLost) -> None:
                _err.print(f"[yellow]connection lost mid-image ({lost}): starting the image again[/]")
                bar.reset(task, total=steps)
                written.clear()  # the previews are made again, under the same names

            make = partial(
                split.generate,
                prompt,
                link,
                policy=policy,
                steps=steps,
                seed=seed,
                guidance_scale=guidance_scale,
                negative_prompt=negative_prompt,
                wire_dtype=wire_dtype,
                input_dtype=input_dtype,
                granularity=granularity,
                blocks=blocks,
                cut_ratio=cut_ratio,
                conditioned=conditioning,
                on_step=lambda done, total: bar.update(task, completed=done, total=total),
                on_denoise=watch if preview_every or noise_png else None,
            )
            # A server lost mid-image: the image starts again on a new connection (same seed, same image).
            result = restarting(link, make, restart)
        after = client.socket_bytes() if client else None
        socket = after - before if after and before else None
    finally:
        if client:
            client.close()
    result.pil().save(out)
    if noise_png is not None and not any("-wire-" in p.name for p in written):
        raise ConfigError(
            f"nothing came down from the cloud at step {noise_png} under the {policy} policy (collafuse: only the "
            "hand-over, at the last of the cloud's steps)"
        )
    for path in written:
        _err.print(f"wrote {path}")
    t = result.traffic
    line = f"wrote {out} · up {t.bytes_up:,} B in {t.frames_up} frames · down {t.bytes_down:,} B in {t.frames_down}"
    if socket:
        line += f" · socket {socket.sent:,} B sent / {socket.received:,} B received"
    _err.print(line)
    _err.print(
        f"{result.total_seconds:.2f} s: device {result.device_seconds:.2f} s · cloud {result.cloud_seconds:.2f} s "
        f"· communication {result.communication_seconds:.2f} s"
    )
