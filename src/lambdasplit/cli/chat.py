"""``lambdasplit chat``: an interactive conversation, split in process or with the body on a server."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from lambdasplit.cli.cloud import connect_cloud, device_trust, load_local
from lambdasplit.cli.options import (
    DEFAULTS,
    CloudTimeout,
    Device,
    Dtype,
    Insecure,
    Key,
    Layers,
    Model,
    PadPrompt,
    ReconnectDeadline,
    Seed,
    Speculative,
    Temperature,
    TlsCa,
    TlsFingerprint,
    Token,
    TopP,
    sampling_params,
)
from lambdasplit.client import CloudClient
from lambdasplit.errors import ConfigError
from lambdasplit.generation import LocalBodyLink, SplitDecoder, stream
from lambdasplit.generation.text import Message
from lambdasplit.privacy.padding import PaddedLink
from lambdasplit.wire import WireDtype

_out = Console(highlight=False)
HELP = "Type a message. /reset forgets the conversation, /exit (or Ctrl-D) quits."


def chat(
    model: Model = DEFAULTS["model"],
    layers: Layers = DEFAULTS["layers"],
    cloud: Annotated[
        str | None, typer.Option(help="Body server URL(s), comma-separated; without it, all parts run here.")
    ] = None,
    token: Token = None,
    tls_fingerprint: TlsFingerprint = None,
    tls_ca: TlsCa = None,
    insecure: Insecure = False,
    pad_prompt: PadPrompt = None,
    wire_dtype: Annotated[str, typer.Option(help="float32, float16, bfloat16, int8, int6, int4 or int2.")] = "float16",
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 256,
    temperature: Temperature = 0.0,
    top_p: TopP = None,
    seed: Seed = None,
    speculative: Speculative = None,
    key: Key = None,
    cloud_timeout: CloudTimeout = 60.0,
    reconnect_deadline: ReconnectDeadline = 60.0,
    device: Device = None,
    dtype: Dtype = None,
) -> None:
    """Chat with the model. Each answer streams as it is generated; the history is kept until /reset."""
    params = sampling_params(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if pad_prompt and not cloud:
        raise ConfigError("--pad-prompt hides the prompt's length on the network: it needs --cloud")
    client: CloudClient | None = None
    with _out.status(f"loading {model}" + (f" and connecting to {cloud}" if cloud else "")):
        if cloud:
            split, client = connect_cloud(
                cloud,
                model,
                token=token,
                device=device,
                dtype=dtype,
                timeout=cloud_timeout,
                reconnect_deadline=reconnect_deadline,
                key=key,
                trust=device_trust(tls_fingerprint, tls_ca, insecure),
            )
        else:
            split = load_local(model, layers, device=device, dtype=dtype, key=key)
    where = f"body on {cloud}" if cloud else "all parts in this process"
    _out.print(f"[dim]{split.name} · layers {split.points} of {split.points.num_layers} · {where}[/]\n{HELP}")
    history: list[Message] = []
    # One decoder (one body session) for the whole conversation: each turn sends only its new positions.
    decoder: SplitDecoder | None = None
    try:
        while True:
            try:
                text = _out.input("[bold]you[/]: ").strip()
            except EOFError:
                break
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                history.clear()
                if decoder is not None:
                    decoder.close()
                    decoder = None
                _out.print("[dim](conversation forgotten)[/]")
                continue
            if not text:
                continue
            history.append({"role": "user", "content": text})
            if decoder is None:
                if client is not None:
                    session = client.open_session(WireDtype.parse(wire_dtype))
                    decoder = SplitDecoder(split, PaddedLink(session, pad_prompt) if pad_prompt else session)
                else:
                    assert split.body is not None
                    decoder = SplitDecoder(split, LocalBodyLink(split.body))
            run = stream(split, history, system=system, params=params, drafter=speculative, decoder=decoder)
            _out.print("[bold]model[/]: ", end="")
            for event in run:
                _out.print(event.text, end="", soft_wrap=True)
            result = run.result
            assert result is not None
            _out.print(f"\n[dim]{result.new_tokens} tokens · {result.tokens_per_second:.1f} tok/s[/]")
            history.append({"role": "assistant", "content": result.text})
    finally:
        if decoder is not None:
            decoder.close()
        if client is not None:
            client.close()
