"""Connecting a command to a body server, the same way in every command (generate, chat, up)."""

from __future__ import annotations

import os

from lambdasplit.client import CloudClient, connect_device
from lambdasplit.privacy.keys import ObfuscationKey
from lambdasplit.privacy.obfuscate import protect
from lambdasplit.split import SplitModel, load_split


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
) -> tuple[SplitModel, CloudClient]:
    """``connect_device`` with the CLI's conventions: the token falls back to $LAMBDASPLIT_TOKEN, and
    ``cloud`` may list several URLs, comma-separated, to fail over between. ``key``: an obfuscation key file."""
    return connect_device(
        cloud,
        model,
        token=token or os.environ.get("LAMBDASPLIT_TOKEN"),
        device=device,
        dtype=dtype,
        timeout=timeout,
        reconnect_deadline=reconnect_deadline,
        quiet=quiet,
        key=key,
    )


def load_local(model: str, layers: str, *, device: str | None, dtype: str | None, key: str | None) -> SplitModel:
    """All three parts in this process; with ``key``, the body obfuscated and the wire transformed by it."""
    split = load_split(model, layers, device=device, dtype=dtype)
    if key is not None:
        protect(split, ObfuscationKey.load(key))
    return split
