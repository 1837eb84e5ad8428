"""Sessions driven through random sequences of OPEN / FORWARD / rollback / CLOSE and bad steps, on a live server.

A hypothesis state machine keeps, per session, the hidden states the body should hold, and checks every
RESULT against the local body run on that whole history from scratch: interleaved sessions, rollbacks
(a position before the end), refused steps (skipping ahead, past the context, NaN, closed sessions) must
leave each cache exactly as the model says. tests/server/test_fuzz.py throws garbage frames at the parser;
this reaches the session logic behind it with well-formed ones.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from websockets.sync.client import ClientConnection, connect

from lambdasplit.split import SplitModel, load_split
from lambdasplit.wire import Frame, MessageType, decode_frame, encode_frame, frame_tensor, tensor_frame
from servers import body_server
from tiny_models import NUM_LAYERS

LAYERS = f"1:{NUM_LAYERS - 1}"
MAX_CONTEXT = 24
MAX_SESSIONS = 3


@pytest.fixture(scope="module")
def served(tiny_checkpoint) -> Iterator[tuple[str, SplitModel]]:
    path, _ = tiny_checkpoint("llama")
    args = ("--model", str(path), "--layers", LAYERS, "--max-context", str(MAX_CONTEXT))
    with body_server(*args, "--max-sessions", str(MAX_SESSIONS)) as url:
        yield url, load_split(path, LAYERS, parts=["body"])


def test_random_session_histories_match_the_local_body(served: tuple[str, SplitModel]) -> None:
    url, local = served
    body, hidden_size = local.body, local.hidden_size
    assert body is not None

    class Sessions(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.ws: ClientConnection = connect(url, compression=None, proxy=None, max_size=None).__enter__()
            self.ask(Frame.json(MessageType.HELLO, {}))
            self.held: dict[int, torch.Tensor] = {}  # session -> (length, D): what its body cache holds
            self.closed: list[int] = []

        def ask(self, frame: Frame | bytes) -> Frame:
            self.ws.send(frame if isinstance(frame, bytes) else encode_frame(frame))
            return decode_frame(self.ws.recv(timeout=30))

        def refused(self, frame: Frame | bytes, code: str) -> None:
            reply = self.ask(frame)
            assert reply.type is MessageType.ERROR and reply.json_body()["code"] == code, reply.json_body()

        def forward(self, session: int, rows: torch.Tensor, position: int) -> Frame:
            return self.ask(tensor_frame(MessageType.FORWARD, rows, "float32", session, position))

        @rule()
        def open(self) -> None:
            reply = self.ask(Frame.json(MessageType.OPEN, {}))
            if len(self.held) < MAX_SESSIONS:
                assert reply.type is MessageType.OPENED
                self.held[reply.session] = torch.empty(0, hidden_size)
            else:
                assert reply.json_body()["code"] == "too_many_sessions"

        @precondition(lambda self: self.held)
        @rule(data=st.data(), rows=st.integers(1, 4), back=st.integers(0, 3), seed=st.integers(0, 2**16))
        def step(self, data: st.DataObject, rows: int, back: int, seed: int) -> None:
            """A step at the end of the history, or ``back`` positions before it (a rollback)."""
            session = data.draw(st.sampled_from(sorted(self.held)))
            history = self.held[session]
            position = max(0, len(history) - back)
            new = torch.randn(rows, hidden_size, generator=torch.Generator().manual_seed(seed))
            reply = self.forward(session, new, position)
            if position + rows > MAX_CONTEXT:
                assert reply.json_body()["code"] == "context_full"
                return
            assert reply.type is MessageType.RESULT and reply.position == position
            history = torch.cat([history[:position], new])
            with torch.inference_mode():
                want = body(history[None])[0, position:]  # the whole history from scratch, no cache
            torch.testing.assert_close(frame_tensor(reply), want, atol=1e-4, rtol=1e-4)
            self.held[session] = history

        @precondition(lambda self: self.held)
        @rule(data=st.data(), ahead=st.integers(1, 3))
        def skip_ahead(self, data: st.DataObject, ahead: int) -> None:
            session = data.draw(st.sampled_from(sorted(self.held)))
            position = len(self.held[session]) + ahead
            self.refused(tensor_frame(MessageType.FORWARD, torch.ones(1, hidden_size), "float32", session, position),
                         "bad_position")  # fmt: skip

        @precondition(lambda self: self.held)
        @rule(data=st.data())
        def non_finite(self, data: st.DataObject) -> None:
            session = data.draw(st.sampled_from(sorted(self.held)))
            frame = tensor_frame(MessageType.FORWARD, torch.ones(2, hidden_size), "float32", session,
                                 len(self.held[session]))  # fmt: skip
            raw = encode_frame(frame)
            self.refused(raw[:-4] + struct.pack("<f", float("nan")), "non_finite")

        @precondition(lambda self: self.held)
        @rule(data=st.data())
        def close(self, data: st.DataObject) -> None:
            session = data.draw(st.sampled_from(sorted(self.held)))
            assert self.ask(Frame.json(MessageType.CLOSE, {}, session=session)).type is MessageType.CLOSED
            del self.held[session]
            self.closed.append(session)

        @precondition(lambda self: self.closed)
        @rule(data=st.data())
        def use_closed(self, data: st.DataObject) -> None:
            session = data.draw(st.sampled_from(self.closed))
            self.refused(tensor_frame(MessageType.FORWARD, torch.ones(1, hidden_size), "float32", session, 0),
                         "unknown_session")  # fmt: skip

        @invariant()
        def alive(self) -> None:
            assert self.ask(Frame(MessageType.PING)).type is MessageType.PONG

        def teardown(self) -> None:
            self.ws.__exit__(None, None, None)

    run_state_machine_as_test(
        Sessions,
        settings=settings(
            max_examples=25,
            stateful_step_count=25,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        ),
    )
