"""``lambdasplit collafuse server|client``: CollaFuse's collaborative training of a split diffusion model.

The server trains one U-Net on the noisy timesteps (t > t_c) of every client; each client trains its own U-Net on
the rest (t <= t_c) and keeps its images. At the end each side has exported a pipeline, and inference is the
split ``collafuse`` policy: ``lambdasplit serve --pipeline SERVER/pipeline`` in the cloud, ``lambdasplit imagine
--pipeline CLIENT/pipeline --policy collafuse --cut-ratio c --cloud URL`` on the client.
"""

from __future__ import annotations

import json
import signal
import ssl
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lambdasplit.cli.cloud import device_trust
from lambdasplit.cli.options import (
    Device,
    Insecure,
    ServerTokens,
    TlsCa,
    TlsFingerprint,
    Token,
    device_token,
    server_tokens,
)
from lambdasplit.errors import ConfigError
from lambdasplit.tls import is_loopback

if TYPE_CHECKING:
    from lambdasplit.collafuse.server import CollaFuseServer, RoundLog, ServerReport

app = typer.Typer(help="CollaFuse: train a split diffusion model with several clients whose images stay home.")
_err = Console(stderr=True, highlight=False)

CutRatio = Annotated[
    float,
    typer.Option(
        "--cut-ratio", min=0.0, max=1.0, help="c, the server's share of the denoising steps: t_c = (1 - c) T."
    ),
]
Pipeline = Annotated[
    str, typer.Option(help="The public pipeline whose tokenizer, text encoder, VAE and U-Net architecture both use.")
]
ShowProgress = Annotated[bool, typer.Option(help="Show a progress bar.")]


def _bar(description: str, enabled: bool) -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=_err, disable=not enabled)


@app.command("server")
def server(
    clients: Annotated[int, typer.Option(min=1, help="How many clients take part; training starts when all joined.")],
    rounds: Annotated[int, typer.Option(min=1, help="Training rounds (each: one batch per client).")],
    out: Annotated[Path, typer.Option(help="Checkpoint folder (and OUT/pipeline for `lambdasplit serve`).")],
    cut_ratio: CutRatio = 0.4,
    batch: Annotated[int, typer.Option(min=1, help="Images each client noises per round.")] = 32,
    lr: Annotated[float, typer.Option(help="AdamW learning rate of the server's U-Net.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed of the server's U-Net initialisation.")] = 0,
    pipeline: Pipeline = "shapes-t2i",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free one; the ready line prints the URL).")] = 8790,
    tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate (PEM) to serve wss://.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The private key (PEM) of --tls-cert.")] = None,
    insecure: Insecure = False,
    token: ServerTokens = None,
    join_timeout: Annotated[float, typer.Option(help="Seconds to wait for every client to join.")] = 600.0,
    round_timeout: Annotated[float, typer.Option(help="Seconds a client may take for its batch.")] = 120.0,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="Rounds between checkpoints (0: at the end).")] = 100,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint in --out.")] = False,
    device: Device = None,
    progress: ShowProgress = True,
) -> None:
    """Train the server's U-Net (t > t_c) with CLIENTS clients, round by round."""
    from lambdasplit.collafuse.model import PublicParts
    from lambdasplit.collafuse.server import CollaFuseServer, ServerSettings
    from lambdasplit.server.run import announce

    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    context = None
    if tls_cert is not None and tls_key is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls_cert, tls_key)
    elif not is_loopback(host) and not insecure:
        raise ConfigError(
            f"listening on {host} without TLS would show the clients' noised latents to the network: pass "
            "--tls-cert/--tls-key, or --insecure if TLS is terminated on a path you trust"
        )
    settings = ServerSettings(
        clients=clients,
        cut_ratio=cut_ratio,
        rounds=rounds,
        batch=batch,
        lr=lr,
        seed=seed,
        join_timeout=join_timeout,
        round_timeout=round_timeout,
        checkpoint_every=checkpoint_every,
    )
    tokens = server_tokens(token)
    if not is_loopback(host) and not tokens:
        _err.print("[yellow]warning[/]: no --token: anyone who reaches this port can join the training")
    parts = PublicParts.load(pipeline, device=device)
    with CollaFuseServer(
        parts, settings, out=out, host=host, port=port, ssl=context, resume=resume, tokens=tokens
    ) as trainer:
        announce(trainer.url, None)
        _err.print(f"c = {cut_ratio} (t_c = {trainer.handoff}): waiting for {clients} client(s) at {trainer.url}")
        with _bar("server", progress) as bar:
            task = bar.add_task("server", total=rounds, completed=trainer.first_round)

            def show(log: object) -> None:
                loss = getattr(log, "loss", None)
                text = f"server · loss {loss:.4f}" if loss is not None else "server · no rows"
                bar.update(task, advance=1, description=f"{text} · {getattr(log, 'clients', 0)} client(s)")

            report = _train_until_stopped(trainer, show)
    rows = sum(r.rows for r in report.rounds)
    dropped = ", ".join(f"{k} ({v})" for k, v in report.dropped.items()) or "none"
    _err.print(
        f"{len(report.rounds)} rounds, {rows:,} rows trained on (t > {trainer.handoff}), "
        f"{report.cpu_seconds:.0f} CPU s of training · dropped: {dropped}\n"
        + (_stopped_note(report.stopped, out, of=rounds) if report.stopped is not None else "")
        + f"inference: lambdasplit serve --pipeline {out / 'pipeline'}"
    )


