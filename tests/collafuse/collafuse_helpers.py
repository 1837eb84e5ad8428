"""Shared pieces of the CollaFuse tests: a tiny U-Net over the embedded pipeline's public parts, a deployment of a
server and clients over loopback, and a hand-made client that misbehaves."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

from lambdasplit.bench.relay import CountingRelay
from lambdasplit.collafuse.client import ClientReport, CollaFuseClient
from lambdasplit.collafuse.data import client_images
from lambdasplit.collafuse.model import PublicParts
from lambdasplit.collafuse.server import CollaFuseServer, RoundLog, ServerReport, ServerSettings

TIMEOUT = 30.0  # every wait: a failure surfaces within this, not as a hang

#: The embedded U-Net's architecture at a quarter of its width: same blocks, same latent and context sizes.
TINY_UNET = {"block_out_channels": [16, 16, 16], "norm_num_groups": 8, "attention_head_dim": 4}


def tiny_parts() -> PublicParts:
    return tiny_parts_on("cpu")


def tiny_parts_on(device: str) -> PublicParts:
    base = PublicParts.load()
    return PublicParts.load(unet_config={**base.unet_config, **TINY_UNET}, device=device)


@dataclass
class Deployment:
    server: ServerReport
    clients: dict[str, ClientReport]
    relay: CountingRelay
    errors: dict[str, BaseException] = field(default_factory=dict)
    seen: list[tuple[str, Any]] = field(default_factory=list)  # (client, Batch) as the server's tap got them


def run_deployment(
    parts: PublicParts,
    settings: ServerSettings,
    *,
    clients: int,
    images: int = 16,
    out: Path | None = None,
    conditional: bool = True,
    rogues: tuple[Callable[[str], None], ...] = (),
    resume: bool = False,
    client_parts: PublicParts | None = None,
    stop_after: int | None = None,
) -> Deployment:
    """A server and ``clients`` `CollaFuseClient` threads over a counting relay that keeps every byte; each of
    ``rogues(url)`` runs in one more thread (the server must then expect ``clients + len(rogues)``).
    ``stop_after``: the server is told to stop (as on SIGTERM) once it has trained that many rounds."""
    seen: list[tuple[str, Any]] = []
    with (
        CollaFuseServer(
            parts, settings, out=out / "server" if out else None, tap=lambda n, b: seen.append((n, b)), resume=resume
        ) as server,
        CountingRelay(server.address, keep=True) as relay,
    ):  # fmt: skip
        reports: dict[str, ClientReport] = {}
        errors: dict[str, BaseException] = {}

        learners = [  # built here, one at a time (diffusers' model building is not thread-safe)
            CollaFuseClient(
                client_parts or parts,
                client_images(k, clients, images, seed=1),
                name=f"client-{k}",
                seed=k,
                conditional=conditional,
                out=out / f"client-{k}" if out else None,
                resume=resume,
            )
            for k in range(clients)
        ]

        def client(k: int) -> None:
            try:
                reports[learners[k].name] = learners[k].run(relay.url(), timeout=TIMEOUT)
            except BaseException as exc:  # the test reads it
                errors[learners[k].name] = exc

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
        threads += [threading.Thread(target=rogue, args=(relay.url(),), daemon=True) for rogue in rogues]
        for thread in threads:
            thread.start()

        def stop_when_due(log: RoundLog) -> None:
            if stop_after is not None and log.round + 1 >= stop_after:
                server.stop("told to by the test")

        report = server.train(stop_when_due)
        for thread in threads:
            thread.join(TIMEOUT)
        return Deployment(report, reports, relay, errors, seen)


def join_message(parts: PublicParts, name: str, **overrides: Any) -> str:
    fields = {
        "type": "join",
        "client": name,
        "fingerprint": parts.fingerprint,
        "latent_shape": list(parts.latent_shape),
        "context_shape": [16, 64],
        **overrides,
    }
    return json.dumps(fields)


@contextmanager
def raw_client(url: str) -> Iterator[ClientConnection]:
    with connect(url, open_timeout=TIMEOUT, max_size=1 << 26) as ws:
        yield ws


def next_json(ws: ClientConnection) -> dict[str, Any]:
    raw = ws.recv(timeout=TIMEOUT)
    assert isinstance(raw, str), f"expected a JSON message, got {len(raw)} bytes"
    return json.loads(raw)
