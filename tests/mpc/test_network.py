"""The body on shares across real connections: two share servers (their own threads, a TCP peer link, WebSocket
device links on 127.0.0.1) and the device's ``SecretSharedLink``, on a tiny Llama built from a config.

What it must show: the same numbers as the HF body, what crosses each link, and a clear error on every party,
no hang, and the other sessions unharmed for a share frame of the wrong size, a mismatched session and a peer
that disappears.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from test_body import BOUND, TINY, steps_inputs
from websockets.sync.client import connect

from lambdasplit.errors import ConfigError, RemoteError, WireError
from lambdasplit.generation import generate
from lambdasplit.mpc import messages as M
from lambdasplit.mpc.body import BodyWeights
from lambdasplit.mpc.device import SecretSharedLink
from lambdasplit.mpc.ops import NormPlan
from lambdasplit.mpc.server import ShareServer
from lambdasplit.split import SplitModel, load_split

TIMEOUT = 5.0  # every party's wait: a failure must surface within this, not hang


@pytest.fixture(scope="module")
def split(tiny_checkpoint) -> SplitModel:
    path, _ = tiny_checkpoint("llama")
    return load_split(path, (1, 4), device="cpu", dtype="float32", quiet=True)


@pytest.fixture(scope="module")
def weights(split: SplitModel) -> BodyWeights:
    assert split.body is not None and split.body.model is not None
    return BodyWeights.from_hf(split.body.model)


def start_pair(
    weights: BodyWeights, timeout: float = TIMEOUT, sink: NormPlan = TINY
) -> tuple[ShareServer, ShareServer]:
    s0 = ShareServer(weights, 0, ("127.0.0.1", 0), rest=TINY, sink=sink, timeout=timeout).start()
    s1 = ShareServer(weights, 1, s0.peer_address, rest=TINY, sink=sink, timeout=timeout).start()
    return s0, s1


@pytest.fixture(scope="module")
def servers(weights: BodyWeights):
    s0, s1 = start_pair(weights)
    yield s0, s1
    s0.close()
    s1.close()


def link_to(servers: tuple[ShareServer, ShareServer]) -> SecretSharedLink:
    return SecretSharedLink([servers[0].url, servers[1].url], timeout=TIMEOUT)


def test_the_networked_body_equals_the_hf_body_and_counts_its_bytes(split, servers) -> None:
    """Prefill and decode steps through both servers stay within BOUND of the HF body's own output; the device
    sends each server one share (T x D int64 after a 24-byte header) per forward and deals server 1 the attention
    products' triples before it; server 1 asks for nothing once a forward of its size has been seen."""
    assert split.body is not None
    cache = split.body.new_cache()
    link = link_to(servers)
    position = 0
    try:
        for hidden in steps_inputs(split):
            with torch.no_grad():
                expected = split.body(hidden, cache)
            before, requests, dealt_before = link.traffic.up_payload_bytes, link.requests, link.dealt_ahead
            seen = hidden.shape[1] in link.usage
            out = link.forward(hidden, position)
            assert out.dtype == hidden.dtype and out.shape == hidden.shape
            assert (out - expected).abs().max().item() < BOUND
            rows = hidden.shape[1]
            assert link.traffic.up_payload_bytes - before == 2 * rows * split.hidden_size * 8
            # the matrix products' triples (two per layer) are dealt before every forward, and a forward of a size
            # seen before gets its pools ahead too: server 1 asks for nothing; the first of its size may ask for pools
            asked, dealt = link.requests - requests, link.dealt_ahead - dealt_before
            assert dealt == 2 * 3 and (asked == 0 if seen else asked > 0 or position > 0)
            position += rows
        last = link.forward(hidden, position - 1, last=True)  # a rollback of one row, the last row only
        assert last.shape == (1, 1, split.hidden_size)
    finally:
        link.close()
    assert link.dealt > 0 and link.traffic.messages == len(steps_inputs(split)) + 1


