"""``lambdasplit serve``: the cloud body server. Loads only the body's weights."""

from __future__ import annotations

import signal
import ssl
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import torch
import typer
from rich.console import Console

from lambdasplit.cli.options import (
    DEFAULTS,
    Device,
    Dtype,
    Layers,
    Model,
    ServerTokens,
    quiet_pipeline_loading,
    server_tokens,
)
from lambdasplit.config import SplitPoints
from lambdasplit.errors import ConfigError
from lambdasplit.privacy.bundles import is_bundle, load_server_bodies
from lambdasplit.privatelora.layout import DEFAULT_RANK, DEFAULT_TARGETS, AdapterLayout
from lambdasplit.server import ServerSettings, serve
from lambdasplit.server.batching import compute_thread
from lambdasplit.server.run import announce
from lambdasplit.server.settings import TlsMode
from lambdasplit.split import SplitModel, load_split
from lambdasplit.syncws import SessionServer
from lambdasplit.tls import certificate_fingerprint, is_loopback

if TYPE_CHECKING:
    from lambdasplit.rayserve.deployment import Scaling

_err = Console(stderr=True)
_d = ServerSettings()


def serve_command(
    model: Model = DEFAULTS["model"],
    layers: Layers = DEFAULTS["layers"],
    host: Annotated[
        str,
        typer.Option(
            help="Address to bind. Beyond loopback the server encrypts (wss://) unless --insecure; give it a --token."
        ),
    ] = _d.host,
    port: Annotated[int, typer.Option(help="Port (0 picks a free one; the ready line names it).")] = _d.port,
    token: ServerTokens = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="Your own TLS certificate (PEM) instead of the self-signed one; serves wss://.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The private key (PEM) of --tls-cert.")] = None,
    tls: Annotated[
        bool,
        typer.Option(
            "--tls",
            help="Encrypt on loopback too (beyond loopback it is the default): wss:// with the self-signed "
            "certificate unless --tls-cert.",
        ),
    ] = False,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="Plain ws:// even beyond loopback, for TLS terminated elsewhere (a proxy). Anyone on the path "
            "reads the hidden states and the token.",
        ),
    ] = False,
    tls_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder of the self-signed certificate, made there once and reused (default: "
            "$LAMBDASPLIT_STATE/tls, else ~/.local/state/lambdasplit/tls).",
            show_default=False,
        ),
    ] = None,
    max_sessions: Annotated[int, typer.Option(help="Sessions held at once; more are refused.")] = _d.max_sessions,
    max_connections: Annotated[
        int, typer.Option(help="WebSocket connections held at once; more are refused (HTTP 503).")
    ] = _d.max_connections,
    max_connections_per_client: Annotated[
        int, typer.Option(help="Connections one client address may hold; more are refused (HTTP 503).")
    ] = _d.max_connections_per_client,
    handshake_timeout: Annotated[
        float, typer.Option(help="Seconds a connection may take to send its upgrade request before it is closed.")
    ] = _d.handshake_timeout,
    drain_seconds: Annotated[
        float,
        typer.Option(
            help="On SIGTERM (or POST /admin/drain): refuse new devices, tell connected ones to move (GOAWAY), and "
            "exit once they have left or after this many seconds (--share, --privatelora: once their sessions "
            "have ended). 0: exit at once."
        ),
    ] = _d.drain_seconds,
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
    group: Annotated[
        str | None,
        typer.Option(
            help="With a server bundle (`lambdasplit developer package`) as --model: serve only this user group's "
            "body (default: every group's, each device on its own group's).",
            show_default=False,
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads for compute (default: torch's, one per core).")
    ] = None,
    share: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=1,
            help="Be share server 0 or 1 of a body computed on secret shares by two servers (run one of each, by "
            "independent operators); devices connect with `generate --cloud URL0,URL1 --secret-shared`. Needs --peer.",
            show_default=False,
        ),
    ] = None,
    peer: Annotated[
        str | None,
        typer.Option(
            help="With --share: HOST:PORT of the link between the two share servers. Share server 0 listens there, "
            "share server 1 connects to it: give both the same address.",
            show_default=False,
        ),
    ] = None,
    peer_timeout: Annotated[
        float,
        typer.Option(
            help="With --share or --privatelora: seconds to wait for the peer server or the device before a session "
            "ends."
        ),
    ] = 60.0,
    privatelora: Annotated[
        bool,
        typer.Option(
            "--privatelora",
            help="Serve the body with PrivateLoRA adapters: frozen random A and B here, each device's private M on "
            "the device, one low-rank round trip per layer (docs/privatelora.md). Layers default to 0: (the paper's "
            "whole decoder stack here). Devices connect with `generate --privatelora M.safetensors` or "
            "`personalize`.",
        ),
    ] = False,
    adapter_targets: Annotated[
        str, typer.Option(help="With --privatelora: the projections adapted in every body layer, comma-separated.")
    ] = ",".join(DEFAULT_TARGETS),
    adapter_rank: Annotated[
        str,
        typer.Option(
            help="With --privatelora: r (both ways) or R_C2D/R_D2C: values per token and projection sent down / up."
        ),
    ] = str(DEFAULT_RANK),
    adapter_seed: Annotated[
        int, typer.Option(help="With --privatelora: the seed A and B are drawn from (devices' M is trained for it).")
    ] = 0,
    ray: Annotated[
        str | None,
        typer.Option(
            help="Serve the body as replicas on Ray Serve (needs lambdasplit[ray]): 'local' starts a Ray on this "
            "machine, 'auto' joins this machine's cluster (`ray start`), or a Ray address. Devices connect to Serve's "
            "proxy at --host/--port exactly as to a plain server.",
            show_default=False,
        ),
    ] = None,
    replicas: Annotated[int, typer.Option(min=1, help="With --ray: body replicas (each its own copy).")] = 1,
    autoscale: Annotated[
        str | None,
        typer.Option(
            help="With --ray: MIN:MAX replicas, added and removed by Serve to keep --target-sessions devices on each "
            "(a removed replica drains: its devices move to the others).",
            show_default=False,
        ),
    ] = None,
    target_sessions: Annotated[
        float, typer.Option(help="With --autoscale: connected devices per replica that Serve aims at.")
    ] = 8.0,
    cpus_per_replica: Annotated[
        float, typer.Option(help="With --ray: logical CPUs Ray reserves for each replica.")
    ] = 1.0,
    stages: Annotated[
        str | None,
        typer.Option(
            help="With --ray: run each replica's body as stage actors on different nodes: a count (even layer "
            "ranges) or the layers where stages after the first begin (e.g. 10,20). The replica holds no weights.",
            show_default=False,
        ),
    ] = None,
    device: Device = None,
    dtype: Dtype = None,
) -> None:
    """Serve the body (layers X..Y-1) of a model to devices over WebSocket.

    Devices connect with `lambdasplit generate --cloud ws://HOST:PORT/v1/split` (or `chat`); the split points
    come from this server. Beyond loopback it serves `wss://` on a self-signed certificate made once, and prints
    the certificate's fingerprint beside the URL: devices pin it (`--tls-fingerprint`, or on first use).
    GET /health is public; GET /metrics needs the token when one is set.
    """
    if tls and insecure:
        raise ConfigError("--tls and --insecure contradict each other: pass one")
    mode: TlsMode = "on" if tls else "off" if insecure else "auto"
    settings = ServerSettings(
        host=host,
        port=port,
        tokens=server_tokens(token),
        max_sessions=max_sessions,
        max_connections=max_connections,
        max_connections_per_client=max_connections_per_client,
        handshake_timeout=handshake_timeout,
        drain_seconds=drain_seconds,
        max_context=max_context,
        idle_ttl=idle_ttl,
        max_frame_bytes=max_frame_bytes,
        kv_budget_bytes=int(kv_budget_mb * (1 << 20)),
        max_batch=max_batch,
        ws_ping_interval=ws_ping_interval,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls=mode,
        tls_dir=tls_dir,
        cloud_only=cloud_only,
    ).with_certificate()
    if group is not None and not is_bundle(model):
        raise ConfigError(f"--group names a user group of a server bundle; {model} is not a bundle")
    if threads is not None:
        torch.set_num_threads(threads)
    if privatelora:
        if share is not None or cloud_only or pipeline is not None or group is not None or is_bundle(model):
            raise ConfigError(
                "--privatelora serves a public model's body: no --share, --cloud-only, --pipeline or bundle"
            )
        layout = AdapterLayout.parse(adapter_targets, adapter_rank, adapter_seed)
        _serve_privatelora(model, "0:" if layers == DEFAULTS["layers"] else layers, layout, settings, peer_timeout)
        return
    if share is not None or peer is not None:
        if cloud_only or pipeline is not None or group is not None or is_bundle(model):
            raise ConfigError(
                "--share serves a public model's body on secret shares: no --cloud-only, --pipeline or bundle"
            )
        _serve_share(model, layers, share, peer, settings, peer_timeout)
        return
    _say_how_devices_connect(settings)
    if ray is not None:
        if cloud_only or pipeline is not None or group is not None or is_bundle(model):
            raise ConfigError("--ray serves a model's body: no --cloud-only, --pipeline or bundle")
        try:
            import ray as _  # noqa: F401 - only to say what is missing before anything starts
        except ImportError as exc:
            raise ConfigError(f"--ray needs Ray Serve: pip install 'lambdasplit[ray]' ({exc})") from exc
        scaling = _scaling(replicas, autoscale, target_sessions, cpus_per_replica)
        _serve_ray(ray, model, layers, settings, scaling, _stages(stages), device, dtype)
        return
    if autoscale is not None or replicas != 1 or stages is not None:
        raise ConfigError("--replicas, --autoscale and --stages run on Ray: add --ray local|auto|ADDRESS")
    if pipeline is not None:
        _serve_pipeline(pipeline, settings, device, dtype)
        return
    groups: dict[str, SplitModel] = {}
    # Every torch call of this server runs on its one compute thread, loading included: see serve's executor.
    compute = compute_thread()
    if cloud_only:
        with _err.status(f"loading all of {model} (cloud-only: prompts arrive as text)"):
            split = compute.submit(load_split, model, "0:", device=device, dtype=dtype).result()
        what = f"whole model, {sum(split.parameter_count(r) for r in ('head', 'body', 'tail')):,} parameters"
    elif is_bundle(model):
        with _err.status(f"checking the server bundle {model} and loading its bodies"):
            groups = compute.submit(load_server_bodies, model, group, device=device, dtype=dtype).result()
        split = next(iter(groups.values()))
        if layers != DEFAULTS["layers"] and SplitPoints.parse(layers, split.points.num_layers) != split.points:
            raise ConfigError(f"{model} was packaged for layers {split.points}, not {layers}: drop --layers")
        if len(groups) > 1:
            _err.print(f"user groups: {', '.join(f'{g} (fingerprint {s.fingerprint})' for g, s in groups.items())}")
    else:
        with _err.status(f"loading the body of {model} (layers {layers})"):
            split = compute.submit(load_split, model, layers, parts=["body"], device=device, dtype=dtype).result()
    if not cloud_only:
        p = split.points
        what = f"body: layers [{p.head_layers}, {p.body_end}) of {p.num_layers}"
        what += f" · {split.parameter_count('body'):,} parameters"
    rt = split.runtime
    _err.print(
        f"{what} · {rt.device} {str(rt.dtype).removeprefix('torch.')} · {torch.get_num_threads()} threads"
        f" · fingerprint {split.fingerprint}"
    )
    serve(groups if len(groups) > 1 else split, settings, executor=compute)


