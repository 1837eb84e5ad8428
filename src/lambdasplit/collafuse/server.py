"""CollaFuse's training server (``lambdasplit collafuse server``): one U-Net learning t > t_c from every client.

Round by round, as the paper's procedure: the server triggers a round; each client noises a batch of its own
images and sends the rows whose timestep is above t_c (x_t, the noise, t and the caption's context); the server
takes one optimiser step on all clients' rows together. A client whose batch is bad (a timestep at or below t_c,
another latent size, a malformed frame), that goes silent or that leaves is told why (when it can still hear) and
dropped; the round goes on with the others. Checkpoints go to ``out`` every ``checkpoint_every`` rounds and at
the end, with an exported pipeline (``out/pipeline``) for ``lambdasplit serve``. ``stop()`` (the CLI calls it on
SIGTERM) ends training after the round in progress: the server trains on it, checkpoints, and tells every client
``stopped`` with the round reached, where each client checkpoints too, so a run with ``--resume`` on every side
continues from there and nothing trained is lost.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from ssl import SSLContext
from typing import Any

import torch
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection

from lambdasplit.collafuse.messages import Batch, control, decode_batch, parse_control
from lambdasplit.collafuse.model import TRAIN_TIMESTEPS, Learner, PublicParts, export_pipeline, handoff_timestep
from lambdasplit.errors import CodedError, ConfigError, LambdaSplitError, SessionError, WireError
from lambdasplit.syncws import SessionServer, send_error

log = logging.getLogger("lambdasplit.collafuse")
#: Seconds between looks at ``stop()``'s flag while waiting for clients to join.
STOP_POLL = 0.5

MAX_MESSAGE = 1 << 26


@dataclass
class ServerSettings:
    clients: int  # how many clients take part; training starts when all have joined
    cut_ratio: float  # c, the server's share of the denoising steps
    rounds: int
    batch: int = 32  # images each client noises per round
    lr: float = 1e-3
    seed: int = 0
    join_timeout: float = 600.0
    round_timeout: float = 120.0
    checkpoint_every: int = 0  # rounds between checkpoints (0: only at the end)

    def __post_init__(self) -> None:
        handoff_timestep(self.cut_ratio)
        if self.clients < 1 or self.rounds < 1 or self.batch < 1:
            raise ConfigError("clients, rounds and batch must be >= 1")


@dataclass
class _Member:
    name: str
    ws: ServerConnection
    gone: threading.Event = field(default_factory=threading.Event)
    bytes_in: int = 0
    rows: int = 0


@dataclass
class RoundLog:
    round: int
    clients: int  # clients whose batch the server trained on
    rows: int
    loss: float | None
    bytes_in: int
    seconds: float


@dataclass
class ServerReport:
    rounds: list[RoundLog]
    dropped: dict[str, str]  # client -> the error code it was dropped with
    timesteps: list[int]  # every t the server trained on (the tests check t > t_c)
    cpu_seconds: float
    stopped: int | None = None  # stopped early (``stop()``) with this many rounds done and checkpointed


class CollaFuseServer:
    """Coordinates ``settings.clients`` clients over WebSockets and trains the server's U-Net.

    ``start()`` listens (tests use ``url``); ``train()`` waits for the clients, runs the rounds and returns a
    `ServerReport`. ``on_round(log)`` is called after every round (the progress bar). ``stop()`` ends the training
    after the round in progress (see the module's doc).
    """

    def __init__(
        self,
        parts: PublicParts,
        settings: ServerSettings,
        *,
        out: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl: SSLContext | None = None,
        resume: bool = False,
        tap: Callable[[str, Batch], None] | None = None,
        tokens: Sequence[str] = (),
    ) -> None:
        """``tap(client, batch)`` sees every checked batch: what a curious server keeps (the measurements).
        ``tokens``: the bearer tokens a client must present (none: any client may join)."""
        self.parts, self.settings, self.out, self.tap = parts, settings, out, tap
        self.handoff = handoff_timestep(settings.cut_ratio)
        self.first_round = 0
        if resume and out is not None and Learner.has_checkpoint(out):
            self.learner, state = Learner.resume(out, settings.lr, parts.device)
            if state.get("cut_ratio") != settings.cut_ratio:
                raise ConfigError(f"the checkpoint in {out} was trained at c = {state.get('cut_ratio')}")
            self.first_round = int(state["round"])
        else:
            self.learner = Learner(parts.new_unet(settings.seed), settings.lr)
        self.context_shape: tuple[int, ...] = tuple(parts.contexts([""]).shape[1:])
        self._members: dict[str, _Member] = {}
        self._lock = threading.Lock()
        self._joined = threading.Condition(self._lock)
        self._started = False
        self._stopping: str | None = None  # why ``stop()`` was called
        self._server = SessionServer(
            self._handle,
            host,
            port,
            max_size=MAX_MESSAGE,
            timeout=30.0,
            ssl=ssl,
            name="collafuse-server",
            tokens=tokens,
        )

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def address(self) -> tuple[str, int]:
        return self._server.address

    def start(self) -> CollaFuseServer:
        self._server.start()
        return self

    def close(self) -> None:
        with self._lock:
            members = list(self._members.values())
        for member in members:
            member.gone.set()
        self._server.close()

    def stop(self, reason: str = "stopped") -> None:
        """End ``train()`` after the round in progress, with a checkpoint on every side; before every client joined,
        ``train()`` raises ``SessionError`` (code ``stopped``, within ``STOP_POLL`` seconds). It only sets a flag,
        so a signal handler may call it."""
        self._stopping = reason

    @property
    def stopping(self) -> bool:
        return self._stopping is not None

    def __enter__(self) -> CollaFuseServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- one thread per client: the join, then it waits while the coordinator uses the connection ---------------
    def _handle(self, ws: ServerConnection) -> None:
        try:
            member = self._join(ws)
        except LambdaSplitError as exc:
            send_error(ws, exc)
            return
        except (ConnectionClosed, TimeoutError):
            return
        member.gone.wait()

    def _join(self, ws: ServerConnection) -> _Member:
        try:
            joined = parse_control(ws.recv(timeout=30.0), "join")
        except TimeoutError:
            raise WireError("the client sent no join message within 30 s", code="timeout") from None
        name = str(joined.get("client", ""))
        if not name or len(name) > 64:
            raise WireError("join needs a client name of 1-64 characters", code="bad_frame")
        latent = tuple(joined.get("latent_shape") or ())
        if latent != self.parts.latent_shape:
            raise WireError(
                f"client {name!r} sends latents {list(latent)}; this model's are {list(self.parts.latent_shape)} "
                "(another image size?)",
                code="bad_shape",
            )
        if joined.get("fingerprint") != self.parts.fingerprint:
            raise WireError(
                f"client {name!r} trains another U-Net architecture (fingerprint {joined.get('fingerprint')!r}, "
                f"this server's {self.parts.fingerprint})",
                code="model_mismatch",
            )
        if tuple(joined.get("context_shape") or ()) != self.context_shape:
            raise WireError(f"client {name!r}'s contexts are not {list(self.context_shape)}", code="bad_shape")
        with self._joined:
            if self._started:
                raise SessionError("training has started; this server takes no more clients", "round_started")
            if name in self._members:
                raise SessionError(f"a client named {name!r} has joined already", "duplicate_client")
            if len(self._members) >= self.settings.clients:
                raise SessionError(f"this server takes {self.settings.clients} clients", "too_many_clients")
            member = self._members[name] = _Member(name, ws)
            self._joined.notify_all()
        return member

    # --- the coordinator ----------------------------------------------------------------------------------------
    def train(self, on_round: Callable[[RoundLog], None] | None = None) -> ServerReport:
        settings = self.settings
        members = self._wait_for_clients()
        for member in list(members):
            welcome = control(
                "welcome",
                cut_ratio=settings.cut_ratio,
                handoff=self.handoff,
                rounds=settings.rounds,
                round=self.first_round,
                batch=settings.batch,
                clients=[m.name for m in members],
            )
            self._send(members, member, welcome)
        report = ServerReport([], {}, [], 0.0)
        # Round r's trigger goes out before the server trains on round r - 1: the clients noise and train their
        # share of round r meanwhile (their batches never depend on the server's weights).
        pending: tuple[int, list[tuple[Batch, int]], float] | None = None
        for r in range(self.first_round, settings.rounds):
            if self._stopping is not None:  # round r is not started: train on r - 1, checkpoint r, tell everyone
                log.warning("%s: stopping with %d rounds done, with a checkpoint", self._stopping, r)
                return self._stop_at(r, members, pending, report, on_round)
            started = time.perf_counter()
            last = report.rounds[-1].loss if report.rounds else None
            for member in list(members):
                self._send(members, member, control("round", round=r, loss=last), report)
            if pending is not None:
                self._finish(*pending, report, on_round)
            received = list(self._collect(members, r, report))
            if not members:
                raise SessionError(f"every client has left (round {r})", "no_clients")
            pending = (r, received, started)
        if pending is not None:
            self._finish(*pending, report, on_round)
        for member in list(members):
            self._send(members, member, control("done", rounds=settings.rounds), report)
            member.gone.set()
        report.cpu_seconds = self.learner.cpu_seconds
        self.save(settings.rounds)
        return report

    def _stop_at(
        self,
        r: int,
        members: list[_Member],
        pending: tuple[int, list[tuple[Batch, int]], float] | None,
        report: ServerReport,
        on_round: Callable[[RoundLog], None] | None,
    ) -> ServerReport:
        """``stop()`` before round ``r``: the clients have done round r - 1 and wait; the server trains on it, saves
        its checkpoint at ``r`` and tells them (each saves its own at ``r``)."""
        if pending is not None:
            self._finish(*pending, report, on_round)
        self.save(r)
        for member in list(members):
            self._send(members, member, control("stopped", round=r, reason=self._stopping), report)
            member.gone.set()
        report.cpu_seconds, report.stopped = self.learner.cpu_seconds, r
        log.warning("stopped after %d of %d rounds (%s)", r, self.settings.rounds, self._stopping)
        return report

    def _finish(
        self,
        r: int,
        received: list[tuple[Batch, int]],
        started: float,
        report: ServerReport,
        on_round: Callable[[RoundLog], None] | None,
    ) -> None:
        """Train on round ``r``'s batches, log it, checkpoint when due."""
        batches = [batch for batch, _ in received]
        loss = self._step(batches, report)
        rows, bytes_in = sum(len(b) for b in batches), sum(n for _, n in received)
        logged = RoundLog(r, len(batches), rows, loss, bytes_in, time.perf_counter() - started)
        report.rounds.append(logged)
        if on_round:
            on_round(logged)
        every = self.settings.checkpoint_every
        if every and (r + 1) % every == 0:
            self.save(r + 1)

    def _wait_for_clients(self) -> list[_Member]:
        deadline = time.monotonic() + self.settings.join_timeout
        with self._joined:
            while len(self._members) < self.settings.clients:
                if self._stopping is not None:
                    raise SessionError(
                        f"{self._stopping} before every client joined ({len(self._members)} of "
                        f"{self.settings.clients}): nothing trained",
                        "stopped",
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SessionError(
                        f"{len(self._members)} of {self.settings.clients} clients joined within "
                        f"{self.settings.join_timeout:.0f} s",
                        "timeout",
                    )
                self._joined.wait(min(left, STOP_POLL))  # wakes for a client, or to look at the stop flag
            self._started = True
            return sorted(self._members.values(), key=lambda m: m.name)  # one order: runs and resumes repeat

    def _collect(self, members: list[_Member], r: int, report: ServerReport) -> Iterator[tuple[Batch, int]]:
        """Each client's checked batch and its size in bytes; a client that fails is dropped."""
        for member in list(members):
            try:
                raw = member.ws.recv(timeout=self.settings.round_timeout)
                batch = decode_batch(
                    raw,
                    round=r,
                    handoff=self.handoff,
                    timesteps=TRAIN_TIMESTEPS,
                    latent_shape=self.parts.latent_shape,
                    context_shape=self.context_shape,
                    max_rows=self.settings.batch,
                )
            except TimeoutError:
                silent = WireError(f"no batch within {self.settings.round_timeout:.0f} s", code="timeout")
                self._drop(members, member, report, silent)
                continue
            except ConnectionClosed:
                self._drop(members, member, report, WireError("the client left mid-round", code="peer_gone"))
                continue
            except CodedError as exc:
                self._drop(members, member, report, exc)
                continue
            if self.tap is not None:
                self.tap(member.name, batch)
            member.bytes_in += len(raw)
            member.rows += len(batch)
            yield batch, len(raw)

    def _step(self, batches: list[Batch], report: ServerReport) -> float | None:
        if not any(len(b) for b in batches):
            return None
        x_t, noise, t, context = (torch.cat([getattr(b, k) for b in batches]) for k in ("x_t", "noise", "t", "context"))
        report.timesteps.extend(int(v) for v in t)
        return self.learner.step(x_t, noise, t, context)

    def _send(self, members: list[_Member], member: _Member, message: str, report: ServerReport | None = None) -> None:
        try:
            member.ws.send(message)
        except ConnectionClosed:
            self._drop(members, member, report, WireError("the client left", code="peer_gone"))

    def _drop(
        self, members: list[_Member], member: _Member, report: ServerReport | None, error: LambdaSplitError
    ) -> None:
        code = error.code if isinstance(error, CodedError) else "bad_request"
        log.warning("dropping client %s: %s (%s)", member.name, error, code)
        if member in members:
            members.remove(member)
        if report is not None:
            report.dropped[member.name] = code
        with contextlib.suppress(Exception):
            send_error(member.ws, error)
        member.gone.set()

    def save(self, reached: int) -> None:
        if self.out is None:
            return
        state: dict[str, Any] = {"round": reached, "cut_ratio": self.settings.cut_ratio, "side": "server"}
        self.learner.save(self.out, state)
        export_pipeline(self.parts, self.learner.unet, self.out / "pipeline")
