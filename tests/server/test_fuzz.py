"""Hostile input against a live body server: every malformed frame gets a typed error and other sessions carry on.

A few hundred generated frames per run (hypothesis, tests/fuzzing.py); scripts/fuzz_server.py runs the same
strategy for as long as you like and reports what it tried.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from websockets.sync.client import connect

from fuzzing import KNOWN_CODES, frames, unanswered
from lambdasplit.client import connect_device
from lambdasplit.generation import generate
from lambdasplit.split import load_split
from lambdasplit.wire import Frame, MessageType, decode_frame, encode_frame
from servers import body_server
from tiny_models import NUM_LAYERS

LAYERS = f"1:{NUM_LAYERS - 1}"


@pytest.fixture(scope="module")
def fuzzed(tiny_checkpoint):
    path, _ = tiny_checkpoint("llama")
    with body_server("--model", str(path), "--layers", LAYERS, "--max-frame-bytes", "65536") as url:
        # A canary session opened before the fuzzing, used after it.
        split, canary = connect_device(url, path)
        with canary:
            link = canary.open_session("float32")
            yield url, path, split, link


def test_malformed_frames_get_typed_errors_and_the_server_carries_on(fuzzed) -> None:
    url, path, split, link = fuzzed
    state = {"ws": None, "tried": 0, "closed": 0}

    def fresh():
        ws = connect(url, compression=None, proxy=None, max_size=None).__enter__()
        ws.send(encode_frame(Frame.json(MessageType.HELLO, {})))
        decode_frame(ws.recv(timeout=10))
        ws.send(encode_frame(Frame.json(MessageType.OPEN, {})))
        decode_frame(ws.recv(timeout=10))
        return ws

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(frames)
    def one(data: bytes) -> None:
        if state["ws"] is None:
            state["ws"] = fresh()
        ws = state["ws"]
        ws.send(data)
        state["tried"] += 1
        if unanswered(data):  # nothing comes back, and the connection still answers
            ws.send(encode_frame(Frame(MessageType.PING)))
            assert decode_frame(ws.recv(timeout=30)).type is MessageType.PONG
            return
        reply = decode_frame(ws.recv(timeout=30))  # an answer, always, and a well-formed one
        if reply.type is MessageType.ERROR:
            body = reply.json_body()
            assert body["code"] in KNOWN_CODES, body
            if body["code"] in ("bad_protocol", "model_mismatch"):  # fatal by design: the server hangs up
                state["ws"], state["closed"] = None, state["closed"] + 1
        else:
            assert reply.type in (MessageType.RESULT, MessageType.OPENED, MessageType.CLOSED, MessageType.PONG,
                                  MessageType.WELCOME)  # fmt: skip

    one()
    assert state["tried"] == 300
    # The canary session, untouched by all of that, still computes exactly.
    got = generate(split, [1, 5, 9, 200], max_new_tokens=8, ignore_eos=True, link=link)
    want = generate(load_split(path, LAYERS), [1, 5, 9, 200], max_new_tokens=8, ignore_eos=True)
    assert got.token_ids == want.token_ids