def _scaling(replicas: int, autoscale: str | None, target_sessions: float, cpus_per_replica: float) -> Scaling:
    from lambdasplit.rayserve.deployment import Scaling

    if autoscale is not None:
        return Scaling.autoscale(autoscale, target_sessions=target_sessions, cpus_per_replica=cpus_per_replica)
    return Scaling(replicas=replicas, target_sessions=target_sessions, cpus_per_replica=cpus_per_replica)


def _stages(text: str | None) -> int | tuple[int, ...] | None:
    """--stages: "2" (two even ranges) or "10,20" (where the stages after the first begin)."""
    if text is None:
        return None
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(
            f"--stages takes a count or comma-separated layer indices (e.g. 2 or 10,20), got {text!r}"
        ) from None
    return values[0] if len(values) == 1 and "," not in text else values


def _serve_ray(
    address: str,
    model: str,
    layers: str,
    settings: ServerSettings,
    scaling: Scaling,
    stages: int | tuple[int, ...] | None,
    device: str | None,
    dtype: str | None,
) -> None:
    from lambdasplit.rayserve import ReplicaSpec, serve_on_ray

    what = f"{scaling.replicas} replica(s)" if scaling.replicas else f"{scaling.min_replicas}:{scaling.max_replicas}"
    what += f", each on stage actors {stages}" if stages is not None else ""
    _err.print(f"deploying the body of {model} (layers {layers}) on Ray Serve ({address}): {what}")
    fingerprint = certificate_fingerprint(settings.tls_cert) if settings.tls_cert else None
    spec = ReplicaSpec(str(model), layers, settings, device, dtype, stages)
    serve_on_ray(spec, scaling, address, lambda url: announce(url, fingerprint))


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
    serve_app(DiffusionServer(body, settings), settings)


