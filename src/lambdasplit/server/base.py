"""What every lambdasplit server shares: bearer-token auth, the WebSocket frame loop, error frames, lifecycle.

A subclass says what its frames mean (``_dispatch``), what it announces (``welcome``, ``health_body``,
``metrics_body``) and how its sessions are freed (``close_owner``, ``evict_idle``). A frame gets zero or more
reply frames: ``_dispatch`` returns one Frame, None, or an async iterator that the loop sends as it yields (a
paper-policy image streams its noise predictions), stopping when the client has gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from lambdasplit.auth import bearer_authorized
from lambdasplit.errors import CodedError, ConfigError, Refusal
from lambdasplit.server.settings import ServerSettings
from lambdasplit.wire import PATH, PROTOCOL, Frame, MessageType, decode_frame, encode_frame

_log = logging.getLogger("lambdasplit.server")

Reply = Frame | AsyncIterator[Frame] | None
Message = MutableMapping[str, Any]  # an ASGI WebSocket event, as Starlette's receive() gives it


class FrameServer:
    """Auth, the frame loop and the counters; ``app`` is the ASGI application.

    ``executor`` is the subclass's one compute thread (torch already uses every core per forward; two
    at once would only thrash): the warm-up runs on it, and it is shut down with the app.
    """

    def __init__(self, settings: ServerSettings, counted: tuple[str, ...], executor: ThreadPoolExecutor) -> None:
        self.settings = settings
        self.limits = settings.frame_limits
        self.executor = executor
        self._conn_ids = itertools.count(1)
        self.started = time.time()
        base = ("connections", "sessions_opened", "bytes_in", "bytes_out")
        self.counters: Counter[str] = Counter(dict.fromkeys(base + counted, 0))
        self.errors: Counter[str] = Counter()
        self._held: Counter[str] = Counter()  # WebSocket connections held, per client address
        self._connections: dict[int, WebSocket] = {}  # accepted connections, to tell them when draining
        self.draining_until: float | None = None  # time.monotonic() deadline once draining
        self.app = Starlette(
            routes=[
                Route("/health", self.health),
                Route("/metrics", self.metrics),
                Route("/admin/drain", self.admin_drain, methods=["POST"]),
                WebSocketRoute(PATH, self.websocket),
            ],
            lifespan=self._lifespan,
        )

    # --- what a subclass provides ---------------------------------------------------------------------------------
    def welcome(self) -> dict[str, Any]:
        raise NotImplementedError

    def health_body(self) -> dict[str, Any]:
        raise NotImplementedError

    def metrics_body(self) -> dict[str, Any]:
        raise NotImplementedError

    async def _dispatch(self, conn: int, frame: Frame, gone: asyncio.Event) -> Reply:
        raise NotImplementedError

    def close_owner(self, conn: int) -> int:
        """Free every session of a connection that went away; how many."""
        raise NotImplementedError

    def evict_idle(self) -> int:
        raise NotImplementedError

    def _warm_up(self) -> None:
        """One throw-away computation before the first client (allocator and kernel set-up)."""

    #: What HELLO's fingerprint is checked against, and the model's name for the refusal.
    fingerprint: str = ""
    model_name: str = ""

    def _hello(self, frame: Frame) -> Frame:
        body = frame.json_body()
        if body.get("protocol", PROTOCOL) != PROTOCOL:
            raise Refusal(
                "bad_protocol",
                f"protocol {body.get('protocol')!r} not supported; this server speaks {PROTOCOL}",
                fatal=True,
            )
        theirs = body.get("fingerprint")
        if theirs is not None and theirs != self.fingerprint:
            raise Refusal(
                "model_mismatch",
                f"this server runs {self.model_name} with fingerprint {self.fingerprint}; the client's model has "
                f"fingerprint {theirs}. Both sides must load the same checkpoint.",
                fatal=True,
            )
        return Frame.json(MessageType.WELCOME, self.welcome())

    # --- HTTP -----------------------------------------------------------------------------------------------------
    async def health(self, request: Request) -> JSONResponse:
        if self.draining_until is None:
            return JSONResponse({"status": "ok", **self.health_body()})
        left = max(0.0, self.draining_until - time.monotonic())
        return JSONResponse({"status": "draining", "deadline_s": round(left, 3), **self.health_body()})

    async def admin_drain(self, request: Request) -> JSONResponse:
        """POST /admin/drain[?seconds=S]: start draining, as SIGTERM does (the token when one is set)."""
        if not self._authorized(request.headers.get("authorization")):
            return JSONResponse({"error": {"code": "unauthorized", "message": "bad or missing token"}}, 401)
        try:
            seconds = float(request.query_params.get("seconds", self.settings.drain_seconds))
        except ValueError:
            seconds = -1.0
        if not seconds > 0:
            message = f"seconds must be a number > 0, got {request.query_params.get('seconds')!r}"
            return JSONResponse({"error": {"code": "bad_request", "message": message}}, 400)
        await self.drain(seconds)
        return JSONResponse({"status": "draining", "deadline_s": seconds, "connections": len(self._connections)})

    # --- draining ---------------------------------------------------------------------------------------------
    async def drain(self, seconds: float) -> None:
        """Refuse new connections and sessions from now on, and send every connected device GOAWAY: it has
        ``seconds`` to move to another server (``drained`` says when the server may exit). Idempotent."""
        if self.draining_until is not None:
            return
        self.draining_until = time.monotonic() + seconds
        goaway = Frame.json(
            MessageType.GOAWAY,
            {"deadline_s": seconds, "reason": "the server is draining (a restart): move to another server"},
        )
        _log.info("draining: %d connection(s), deadline %.0f s", len(self._connections), seconds)
        for ws in list(self._connections.values()):
            with contextlib.suppress(Exception):  # a device already gone has nothing to be told
                await self._send(ws, goaway)

    def drained(self) -> bool:
        """Draining, and every device has left or the deadline has passed."""
        if self.draining_until is None:
            return False
        return not self._connections or time.monotonic() >= self.draining_until

    async def metrics(self, request: Request) -> JSONResponse:
        if not self._authorized(request.headers.get("authorization")):
            return JSONResponse({"error": {"code": "unauthorized", "message": "bad or missing token"}}, 401)
        return JSONResponse(
            {**self.metrics_body(), "errors": dict(self.errors), "uptime_s": round(time.time() - self.started, 3)}
        )

    # --- WebSocket --------------------------------------------------------------------------------
    def _authorized(self, header: str | None) -> bool:
        return bearer_authorized(header, self.settings.tokens)

    def _over_limit(self, address: str) -> str | None:
        """Why a new connection from ``address`` is refused (the connection caps), or None."""
        total, mine = sum(self._held.values()), self._held[address]
        if total >= self.settings.max_connections:
            return f"this server holds {total} connections, its limit (max_connections); try again later"
        if mine >= self.settings.max_connections_per_client:
            return (
                f"{address} holds {mine} connections to this server, the limit per client address "
                "(max_connections_per_client); close one or try again later"
            )
        return None

    async def websocket(self, ws: WebSocket) -> None:
        address = ws.client.host if ws.client is not None else "?"
        code, why = "too_many_connections", self._over_limit(address)
        if self.draining_until is not None:
            code, why = "draining", "this server is draining (a restart): connect to another one"
        if why is not None:
            self.errors[code] += 1
            body = {"error": {"code": code, "message": why}}
            await ws.send_denial_response(JSONResponse(body, 503, headers={"Retry-After": "5"}))
            return
        self._held[address] += 1
        try:
            await self._connection(ws)
        finally:
            self._held[address] -= 1
            if not self._held[address]:
                del self._held[address]

    async def _connection(self, ws: WebSocket) -> None:
        if not self._authorized(ws.headers.get("authorization")):
            self.errors["unauthorized"] += 1
            await ws.close(code=1008, reason="unauthorized: bad or missing bearer token")  # HTTP 403 pre-accept
            return
        await ws.accept()
        conn = next(self._conn_ids)
        self._connections[conn] = ws
        self.counters["connections"] += 1
        greeted = False
        # A reader task takes messages off the socket while a request runs, so a client that goes away in
        # the middle of a long GENERATE is seen at once (``gone``) and the generation stops. Its small inbox
        # keeps backpressure: a client that floods frames waits on TCP, not on server memory.
        inbox: asyncio.Queue[Message] = asyncio.Queue(maxsize=4)
        gone = asyncio.Event()
        reader = asyncio.create_task(self._read(ws, inbox, gone))
        try:
            while not (gone.is_set() and inbox.empty()):
                message = await inbox.get()
                if message["type"] == "websocket.disconnect":
                    break
                data = message.get("bytes")
                reply: Reply
                frame: Frame | None = None
                if data is None:
                    reply = self._error(Refusal("text_message", "send binary frames, not text"))
                else:
                    self.counters["bytes_in"] += len(data)
                    try:
                        frame = decode_frame(data, self.limits)
                        if frame.type is not MessageType.HELLO and not greeted:
                            raise Refusal("hello_first", "send HELLO before anything else")
                        if frame.type is MessageType.OPEN and self.draining_until is not None:
                            raise Refusal("draining", "this server is draining (a restart): open it elsewhere")
                        reply = await self._dispatch(conn, frame, gone)
                        greeted = True
                    except (CodedError, ConfigError) as e:
                        reply = self._refused(e, 0 if frame is None else frame.session)
                    except WebSocketDisconnect:
                        raise
                    except Exception as e:  # a fault here (a bug, out of memory): this request fails, saying why
                        reply = self._internal(e, frame)
                if gone.is_set():
                    break
                if not await self._reply(ws, reply, gone, 0 if frame is None else frame.session):
                    break
        except WebSocketDisconnect:
            pass
        finally:
            reader.cancel()
            self._connections.pop(conn, None)
            freed = self.close_owner(conn)
            if freed:
                _log.info("connection %d went away; freed %d session(s)", conn, freed)

    @staticmethod
    async def _read(ws: WebSocket, inbox: asyncio.Queue[Message], gone: asyncio.Event) -> None:
        """Move the socket's messages to ``inbox`` until the client disconnects, then set ``gone``.

        However it ends, ``gone`` is set and a disconnect message is queued when there is room; when there is
        none the handler drains the inbox and stops on ``gone`` (it never waits on an empty inbox after that).
        """
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                await inbox.put(message)
        except (WebSocketDisconnect, RuntimeError):  # RuntimeError: receive after the socket closed
            return
        finally:
            gone.set()
            with contextlib.suppress(asyncio.QueueFull):
                inbox.put_nowait({"type": "websocket.disconnect"})

    async def _reply(self, ws: WebSocket, reply: Reply, gone: asyncio.Event, session: int) -> bool:
        """Send the reply frame(s); False when the connection is done (a fatal refusal, or the client left)."""
        if reply is None:
            return True
        if isinstance(reply, Frame):
            return await self._send(ws, reply)
        try:
            async for frame in reply:
                if gone.is_set() or not await self._send(ws, frame):
                    return False
        except (CodedError, ConfigError) as e:
            return await self._send(ws, self._refused(e, session))
        except WebSocketDisconnect:
            raise
        except Exception as e:  # a fault while streaming (an image's step, a cloud-only token)
            return await self._send(ws, self._internal(e, None, session))
        return True

    async def _send(self, ws: WebSocket, frame: Frame) -> bool:
        out = encode_frame(frame)
        self.counters["bytes_out"] += len(out)
        await ws.send_bytes(out)
        if frame.type is MessageType.ERROR and frame.json_body().get("fatal"):
            await ws.close(code=1008, reason=frame.json_body()["code"])
            return False
        return True

    def _refused(self, e: CodedError | ConfigError, session: int) -> Frame:
        """The ERROR frame for a refused request: a ``Refusal`` as it is, any other coded error with its code,
        answered for the session of the frame that caused it."""
        if isinstance(e, Refusal):
            return self._error(e)
        code = e.code if isinstance(e, CodedError) else "bad_request"
        return self._error(Refusal(code, str(e), session))

    def _internal(self, e: Exception, frame: Frame | None, session: int = 0) -> Frame:
        """The ERROR frame (``internal``) for an unexpected fault while serving ``frame`` (or its stream), logged
        with its traceback: the device learns that the server failed and why, and the connection goes on."""
        _log.error("%s failed", "a stream" if frame is None else frame.type.name, exc_info=e)
        session = session if frame is None else frame.session
        return self._error(Refusal("internal", f"the server failed: {type(e).__name__}: {e}", session))

    def _error(self, r: Refusal) -> Frame:
        self.errors[r.code] += 1
        body: dict[str, Any] = {"code": r.code, "message": str(r)}
        if r.fatal:
            body["fatal"] = True  # the server closes the connection after this frame
        return Frame.json(MessageType.ERROR, body, session=r.session)

    # --- lifecycle --------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        # One throw-away forward before the first client: the first call pays for allocator and kernel set-up.
        await asyncio.get_running_loop().run_in_executor(self.executor, self._warm_up)
        task = asyncio.create_task(self._evict_forever())
        try:
            yield
        finally:
            task.cancel()
            self.executor.shutdown(wait=False, cancel_futures=True)

    async def _evict_forever(self) -> None:
        period = min(self.settings.idle_ttl / 4, 5.0)
        while True:
            await asyncio.sleep(period)
            if n := self.evict_idle():
                _log.info("evicted %d idle session(s)", n)
