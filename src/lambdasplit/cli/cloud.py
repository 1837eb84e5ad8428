"""Connecting a command to a body server, the same way in every command (generate, chat, up)."""

from __future__ import annotations

import os

from lambdasplit.client import CloudClient, connect_device
from lambdasplit.split import SplitModel


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
) -> tuple[SplitModel, CloudClient]:
    """``connect_device`` with the CLI's conventions: the token falls back to $LAMBDASPLIT_TOKEN, and
    ``cloud`` may list several URLs, comma-separated, to fail over between."""
    return connect_device(
        cloud,
        model,
        token=token or os.environ.get("LAMBDASPLIT_TOKEN"),
        device=device,
        dtype=dtype,
        timeout=timeout,
        reconnect_deadline=reconnect_deadline,
        quiet=quiet,
    )
