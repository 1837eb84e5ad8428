"""The cloud body server: a Starlette app with one WebSocket endpoint that runs the body for many sessions.

Protocol (frames in docs/wire-format.md, conversation in docs/protocol.md):

    client                         server
    HELLO {fingerprint}     ->
                            <-     WELCOME {model, layers [X, Y], hidden_size, limits}
    OPEN {}                 ->
                            <-     OPENED (header: session)
    FORWARD (T, D) @ pos    ->     body forward with the session's KV cache (off the event loop)
                            <-     RESULT (T, D) @ pos, same wire dtype ((T, V) logits in STIP's layout;
                                   one row when FORWARD has the LAST flag)
    [TREE {parents, keep}   ->     no reply: keeps a branch of the last tree now, parents for the next FORWARD
                                   (token trees, when WELCOME says "trees": true; docs/protocol.md)]
    CLOSE                   ->
                            <-     CLOSED

A cloud-only server (``serve --cloud-only``, the baseline of the benchmarks) holds the whole model and
answers ``GENERATE {prompt, sampling}`` with ``TEXT {text, ...}`` instead of opening body sessions.

Every refusal is an ERROR frame ``{"code", "message"}`` with a stable code; the connection keeps
serving afterwards, except after ``unauthorized`` (refused at the handshake) and ``model_mismatch``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from lambdasplit import __version__
from lambdasplit.errors import CodedError, ConfigError, LambdaSplitError, Refusal, SessionError
from lambdasplit.generation import SamplingParams, TokenEvent, stream
from lambdasplit.server.base import FrameServer
from lambdasplit.server.batching import Batcher
from lambdasplit.server.sessions import Held, SessionStore
from lambdasplit.server.settings import ServerSettings
from lambdasplit.split.loader import SplitModel
from lambdasplit.split.parts import Body
from lambdasplit.split.state import BodyState, PendingTree
from lambdasplit.split.tree import check_tree, supports_trees
from lambdasplit.wire import PATH, PROTOCOL, Frame, FrameFlags, MessageType, frame_tensor, tensor_frame

__all__ = ["PATH", "PROTOCOL", "BodyServer", "Refusal", "kv_bytes_per_position"]


def kv_bytes_per_position(split: SplitModel) -> int:
    """Bytes one position adds to a session's body KV cache: keys and values of every body layer."""
    c, body = split.config, split.body
    if body is None or body.num_layers == 0:
        return 0
    heads = int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    return 2 * body.num_layers * heads * head_dim * torch.empty((), dtype=split.runtime.dtype).element_size()