def _train_until_stopped(trainer: CollaFuseServer, show: Callable[[RoundLog], None]) -> ServerReport:
    """``trainer.train(show)``; the first SIGTERM stops it after the round in progress, with a checkpoint on every
    side (``CollaFuseServer.stop``); a second one stops at once (as Ctrl-C does), back to the last checkpoint."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if not trainer.stopping:
            trainer.stop("SIGTERM")  # only a flag: nothing here may write or lock (the main thread may hold both)
        elif callable(previous):
            previous(signum, frame)  # lifetime's: SystemExit in the main thread
        else:
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return trainer.train(show)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stopped_note(reached: int, out: Path, of: int | None = None) -> str:
    rounds = f"{reached} of {of}" if of is not None else f"{reached}"
    return (
        f"stopped after {rounds} rounds: checkpoint in {out}; the same commands with --resume on the server and "
        "every client continue from there\n"
    )


@app.command("client")
def client(
    server: Annotated[str, typer.Option(help="The CollaFuse server: ws(s)://HOST:PORT.")],
    client: Annotated[int, typer.Option(min=0, help="This client's index: which part of the shapes it holds.")],
    clients: Annotated[int, typer.Option(min=1, help="How many clients the shapes are cut between.")],
    out: Annotated[Path, typer.Option(help="Checkpoint folder (and OUT/pipeline for `lambdasplit imagine`).")],
    images: Annotated[int, typer.Option(min=1, help="How many private images this client holds.")] = 256,
    data_seed: Annotated[int, typer.Option(help="Seed the private images are drawn from.")] = 1,
    name: Annotated[str | None, typer.Option(help="Name given to the server (default: client-INDEX).")] = None,
    unconditional: Annotated[bool, typer.Option(help="Train without captions (the server gets none).")] = False,
    lr: Annotated[float, typer.Option(help="AdamW learning rate of this client's U-Net.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed of the U-Net initialisation and of each round's draws.")] = 0,
    wire_dtype: Annotated[str, typer.Option(help="float16, bfloat16 or float32 for the noised rows.")] = "float16",
    pipeline: Pipeline = "shapes-t2i",
    report: Annotated[Path | None, typer.Option(help="Write this client's figures (JSON) here.")] = None,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="Rounds between checkpoints (0: at the end).")] = 100,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint in --out.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the server's next round.")] = 900.0,
    tls_fingerprint: TlsFingerprint = None,
    tls_ca: TlsCa = None,
    insecure: Insecure = False,
    token: Token = None,
    device: Device = None,
    progress: ShowProgress = True,
) -> None:
    """Take part in training: send the noisy rows (t > t_c) of each round's batch, train the rest here."""
    from lambdasplit.collafuse.client import CollaFuseClient
    from lambdasplit.collafuse.data import client_images
    from lambdasplit.collafuse.model import PublicParts

    if client >= clients:
        raise ConfigError(f"--client is an index below --clients ({clients}), got {client}")
    parts = PublicParts.load(pipeline, device=device)
    data = client_images(client, clients, images, seed=data_seed)
    learner = CollaFuseClient(
        parts,
        data,
        name=name or f"client-{client}",
        conditional=not unconditional,
        lr=lr,
        seed=seed + client,
        wire_dtype=wire_dtype,
        out=out,
        resume=resume,
    )
    with _bar("client", progress) as bar:
        task = bar.add_task(learner.name, total=None, completed=learner.first_round)

        def show(done: int, total: int, loss: float | None) -> None:
            text = f"{learner.name} · loss {loss:.4f}" if loss is not None else f"{learner.name} · no local rows"
            bar.update(task, completed=done, total=total, description=text)

        result = learner.run(
            server,
            trust=device_trust(tls_fingerprint, tls_ca, insecure),
            timeout=timeout,
            checkpoint_every=checkpoint_every,
            on_round=show,
            token=device_token(token),
        )
    figures = {**asdict(result), "cpu_seconds_per_step": result.cpu_seconds_per_step}
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(figures, indent=1))
    _err.print(
        f"{result.rounds} rounds · {result.rows_sent:,} rows sent (t > {result.handoff}), {result.rows_local:,} "
        f"trained here · {result.bytes_sent:,} B sent · {result.cpu_seconds_per_step:.3f} CPU s per round\n"
        + (f"the server {_stopped_note(result.stopped, out)}" if result.stopped is not None else "")
        + f"inference: lambdasplit imagine PROMPT --pipeline {out / 'pipeline'} --policy collafuse "
        f"--cut-ratio {result.cut_ratio} --cloud URL"
    )