def test_greedy_tokens_through_the_servers_equal_the_plain_split(split, servers) -> None:
    plain = generate(split, "a b c d", max_new_tokens=6)
    link = link_to(servers)
    try:
        shared = generate(split, "a b c d", max_new_tokens=6, link=link)
    finally:
        link.close()
    assert shared.token_ids == plain.token_ids and len(plain.token_ids) == 6


def test_a_product_dealt_ahead_for_other_shapes_is_refused_not_used(split, servers, monkeypatch) -> None:
    """A device that deals a triple for shapes other than the body takes would leave the dealer's streams out of
    step (every product after it wrong): server 1 refuses it, and the device learns why."""
    import lambdasplit.mpc.device as device

    products = device.attention_products
    monkeypatch.setattr(device, "attention_products", lambda rows, context, *heads: products(rows, context + 1, *heads))
    link = link_to(servers)
    with pytest.raises(WireError) as refused:
        link.forward(steps_inputs(split)[0], 0)
    assert refused.value.code == "out_of_step" and "dealt a product" in str(refused.value)


def test_a_forward_redone_after_an_implausible_output_is_wide_on_both_servers(split, weights) -> None:
    """A massive row after position 0 blows up under the position's norm plan, and a row whose norm comes out
    negated (mean square 250 under TINY: an output of ordinary size) shows in the norm checks each server's OUTPUT
    carries (2 per layer, 3 words a row, after the output's share); either way the device sends the forward again
    flagged WIDE and both servers norm each row by the plan its mean square fits: the output is the HF body's.
    A FORWARD with a flag no server knows is refused."""
    assert split.body is not None
    inputs = steps_inputs(split)[0]
    massive, negated = inputs.clone(), inputs.clone()
    massive[0, 3] *= 1000  # as in test_body: mean square ~1e5 at position 3
    negated[0, 3] *= (250 / negated[0, 3].pow(2).mean()).sqrt()
    s0, s1 = start_pair(weights, sink=NormPlan(pre_shift=8, scale_bits=14, iterations=10))
    try:
        for hidden in (massive, negated):
            with torch.no_grad():
                expected = split.body(hidden, split.body.new_cache())
            link = link_to((s0, s1))
            try:
                rounds = list(link.peer_rounds)
                out = link.forward(hidden, 0)
                assert link.retries == 1 and link.step == 2
                assert (out - expected).abs().max().item() < BOUND  # each OUTPUT's size is checked as it is read
                assert link.peer_rounds[0] - rounds[0] == link.peer_rounds[1] - rounds[1]  # one program, in step
            finally:
                link.close()
        links = raw_session((s0, s1), b"f" * 16)
        for ws in links:
            assert json.loads(ws.recv(timeout=TIMEOUT))["type"] == "ready"
        frame = M.FORWARD.pack(M.FORWARD_MAGIC, 0, 0, 1, split.hidden_size, 2) + bytes(split.hidden_size * 8)
        links[0].send(frame)
        error = error_of(links[0])
        assert error["code"] == "bad_frame" and "flags 0x2" in error["message"]
        for ws in links:
            ws.close()
    finally:
        s0.close()
        s1.close()


def raw_session(servers, session: bytes, party_sessions: tuple[bytes, bytes] | None = None):
    """Open a session by hand (the device's first message), to send what a correct device never would."""
    sessions = party_sessions or (session, session)
    links = [connect(s.url, open_timeout=TIMEOUT).__enter__() for s in servers]
    for party, ws in enumerate(links):
        ws.send(
            json.dumps(
                {"type": "open", "session": sessions[party].hex(), "party": party, "key": "00" * 16, "link": "11" * 32}
            )
        )
    return links


def error_of(ws) -> dict:
    """The next error message on ``ws`` (skipping a dealer request), within the test's timeout."""
    deadline = time.monotonic() + 3 * TIMEOUT
    while time.monotonic() < deadline:
        data = ws.recv(timeout=3 * TIMEOUT)
        if isinstance(data, str) and json.loads(data)["type"] == "error":
            return json.loads(data)
    raise AssertionError("no error message")