class BodyServer(FrameServer):
    """Holds the body part, the sessions and the counters; ``app`` is the ASGI application.

    ``split`` may be a mapping of user groups to bodies (a model developer's server bundle: the same model
    cut at the same points, each body transformed with its group's secrets). A device's HELLO then names its
    group and presents that body's fingerprint; its sessions run on that body only.

    ``executor``: the compute thread (``batching.compute_thread``; a new one by default). Pass the one the split
    was loaded on: see ``run.serve``.
    """

    def __init__(
        self,
        split: SplitModel | Mapping[str, SplitModel],
        settings: ServerSettings,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.groups: dict[str, SplitModel] | None = None
        if isinstance(split, Mapping):
            self.groups = _check_groups(split, settings)
            split = next(iter(self.groups.values()))
        self._conn_group: dict[int, str] = {}
        if split.body is None:
            raise ConfigError("the body server needs a SplitModel loaded with parts=['body']")
        if settings.cloud_only and (split.head is None or split.tail is None or split.tokenizer is None):
            raise ConfigError("a cloud-only server needs all three parts and the tokenizer (load_split(model, '0:'))")
        counted: tuple[str, ...] = ("forward_frames", "positions")
        counted += ("generations", "generated_tokens", "generations_abandoned") if settings.cloud_only else ()
        # The batcher owns the compute thread; cloud-only generation and the warm-up run on it too.
        self.batcher = Batcher(split.body, settings.max_batch, executor)
        super().__init__(settings, counted, self.batcher.executor)
        self.split, self.body = split, split.body
        self.fingerprint, self.model_name = split.fingerprint, split.name
        # However a session leaves (CLOSE, its connection gone, evicted when idle), release_state is told.
        self.store: SessionStore[BodyState] = SessionStore(
            settings.max_sessions, settings.idle_ttl, on_close=self.release_state
        )
        self.kv_bytes_per_position = kv_bytes_per_position(split)
        self._reserved = 0  # positions of FORWARDs queued for the compute thread, counted against the budget
        self.compute_seconds = 0.0  # time in cloud-only generation (body forwards: the batcher counts them)
        #: Extra WELCOME fields from whoever runs this server (a Ray Serve replica names itself: ``replica``).
        self.announced: dict[str, Any] = {}
        #: Whether TREE frames are served: a body here whose cache can keep one branch of a token tree.
        self.trees = supports_trees(self.body.new_cache())

    # --- HTTP -------------------------------------------------------------------------------------
    def welcome(self) -> dict[str, Any]:
        p = self.split.points
        return {
            "protocol": PROTOCOL,
            "server": f"lambdasplit/{__version__}",
            "mode": "cloud-only" if self.settings.cloud_only else "split",
            "model": self.split.name,
            "fingerprint": self.split.fingerprint,
            "num_layers": p.num_layers,
            "layers": [p.head_layers, p.body_end],
            "hidden_size": self.split.hidden_size,
            "output": self.body.output,  # "logits" for STIP's layout (RESULT rows of vocab_size), else "hidden"
            "vocab_size": int(self.split.config.vocab_size),
            "wire_dtypes": [d.name.lower() for d in self.settings.wire_dtypes],
            "trees": self.trees,  # TREE frames: token trees verified in one FORWARD (docs/protocol.md)
            "limits": {
                "max_sessions": self.settings.max_sessions,
                "max_context": self.settings.max_context,
                "idle_ttl": self.settings.idle_ttl,
                "max_frame_bytes": self.settings.max_frame_bytes,
                "kv_budget_bytes": self.settings.kv_budget_bytes,
            },
            **self.announced,
        }

    def health_body(self) -> dict[str, Any]:
        p = self.split.points
        return {"model": self.split.name, "layers": [p.head_layers, p.body_end], "sessions": len(self.store)}

    def metrics_body(self) -> dict[str, Any]:
        return {
            "sessions": len(self.store),
            "sessions_evicted": self.store.evicted,
            "kv_bytes": self._positions() * self.kv_bytes_per_position,
            **dict(self.counters),
            "compute_seconds": round(self.compute_seconds + self.batcher.compute_seconds, 6),
            "batches": self.batcher.batches,
            "batched_steps": self.batcher.batched_steps,
        }

    async def _dispatch(self, conn: int, frame: Frame, gone: asyncio.Event) -> Frame | None:
        """The reply to one frame; ``gone`` is set when the client disconnects (a long request stops early)."""
        t = frame.type
        if t is MessageType.HELLO:
            return self._hello(frame) if self.groups is None else self._hello_group(conn, frame)
        if t is MessageType.GENERATE:
            return await self._generate(frame, gone)
        if t is MessageType.OPEN:
            if self.settings.cloud_only:
                raise Refusal("wrong_mode", "this is a cloud-only server: send GENERATE with text, not body sessions")
            body = self.body if self.groups is None else self.groups[self._conn_group[conn]].body
            assert body is not None  # checked when the groups were given
            session = self.store.open(conn, lambda handle: self.new_state(body))
            self.counters["sessions_opened"] += 1
            return Frame.json(
                MessageType.OPENED, {"session": session.handle, "id": session.token}, session=session.handle
            )
        if t is MessageType.FORWARD:
            return await self._forward(self.store.get(conn, frame.session), frame)
        if t is MessageType.TREE:
            # No reply of its own: the FORWARD sent right after it answers for both (for a session this connection
            # does not hold, that FORWARD is refused as unknown too).
            with contextlib.suppress(SessionError):
                await self._tree(self.store.get(conn, frame.session).value, frame)
            return None
        if t is MessageType.CLOSE:
            self.store.close(conn, frame.session)
            return Frame.json(MessageType.CLOSED, {}, session=frame.session)
        if t is MessageType.PING:
            return Frame(MessageType.PONG)
        raise Refusal("unexpected_type", f"a client does not send {t.name} frames", frame.session)

    def new_state(self, body: Body) -> BodyState:
        """A new session's state on ``body``: its own KV cache here. A server whose body runs elsewhere (a chain of
        stage actors, ``lambdasplit.rayserve.stages``) returns a state with the same interface that drives it."""
        return BodyState(body)

    def release_state(self, state: BodyState) -> None:
        """A session has left. Its KV cache here is freed with the state when nothing refers to it any more. Closing
        it now could race the compute thread: a step of that session may be running in a batch with other sessions'
        steps, and a cache gone mid-batch would fail them all. A server whose caches live elsewhere frees them here
        (``StagedBodyServer``)."""

    def _positions(self) -> int:
        """Positions held by all sessions' KV caches together."""
        return sum(held.value.length for held in self.store)

    async def _tree(self, state: BodyState, frame: Frame) -> None:
        """Keep the branch a TREE frame names (``keep``: ``{"start", "rows"}``, of the session's last tree) and hold its
        ``parents`` (the next FORWARD's rows as a token tree) for the session's next FORWARD. The keep runs now, before
        this connection's next frame is read, on the compute thread (between batches; see ``batching.compute_thread``):
        the session's last step has answered, so nothing computes on its cache, and a refusal of the FORWARD after it
        (``memory_full``, say) leaves the body as the device's caches are. A bad TREE frame changes nothing and is not
        answered on its own (the device sends the FORWARD without waiting): that FORWARD is refused with its error."""
        body = frame.json_body()
        parents, keep = body.get("parents"), body.get("keep")
        try:
            if not self.trees:
                raise Refusal("bad_tree", 'this server does not verify token trees (its WELCOME says "trees": false)')
            if parents is None and keep is None:
                raise Refusal("bad_tree", 'a TREE frame carries "parents", "keep" or both')
            if parents is not None:
                check_tree(parents)
            if keep is not None:
                start, rows = (keep.get("start"), keep.get("rows")) if isinstance(keep, dict) else (None, None)
                if not isinstance(start, int) or not isinstance(rows, list) or not all(type(r) is int for r in rows):
                    raise Refusal("bad_tree", 'TREE\'s "keep" is {"start": int, "rows": [int, ...]}')
                await self.batcher.call(functools.partial(state.keep, start, rows))  # last: a bad frame changes nothing
            state.pending_tree = PendingTree(parents)
        except CodedError as e:
            state.pending_tree = PendingTree(None, refused=Refusal(e.code, str(e), frame.session))

    async def _forward(self, session: Held[BodyState], frame: Frame) -> Frame:
        state, sid, d = session.value, frame.session, self.split.hidden_size
        pending, state.pending_tree = state.pending_tree, None
        if pending is not None and pending.refused is not None:
            raise pending.refused
        tree = pending.parents if pending is not None else None
        if frame.dtype not in self.settings.wire_dtypes:
            allowed = ", ".join(x.name.lower() for x in self.settings.wire_dtypes)
            raise Refusal(
                "bad_dtype", f"FORWARD carries {frame.dtype.name.lower()}; this server accepts {allowed}", sid
            )
        if len(frame.shape) != 2 or frame.shape[1] != d or frame.shape[0] < 1:
            raise Refusal(
                "bad_shape", f"FORWARD must carry a (positions, {d}) hidden state, got {list(frame.shape)}", sid
            )
        rows, pos, reset = frame.shape[0], frame.position, bool(frame.flags & FrameFlags.RESET)
        last = bool(frame.flags & FrameFlags.LAST)
        if tree is not None:
            check_tree(tree, rows)
        state.check(pos, reset)  # before it queues: a refusal costs nothing
        if pos + rows > self.settings.max_context:
            raise Refusal(
                "context_full",
                f"{pos} + {rows} positions exceed this server's max context {self.settings.max_context}",
                sid,
            )
        growth = pos + rows - state.length  # positions this step adds to the session (negative: a rollback)
        # Every session's positions after this step, steps queued but not yet run included.
        held = self._positions() + self._reserved + growth
        if held * self.kv_bytes_per_position > self.settings.kv_budget_bytes:
            raise Refusal(
                "memory_full",
                f"the KV caches of all sessions would need {held * self.kv_bytes_per_position / 2**20:.1f} MiB, over "
                f"this server's budget of {self.settings.kv_budget_bytes / 2**20:.1f} MiB; retry later or shorten",
                sid,
            )
        rt = self.split.runtime
        # Decoded (rejecting NaN/Inf) and encoded on the compute thread, with the forward: see batching.compute_thread.
        decode = functools.partial(frame_tensor, frame, dtype=rt.dtype, device=rt.device)  # (T, D)
        encode = functools.partial(tensor_frame, MessageType.RESULT, wire_dtype=frame.dtype, session=sid, position=pos)
        self._reserved += max(growth, 0)
        try:
            # Batched with other sessions' steps (a tree's block runs on its own).
            reply = await self.batcher.submit(state, decode, pos, reset, last, tree=tree, encode=encode)
        finally:
            self._reserved -= max(growth, 0)
        self.counters["forward_frames"] += 1
        self.counters["positions"] += rows
        return reply

    async def _generate(self, frame: Frame, gone: asyncio.Event) -> Frame:
        """The cloud-only baseline: the prompt arrives as text, the whole model runs here, text goes back."""
        if not self.settings.cloud_only:
            raise Refusal("wrong_mode", "this server runs a body for split clients; GENERATE needs --cloud-only")
        request = frame.json_body()
        prompt = request.pop("prompt", None)
        chat, system = request.pop("chat", False), request.pop("system", None)
        valid_prompt = isinstance(prompt, str) or (
            isinstance(prompt, list) and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in prompt)
        )
        if not valid_prompt or not isinstance(chat, bool) or not isinstance(system, str | None):
            raise Refusal("bad_request", "GENERATE needs a text or chat-message 'prompt', a boolean 'chat', a 'system'")
        stop = request.pop("stop", None) or ()
        stop = (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, list | tuple) or not all(isinstance(x, str) for x in stop):
            raise Refusal("bad_request", "GENERATE's 'stop' is a string or a list of strings")
        try:
            params = SamplingParams(**request, stop=tuple(stop))
            run = stream(self.split, prompt, chat=chat, system=system, params=params)
        except (TypeError, ValueError, LambdaSplitError) as exc:
            raise Refusal("bad_request", f"bad GENERATE request: {exc}") from exc
        if len(run.prompt_ids) + params.max_new_tokens > self.settings.max_context:
            raise Refusal(
                "context_full",
                f"{len(run.prompt_ids)} prompt + {params.max_new_tokens} new tokens exceed max context "
                f"{self.settings.max_context}",
            )
        # One token per executor call, so body sessions of other clients interleave with a long generation.
        # Between tokens it also stops when the client has gone: nobody would read the answer.
        tokens = iter(run)
        while await self.batcher.call(lambda: self._timed_next(tokens)):
            if gone.is_set():
                self.counters["generations_abandoned"] += 1
                return Frame.json(MessageType.ERROR, {"code": "gone", "message": "the client disconnected"})
        assert run.result is not None
        self.counters["generations"] += 1
        self.counters["generated_tokens"] += run.result.new_tokens
        r = run.result
        answer = {"text": r.text, "new_tokens": r.new_tokens, "prompt_tokens": r.prompt_tokens}
        return Frame.json(MessageType.TEXT, answer | {"finish_reason": r.finish_reason})

    def _timed_next(self, tokens: Iterator[TokenEvent]) -> bool:
        start = time.perf_counter()
        more = next(tokens, None) is not None
        self.compute_seconds += time.perf_counter() - start
        return more

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def close_owner(self, conn: int) -> int:
        self._conn_group.pop(conn, None)
        return len(self.store.close_owner(conn))

    def _hello_group(self, conn: int, frame: Frame) -> Frame:
        """HELLO on a server of several user groups: the device's group, proven by its body's fingerprint."""
        assert self.groups is not None
        body = frame.json_body()
        if body.get("protocol", PROTOCOL) != PROTOCOL:
            return self._hello(frame)  # refused there, the same way as on any server
        names = ", ".join(self.groups)
        name, theirs = body.get("group"), body.get("fingerprint")
        if not isinstance(name, str | None):
            raise Refusal("bad_request", f"HELLO's group is a string, got {type(name).__name__}", fatal=True)
        if not isinstance(theirs, str):
            raise Refusal(
                "model_mismatch",
                f"this server serves user groups ({names}): HELLO needs the fingerprint of the client's group body",
                fatal=True,
            )
        if name is None:  # a device that does not name its group: its key's fingerprint says which
            name = next((g for g, s in self.groups.items() if s.fingerprint == theirs), None)
            if name is None:
                raise Refusal(
                    "model_mismatch",
                    f"this server runs the bodies of user groups {names} of {self.model_name}; the client's "
                    f"fingerprint {theirs} pairs with none of them",
                    fatal=True,
                )
        if name not in self.groups:
            raise Refusal("unknown_group", f"this server has no user group {name!r}; it serves {names}", fatal=True)
        ours = self.groups[name].fingerprint
        if theirs != ours:
            raise Refusal(
                "group_mismatch",
                f"user group {name!r}'s body has fingerprint {ours}, and the client's key pairs with {theirs}: a "
                "device of one group cannot use another group's body",
                fatal=True,
            )
        self._conn_group[conn] = name
        return Frame.json(MessageType.WELCOME, {**self.welcome(), "group": name, "fingerprint": ours})

    def evict_idle(self) -> int:
        return self.store.evict_idle()

    def _warm_up(self) -> None:
        rt = self.split.runtime
        self.body(torch.zeros(1, 4, self.split.hidden_size, dtype=rt.dtype, device=rt.device), self.body.new_cache())


def _check_groups(groups: Mapping[str, SplitModel], settings: ServerSettings) -> dict[str, SplitModel]:
    """User groups must be bodies of one model at the same split points, each with its own fingerprint."""
    if not groups:
        raise ConfigError("a server of user groups needs at least one group")
    if settings.cloud_only:
        raise ConfigError("user groups serve body sessions; they cannot be combined with cloud-only mode")
    first = next(iter(groups.values()))
    for name, split in groups.items():
        if split.body is None or split.points != first.points or split.hidden_size != first.hidden_size:
            raise ConfigError(f"user group {name!r} is not a body of the same model at layers {first.points}")
    fingerprints = [s.fingerprint for s in groups.values()]
    if len(set(fingerprints)) != len(fingerprints):
        raise ConfigError("two user groups have the same fingerprint: each group needs its own secrets")
    return dict(groups)
