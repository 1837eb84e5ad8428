"""Connecting a command to a body server, the same way in every command (generate, chat, up)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape

from lambdasplit.cli.options import device_token
from lambdasplit.client import CloudClient, connect_device
from lambdasplit.errors import ConfigError
from lambdasplit.mpc.device import SecretSharedLink
from lambdasplit.privacy.keys import ObfuscationKey
from lambdasplit.privacy.obfuscate import protect
from lambdasplit.privatelora import AdapterLink, PrivateAdapters
from lambdasplit.split import SplitModel, load_split
from lambdasplit.split.build import Role
from lambdasplit.tls import TlsTrust

_err = Console(stderr=True)


def device_trust(fingerprint: str | None, ca: Path | None, insecure: bool) -> TlsTrust:
    """``--tls-fingerprint``, ``--tls-ca`` and ``--insecure`` as a ``TlsTrust`` whose notices go to stderr."""
    return TlsTrust(
        fingerprint=fingerprint,
        ca_file=ca,
        insecure=insecure,
        notify=lambda message: _err.print(f"[yellow]{escape(message)}[/]"),
    )


def connect_cloud(
    cloud: str,
    model: str,
    *,
    token: str | None,
    device: str | None,
    dtype: str | None,
    timeout: float,
    reconnect_deadline: float,
    quiet: bool = False,
    key: str | None = None,
    trust: TlsTrust | None = None,
) -> tuple[SplitModel, CloudClient]:
    """``connect_device`` with the CLI's conventions: the token falls back to $LAMBDASPLIT_TOKEN, and
    ``cloud`` may list several URLs, comma-separated, to fail over between. ``key``: an obfuscation key file;
    ``trust``: which wss:// certificates to accept (``device_trust``)."""
    return connect_device(
        cloud,
        model,
        token=device_token(token),
        device=device,
        dtype=dtype,
        timeout=timeout,
        reconnect_deadline=reconnect_deadline,
        quiet=quiet,
        key=key,
        trust=trust,
    )


def load_local(
    model: str,
    layers: str,
    *,
    device: str | None,
    dtype: str | None,
    key: str | None,
    parts: tuple[Role, ...] = ("head", "body", "tail"),
) -> SplitModel:
    """The split in this process; with ``key``, the body obfuscated and the wire transformed by it.

    ``parts``: all three by default; ``("head", "tail")`` when only the tokenizer, configs and ends are wanted
    (``generate --unsplit`` runs the whole model beside them). A key needs the body it obfuscates.
    """
    if key is not None and "body" not in parts:
        raise ConfigError("--key obfuscates the split's body; without the body there is nothing to obfuscate")
    split = load_split(model, layers, device=device, dtype=dtype, parts=parts)
    if key is not None:
        protect(split, ObfuscationKey.load(key))
    return split


def open_shared_link(
    split: SplitModel,
    cloud: str,
    timeout: float,
    trust: TlsTrust | None,
    token: str | None = None,
    wide: bool = False,
) -> SecretSharedLink:
    """A session on the two share servers of ``cloud`` ("URL0,URL1"), checked against this device's split.
    ``token`` (else $LAMBDASPLIT_TOKEN): one bearer token for both servers, or "TOKEN0,TOKEN1", one for each.
    ``wide``: every forward's norms fit any row (``SecretSharedLink``)."""
    urls = [u.strip() for u in cloud.split(",") if u.strip()]
    given = device_token(token)
    tokens = None if not given else given if "," not in given else [t.strip() or None for t in given.split(",")]
    link = SecretSharedLink(urls, timeout=timeout, trust=trust, token=tokens, wide=wide)
    body_layers = split.points.body_end - split.points.head_layers
    if link.layers != body_layers or link.hidden_size != split.hidden_size:
        link.close()
        raise ConfigError(
            f"the share servers run {link.layers} layers of width {link.hidden_size}; this device's split "
            f"{split.points} needs {body_layers} of width {split.hidden_size}: pass the servers' --layers"
        )
    return link


def open_adapter_link(
    model: str,
    adapters_path: str,
    cloud: str,
    *,
    wire_dtype: str,
    timeout: float,
    trust: TlsTrust | None,
    token: str | None = None,
) -> tuple[SplitModel, AdapterLink]:
    """A PrivateLoRA session on ``cloud`` answered by the adapters in ``adapters_path``; this device's head and tail
    are cut where the adapted body begins and ends. ``token``: the server's (else $LAMBDASPLIT_TOKEN)."""
    if wire_dtype not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"PrivateLoRA sends float32, float16 or bfloat16, not --wire-dtype {wire_dtype}")
    adapters = PrivateAdapters.load(adapters_path)
    layers = f"{adapters.layers[0]}:{adapters.layers[-1] + 1}"
    split = load_split(model, layers, device="cpu", dtype="float32", parts=("head", "tail"))
    link = AdapterLink(
        cloud,
        adapters,
        dtype=wire_dtype,
        timeout=timeout,
        trust=trust,
        token=device_token(token),
    )
    try:
        link.check_model(split)
    except ConfigError:
        link.close()
        raise
    return split, link