def test_a_share_of_the_wrong_size_ends_that_session_on_both_servers_only(split, servers) -> None:
    healthy = link_to(servers)
    try:
        hidden = steps_inputs(split)[0]
        healthy.forward(hidden, 0)
        links = raw_session(servers, b"w" * 16)
        for ws in links:
            assert json.loads(ws.recv(timeout=TIMEOUT))["type"] == "ready"
        good = M.FORWARD.pack(M.FORWARD_MAGIC, 0, 0, 2, split.hidden_size, 0) + bytes(2 * split.hidden_size * 8)
        bad = M.FORWARD.pack(M.FORWARD_MAGIC, 0, 0, 2, split.hidden_size, 0) + bytes(2 * split.hidden_size * 8 - 8)
        links[0].send(bad)
        links[1].send(good)
        error0, error1 = error_of(links[0]), error_of(links[1])
        assert error0["code"] == "bad_share" and "bytes" in error0["message"]
        assert error1["code"] == "peer_gone"  # its peer ended the session: it says so, it does not wait
        for ws in links:
            ws.close()
        out = healthy.forward(hidden[:, :1], hidden.shape[1])  # the other session goes on
        assert out.shape == (1, 1, split.hidden_size)
    finally:
        healthy.close()


def test_sessions_that_do_not_match_fail_on_both_servers(split, servers) -> None:
    """The device opened one session on server 0 and another on server 1: server 1 is refused by its peer and
    server 0 waits for a peer that never comes, each with an error naming the session, within the timeout."""
    start = time.monotonic()
    links = raw_session(servers, b"", party_sessions=(b"a" * 16, b"b" * 16))
    error0, error1 = error_of(links[0]), error_of(links[1])
    assert error1["code"] == "session_mismatch" and (b"b" * 16).hex() in error1["message"]
    assert error0["code"] == "peer_timeout" and (b"a" * 16).hex() in error0["message"]
    assert time.monotonic() - start < 4 * TIMEOUT
    for ws in links:
        ws.close()


def test_an_open_without_the_peer_link_key_is_refused(servers) -> None:
    with connect(servers[1].url, open_timeout=TIMEOUT) as ws:
        ws.send(json.dumps({"type": "open", "session": (b"k" * 16).hex(), "party": 1, "key": "00" * 16}))
        error = error_of(ws)
    assert error["code"] == "bad_frame" and "link" in error["message"]


def test_a_peer_that_disappears_is_a_clear_error_for_the_device(split, weights) -> None:
    s0, s1 = start_pair(weights)
    link = SecretSharedLink([s0.url, s1.url], timeout=TIMEOUT)
    try:
        hidden = steps_inputs(split)[0]
        link.forward(hidden, 0)
        s1.close()  # server 1 goes away: its device link and its peer link close
        start = time.monotonic()
        with pytest.raises((RemoteError, WireError)) as caught:
            link.forward(hidden[:, :1], hidden.shape[1])
        assert time.monotonic() - start < 3 * TIMEOUT
        assert "share server" in str(caught.value)
    finally:
        link.close()
        s0.close()
        s1.close()


def test_the_device_refuses_bad_addresses_and_mismatched_servers(split, servers, weights) -> None:
    with pytest.raises(ConfigError, match="two share servers"):
        SecretSharedLink([servers[0].url])
    with pytest.raises(ConfigError, match="ws:// beyond loopback"):
        SecretSharedLink(["ws://192.0.2.1:1", "ws://192.0.2.2:1"])
    with pytest.raises(RemoteError, match="share server 0") as caught:
        SecretSharedLink([servers[1].url, servers[0].url], timeout=TIMEOUT)  # the parties swapped
    assert caught.value.code == "wrong_party"
