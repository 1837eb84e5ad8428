"""Connect a device to a body server: the split points come from the server, so the sides cannot disagree."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from lambdasplit.client.connection import CloudClient
from lambdasplit.errors import ConfigError
from lambdasplit.models.checkpoint import Checkpoint
from lambdasplit.models.registry import DEFAULT_MODEL
from lambdasplit.models.resolve import resolve_checkpoint
from lambdasplit.privacy.bundles import UserBundle, is_bundle
from lambdasplit.privacy.keys import ObfuscationKey
from lambdasplit.privacy.obfuscate import protect
from lambdasplit.split.loader import SplitModel, load_split
from lambdasplit.tls import TlsTrust


def connect_device(
    url: str | Sequence[str],
    model: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    token: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    timeout: float = 60.0,
    trust: TlsTrust | None = None,
    quiet: bool = False,
    reconnect_deadline: float = 60.0,
    key: ObfuscationKey | str | os.PathLike[str] | None = None,
    ca_file: str | None = None,
) -> tuple[SplitModel, CloudClient]:
    """Connect to the body server at ``url`` and load this device's head and tail for its split points.

    The handshake carries this checkpoint's fingerprint; a server running another model refuses it
    (``RemoteError`` with code ``model_mismatch``). ``url`` may be a list (or a comma-separated string)
    of servers of the same deployment: the client fails over between them (``CloudClient``).

    ``trust`` says which ``wss://`` certificates to accept (``TlsTrust``; default: this machine's CAs, else the
    certificate pinned on first use); ``ca_file`` is the deprecated spelling of ``TlsTrust(ca_file=...)``.

    ``model`` may be a user bundle from a model developer (``lambdasplit developer package``): its head, tail and
    key are used, and the handshake presents its group's fingerprint.

    With ``key`` (an ``ObfuscationKey`` or its file), the server must run the body obfuscated with that key
    (``lambdasplit obfuscate``); the device then sends ``key.encode(h)`` and decodes what comes back.
    """
    urls = [u.strip() for u in url.split(",")] if isinstance(url, str) else list(url)
    bundle = UserBundle.open(Path(model)) if is_bundle(Path(model)) else None
    if bundle is not None:
        if key is not None:
            raise ConfigError(f"{model} is a user bundle and carries its group's key; do not pass a key as well")
        fingerprint = bundle.fingerprint
    else:
        fingerprint = Checkpoint(resolve_checkpoint(model, quiet=quiet)).fingerprint()
    if key is not None and not isinstance(key, ObfuscationKey):
        key = ObfuscationKey.load(key)
    if key is not None:
        key.check(fingerprint, key.points)  # the model; the split points are checked against the server's below
        fingerprint = key.body_fingerprint()
    client = CloudClient(
        urls,
        token=token,
        fingerprint=fingerprint,
        timeout=timeout,
        trust=trust,
        ca_file=ca_file,
        group=bundle.group if bundle is not None else None,
        reconnect_deadline=reconnect_deadline,
    )
    try:
        if client.mode != "split":
            raise ConfigError(
                f"{url} is a {client.mode} server: it takes text (GENERATE), not hidden states; "
                "start it without --cloud-only for split inference"
            )
        split = load_split(model, client.layers, parts=["head", "tail"], device=device, dtype=dtype, quiet=quiet)
        expected = "logits" if split.layout == "stip" else "hidden"
        if client.welcome.get("output", "hidden") != expected:
            raise ConfigError(
                f"{model} is for the {split.layout} layout (the body returns {expected}); the server's body returns "
                f"{client.welcome.get('output')}"
            )
        if bundle is not None:
            bundle.protect(split)
        elif key is not None:
            protect(split, key)
    except BaseException:
        client.close()
        raise
    return split, client
