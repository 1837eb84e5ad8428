"""``lambdasplit up``: the device agent. An OpenAI-compatible API and a web UI on 127.0.0.1, the body in the cloud."""

from __future__ import annotations

import contextlib
import secrets
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from lambdasplit.agent import AgentSettings, DeviceAgent
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
)
from lambdasplit.errors import ConfigError
from lambdasplit.generation.drafting import check_drafter_name
from lambdasplit.privacy.keys import ObfuscationKey
from lambdasplit.server.process import body_server_process
from lambdasplit.split import SplitModel, load_split
from lambdasplit.wire import WireDtype

if TYPE_CHECKING:
    from lambdasplit.audit.live import LiveAttacker

_err = Console(stderr=True)


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
        settings = AgentSettings(wire_dtype=wire, max_parallel=max_parallel, speculative=speculative, cloud_label=label)
        agent = DeviceAgent(split, client, settings, attacker=_attacker(split, str(model), key) if attack else None)
        p = split.points
        _err.print(
            f"{split.name}: head [0, {p.head_layers}) and tail [{p.body_end}, {p.num_layers}) here, "
            f"body [{p.head_layers}, {p.body_end}) on {label}; wire {wire.name.lower()}"
        )
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
