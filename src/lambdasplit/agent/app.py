"""The device agent: an OpenAI-compatible endpoint on 127.0.0.1 whose model runs split with a cloud body.

Apps written against the OpenAI API point their base URL here. The agent holds the head and tail,
keeps one connection to the body server, and opens one body session per request; only hidden states
go to the cloud. Routes:

    GET  /                          the web UI (chat + "What the network sees")
    GET  /v1/models                 the one model this agent serves
    POST /v1/chat/completions       chat, non-streaming or ``stream: true`` (server-sent events)
    POST /v1/completions            plain text completion, same options
    GET  /v1/lambdasplit/info       split points, wire dtype, cloud URL, totals (for the UI)
    GET  /v1/lambdasplit/network    server-sent events: every step's frame sizes and transmitted state
    GET  /ui/common.css, common.js  what the pages share
    GET  /images                    the image page (with an image model: ``images=``, ``up --image-cloud``)
    POST /v1/images/generations     text-to-image, b64_json; ``stream: true`` sends partial images as it denoises
    GET  /v1/lambdasplit/attack     what an attacker read back from the latest turn (with an ``attacker``)
    GET  /health

Generation runs on a thread pool (``max_parallel`` requests at once; more wait their turn), so several
requests are served at once, each with its own body session on the shared connection.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from lambdasplit import __version__
from lambdasplit.agent.attack_panel import Attacker, AttackPanel
from lambdasplit.agent.feed import NetworkFeed, ObservedLink
from lambdasplit.agent.images import Cancelled, ImageService, MadeImage, Preview
from lambdasplit.agent.schema import ApiError, ChatCompletionRequest, CompletionRequest, ImageRequest, parse
from lambdasplit.client.connection import CloudClient
from lambdasplit.errors import ConfigError, LambdaSplitError, RemoteError, SessionError, WireError
from lambdasplit.generation import Generation, GenerationResult, SamplingParams, prompt_ids, stream
from lambdasplit.split.loader import SplitModel
from lambdasplit.wire import WireDtype

_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
_END = object()  # marks the end of a streamed generation on its queue


@dataclass(frozen=True)
class AgentSettings:
    wire_dtype: WireDtype = WireDtype.FLOAT16
    max_parallel: int = 4  # generations at once
    default_max_tokens: int = 512  # when a request names none
    speculative: str | None = None  # drafter name for every request (None: plain steps)
    cloud_label: str = ""  # how the UI names the cloud (its URL, or "local body server")


class DeviceAgent:
    """Holds the device's parts and the cloud connection; ``app`` is the ASGI application."""

    def __init__(
        self,
        split: SplitModel,
        client: CloudClient,
        settings: AgentSettings | None = None,
        *,
        images: ImageService | None = None,
        attacker: Attacker | None = None,
    ) -> None:
        if split.head is None or (split.tail is None and split.layout != "stip") or split.tokenizer is None:
            raise LambdaSplitError("the device agent needs the head, the tail (but in STIP's layout) and the tokenizer")
        self.split, self.client = split, client
        self.settings = settings or AgentSettings()
        self.feed = NetworkFeed()
        self.attacks: AttackPanel | None = None
        if attacker is not None:  # run on each turn's traffic, for the UI's attacker panel (agent/attack_panel.py)
            keyed = split.wire_transform is not None
            self.attacks = AttackPanel(attacker, self.feed, split.tokenizer, cloud_url=client.url, keyed=keyed)
        self.executor = ThreadPoolExecutor(self.settings.max_parallel, thread_name_prefix="lambdasplit-agent")
        self.images = images
        # Images take turns on their one link: one thread, so a queued image holds no text generation's thread.
        self.image_executor = ThreadPoolExecutor(1, thread_name_prefix="lambdasplit-image")
        self.created = int(time.time())
        limits = client.welcome.get("limits", {})
        positions = getattr(split.config, "max_position_embeddings", None) or 1 << 30
        self.max_context = min(int(limits.get("max_context", positions)), int(positions))
        self.app = Starlette(
            routes=[
                Route("/", self.index),
                Route("/health", self.health),
                Route("/v1/models", self.models),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/lambdasplit/info", self.info),
                Route("/v1/lambdasplit/network", self.network),
                Route("/images", self.images_page),
                Mount("/ui", StaticFiles(packages=[("lambdasplit.agent", "ui")]), name="ui"),
                Route("/v1/images/generations", self.images_generations, methods=["POST"]),
                Route("/v1/lambdasplit/attack", self.attack),
            ],
            exception_handlers={ApiError: _api_error, 404: _not_found, 405: _not_allowed},
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        yield
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.image_executor.shutdown(wait=False, cancel_futures=True)
        if self.attacks is not None:
            self.attacks.close()

    @property
    def model_id(self) -> str:
        return self.split.name

    # --- plain routes -------------------------------------------------------------------------------
    async def index(self, request: Request) -> HTMLResponse:
        return HTMLResponse(_page("index.html"))

    async def images_page(self, request: Request) -> HTMLResponse:
        return HTMLResponse(_page("images.html"))

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": self.model_id})

    async def models(self, request: Request) -> JSONResponse:
        cards = [{"id": self.model_id, "object": "model", "created": self.created, "owned_by": "lambdasplit"}]
        if self.images is not None:
            cards.append(
                {"id": self.images.name, "object": "model", "created": self.created, "owned_by": "lambdasplit"}
            )
        return JSONResponse({"object": "list", "data": cards})

    async def info(self, request: Request) -> JSONResponse:
        p = self.split.points
        return JSONResponse(
            {
                "model": self.model_id,
                "version": __version__,
                "layers": {
                    "head": [0, p.head_layers],
                    "body": [p.head_layers, p.body_end],
                    "tail": [p.body_end, p.num_layers],
                },
                "hidden_size": self.split.hidden_size,
                "wire_dtype": self.settings.wire_dtype.name.lower(),
                "cloud": self.settings.cloud_label or self.client.url,
                "speculative": self.settings.speculative,
                "totals": self.feed.totals(),
                "images": self.images.info() if self.images is not None else None,
            }
        )

    async def network(self, request: Request) -> StreamingResponse:
        queue = self.feed.subscribe()

        async def events() -> AsyncIterator[str]:
            try:
                yield _sse({"type": "hello", "totals": self.feed.totals()})
                while True:
                    try:
                        event = await asyncio.wait_for(queue.get(), timeout=15)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    yield _sse(event)
            finally:
                self.feed.unsubscribe(queue)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    async def attack(self, request: Request) -> JSONResponse:
        if self.attacks is None:
            return JSONResponse({"type": "attack", "status": "off"})
        return JSONResponse(self.attacks.report())

    # --- OpenAI routes ------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        body = parse(ChatCompletionRequest, await _json(request))
        self._check_model(body.model)
        messages = body.chat()
        return await self._complete(request, body, messages, chat=True, kind="chat", prompt_view=messages)

    async def completions(self, request: Request) -> Response:
        body = parse(CompletionRequest, await _json(request))
        self._check_model(body.model)
        text = body.text()
        return await self._complete(request, body, text, chat=False, kind="text", prompt_view=text)

    def _check_model(self, model: str) -> None:
        if model != self.model_id:
            raise ApiError(
                404,
                f"the model {model!r} does not exist here; this agent serves {self.model_id!r}",
                param="model",
                code="model_not_found",
            )

    async def _complete(
        self, request: Request, body: Any, prompt: Any, *, chat: bool, kind: str, prompt_view: Any
    ) -> Response:
        ids = prompt_ids(self.split, prompt, chat=chat)
        # Without max_tokens, an answer may use the rest of the context, up to default_max_tokens.
        params = body.sampling(max(1, min(self.settings.default_max_tokens, self.max_context - len(ids))))
        if len(ids) + params.max_new_tokens > self.max_context:
            raise ApiError(
                400,
                f"{len(ids)} prompt tokens + max_tokens {params.max_new_tokens} exceed the context of "
                f"{self.max_context} positions",
                param="max_tokens",
                code="context_length_exceeded",
            )
        request_id = self.feed.new_request(prompt_view, kind)
        if self.attacks is not None:
            self.attacks.expect(request_id, ids, prompt_view)
        reply = _Reply(kind, self.model_id, self.split.fingerprint)
        if not body.stream:
            return await self._whole(request, ids, params, request_id, reply)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await self._stream(ids, params, request_id, reply, include_usage)

    async def _whole(
        self, request: Request, ids: list[int], params: SamplingParams, request_id: str, reply: _Reply
    ) -> Response:
        """A non-streamed answer; generation stops if the client hangs up before it is done."""
        cancelled = threading.Event()

        def work() -> GenerationResult | None:
            run = self._generation(ids, params, request_id)
            for _ in run:
                if cancelled.is_set():
                    return None  # leaving the loop closes the generation and its body session
            self._turn_done(request_id, run)
            return run.result

        watcher = asyncio.create_task(_watch_disconnect(request, cancelled))
        try:
            result = await self._run(work)
        finally:
            cancelled.set()
            watcher.cancel()
        if result is None:
            return Response(status_code=499)  # the client closed the request; nobody reads this
        return JSONResponse(reply.whole(result))

    def _generation(self, ids: list[int], params: SamplingParams, request_id: str) -> Generation:
        """A generation on a fresh body session (on a generation thread)."""
        try:
            link = ObservedLink(self.client.open_session(self.settings.wire_dtype), self.feed, request_id)
        except (WireError, RemoteError) as exc:
            raise _cloud_error(exc) from exc
        body_link = link if self.attacks is None else self.attacks.capture(request_id, link)
        return stream(
            self.split,
            ids,
            link=body_link,
            params=params,
            drafter=self.settings.speculative,
        )

    def _turn_done(self, request_id: str, run: Generation) -> None:
        """After a turn (``run.result`` None when it was cancelled): the attacker panel reads what it sent."""
        if self.attacks is not None:
            self.attacks.finish(request_id, run.result)

    async def _run(self, work: Callable[[], GenerationResult | None]) -> GenerationResult | None:
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, work)
        except (WireError, RemoteError) as exc:
            raise _cloud_error(exc) from exc

    async def _stream(
        self, ids: list[int], params: SamplingParams, request_id: str, reply: _Reply, include_usage: bool
    ) -> Response:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()

        def produce() -> None:
            try:
                run = self._generation(ids, params, request_id)
                for event in run:
                    if cancelled.is_set():
                        break  # the client went away: closing the generation closes its body session
                    loop.call_soon_threadsafe(queue.put_nowait, event.text)
                self._turn_done(request_id, run)
                loop.call_soon_threadsafe(queue.put_nowait, run.result)
            except BaseException as exc:  # surfaced to the client as an error event
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _END)

        self.executor.submit(produce)
        first = await queue.get()  # errors before the first token are a plain error response
        if isinstance(first, BaseException):
            await queue.get()
            raise _cloud_error(first) if isinstance(first, WireError | RemoteError) else first

        async def chunks() -> AsyncIterator[str]:
            item = first
            yield _sse(reply.chunk(role=True))
            try:
                while item is not _END:
                    if isinstance(item, str):
                        if item:
                            yield _sse(reply.chunk(text=item))
                    elif isinstance(item, GenerationResult):
                        yield _sse(reply.chunk(finish=_FINISH[item.finish_reason], usage_null=include_usage))
                        if include_usage:
                            yield _sse(reply.usage_chunk(item))
                    elif isinstance(item, BaseException):
                        error = _cloud_error(item) if isinstance(item, WireError | RemoteError) else item
                        body = error.body() if isinstance(error, ApiError) else ApiError(500, str(item)).body()
                        yield _sse(body)
                    item = await queue.get()
                yield "data: [DONE]\n\n"
            finally:
                cancelled.set()

        return _WatchedStream(
            cancelled, chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )

    # --- images -------------------------------------------------------------------------------------
    async def images_generations(self, request: Request) -> Response:
        if self.images is None:
            raise ApiError(
                404,
                "this agent serves no image model: start it with `lambdasplit up --image-cloud URL|local`",
                param="model",
                code="model_not_found",
            )
        body = parse(ImageRequest, await _json(request))
        body.check_supported(self.images.size)
        if body.model not in (None, self.images.name):
            raise ApiError(
                404,
                f"the model {body.model!r} does not exist here; this agent draws with {self.images.name!r}",
                param="model",
                code="model_not_found",
            )
        view = {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "returned": "the finished image"}
        request_id = self.feed.new_request(view, "image")
        created = int(time.time())
        loop = asyncio.get_running_loop()
        cancelled = threading.Event()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        images = self.images

        def work() -> None:
            def preview(p: Preview) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, p)

            try:
                made = images.generate(body, request_id, self.feed, preview if body.stream else None, cancelled)
                loop.call_soon_threadsafe(queue.put_nowait, made)
            except BaseException as exc:  # answered as an error (or dropped, when the client has gone)
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        self.image_executor.submit(work)
        event = _image_event(created, images.size)
        if not body.stream:
            watcher = asyncio.create_task(_watch_disconnect(request, cancelled))
            try:
                item = await queue.get()
            finally:
                cancelled.set()
                watcher.cancel()
            if isinstance(item, Cancelled):
                return Response(status_code=499)
            if isinstance(item, BaseException):
                raise _image_error(item)
            return JSONResponse(_image_response(item, created, images.size))

        async def events() -> AsyncIterator[str]:
            index = 0
            while True:
                item = await queue.get()
                if isinstance(item, Preview):
                    extra = {"lambdasplit": {"step": item.done, "total": item.total}}
                    partial = event("image_generation.partial_image", item.png) | {"partial_image_index": index}
                    yield _sse(partial | extra, name="image_generation.partial_image")
                    index += 1
                elif isinstance(item, MadeImage):
                    done = event("image_generation.completed", item.png) | {"lambdasplit": _image_facts(item)}
                    yield _sse(done, name="image_generation.completed")
                    return
                else:
                    error = item if isinstance(item, ApiError) else _image_error(item)
                    yield _sse(error.body(), name="error")
                    return

        return _WatchedStream(
            cancelled, events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )


