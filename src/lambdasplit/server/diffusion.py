"""The diffusion body server: one U-Net for many devices, one `DiffusionSession` per image.

    client                                   server
    HELLO {fingerprint}               ->
                                      <-     WELCOME {mode "diffusion", model, fingerprint, unet, policies, limits}
    OPEN {SessionOptions}             ->
                                      <-     OPENED {session, id, shapes} (header: session)
    FORWARD inputs..., latent @ 0     ->     (no reply until the last input)
    paper:                            <-     RESULT noise @ 0, 1, ..., N-1 (streamed as computed)
    unet-lambda, per step i:
      FORWARD emb @ i, sample @ i     ->
                                      <-     RESULT sample @ i
    collafuse:                        <-     STATE {step m, state, tensors}, RESULT latent @ m, RESULT state tensors
    CLOSE                             ->
                                      <-     CLOSED {compute_seconds}

Every frame's compute runs on the one compute thread, a frame at a time, so several devices' images interleave
step by step; a streamed image stops when its device disconnects.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lambdasplit import __version__
from lambdasplit.diffusion.protocol import POLICIES, SessionOptions
from lambdasplit.errors import ConfigError, LambdaSplitError
from lambdasplit.server.base import PROTOCOL, FrameServer, Refusal, Reply
from lambdasplit.server.settings import ServerSettings
from lambdasplit.wire import Frame, MessageType

if TYPE_CHECKING:
    from lambdasplit.diffusion.cloud import DiffusionBody, DiffusionSession


@dataclass
class _Held:
    session: DiffusionSession
    owner: int
    token: str
    last_used: float = field(default_factory=time.monotonic)


class DiffusionServer(FrameServer):
    """Serves a `DiffusionBody` to split text-to-image devices."""

    def __init__(self, body: DiffusionBody, settings: ServerSettings) -> None:
        super().__init__(settings, ("images", "steps", "images_abandoned"))
        self.body = body
        self.fingerprint, self.model_name = body.fingerprint, f"the U-Net of {body.name}"
        self.sessions: dict[tuple[int, int], _Held] = {}
        self._next_handle = 1
        self.evicted = 0

    def welcome(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL,
            "server": f"lambdasplit/{__version__}",
            "mode": "diffusion",
            "model": self.body.name,
            "fingerprint": self.body.fingerprint,
            "unet": self.body.describe(),
            "policies": list(POLICIES),
            "wire_dtypes": [d.name.lower() for d in self.settings.wire_dtypes],
            "limits": {
                "max_sessions": self.settings.max_sessions,
                "idle_ttl": self.settings.idle_ttl,
                "max_frame_bytes": self.settings.max_frame_bytes,
            },
        }

    def health_body(self) -> dict[str, Any]:
        return {"model": self.body.name, "mode": "diffusion", "sessions": len(self.sessions)}

    def metrics_body(self) -> dict[str, Any]:
        return {
            "sessions": len(self.sessions),
            "sessions_evicted": self.evicted,
            **dict(self.counters),
            "compute_seconds": round(self.body.compute_seconds, 6),
        }

    def close_owner(self, conn: int) -> int:
        keys = [k for k in self.sessions if k[0] == conn]
        for k in keys:
            if not self.sessions[k].session.done:
                self.counters["images_abandoned"] += 1
            del self.sessions[k]
        return len(keys)

    def evict_idle(self) -> int:
        now = time.monotonic()
        stale = [k for k, h in self.sessions.items() if now - h.last_used > self.settings.idle_ttl]
        for k in stale:
            del self.sessions[k]
        self.evicted += len(stale)
        return len(stale)

    async def _dispatch(self, conn: int, frame: Frame, gone: asyncio.Event) -> Reply:
        t = frame.type
        if t is MessageType.HELLO:
            return self._hello(frame)
        if t is MessageType.OPEN:
            return self._open(conn, frame)
        if t is MessageType.FORWARD:
            return self._forward(self._get(conn, frame.session), frame, gone)
        if t is MessageType.CLOSE:
            held = self._get(conn, frame.session)
            del self.sessions[(conn, frame.session)]
            return Frame.json(
                MessageType.CLOSED, {"compute_seconds": held.session.compute_seconds}, session=frame.session
            )
        if t is MessageType.PING:
            return Frame(MessageType.PONG)
        raise Refusal("unexpected_type", f"a client does not send {t.name} frames", frame.session)

    def _open(self, conn: int, frame: Frame) -> Frame:
        if len(self.sessions) >= self.settings.max_sessions:
            raise Refusal("too_many_sessions", f"the server holds its maximum of {self.settings.max_sessions} images")
        try:
            options = SessionOptions.from_json(frame.json_body())
            for dtype in (options.dtype, options.inputs_dtype):
                if dtype not in self.settings.wire_dtypes:
                    raise ConfigError(f"wire dtype {dtype.name.lower()} is not accepted by this server")
            handle = self._next_handle
            session = self.body.open(options, handle)
        except ConfigError as exc:
            raise Refusal("bad_options", str(exc)) from None
        self._next_handle = self._next_handle % 0xFFFF_FFFF + 1
        held = _Held(session, conn, secrets.token_hex(16))
        self.sessions[(conn, handle)] = held
        self.counters["sessions_opened"] += 1
        self.counters["images"] += 1
        return Frame.json(
            MessageType.OPENED, {"session": handle, "id": held.token, "shapes": session.shapes()}, session=handle
        )

    def _get(self, conn: int, handle: int) -> _Held:
        held = self.sessions.get((conn, handle))
        if held is None:
            raise Refusal(
                "unknown_session", f"no open image session {handle} on this connection (closed or evicted)", handle
            )
        held.last_used = time.monotonic()
        return held

    def _forward(self, held: _Held, frame: Frame, gone: asyncio.Event) -> AsyncIterator[Frame]:
        """The session's reply frames, each computed on the compute thread; stops when the device has gone."""
        loop = asyncio.get_running_loop()

        async def frames() -> AsyncIterator[Frame]:
            try:
                replies: Iterator[Frame] = await loop.run_in_executor(self.executor, held.session.feed, frame)
                while not gone.is_set():
                    reply = await loop.run_in_executor(self.executor, next, replies, None)
                    if reply is None:
                        return
                    held.last_used = time.monotonic()
                    if reply.type is MessageType.RESULT:
                        self.counters["steps"] += 1
                    yield reply
            except LambdaSplitError:
                raise  # a refusal with its own code (the frame loop answers it)
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # torch or diffusers refused the input
                held.session.done = True
                raise Refusal("compute_failed", f"the U-Net failed on this input: {exc}", frame.session) from exc

        return frames()
