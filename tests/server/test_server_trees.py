"""TREE frames on the body server: a token tree's FORWARD runs under the tree mask, the next keeps a branch, and a bad
TREE frame is answered once, by refusing the FORWARD that follows it (the device sends both without waiting)."""

from __future__ import annotations

import pytest
import torch
from websockets.sync.client import connect

from lambdasplit.split import load_split
from lambdasplit.split.state import BodyState
from lambdasplit.wire import Frame, MessageType, decode_frame, encode_frame, frame_tensor, tensor_frame
from tiny_models import NUM_LAYERS


def _hello(url: str):
    ws = connect(url, compression=None, proxy=None).__enter__()
    ws.send(encode_frame(Frame.json(MessageType.HELLO, {"protocol": 1})))
    welcome = decode_frame(ws.recv(timeout=10))
    assert welcome.type is MessageType.WELCOME
    return ws, welcome.json_body()


def _forward(ws, session: int, rows: torch.Tensor, position: int, tree: dict | None = None) -> Frame:
    """A FORWARD (after a TREE frame when ``tree``): exactly one reply comes back for the two."""
    if tree is not None:
        ws.send(encode_frame(Frame.json(MessageType.TREE, tree, session=session)))
    ws.send(encode_frame(tensor_frame(MessageType.FORWARD, rows, "float32", session, position)))
    reply = decode_frame(ws.recv(timeout=30))
    ws.send(encode_frame(Frame(MessageType.PING)))
    assert decode_frame(ws.recv(timeout=10)).type is MessageType.PONG  # nothing else was queued
    return reply


@pytest.fixture(scope="module")
def body(tiny_checkpoint):
    path, _ = tiny_checkpoint("llama")
    return load_split(path, f"1:{NUM_LAYERS - 1}", parts=("body",), device="cpu", dtype="float32").body


def test_a_tree_runs_under_its_mask_and_its_branch_is_kept(llama_server, body) -> None:
    g = torch.Generator().manual_seed(0)
    local = BodyState(body)
    ws, welcome = _hello(llama_server)
    assert welcome["trees"] is True
    d = welcome["hidden_size"]
    with ws:
        ws.send(encode_frame(Frame.json(MessageType.OPEN, {})))
        session = decode_frame(ws.recv(timeout=10)).session
        prompt, tree, step = (torch.randn(n, d, generator=g) for n in (4, 4, 1))

        def check(reply: Frame, expected: torch.Tensor, position: int) -> None:
            assert reply.type is MessageType.RESULT and reply.position == position
            torch.testing.assert_close(frame_tensor(reply), expected[0], atol=1e-5, rtol=1e-5)

        check(_forward(ws, session, prompt, 0), local.forward(prompt[None], 0), 0)
        parents = [-1, 0, 1, 0]
        check(_forward(ws, session, tree, 4, {"parents": parents}), local.forward(tree[None], 4, tree=parents), 4)
        # The branch is kept as the TREE frame arrives: it holds even when the FORWARD after it is refused.
        bad = _forward(ws, session, torch.randn(1, d + 1), 6, {"keep": {"start": 4, "rows": [0, 3]}})
        assert bad.json_body()["code"] == "bad_shape"
        local.keep(4, [0, 3])
        check(_forward(ws, session, step, 6), local.forward(step[None], 6), 6)
        # The branch kept is what the body holds: a chain of the same rows continues the same way.
        chain = BodyState(body)
        chain.forward(prompt[None], 0)
        chain.forward(tree[[0, 3]][None], 4)
        torch.testing.assert_close(chain.forward(step[None], 6), local.forward(step[None], 6), atol=1e-5, rtol=1e-5)


def test_bad_tree_frames_refuse_the_forward_after_them(llama_server) -> None:
    ws, welcome = _hello(llama_server)
    d = welcome["hidden_size"]
    with ws:
        ws.send(encode_frame(Frame.json(MessageType.OPEN, {})))
        session = decode_frame(ws.recv(timeout=10)).session
        assert _forward(ws, session, torch.randn(4, d), 0).type is MessageType.RESULT
        bad = {
            "not a tree": {"parents": [0, 1, 2]},
            "rows differ": {"parents": [-1, 0]},
            "neither": {},
            "keep beyond": {"keep": {"start": 2, "rows": [5]}},
            "keep malformed": {"keep": {"start": "2", "rows": [0]}},
            "keep unordered": {"keep": {"start": 1, "rows": [1, 0]}},
        }
        for case, spec in bad.items():
            reply = _forward(ws, session, torch.randn(3, d), 4, spec)
            assert reply.type is MessageType.ERROR, case
            assert reply.json_body()["code"] == "bad_tree", (case, reply.json_body())
        # A TREE frame for a session this connection does not hold gets no reply; its FORWARD is refused as unknown.
        reply = _forward(ws, 999, torch.randn(1, d), 0, {"parents": [-1]})
        assert reply.json_body()["code"] == "unknown_session"
        # The session still works: a good tree after the refusals.
        reply = _forward(ws, session, torch.randn(3, d), 4, {"parents": [-1, 0, 0]})
        assert reply.type is MessageType.RESULT and reply.shape == (3, d)


def test_a_session_lost_after_a_tree_is_rebuilt_with_the_branch_kept(llama_server, body) -> None:
    """The device's history keeps the branch too: when the server no longer knows the session, the link replays
    the prompt and the kept branch (not the whole tree) into a new one, and the step goes on as before."""
    from lambdasplit.client import CloudClient

    g = torch.Generator().manual_seed(1)
    local = BodyState(body)
    with CloudClient(llama_server) as client:
        link = client.open_session("float32")
        d = int(client.welcome["hidden_size"])
        prompt, tree, step = (torch.randn(1, n, d, generator=g) for n in (5, 4, 1))
        link.forward(prompt, 0)
        local.forward(prompt, 0)
        link.forward_tree(tree, 5, [-1, 0, 0, 2], None)
        local.forward(tree, 5, tree=[-1, 0, 0, 2])
        client.request(Frame.json(MessageType.CLOSE, {}, session=link.session))  # as if evicted
        local.keep(5, [0, 2, 3])
        out = link.forward_tree(step, 8, None, (5, [0, 2, 3]))
        assert len(link.recoveries) == 1 and link.recoveries[0].replayed_positions == 8
        torch.testing.assert_close(out, local.forward(step, 8), atol=1e-5, rtol=1e-5)
        assert link.length == 9 and sum(h.shape[0] for h in link.history) == 9
        torch.testing.assert_close(torch.cat(link.history)[5:8], tree[0, [0, 2, 3]])
        link.close()