class _WatchedStream(StreamingResponse):
    """A streaming response that tells its producer when it ends, however it ends (a client hanging up
    can cancel the response before its body generator ever starts, so the generator's own cleanup is
    not enough)."""

    def __init__(self, done: threading.Event, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.done = done

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.done.set()


class _Reply:
    """OpenAI response objects for one request (chat or text completion)."""

    def __init__(self, kind: str, model: str, fingerprint: str) -> None:
        self.kind, self.model = kind, model
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.fingerprint = f"lambdasplit-{fingerprint[:12]}"

    def _head(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }

    @staticmethod
    def usage(result: GenerationResult) -> dict[str, int]:
        return {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.new_tokens,
            "total_tokens": result.prompt_tokens + result.new_tokens,
        }

    def whole(self, result: GenerationResult) -> dict[str, Any]:
        finish = _FINISH[result.finish_reason]
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None}
            out = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None}
            out = self._head("text_completion")
        return out | {"choices": [choice | {"finish_reason": finish}], "usage": self.usage(result)}

    def chunk(
        self, *, text: str = "", role: bool = False, finish: str | None = None, usage_null: bool = False
    ) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = (
                {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            )
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            out = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            out = self._head("text_completion")
        out["choices"] = [choice]
        if usage_null:
            out["usage"] = None
        return out

    def usage_chunk(self, result: GenerationResult) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return self._head(obj) | {"choices": [], "usage": self.usage(result)}


def _sse(data: dict[str, Any], name: str | None = None) -> str:
    line = f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
    return f"event: {name}\n{line}" if name else line


def _page(name: str) -> str:
    return resources.files("lambdasplit.agent").joinpath(f"ui/{name}").read_text(encoding="utf-8")


async def _watch_disconnect(request: Request, cancelled: threading.Event) -> None:
    """Set ``cancelled`` when the client hangs up (polled: a plain response has no other signal)."""
    while not cancelled.is_set():
        if await request.is_disconnected():
            cancelled.set()
            return
        await asyncio.sleep(0.5)


def _image_event(created: int, size: str) -> Callable[[str, bytes], dict[str, Any]]:
    def event(kind: str, data: bytes) -> dict[str, Any]:
        return {
            "type": kind,
            "b64_json": base64.b64encode(data).decode("ascii"),
            "created_at": created,
            "size": size,
            "quality": "auto",
            "background": "opaque",
            "output_format": "png",
        }

    return event


def _image_facts(made: MadeImage) -> dict[str, Any]:
    """lambdasplit's own figures for an image: what crossed the link and where the time went."""
    image, t = made.image, made.image.traffic
    return {
        "policy": image.policy,
        "steps": image.steps,
        "bytes_up": t.bytes_up,
        "bytes_down": t.bytes_down,
        "frames_up": t.frames_up,
        "frames_down": t.frames_down,
        "seconds": round(image.total_seconds, 3),
        "device_seconds": round(image.device_seconds, 3),
        "cloud_seconds": round(image.cloud_seconds, 3),
    }


def _image_response(made: MadeImage, created: int, size: str) -> dict[str, Any]:
    data = {"b64_json": base64.b64encode(made.png).decode("ascii"), "revised_prompt": None}
    return {
        "created": created,
        "data": [data],
        "output_format": "png",
        "size": size,
        "lambdasplit": _image_facts(made),
    }


def _image_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ConfigError | SessionError):
        return ApiError(400, str(exc), code="unsupported")
    if isinstance(exc, WireError | RemoteError):
        return _cloud_error(exc)
    return ApiError(500, f"the image failed: {exc}", type="server_error")


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from exc


def _cloud_error(exc: BaseException) -> ApiError:
    if isinstance(exc, RemoteError) and exc.code == "context_full":
        return ApiError(400, str(exc), param="max_tokens", code="context_length_exceeded")
    if isinstance(exc, RemoteError) and exc.code == "too_many_sessions":
        return ApiError(503, f"the body server is full: {exc}", type="server_error", code="cloud_busy")
    return ApiError(502, f"the body server failed: {exc}", type="server_error", code="cloud_unavailable")


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status)


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    error = ApiError(404, f"no route {request.method} {request.url.path}", code="unknown_url")
    return JSONResponse(error.body(), status_code=404)


async def _not_allowed(request: Request, exc: Exception) -> JSONResponse:
    error = ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
    return JSONResponse(error.body(), status_code=405)
