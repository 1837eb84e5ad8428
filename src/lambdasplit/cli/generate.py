"""``lambdasplit generate``: split generation in one process (or the unsplit model, for comparison)."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console

from lambdasplit.cli.cloud import connect_cloud, device_trust, load_local, open_adapter_link, open_shared_link
from lambdasplit.cli.options import (
    DEFAULTS,
    CloudTimeout,
    Device,
    DraftTokens,
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
    TopK,
    TopP,
    sampling_params,
)
from lambdasplit.config import Runtime
from lambdasplit.errors import ConfigError
from lambdasplit.generation import BodyLink, DraftLength, GenerationResult, ModelDecoder, make_drafter, stream
from lambdasplit.mpc.device import SecretSharedLink
from lambdasplit.privacy.padding import PaddedLink
from lambdasplit.privatelora import AdapterLink
from lambdasplit.split import SplitModel
from lambdasplit.split.build import Role
from lambdasplit.wire import WireDtype

_err = Console(stderr=True)
# --unsplit still loads head and tail: they bring the tokenizer and configs, and cost little.
_PARTS: dict[bool, tuple[Role, ...]] = {False: ("head", "body", "tail"), True: ("head", "tail")}


def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt (with --chat: the user's message).")],
    model: Model = DEFAULTS["model"],
    layers: Layers = DEFAULTS["layers"],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Stop after this many tokens.")] = 128,
    # A plain flag that defaults to False: a flag defaulting to True cannot be turned off, and click 8.1 flips it.
    greedy: Annotated[
        bool, typer.Option("--greedy", help="Argmax decoding, as without --temperature; refuses a --temperature > 0.")
    ] = False,
    temperature: Temperature = 0.0,
    top_k: TopK = None,
    top_p: TopP = None,
    repetition_penalty: Annotated[
        float | None, typer.Option(help="Penalise repeated tokens (> 1); greedy or sampled.")
    ] = None,
    seed: Seed = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop at this string (repeatable).")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    system: Annotated[str | None, typer.Option(help="System message (with --chat).")] = None,
    unsplit: Annotated[bool, typer.Option("--unsplit", help="Run the plain, unsplit model instead.")] = False,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Paper's baseline: resend the whole sequence every step.")
    ] = False,
    cloud: Annotated[
        str | None,
        typer.Option(
            help="Body server URL (ws://HOST:PORT/v1/split; several, comma-separated, to fail over); layers come "
            "from the server."
        ),
    ] = None,
    secret_shared: Annotated[
        bool,
        typer.Option(
            "--secret-shared",
            help="--cloud names two share servers (`serve --share 0` and `--share 1`, comma-separated): the body runs "
            "on secret shares of the hidden states, and this device deals their randomness. Greedy, on CPU, slow "
            "(seconds per token).",
        ),
    ] = False,
    wide_norms: Annotated[
        bool,
        typer.Option(
            "--wide-norms",
            help="With --secret-shared: every forward's norms fit any row, so that none is redone when the prompt "
            "makes a second attention sink (e.g. an <|endoftext|> in it), which both servers would see; about 38% "
            "more rounds a token (docs/secret-sharing.md).",
        ),
    ] = False,
    privatelora: Annotated[
        str | None,
        typer.Option(
            help="With --cloud: the body server runs PrivateLoRA (`serve --privatelora`) and this file holds the "
            "device's private adapters M (`lambdasplit personalize`); one low-rank round trip per layer and token.",
            show_default=False,
        ),
    ] = None,
    token: Token = None,
    tls_fingerprint: TlsFingerprint = None,
    tls_ca: TlsCa = None,
    insecure: Insecure = False,
    pad_prompt: PadPrompt = None,
    wire_dtype: Annotated[
        str, typer.Option(help="Hidden states on the wire: float32, float16, bfloat16, int8, int6, int4, int2.")
    ] = "float16",
    speculative: Speculative = None,
    draft_tokens: DraftTokens = 4,
    key: Key = None,
    cloud_timeout: CloudTimeout = 60.0,
    reconnect_deadline: ReconnectDeadline = 60.0,
    device: Device = None,
    dtype: Dtype = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming text.")] = False,
) -> None:
    """Generate text with the model split in three parts.

    Without --cloud all three parts run in this process. With --cloud URL this process is the device: it runs
    head and tail, and only hidden states travel to the body server (`lambdasplit serve`).

    Greedy by default (--temperature 0, as `lambdasplit chat`): the output is the unsplit model's, token for
    token. --temperature T > 0 samples, shaped by --top-k, --top-p and made reproducible by --seed; those three
    are refused without it, and --greedy with a --temperature above 0 is refused too.
    """
    params = sampling_params(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        greedy=greedy,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        repetition_penalty=repetition_penalty,
        stop=tuple(stop or ()),
    )
    if speculative is not None and no_cache:
        raise ConfigError("--speculative rolls back rejected drafts in the KV caches; it cannot run with --no-cache")
    if wide_norms and not secret_shared:
        raise ConfigError("--wide-norms is a setting of --secret-shared")
    client = None
    link: BodyLink | None = None
    if privatelora is not None:
        if cloud is None or secret_shared or unsplit or no_cache or speculative or pad_prompt or key:
            raise ConfigError(
                "--privatelora needs --cloud URL and takes none of --secret-shared, --unsplit, --no-cache, "
                "--speculative, --pad-prompt, --key"
            )
        with _err.status(f"loading the head and tail of {model} and opening a PrivateLoRA session"):
            trust = device_trust(tls_fingerprint, tls_ca, insecure)
            split, link = open_adapter_link(
                model, privatelora, cloud, wire_dtype=wire_dtype, timeout=cloud_timeout, trust=trust, token=token
            )
    elif secret_shared:
        if cloud is None or unsplit or no_cache or speculative or pad_prompt or key:
            raise ConfigError(
                "--secret-shared needs --cloud URL0,URL1 and takes none of --unsplit, --no-cache, --speculative, "
                "--pad-prompt, --key"
            )
        with _err.status(f"loading the head and tail of {model} and opening a session on both share servers"):
            split = load_local(model, layers, device="cpu", dtype="float32", key=None, parts=("head", "tail"))
            trust = device_trust(tls_fingerprint, tls_ca, insecure)
            link = open_shared_link(split, cloud, cloud_timeout, trust, token, wide=wide_norms)
    elif cloud is not None:
        if unsplit:
            raise ConfigError("--unsplit runs the whole model here; it cannot be combined with --cloud")
        with _err.status(f"connecting to {cloud} and loading the head and tail of {model}"):
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
        session = client.open_session(WireDtype.parse(wire_dtype))
        link = PaddedLink(session, pad_prompt) if pad_prompt else session
    else:
        if pad_prompt:
            raise ConfigError("--pad-prompt hides the prompt's length on the network: it needs --cloud")
        if unsplit and key is not None:
            raise ConfigError("--key obfuscates the split's body; the unsplit model has none")
        with _err.status(f"loading {model} ({'unsplit' if unsplit else f'layers {layers}'})"):
            # The tokenizer and configs come from the split loader; --unsplit adds the plain HF model.
            split = load_local(model, layers, device=device, dtype=dtype, key=key, parts=_PARTS[unsplit])
    drafter = make_drafter(speculative, split, DraftLength(k=draft_tokens)) if speculative else None
    # --unsplit: the same loop as the split, driving the plain model through the Decoder protocol.
    decoder = _unsplit_decoder(split) if unsplit else None
    run = stream(
        split,
        prompt,
        chat=chat,
        system=system,
        use_cache=not no_cache,
        params=params,
        link=link,
        drafter=drafter,
        decoder=decoder,
    )
    before = client.socket_bytes() if client is not None else None
    for event in run:
        if not as_json:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    if decoder is not None:
        decoder.close()  # stream leaves a decoder it was given open
    result = run.result
    assert result is not None
    mode = "unsplit" if unsplit else ("split-no-cache" if no_cache else "split")
    if isinstance(link, SecretSharedLink):
        mode = "secret-shared"
        link.close()
        if not as_json:
            _err.print(
                f"[dim]secret-shared: the servers ran {link.peer_rounds[0]:,} rounds, {link.peer_bytes[0]:,} B each "
                f"way between them; this device dealt {link.dealt:,} B to share server 1 "
                f"({link.requests} requests); forwards redone wide (an output out of range): {link.retries}[/]"
            )
    if isinstance(link, AdapterLink):
        mode = "privatelora"
        link.close()
        if not as_json:
            _err.print(f"[dim]privatelora: {link.exchanges:,} low-rank round trips with the server[/]")
    if client is not None:
        mode += "-network"
        after = client.socket_bytes()
        socket_bytes = after - before if after is not None and before is not None else None
        client.close()
    else:
        socket_bytes = None
    if as_json:
        out = _json(result, split, mode)
        if isinstance(link, SecretSharedLink):
            out["secret_shared"] = {
                "peer_rounds": link.peer_rounds[0],
                "peer_bytes_each_way": link.peer_bytes[0],
                "dealt_bytes": link.dealt,
                "dealer_requests": link.requests,
                "retries": link.retries,
                "wide_norms": link.wide,
            }
        if isinstance(link, AdapterLink):
            out["privatelora"] = {"exchanges": link.exchanges, "adapters": privatelora}
        if client is not None:
            out.update(cloud=cloud, wire_dtype=WireDtype.parse(wire_dtype).name.lower())
            out["socket"] = (
                None if socket_bytes is None else {"sent": socket_bytes.sent, "received": socket_bytes.received}
            )
            if isinstance(link, PaddedLink):
                out["padded_rows"] = link.padded_rows
        print(json.dumps(out))
    else:
        print()
        _summary(result, split, mode)


def _unsplit_decoder(split: SplitModel) -> ModelDecoder:
    from lambdasplit.models.unsplit import load_unsplit

    rt: Runtime = split.runtime
    with _err.status("loading the unsplit model"):
        return ModelDecoder(load_unsplit(split.path, rt))


def _json(result: GenerationResult, split: SplitModel, mode: str) -> dict[str, object]:
    out = result.to_dict()
    p = split.points
    out.update(
        mode=mode,
        model=split.name,
        layers={"head": [0, p.head_layers], "body": [p.head_layers, p.body_end], "tail": [p.body_end, p.num_layers]},
        device=str(split.runtime.device),
        dtype=str(split.runtime.dtype).removeprefix("torch."),
    )
    if mode == "unsplit":
        out["layers"] = {"all": [0, p.num_layers]}
    return out


def _summary(result: GenerationResult, split: SplitModel, mode: str) -> None:
    t = result.traffic
    where = "unsplit" if mode == "unsplit" else f"layers {split.points} of {split.points.num_layers}"
    _err.print(
        f"[dim]{mode} · {where} · {result.new_tokens} tokens in {result.seconds:.2f} s "
        f"({result.tokens_per_second:.1f} tok/s, prefill {result.prefill_seconds * 1000:.0f} ms) · "
        f"hidden states up {t.up_bytes:,} B / down {t.down_bytes:,} B · {result.finish_reason}[/]"
    )
    if result.acceptance_rate is not None:
        _err.print(
            f"[dim]speculative: {result.accepted_tokens}/{result.drafted_tokens} drafted tokens accepted "
            f"({100 * result.acceptance_rate:.0f}%), {result.new_tokens / (result.steps + 1):.2f} tokens per step[/]"
        )
