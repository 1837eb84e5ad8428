"""A CollaFuse client (``lambdasplit collafuse client``): private images, a U-Net for t <= t_c, a share of each round.

Each round the server triggers, the client draws a batch of its own images, encodes them with the public VAE,
draws the noise and timesteps, sends the rows with t > t_c (x_t, the noise, t, the caption's context; never the
images or their clean latents) and trains its own U-Net on the rest while the server trains. Its checkpoint and
an exported pipeline (``out/pipeline``, for ``lambdasplit imagine --policy collafuse``) stay on the client.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from websockets.exceptions import ConnectionClosed

from lambdasplit.collafuse.data import ClientImages
from lambdasplit.collafuse.messages import WIRE_DTYPES, Batch, control, parse_control
from lambdasplit.collafuse.model import Learner, PublicParts, export_pipeline, noised
from lambdasplit.errors import ConfigError, WireError
from lambdasplit.syncws import connect_session
from lambdasplit.tls import TlsTrust

MAX_MESSAGE = 1 << 26


@dataclass
class ClientReport:
    name: str
    rounds: int  # rounds this client took part in
    rows_sent: int  # noised rows sent to the server (t > t_c)
    rows_local: int  # rows it trained on itself (t <= t_c)
    bytes_sent: int
    bytes_received: int
    training_cpu_seconds: float  # CPU seconds of its own training steps
    round_cpu_seconds: float  # CPU seconds of whole rounds (encode, noise, send, train)
    cut_ratio: float
    handoff: int
    stopped: int | None = None  # the server stopped early, with this many rounds done (checkpointed here too)

    @property
    def cpu_seconds_per_step(self) -> float:
        return self.round_cpu_seconds / max(1, self.rounds)


class CollaFuseClient:
    """One client: ``run(url)`` joins the server, takes part in every round and returns a `ClientReport`.

    ``conditional=False`` trains an unconditional model: every context is the empty caption's.
    ``on_round(round, total, loss)`` is called after every round (the progress bar).
    """

    def __init__(
        self,
        parts: PublicParts,
        images: ClientImages,
        *,
        name: str,
        conditional: bool = True,
        lr: float = 1e-3,
        seed: int = 0,
        wire_dtype: str = "float16",
        out: Path | None = None,
        resume: bool = False,
    ) -> None:
        if wire_dtype not in WIRE_DTYPES:
            raise ConfigError(f"the wire dtype is one of {', '.join(WIRE_DTYPES)}, got {wire_dtype!r}")
        self.parts, self.name, self.seed, self.out = parts, name, seed, out
        self.wire_dtype = WIRE_DTYPES[wire_dtype]
        self.latents = parts.encode(images.images)
        captions = images.captions if conditional else [""] * len(images)
        self.contexts = parts.contexts(captions)
        self.first_round = 0
        if resume and out is not None and Learner.has_checkpoint(out):
            self.learner, state = Learner.resume(out, lr, parts.device)
            self.first_round = int(state["round"])
        else:
            self.learner = Learner(parts.new_unet(seed + 1), lr)
        self.conditional = conditional

    def run(
        self,
        url: str,
        *,
        trust: TlsTrust | None = None,
        timeout: float = 600.0,
        checkpoint_every: int = 0,
        on_round: Callable[[int, int, float | None], None] | None = None,
        token: str | None = None,
    ) -> ClientReport:
        """Train with the server at ``url`` until it says done, or stopped (SIGTERM on the server: this client saves
        its checkpoint at the round reached, ``report.stopped``); ``timeout``: the longest wait for a round;
        ``token``: the server's bearer token."""
        with contextlib.ExitStack() as stack:
            ws = connect_session(
                url,
                what="the CollaFuse server",
                exposes="the noised latents of this client's images",
                trust=trust or TlsTrust(),
                timeout=30.0,
                max_size=MAX_MESSAGE,
                stack=stack,
                token=token,
            )
            sent = received = 0

            def send(message: str | bytes) -> None:
                nonlocal sent
                ws.send(message)
                sent += len(message)

            def receive(*kinds: str) -> dict[str, Any]:
                nonlocal received
                try:
                    raw = ws.recv(timeout=timeout)
                except TimeoutError:
                    raise WireError(f"the server sent nothing for {timeout:.0f} s", code="timeout") from None
                except ConnectionClosed:
                    raise WireError("the server closed the connection", code="peer_gone") from None
                received += len(raw)
                return parse_control(raw, *kinds)

            send(
                control(
                    "join",
                    client=self.name,
                    fingerprint=self.parts.fingerprint,
                    latent_shape=list(self.parts.latent_shape),
                    context_shape=list(self.contexts.shape[1:]),
                )
            )
            welcome = receive("welcome")
            cut_ratio, handoff, total = float(welcome["cut_ratio"]), int(welcome["handoff"]), int(welcome["rounds"])
            batch = int(welcome["batch"])
            report = ClientReport(self.name, 0, 0, 0, 0, 0, 0.0, 0.0, cut_ratio, handoff)
            while True:
                message = receive("round", "done", "stopped")
                if message["type"] != "round":  # done; or stopped after the round this client last sent
                    break
                r = int(message["round"])
                start = time.process_time()
                server_rows, local = self._round(r, batch, handoff)
                send(server_rows.encode(self.wire_dtype))
                loss = self.learner.step(*local)
                report.round_cpu_seconds += time.process_time() - start
                report.rounds += 1
                report.rows_sent += len(server_rows)
                report.rows_local += len(local[2])
                if on_round:
                    on_round(r + 1, total, loss)
                if checkpoint_every and (r + 1) % checkpoint_every == 0:
                    self.save(r + 1, cut_ratio)
            report.bytes_sent, report.bytes_received = sent, received
            report.training_cpu_seconds = self.learner.cpu_seconds
            if message["type"] == "stopped":  # a run with --resume continues from this round
                report.stopped = int(message["round"])
            self.save(total if report.stopped is None else report.stopped, cut_ratio)
            return report

    def _round(
        self, r: int, batch: int, handoff: int
    ) -> tuple[Batch, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """This round's noised batch, split at t_c: (the server's rows, the client's own rows)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + r)  # a resumed run draws the same
        index = torch.randint(0, len(self.latents), (batch,), generator=generator)
        x_t, noise, t = noised(self.latents[index], generator)
        context = self.contexts[index]
        up = t > handoff
        here = ~up
        return Batch(r, x_t[up], noise[up], t[up], context[up]), (x_t[here], noise[here], t[here], context[here])

    def save(self, reached: int, cut_ratio: float) -> None:
        if self.out is None:
            return
        state = {"round": reached, "cut_ratio": cut_ratio, "side": "client", "client": self.name}
        self.learner.save(self.out, {**state, "conditional": self.conditional})
        export_pipeline(self.parts, self.learner.unet, self.out / "pipeline")
