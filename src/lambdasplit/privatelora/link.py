"""The device's side of PrivateLoRA over the network: send the head's hidden states up, answer the cloud's
``u = x A`` with ``v = u M`` at every adapted layer, take the body's output for the tail.

``AdapterLink`` is a ``BodyLink`` (``generation.session``), so the generation loop, head and tail are the plain
split's. It also runs training steps (``train_forward`` / ``train_backward``, used by ``training``): the cloud
backpropagates through its frozen layers and asks the device for ``dL/du`` at each adapted layer, while the
device's autograd accumulates ``dL/dM``. M, its gradients and its checkpoints never leave the device.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import torch
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from lambdasplit.errors import ConfigError, RemoteError, WireError
from lambdasplit.privatelora import messages as M
from lambdasplit.privatelora.layout import AdapterLayout
from lambdasplit.privatelora.private import PrivateAdapters
from lambdasplit.privatelora.server import FLAG_LAST, FLAG_RESET, MAX_MESSAGE
from lambdasplit.split import SplitModel
from lambdasplit.syncws import connect_session
from lambdasplit.tls import TlsTrust
from lambdasplit.traffic import Traffic


class AdapterLink:
    """One session with the PrivateLoRA server at ``url``, answering with ``adapters`` (the device's M).

    ``adapters`` None: new adapters (M = 0) of the server's layout, for a device about to fine-tune them
    (``self.adapters`` afterwards).

    ``dtype``: how tensors travel (float32, float16 or bfloat16); ``token``: the server's bearer token. ``traffic``
    counts every message both ways (``messages`` counts forwards and backwards); ``exchanges`` counts DOWN/UP and
    GRAD_DOWN/GRAD_UP round trips.
    """

    def __init__(
        self,
        url: str,
        adapters: PrivateAdapters | None = None,
        *,
        dtype: str = "float32",
        timeout: float = 60.0,
        trust: TlsTrust | None = None,
        token: str | None = None,
    ) -> None:
        if dtype not in M.WIRE_DTYPES:
            raise ConfigError(f"a PrivateLoRA link carries {', '.join(M.WIRE_DTYPES)}, not {dtype!r}")
        self.url, self.timeout = url, timeout
        self.dtype = M.WIRE_DTYPES[dtype]
        self.trust = trust or TlsTrust()
        self._token = token
        self.traffic = Traffic()
        self.exchanges = 0
        self.step = 0
        self._stack = contextlib.ExitStack()
        self.ws = self._connect(url)
        try:
            asked = None if adapters is None else adapters.layout.describe()
            self._send(json.dumps({"type": "open", "adapters": asked, "dtype": dtype}))
            self.ready = self._ready_message()
            self.adapters = adapters or self._adapters_of(self.ready)
            self._check_ready(self.ready)
        except BaseException:
            self.close()
            raise

    def _connect(self, url: str) -> ClientConnection:
        return connect_session(
            url,
            what="the PrivateLoRA server",
            exposes="every hidden state and low-rank activation",
            trust=self.trust,
            timeout=self.timeout,
            max_size=MAX_MESSAGE,
            stack=self._stack,
            token=self._token,
        )

    def _ready_message(self) -> dict[str, Any]:
        data = self._receive("ready message")
        ready = json.loads(data) if isinstance(data, str) else {}
        if ready.get("type") != "ready":
            raise WireError(f"the server answered open with {str(data)[:200]!r}", code="bad_frame")
        return dict(ready)

    @staticmethod
    def _adapters_of(ready: dict[str, Any]) -> PrivateAdapters:
        described = ready["adapters"]
        layout = AdapterLayout(
            tuple(described["targets"]), int(described["rank_c2d"]), int(described["rank_d2c"]), int(ready["seed"])
        )
        return PrivateAdapters(layout, range(*ready["layers"]))

    def _check_ready(self, ready: dict[str, Any]) -> None:
        """Refuse a server whose layers, groups or seed are not these adapters'."""
        start, stop = ready["layers"]
        if list(range(start, stop)) != self.adapters.layers:
            raise ConfigError(
                f"the server's body runs layers [{start}, {stop}); these adapters are for layers "
                f"{self.adapters.layers[0]}..{self.adapters.layers[-1]}",
            )
        if [tuple(g) for g in ready["groups"]] != self.adapters.groups:
            raise ConfigError(
                f"the server groups its projections as {ready['groups']}, the device as {self.adapters.groups}"
            )
        if ready.get("seed") != self.adapters.layout.seed:
            raise ConfigError(
                f"the server's A and B come from seed {ready.get('seed')}, these adapters were trained with seed "
                f"{self.adapters.layout.seed}"
            )
        self.hidden_size = int(ready["hidden_size"])

    def check_model(self, split: SplitModel) -> None:
        """Refuse to pair this device's ``split`` (head and tail) with a server running another model."""
        if self.ready.get("fingerprint") != split.fingerprint or self.hidden_size != split.hidden_size:
            raise ConfigError(
                f"the server runs a body of model {self.ready.get('fingerprint')} (width {self.hidden_size}); this "
                f"device loaded {split.fingerprint} (width {split.hidden_size}): pass the server's --model"
            )

    def _send(self, data: str | bytes) -> None:
        try:
            self.ws.send(data)
        except ConnectionClosed:
            raise WireError("the PrivateLoRA server closed the session", code="peer_gone") from None

    def _receive(self, what: str) -> str | bytes:
        try:
            data = self.ws.recv(timeout=self.timeout)
        except TimeoutError:
            raise WireError(f"the server sent no {what} within {self.timeout:.0f} s", code="timeout") from None
        except ConnectionClosed:
            raise WireError(f"the server closed the session before its {what}", code="peer_gone") from None
        if isinstance(data, str):
            message = json.loads(data)
            if message.get("type") == "error":
                raise RemoteError(str(message.get("message")), code=str(message.get("code")))
        return data

    # inference: a BodyLink

    def forward(self, hidden: torch.Tensor, position: int, reset: bool = False, last: bool = False) -> torch.Tensor:
        """The body's output for ``hidden`` (1, T, D) at ``position``: (1, T, D), or (1, 1, D) with ``last``."""
        self._check(hidden)
        flags = (FLAG_LAST if last else 0) | (FLAG_RESET if reset else 0)
        frame = M.pack(M.Kind.FORWARD, self.step, hidden[0], position=position, group=flags, dtype=self.dtype)
        return self._run(frame, hidden, keep=False).to(hidden.device, hidden.dtype)

    # training: used by ``training.SplitTrainer``

    def train_forward(self, hidden: torch.Tensor) -> tuple[int, torch.Tensor]:
        """A training forward of ``hidden`` (1, T, D): (its step, the body's output (1, T, D)); the device keeps
        each exchange's graph until ``train_backward`` of that step."""
        self._check(hidden)
        step = self.step
        frame = M.pack(M.Kind.TRAIN, step, hidden[0], dtype=self.dtype)
        return step, self._run(frame, hidden, keep=True).to(hidden.device, hidden.dtype)

    def train_backward(self, step: int, grad: torch.Tensor) -> None:
        """Send dL/d(output) (1, T, D) of training step ``step``; answer the cloud's dL/dv with dL/du until DONE.
        ``M.grad`` of every adapted projection holds dL/dM afterwards (accumulated)."""
        frame = M.pack(M.Kind.GRAD, step, grad[0], dtype=self.dtype)
        self._converse(frame, step, M.Kind.DONE, M.Kind.GRAD_DOWN, M.Kind.GRAD_UP, self._gradient)

    def _gradient(self, msg: M.Message) -> torch.Tensor:
        grad_v = self._values(msg, self.adapters.layout.rank_d2c)
        return self.adapters.gradient(msg.layer, msg.group, grad_v)

    def _check(self, hidden: torch.Tensor) -> None:
        if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[2] != self.hidden_size:
            raise ConfigError(f"hidden must be (1, T, {self.hidden_size}), got {tuple(hidden.shape)}")

    def _values(self, msg: M.Message, width: int) -> torch.Tensor:
        """A DOWN or GRAD_DOWN payload as (n, 1, rows, width) for the group it names."""
        groups = self.adapters.groups
        n = len(groups[msg.group]) if msg.group < len(groups) else 0
        if n == 0:
            raise WireError(f"the server named group {msg.group}; there are {len(groups)}", code="bad_adapter")
        return msg.tensor((n, msg.rows, width), msg.kind.name).unsqueeze(1)

    def _run(self, frame: bytes, hidden: torch.Tensor, keep: bool) -> torch.Tensor:
        """Send a FORWARD or TRAIN and answer DOWN with UP until the OUTPUT of this step."""
        step = self.step
        self.step += 1

        def answer(msg: M.Message) -> torch.Tensor:
            u = self._values(msg, self.adapters.layout.rank_c2d)
            return self.adapters.answer(msg.layer, msg.group, u, keep=keep)

        out = self._converse(frame, step, M.Kind.OUTPUT, M.Kind.DOWN, M.Kind.UP, answer)
        return out.tensor((out.rows, self.hidden_size), "output").unsqueeze(0)

    def _converse(
        self,
        frame: bytes,
        step: int,
        last: M.Kind,
        asked: M.Kind,
        reply: M.Kind,
        answer: Callable[[M.Message], torch.Tensor],
    ) -> M.Message:
        """Send ``frame``, then answer each ``asked`` message of ``step`` with ``reply`` (``answer``: (n, 1, T, r))
        until ``last`` arrives; the traffic is counted as one message. Returns ``last``."""
        start = time.perf_counter()
        self._send(frame)
        up, down, up_payload, down_payload = len(frame), 0, len(frame) - M.HEADER.size, 0
        while True:
            msg = M.unpack(self._receive(last.name))
            down += M.HEADER.size + len(msg.payload)
            down_payload += len(msg.payload)
            if msg.step != step or msg.kind not in (last, asked):
                raise WireError(
                    f"expected {asked.name} or {last.name} for step {step}, got {msg.kind.name} for step {msg.step}",
                    code="out_of_step",
                )
            if msg.kind == last:
                break
            values = answer(msg)
            data = M.pack(reply, step, values[:, 0], layer=msg.layer, group=msg.group, dtype=self.dtype)
            self._send(data)
            self.exchanges += 1
            up += len(data)
            up_payload += len(data) - M.HEADER.size
        self.traffic.add(up, down, up_payload, down_payload, seconds=time.perf_counter() - start)
        return msg

    def close(self) -> None:
        with contextlib.suppress(ConnectionClosed, RuntimeError):
            self.ws.send(json.dumps({"type": "close"}))
        self._stack.close()

    def __enter__(self) -> AdapterLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
