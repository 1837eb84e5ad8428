"""Connect a device to a body server: the split points come from the server, so the sides cannot disagree."""

from __future__ import annotations

import os

import torch

from lambdasplit.client.connection import CloudClient
from lambdasplit.errors import ConfigError
from lambdasplit.models.checkpoint import Checkpoint
from lambdasplit.models.registry import DEFAULT_MODEL
from lambdasplit.models.resolve import resolve_checkpoint
from lambdasplit.split.loader import SplitModel, load_split


def connect_device(
    url: str,
    model: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    token: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    timeout: float = 60.0,
    ca_file: str | None = None,
    quiet: bool = False,
) -> tuple[SplitModel, CloudClient]:
    """Connect to the body server at ``url`` and load this device's head and tail for its split points.

    The handshake carries this checkpoint's fingerprint; a server running another model refuses it
    (``RemoteError`` with code ``model_mismatch``).
    """
    fingerprint = Checkpoint(resolve_checkpoint(model, quiet=quiet)).fingerprint()
    client = CloudClient(url, token=token, fingerprint=fingerprint, timeout=timeout, ca_file=ca_file)
    try:
        if client.mode != "split":
            raise ConfigError(
                f"{url} is a {client.mode} server: it takes text (GENERATE), not hidden states; "
                "start it without --cloud-only for split inference"
            )
        split = load_split(model, client.layers, parts=["head", "tail"], device=device, dtype=dtype, quiet=quiet)
    except BaseException:
        client.close()
        raise
    return split, client
