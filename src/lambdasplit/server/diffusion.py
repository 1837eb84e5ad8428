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
    collafuse:                        <-     STATE {step m, state, tensors, generator_state?}, RESULT latent @ m,
                                             RESULT state tensors
    CLOSE                             ->
                                      <-     CLOSED {compute_seconds}

Every frame's compute runs on the one compute thread, a frame at a time, so several devices' images interleave
step by step; a streamed image stops when its device disconnects.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from lambdasplit import __version__
from lambdasplit.diffusion.protocol import POLICIES, SessionOptions
from lambdasplit.errors import ConfigError, LambdaSplitError, Refusal
from lambdasplit.server.base import FrameServer, Reply
from lambdasplit.server.sessions import Held, SessionStore
from lambdasplit.server.settings import ServerSettings
from lambdasplit.wire import PROTOCOL, Frame, MessageType

if TYPE_CHECKING:
    from lambdasplit.diffusion.cloud import DiffusionBody, DiffusionSession


class DiffusionServer(FrameServer):
    """Serves a `DiffusionBody` to split text-to-image devices."""

    def __init__(self, body: DiffusionBody, settings: ServerSettings) -> None:
        # One compute thread: a frame's U-Net work at a time, so several devices' images interleave step by step.
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lambdasplit-unet")
        super().__init__(settings, ("images", "steps", "images_abandoned"), executor)
        self.body = body
        self.fingerprint, self.model_name = body.fingerprint, f"the U-Net of {body.name}"
        self.sessions: SessionStore[DiffusionSession] = SessionStore(
            settings.max_sessions, settings.idle_ttl, "image session"
        )

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
            "sessions_evicted": self.sessions.evicted,
            **dict(self.counters),
            "compute_seconds": round(self.body.compute_seconds, 6),
        }

    def close_owner(self, conn: int) -> int:
        freed = self.sessions.close_owner(conn)
        self.counters["images_abandoned"] += sum(not held.value.done for held in freed)
        return len(freed)

    def evict_idle(self) -> int:
        return self.sessions.evict_idle()

    async def _dispatch(self, conn: int, frame: Frame, gone: asyncio.Event) -> Reply:
        t = frame.type
        if t is MessageType.HELLO:
            return self._hello(frame)
        if t is MessageType.OPEN:
            return self._open(conn, frame)
        if t is MessageType.FORWARD:
            return self._forward(self.sessions.get(conn, frame.session), frame, gone)
        if t is MessageType.CLOSE:
            held = self.sessions.close(conn, frame.session)
            return Frame.json(MessageType.CLOSED, {"compute_seconds": held.value.compute_seconds}, session=held.handle)
        if t is MessageType.PING:
            return Frame(MessageType.PONG)
        raise Refusal("unexpected_type", f"a client does not send {t.name} frames", frame.session)

    def _open(self, conn: int, frame: Frame) -> Frame:
        try:
            options = SessionOptions.from_json(frame.json_body())
            for dtype in (options.dtype, options.inputs_dtype):
                if dtype not in self.settings.wire_dtypes:
                    raise ConfigError(f"wire dtype {dtype.name.lower()} is not accepted by this server")
            held = self.sessions.open(conn, lambda handle: self.body.open(options, handle))
        except ConfigError as exc:
            raise Refusal("bad_options", str(exc)) from None
        self.counters["sessions_opened"] += 1
        self.counters["images"] += 1
        body = {"session": held.handle, "id": held.token, "shapes": held.value.shapes()}
        return Frame.json(MessageType.OPENED, body, session=held.handle)

    def _forward(self, held: Held[DiffusionSession], frame: Frame, gone: asyncio.Event) -> AsyncIterator[Frame]:
        """The session's reply frames, each computed on the compute thread; stops when the device has gone."""
        loop = asyncio.get_running_loop()

        async def frames() -> AsyncIterator[Frame]:
            try:
                replies: Iterator[Frame] = await loop.run_in_executor(self.executor, held.value.feed, frame)
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
                held.value.done = True
                raise Refusal("compute_failed", f"the U-Net failed on this input: {exc}", frame.session) from exc

        return frames()
