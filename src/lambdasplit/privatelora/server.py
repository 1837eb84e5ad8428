"""The cloud's PrivateLoRA body server (``lambdasplit serve --privatelora``): the shared decoder stack with frozen
A and B, serving devices that hold the private M.

Each device connection is one session in its own thread (``messages`` has the protocol): its own KV cache, its
own training graphs, and its connection as the ``Exchange`` the adapters ask mid-forward. The body's modules,
weights, A and B are shared by all sessions. A bad message, a device that goes silent (``timeout``) or leaves
mid-step ends that session with an ``error`` message, never another one.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from ssl import SSLContext

import torch
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection

from lambdasplit.errors import LambdaSplitError, WireError
from lambdasplit.privatelora import messages as M
from lambdasplit.privatelora.cloud import CloudAdapters, exchanging, forward_for_training
from lambdasplit.privatelora.layout import AdapterLayout
from lambdasplit.split import SplitModel
from lambdasplit.split.state import BodyState
from lambdasplit.syncws import SessionServer, control_type, receive_open, send_error
from lambdasplit.wire.tensors import WireDtype

log = logging.getLogger("lambdasplit.privatelora")

MAX_MESSAGE = 1 << 26
MAX_ROWS = 2048  # positions per forward: a prompt, or a training sequence
MAX_PENDING = 4  # training forwards a session may hold before their backward
FLAG_LAST, FLAG_RESET = 1, 2  # FORWARD's ``group`` field


#: ``tap(layer, group, u, v)``: what a curious server keeps of each forward exchange (the privacy measurements).
Tap = Callable[[int, int, torch.Tensor, torch.Tensor], None]


class _DeviceExchange:
    """The adapters' ``Exchange`` over one session's connection, for one step."""

    def __init__(
        self, ws: ServerConnection, step: int, dtype: WireDtype, layout: AdapterLayout, timeout: float, tap: Tap | None
    ) -> None:
        self.ws, self.step, self.dtype, self.layout, self.timeout = ws, step, dtype, layout, timeout
        self.tap = tap

    def forward(self, layer: int, group: int, u: torch.Tensor) -> torch.Tensor:
        v = self._ask(M.Kind.DOWN, M.Kind.UP, layer, group, u, self.layout.rank_d2c)
        if self.tap is not None:
            self.tap(layer, group, u.detach(), v.detach())
        return v

    def backward(self, layer: int, group: int, grad_v: torch.Tensor) -> torch.Tensor:
        return self._ask(M.Kind.GRAD_DOWN, M.Kind.GRAD_UP, layer, group, grad_v, self.layout.rank_c2d)

    def _ask(self, ask: M.Kind, answer: M.Kind, layer: int, group: int, sent: torch.Tensor, width: int) -> torch.Tensor:
        n, batch, rows, _ = sent.shape  # (n, 1, T, r)
        self.ws.send(M.pack(ask, self.step, sent.reshape(n, rows, -1), layer=layer, group=group, dtype=self.dtype))
        try:
            data = self.ws.recv(timeout=self.timeout)
        except TimeoutError:
            raise WireError(
                f"the device sent no {answer.name} for layer {layer} within {self.timeout:.0f} s", code="device_timeout"
            ) from None
        msg = M.unpack(data)
        if (msg.kind, msg.step, msg.layer, msg.group) != (answer, self.step, layer, group):
            raise WireError(
                f"expected {answer.name} for step {self.step}, layer {layer}, group {group}; the device sent "
                f"{msg.kind.name} for step {msg.step}, layer {msg.layer}, group {msg.group}",
                code="out_of_step",
            )
        values = msg.tensor((n, rows, width), answer.name)
        return values.view(n, batch, rows, width).to(sent.device, sent.dtype)


class AdapterServer(SessionServer):
    """The body of ``split`` with PrivateLoRA adapters of ``layout``, serving devices on ``host:port`` (WebSocket).

    ``timeout``: how long a session waits for its device at any point (an exchange, the next message).
    ``tap``: called with every forward exchange's ``u`` and ``v`` as this server holds them: what a curious cloud
    can keep (``benchmarks/privatelora_privacy.py`` fits M from it). ``tokens``: the bearer tokens a device must
    present (none: any device is served).
    """

    def __init__(
        self,
        split: SplitModel,
        layout: AdapterLayout,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        timeout: float = 60.0,
        max_sessions: int = 8,
        ssl: SSLContext | None = None,
        tap: Tap | None = None,
        tokens: Sequence[str] = (),
    ) -> None:
        if split.body is None:
            raise ValueError("an adapter server needs the body (load_split(..., parts=('body',)))")
        self.split, self.layout, self.timeout, self.tap = split, layout, timeout, tap
        self.adapters = CloudAdapters(split.body, layout)
        super().__init__(
            self._session,
            host,
            port,
            max_size=MAX_MESSAGE,
            timeout=timeout,
            ssl=ssl,
            name="privatelora",
            tokens=tokens,
            max_sessions=max_sessions,
        )
        self.served = 0  # sessions that ended, however
        self.active = 0  # sessions in progress
        self._count = threading.Lock()

    def start(self) -> AdapterServer:
        super().start()
        return self

    def __enter__(self) -> AdapterServer:
        return self.start()

    def ready(self) -> dict[str, object]:
        body = self.adapters.body
        return {
            "type": "ready",
            "layers": [body.start, body.stop],
            "hidden_size": self.split.hidden_size,
            "groups": [list(g) for g in self.layout.groups()],
            "adapters": self.layout.describe(),
            "seed": self.layout.seed,
            "fingerprint": self.split.fingerprint,
        }

    # one device connection = one session

    def _session(self, ws: ServerConnection) -> None:
        with self._count:
            self.active += 1
        try:
            dtype = self._open(ws)
            ws.send(json.dumps(self.ready()))
            _Session(self, ws, dtype).serve()
        except ConnectionClosed:
            log.info("privatelora: the device left")
        except LambdaSplitError as e:
            log.warning("privatelora: session ended: %s", e)
            send_error(ws, e)
        except Exception as e:  # a bug: the device still gets an answer
            log.exception("privatelora: session failed")
            send_error(ws, WireError(f"the adapter server failed: {type(e).__name__}: {e}", code="internal"))
        finally:
            with self._count:
                self.served += 1
                self.active -= 1

    def _open(self, ws: ServerConnection) -> WireDtype:
        opened = receive_open(ws, self.timeout, "adapters, dtype")
        # adapters null: a new device takes this server's layout (ready says it) and starts from M = 0
        asked, dtype = opened.get("adapters"), opened.get("dtype", "float32")
        if dtype not in M.WIRE_DTYPES:
            raise WireError(f"open's dtype is one of {', '.join(M.WIRE_DTYPES)}, got {dtype!r}", code="bad_frame")
        if asked is not None and asked != self.layout.describe():
            raise WireError(
                f"the device's adapters {asked} do not match this server's {self.layout.describe()}",
                code="adapter_mismatch",
            )
        return M.WIRE_DTYPES[dtype]


class _Session:
    """One device's session: its KV cache, its step counter and the training forwards awaiting a backward."""

    def __init__(self, server: AdapterServer, ws: ServerConnection, dtype: WireDtype) -> None:
        self.server, self.ws, self.dtype = server, ws, dtype
        body = server.adapters.body
        self.state = BodyState(body)
        self.width = server.split.hidden_size
        self.runtime = server.split.runtime
        self.step = 0
        self.pending: dict[int, tuple[torch.Tensor, _DeviceExchange]] = {}  # training step -> (output, exchange)

    def exchange(self, step: int) -> _DeviceExchange:
        return _DeviceExchange(self.ws, step, self.dtype, self.server.layout, self.server.timeout, self.server.tap)

    def serve(self) -> None:
        while True:
            try:
                data = self.ws.recv(timeout=self.server.timeout)
            except TimeoutError:
                raise WireError(f"the device was silent for {self.server.timeout:.0f} s", code="timeout") from None
            if isinstance(data, str):
                if control_type(data) == "close":
                    return
                raise WireError(f"unexpected {control_type(data)!r} message in a session", code="bad_frame")
            msg = M.unpack(data)
            if msg.kind in (M.Kind.FORWARD, M.Kind.TRAIN):
                self._forward(msg)
            elif msg.kind == M.Kind.GRAD:
                self._backward(msg)
            else:
                raise WireError(f"a device does not send {msg.kind.name} between steps", code="bad_frame")

    def _hidden(self, msg: M.Message) -> torch.Tensor:
        if not 1 <= msg.rows <= MAX_ROWS:
            raise WireError(f"{msg.rows} rows; a forward takes 1 .. {MAX_ROWS}", code="bad_frame")
        hidden = msg.tensor((1, msg.rows, self.width), msg.kind.name)
        return hidden.to(self.runtime.device, self.runtime.dtype)

    def _forward(self, msg: M.Message) -> None:
        if msg.step != self.step:
            raise WireError(
                f"{msg.kind.name} for step {msg.step}; this session is at step {self.step}", code="out_of_step"
            )
        hidden = self._hidden(msg)
        exchange = self.exchange(msg.step)
        self.step += 1
        if msg.kind == M.Kind.TRAIN:
            if len(self.pending) >= MAX_PENDING:
                raise WireError(
                    f"{MAX_PENDING} training forwards already await their backward", code="too_many_pending"
                )
            with exchanging(exchange):
                out, _ = forward_for_training(self.state.body, hidden)
            self.pending[msg.step] = (out, exchange)
        else:
            flags = msg.group
            with exchanging(exchange):
                out = self.state.forward(
                    hidden, msg.position, reset=bool(flags & FLAG_RESET), last=bool(flags & FLAG_LAST)
                )
        self.ws.send(M.pack(M.Kind.OUTPUT, msg.step, out[0], dtype=self.dtype))

    def _backward(self, msg: M.Message) -> None:
        held = self.pending.pop(msg.step, None)
        if held is None:
            raise WireError(
                f"a gradient for step {msg.step}, which is no training forward awaiting one "
                f"(waiting: {sorted(self.pending) or 'none'})",
                code="unknown_step",
            )
        out, exchange = held
        grad = msg.tensor(tuple(out.shape), "GRAD").to(out.device, out.dtype)
        with exchanging(exchange), torch.inference_mode(False):
            torch.autograd.backward(out, grad)
        self.ws.send(M.pack(M.Kind.DONE, msg.step))
