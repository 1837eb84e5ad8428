"""``lambdasplit up``: the device agent. An OpenAI-compatible API and a web UI on 127.0.0.1, the body in the cloud."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from lambdasplit.agent import AgentSettings, DeviceAgent
from lambdasplit.agent.images import ImageService
from lambdasplit.agent.run import run_agent
from lambdasplit.cli.cloud import connect_cloud, device_trust
from lambdasplit.cli.options import (
    DEFAULTS,
    CloudTimeout,
    Device,
    Dtype,
    Insecure,
    Key,
    Model,
    ReconnectDeadline,
    Speculative,
    TlsCa,
    TlsFingerprint,
    Token,
    device_token,
    quiet_pipeline_loading,
)
from lambdasplit.errors import ConfigError
from lambdasplit.generation.drafting import check_drafter_name
from lambdasplit.privacy.keys import ObfuscationKey
from lambdasplit.server.process import body_server_process
from lambdasplit.split import SplitModel, load_split
from lambdasplit.tls import TlsTrust
from lambdasplit.wire import WireDtype

if TYPE_CHECKING:
    from lambdasplit.audit.live import LiveAttacker

_err = Console(stderr=True)


@contextlib.contextmanager
def image_service(
    cloud: str,
    pipeline: str,
    *,
    token: str | None,
    trust: TlsTrust,
    timeout: float,
    device: str | None,
    dtype: str | None,
    device_unet: bool,
) -> Iterator[ImageService]:
    """The agent's image model: ``pipeline``'s device ends here, its U-Net on ``cloud`` (a URL, or 'local': a
    ``serve --pipeline`` subprocess started here)."""
    from lambdasplit.client import CloudClient, RemoteDiffusionLink
    from lambdasplit.diffusion import SplitPipeline, load_pipeline, load_unet_config
    from lambdasplit.diffusion.pipeline import unet_fingerprint

    with contextlib.ExitStack() as stack:
        if cloud == "local":
            token = secrets.token_urlsafe(16)
            with _err.status(f"starting a local diffusion body server ({pipeline})"):
                url = stack.enter_context(body_server_process(["--pipeline", pipeline], token=token))
            label = f"local diffusion body server {url}"
        elif cloud.startswith(("ws://", "wss://")):
            url, label = cloud, cloud
        else:
            raise ConfigError(f"--image-cloud takes ws://HOST:PORT/v1/split, wss://... or 'local', got {cloud!r}")
        quiet_pipeline_loading()
        with _err.status(f"loading {pipeline}, handshake with {url}"):
            pipe = load_pipeline(pipeline, device=device, dtype=dtype, unet=device_unet)
            unet_config = pipe.unet.config if device_unet else load_unet_config(pipeline)
            client = CloudClient(
                url,
                token=device_token(token),
                fingerprint=unet_fingerprint(unet_config),
                timeout=timeout,
                trust=trust,
            )
        stack.callback(client.close)
        yield ImageService(SplitPipeline(pipe, unet_config), RemoteDiffusionLink(client), pipeline, label)


def up(
    cloud: Annotated[
        str,
        typer.Option(
            help="Body server URL (ws://HOST:PORT/v1/split or wss://...; several, comma-separated, to fail over), "
            "or 'local' to start one here."
        ),
    ],
    model: Model = DEFAULTS["model"],
    layers: Annotated[str, typer.Option("--layers", "-l", help="Split points X:Y for --cloud local.")] = "2:28",
    host: Annotated[str, typer.Option(help="Address to serve on. Keep 127.0.0.1: the API has no auth.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port (0 picks a free one; the ready line names it).")] = 8000,
    token: Token = None,
    tls_fingerprint: TlsFingerprint = None,
    tls_ca: TlsCa = None,
    insecure: Insecure = False,
    wire_dtype: Annotated[
        str, typer.Option(help="Hidden states on the wire: float32, float16, bfloat16, int8, int6, int4, int2.")
    ] = "float16",
    max_parallel: Annotated[int, typer.Option(min=1, help="Generations served at once; more wait.")] = 4,
    speculative: Speculative = None,
    key: Key = None,
    attack: Annotated[
        bool,
        typer.Option(
            help="After each turn, run the audit's strongest attack on the hidden states it sent and show what it "
            "read back in the web UI (CPU time on this device, off the answer's path)."
        ),
    ] = True,
    cloud_timeout: CloudTimeout = 60.0,
    reconnect_deadline: ReconnectDeadline = 60.0,
    device: Device = None,
    dtype: Dtype = None,
    image_cloud: Annotated[
        str | None,
        typer.Option(
            help="Diffusion body server for the image page and /v1/images/generations (ws://.../v1/split, "
            "wss://...), or 'local' to start one here. Without it the agent serves text only.",
            show_default=False,
        ),
    ] = None,
    pipeline: Annotated[
        str, typer.Option(help="With --image-cloud: the diffusers pipeline (folder, hub id or shapes-t2i).")
    ] = "shapes-t2i",
    device_unet: Annotated[
        bool,
        typer.Option(
            "--device-unet/--no-device-unet",
            help="With --image-cloud: load the U-Net here too, for the unet-lambda and collafuse policies "
            "(--no-device-unet: the paper policy only, the U-Net's weights stay on disk).",
        ),
    ] = True,
) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) and a web UI.

    Point any OpenAI client at http://127.0.0.1:8000/v1. Head and tail run in this process; each request
    gets its own session on the body server, and only hidden states cross the network. The UI at / shows
    what the network sees, step by step.
    """
    if host not in ("127.0.0.1", "localhost", "::1"):
        _err.print(f"[yellow]warning[/]: serving on {host}: anyone who can reach it can use your model and cloud")
    wire = WireDtype.parse(wire_dtype)
    if speculative is not None:
        check_drafter_name(speculative)
    with contextlib.ExitStack() as stack:
        if cloud == "local" and key is not None:
            raise ConfigError(
                "--key needs a body server running the body obfuscated with it (`lambdasplit obfuscate`, then "
                "`lambdasplit serve --model BODY_DIR`); --cloud local serves the plain body"
            )
        if cloud == "local":
            token = secrets.token_urlsafe(16)
            with _err.status(f"starting a local body server (layers {layers} of {model})"):
                url = stack.enter_context(body_server_process(["--model", str(model), "--layers", layers], token=token))
            label = f"local body server {url}"
        elif all(u.strip().startswith(("ws://", "wss://")) for u in cloud.split(",")):
            url, label = cloud, cloud
        else:
            raise ConfigError(f"--cloud takes ws://HOST:PORT/v1/split, wss://... or 'local', got {cloud!r}")
        with _err.status(f"loading the head and tail of {model}, handshake with {url}"):
            split, client = connect_cloud(
                url,
                model,
                token=token,
                device=device,
                dtype=dtype,
                timeout=cloud_timeout,
                reconnect_deadline=reconnect_deadline,
                key=key,
                trust=device_trust(tls_fingerprint, tls_ca, insecure),
                quiet=True,
            )
        stack.enter_context(client)
        images = None
        if image_cloud is not None:
            images = stack.enter_context(
                image_service(
                    image_cloud,
                    pipeline,
                    token=token,
                    trust=device_trust(tls_fingerprint, tls_ca, insecure),
                    timeout=cloud_timeout,
                    device=device,
                    dtype=dtype,
                    device_unet=device_unet,
                )
            )
        settings = AgentSettings(wire_dtype=wire, max_parallel=max_parallel, speculative=speculative, cloud_label=label)
        attacker = _attacker(split, str(model), key) if attack else None
        agent = DeviceAgent(split, client, settings, images=images, attacker=attacker)
        p = split.points
        _err.print(
            f"{split.name}: head [0, {p.head_layers}) and tail [{p.body_end}, {p.num_layers}) here, "
            f"body [{p.head_layers}, {p.body_end}) on {label}; wire {wire.name.lower()}"
        )
        if images is not None:
            _err.print(f"{images.name}: text encoders, scheduler and VAE here, the U-Net on {images.cloud_label}")
        run_agent(agent, host=host, port=port)


def _attacker(split: SplitModel, model: str, key: str | None) -> LiveAttacker:
    """The audit's live attack for this deployment. Without a key the device's head and tail are the public
    weights the attacker holds. Under a permutation key (``--key``) the attacker's public split holds the body
    too (A4 ranks its candidates by the public model's next token). A developer bundle's key is said, not
    attacked: its head and tail are the developer's, and the public base is not at hand here."""
    from lambdasplit.audit.live import LiveAttacker

    transform = split.wire_transform
    if transform is None:
        return LiveAttacker(split)
    kind = transform.kind if isinstance(transform, ObfuscationKey) else type(transform).__name__
    if key is None:
        return LiveAttacker(split, key_kind=f"developer bundle's {kind}")
    if kind != "permutation":
        return LiveAttacker(split, key_kind=kind)
    runtime = split.runtime
    public = load_split(model, split.points, device=runtime.device, dtype=runtime.dtype, quiet=True)
    return LiveAttacker(public, key_kind=kind)