def _serve_share(
    model: str, layers: str, share: int | None, peer: str | None, settings: ServerSettings, timeout: float
) -> None:
    from lambdasplit.mpc.body import BodyWeights
    from lambdasplit.mpc.server import ShareServer

    if share is None or peer is None:
        raise ConfigError("a share server needs both --share 0|1 and --peer HOST:PORT")
    host, _, port = peer.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--peer is HOST:PORT, got {peer!r}")
    _say_how_devices_connect(settings)
    with _err.status(f"loading the body of {model} (layers {layers}) for computing on shares"):
        split = load_split(model, layers, parts=["body"], device="cpu", dtype="float32")
        assert split.body is not None and split.body.model is not None
        weights = BodyWeights.from_hf(split.body.model)
    context = _server_context(settings)
    server = ShareServer(
        weights,
        share,
        (host.strip("[]"), int(port)),
        host=settings.host,
        port=settings.port,
        timeout=timeout,
        max_sessions=settings.max_sessions,
        ssl=context,
        tokens=settings.tokens,
    )
    p = split.points
    where = "listens for share server 1" if share == 0 else "connects to share server 0"
    _err.print(
        f"share server {share}: body layers [{p.head_layers}, {p.body_end}) of {p.num_layers} on secret shares · "
        f"peer link {where} at {server.peer_address[0]}:{server.peer_address[1]} · fingerprint "
        f"{server.fingerprint.hex()[:16]}"
    )
    _serve_until_stopped(server, settings)


def _serve_privatelora(
    model: str, layers: str, layout: AdapterLayout, settings: ServerSettings, timeout: float
) -> None:
    from lambdasplit.privatelora import AdapterServer

    _say_how_devices_connect(settings)
    with _err.status(f"loading the body of {model} (layers {layers}) with PrivateLoRA adapters"):
        split = load_split(model, layers, parts=["body"])
        server = AdapterServer(
            split,
            layout,
            host=settings.host,
            port=settings.port,
            timeout=timeout,
            max_sessions=settings.max_sessions,
            ssl=_server_context(settings),
            tokens=settings.tokens,
        )
    p, rt = split.points, split.runtime
    down, up = layout.values_per_token(p.body_end - p.head_layers)
    _err.print(
        f"PrivateLoRA body: layers [{p.head_layers}, {p.body_end}) of {p.num_layers} · adapters on "
        f"{', '.join(layout.targets)} · ranks {layout.rank_c2d}/{layout.rank_d2c} · seed {layout.seed} · "
        f"{down} values down and {up} up per token · {rt.device} {str(rt.dtype).removeprefix('torch.')} · "
        f"fingerprint {split.fingerprint}"
    )
    _serve_until_stopped(server, settings)


def _serve_until_stopped(server: SessionServer, settings: ServerSettings) -> None:
    """Print the ready line (with the certificate's fingerprint when there is one), serve until stopped.

    The first SIGTERM drains (``SessionServer.drain``: new devices refused, the sessions in progress given up to
    ``settings.drain_seconds`` to end), then the server stops; a second SIGTERM, or Ctrl-C, stops it at once."""

    def stop() -> None:
        left = server.drain(settings.drain_seconds)
        _err.print(f"drained: {left} session(s) still open at the deadline" if left else "drained: no session open")
        server.server.shutdown()

    def on_sigterm(signum: int, frame: object) -> None:
        if server.draining or settings.drain_seconds <= 0:
            threading.Thread(target=server.server.shutdown, daemon=True).start()
            return
        _err.print(f"SIGTERM: draining for up to {settings.drain_seconds:g} s")
        server.draining = True
        threading.Thread(target=stop, name="drain", daemon=True).start()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    announce(server.url, certificate_fingerprint(settings.tls_cert) if settings.tls_cert else None)
    try:
        server.serve_forever()
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.close()


def _server_context(settings: ServerSettings) -> ssl.SSLContext | None:
    if settings.tls_cert is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


def _say_how_devices_connect(settings: ServerSettings) -> None:
    """What the connection protects, and what a device must pass to trust this server."""
    beyond = not is_loopback(settings.host)
    if settings.tls_cert is not None:
        _err.print(
            f"TLS certificate {certificate_fingerprint(settings.tls_cert)} ({settings.tls_cert}): devices trust it by "
            "a CA, --tls-ca, or --tls-fingerprint with this fingerprint (the ready line repeats it)"
        )
    elif beyond:
        _err.print(
            "[yellow]warning[/]: --insecure: serving plain ws:// beyond loopback. Anyone on the path reads every "
            "hidden state (an eavesdropper holding the public weights read 99.7-100% of prompt tokens from them in "
            "the project's audit, docs/threat-model.md) and the token; devices refuse to send a token here unless "
            "they pass --insecure too."
        )
    if beyond and not settings.tokens:
        _err.print("[yellow]warning[/]: no --token: anyone who reaches this port can use the body")
