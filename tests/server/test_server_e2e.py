"""Split inference over a real connection: `lambdasplit serve` subprocess on loopback, client in this process."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
import torch
from websockets.sync.client import connect

from drafters import ScriptedDrafter
from lambdasplit.client import CloudClient, connect_device
from lambdasplit.errors import RemoteError
from lambdasplit.generation import SplitDecoder, generate
from lambdasplit.split import load_split
from lambdasplit.wire import Frame, FrameFlags, MessageType, decode_frame, encode_frame, frame_tensor, tensor_frame
from servers import body_server, http_url, in_threads
from tiny_models import NUM_LAYERS

PROMPTS = [[1, 17, 42, 99, 7], [1, 250, 31, 64, 12, 5, 9], [1, 3, 3, 3], [1, 200, 100, 50, 25, 12]]
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    path, _ = tiny_checkpoint("qwen2")
    return path


@pytest.fixture(scope="module")
def server(tiny):
    with body_server("--model", str(tiny), "--layers", f"1:{NUM_LAYERS - 1}", "--token", TOKEN) as url:
        yield url


def metrics(url: str) -> dict:
    req = urllib.request.Request(http_url(url, "/metrics"), headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_float32_wire_output_equals_unsplit_and_byte_counts_agree(tiny, server) -> None:
    local = load_split(tiny, f"1:{NUM_LAYERS - 1}")
    expected = [generate(local, p, max_new_tokens=16, ignore_eos=True).token_ids for p in PROMPTS[:2]]
    before = metrics(server)
    split, client = connect_device(server, tiny, token=TOKEN)
    with client:
        assert split.points == local.points  # the split points came from the server's handshake
        assert split.body is None
        results = [
            generate(split, p, max_new_tokens=16, ignore_eos=True, link=client.open_session("float32"))
            for p in PROMPTS[:2]
        ]
        after = metrics(server)
        assert [r.token_ids for r in results] == expected
        # The client's frame bytes equal the server's: every byte the client counted, the server counted.
        assert after["bytes_in"] - before["bytes_in"] == client.bytes_sent
        assert after["bytes_out"] - before["bytes_out"] == client.bytes_received
        # One round trip for the prompt, one per further token; header 24 bytes per frame.
        r = results[0]
        assert r.traffic.messages == 16
        assert r.traffic.up_bytes - r.traffic.up_payload_bytes == 24 * 16
        assert r.traffic.up_payload_bytes == 4 * split.hidden_size * (len(PROMPTS[0]) + 15)
        sock = client.socket_bytes()
        assert sock is not None and sock.sent >= client.bytes_sent and sock.received >= client.bytes_received


@pytest.mark.parametrize(("wire", "bits"), [("int8", 8), ("int6", 6), ("int4", 4), ("int2", 2)])
def test_quantized_wires_carry_packed_codes_both_ways(tiny, server, wire: str, bits: int) -> None:
    """Each hidden-state row costs hidden * bits / 8 bytes of codes plus 8 of scale and offset, up and down."""
    split, client = connect_device(server, tiny, token=TOKEN)
    with client:
        link = client.open_session(wire)
        result = generate(split, PROMPTS[0], max_new_tokens=6, ignore_eos=True, link=link)
    rows = len(PROMPTS[0]) + 5  # the prompt, then one row per fed-back token
    per_row = split.hidden_size * bits // 8 + 8
    assert result.traffic.up_payload_bytes == result.traffic.down_payload_bytes == rows * per_row
    assert len(result.token_ids) == 6


def test_four_concurrent_clients_get_independent_correct_outputs(tiny, server) -> None:
    local = load_split(tiny, f"1:{NUM_LAYERS - 1}")
    expected = [generate(local, p, max_new_tokens=24, ignore_eos=True).token_ids for p in PROMPTS]

    def worker(i: int) -> list[int]:
        split, client = connect_device(server, tiny, token=TOKEN, quiet=True)
        with client:
            link = client.open_session("float32")
            return generate(split, PROMPTS[i], max_new_tokens=24, ignore_eos=True, link=link).token_ids

    assert in_threads(worker, len(PROMPTS)) == expected


def test_speculative_steps_over_the_network_equal_plain_and_roll_back_the_body(tiny, server) -> None:
    """Drafts cross in one FORWARD; rejected ones are rolled back on the server (sliding-window layers too)."""
    split, client = connect_device(server, tiny, token=TOKEN)
    new = 30
    with client:
        for prompt in PROMPTS[:2]:
            plain = generate(split, prompt, max_new_tokens=new, ignore_eos=True, link=client.open_session("float32"))
            drafter = ScriptedDrafter(plain.token_ids, len(prompt), int(split.config.vocab_size))
            link = client.open_session("float32")
            spec = generate(split, prompt, max_new_tokens=new, ignore_eos=True, link=link, drafter=drafter)
            assert spec.token_ids == plain.token_ids
            assert 0 < spec.accepted_tokens < spec.drafted_tokens
            # Fewer round trips, and every drafted position crossed the wire once as a hidden state.
            assert spec.traffic.messages == spec.steps + 1 < plain.traffic.messages
            fed = len(prompt) + spec.steps + spec.drafted_tokens
            assert spec.traffic.up_payload_bytes == 4 * split.hidden_size * fed
            lookup = generate(
                split, prompt, max_new_tokens=new, ignore_eos=True, link=client.open_session(), drafter="lookup"
            )
            assert (
                lookup.token_ids
                == generate(split, prompt, max_new_tokens=new, ignore_eos=True, link=client.open_session()).token_ids
            )


def test_wrong_token_and_wrong_model_are_refused(tiny, server, tiny_checkpoint) -> None:
    with pytest.raises(RemoteError) as info:
        CloudClient(server, token="wrong")
    assert info.value.code == "unauthorized"
    other, _ = tiny_checkpoint("llama")
    with pytest.raises(RemoteError) as info:
        connect_device(server, other, token=TOKEN)
    assert info.value.code == "model_mismatch"
    assert "fingerprint" in str(info.value)


def _raw(server: str):
    ws = connect(
        server, additional_headers={"Authorization": f"Bearer {TOKEN}"}, compression=None, proxy=None
    ).__enter__()
    ws.send(encode_frame(Frame.json(MessageType.HELLO, {"protocol": 1})))
    assert decode_frame(ws.recv(timeout=10)).type is MessageType.WELCOME
    return ws


def _ask(ws, data: bytes) -> Frame:
    ws.send(data)
    return decode_frame(ws.recv(timeout=30))


def _code(frame: Frame) -> str:
    assert frame.type is MessageType.ERROR, frame.type
    return frame.json_body()["code"]


def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(server) -> None:
    hidden = 64
    with _raw(server) as ws:
        session = _ask(ws, encode_frame(Frame.json(MessageType.OPEN, {}))).session
        good = encode_frame(tensor_frame(MessageType.FORWARD, torch.randn(3, hidden), "float32", session, 0))
        cases = {
            "unknown_session": encode_frame(
                tensor_frame(MessageType.FORWARD, torch.randn(1, hidden), "float32", 999, 0)
            ),
            "bad_shape": encode_frame(
                tensor_frame(MessageType.FORWARD, torch.randn(1, hidden + 1), "float32", session, 0)
            ),
            "size_mismatch": good[:-7],  # truncated frame
            "bad_dtype": good[:4] + bytes([0x77]) + good[5:],  # unknown dtype code
            "bad_magic": b"GET / HTTP/1.1\r\n\r\n",
            "bad_position": encode_frame(
                tensor_frame(MessageType.FORWARD, torch.randn(1, hidden), "float32", session, 5)
            ),
            "non_finite": encode_frame(
                tensor_frame(MessageType.FORWARD, torch.ones(1, hidden), "float32", session, 0)
            ).replace(torch.ones(1).numpy().tobytes(), torch.tensor([float("nan")]).numpy().tobytes(), 1),
            "hello_first": None,  # checked on a fresh connection below
        }
        for code, data in cases.items():
            if data is not None:
                assert _code(_ask(ws, data)) == code, code
        ws.send("a text message")
        assert _code(decode_frame(ws.recv(timeout=10))) == "text_message"
        # The same connection and session still work.
        reply = _ask(ws, good)
        assert reply.type is MessageType.RESULT and reply.shape == (3, hidden) and reply.position == 0
        reply = _ask(ws, encode_frame(tensor_frame(MessageType.FORWARD, torch.randn(1, hidden), "float32", session, 3)))
        assert reply.type is MessageType.RESULT and reply.position == 3
        # A RESET frame restarts the session's cache at 0 (the no-cache baseline).
        flags = FrameFlags.RESET
        reset = tensor_frame(MessageType.FORWARD, torch.randn(2, hidden), "float16", session, 0, flags=flags)
        assert _ask(ws, encode_frame(reset)).type is MessageType.RESULT
        # LAST: the same rows, only the last one back (and all of them in the cache: the next step continues).
        rows = torch.randn(3, hidden)
        full = frame_tensor(_ask(ws, encode_frame(tensor_frame(MessageType.FORWARD, rows, "float32", session, 0))))
        last = tensor_frame(MessageType.FORWARD, rows, "float32", session, 0, flags=FrameFlags.LAST)
        reply = _ask(ws, encode_frame(last))
        assert reply.shape == (1, hidden) and torch.allclose(frame_tensor(reply), full[-1:], atol=1e-6)
        step = tensor_frame(MessageType.FORWARD, torch.randn(1, hidden), "float32", session, 3)
        assert _ask(ws, encode_frame(step)).position == 3
    with connect(server, additional_headers={"Authorization": f"Bearer {TOKEN}"}, proxy=None) as ws:
        assert _code(_ask(ws, encode_frame(Frame.json(MessageType.OPEN, {})))) == "hello_first"
    errors = metrics(server)["errors"]
    assert errors["bad_shape"] >= 1 and errors["unknown_session"] >= 1


def test_kv_memory_budget_refuses_clearly_and_frees_with_the_session(tiny) -> None:
    # Tiny qwen2 body, layers 1..3: 2 (K, V) x 3 layers x 2 KV heads x 16 dims x 4 bytes = 768 B per position.
    with body_server("--model", str(tiny), "--layers", "1:4", "--kv-budget-mb", "1") as url:
        ws = connect(url, compression=None, proxy=None, max_size=None).__enter__()
        ws.send(encode_frame(Frame.json(MessageType.HELLO, {})))
        assert decode_frame(ws.recv(timeout=10)).json_body()["limits"]["kv_budget_bytes"] == 1 << 20
        a = _ask(ws, encode_frame(Frame.json(MessageType.OPEN, {}))).session
        b = _ask(ws, encode_frame(Frame.json(MessageType.OPEN, {}))).session
        rows = lambda n: torch.randn(n, 64)  # noqa: E731
        assert _ask(ws, encode_frame(tensor_frame(MessageType.FORWARD, rows(1000), "float16", a, 0))).type is (
            MessageType.RESULT
        )  # 750 KiB of cache
        refused = _ask(ws, encode_frame(tensor_frame(MessageType.FORWARD, rows(500), "float16", b, 0)))
        assert _code(refused) == "memory_full" and "MiB" in refused.json_body()["message"]
        assert _ask(ws, encode_frame(Frame.json(MessageType.CLOSE, {}, session=a))).type is MessageType.CLOSED
        reply = _ask(ws, encode_frame(tensor_frame(MessageType.FORWARD, rows(500), "float16", b, 0)))
        assert reply.type is MessageType.RESULT  # the budget freed with the closed session
        ws.close()


def test_one_connection_cannot_step_or_close_another_connections_session(server) -> None:
    with _raw(server) as owner, _raw(server) as other:
        session = _ask(owner, encode_frame(Frame.json(MessageType.OPEN, {}))).session
        step = encode_frame(tensor_frame(MessageType.FORWARD, torch.randn(2, 64), "float32", session, 0))
        assert _code(_ask(other, step)) == "unknown_session"  # same handle, other connection: not found
        assert _code(_ask(other, encode_frame(Frame.json(MessageType.CLOSE, {}, session=session)))) == (
            "unknown_session"
        )
        assert _ask(owner, step).type is MessageType.RESULT  # untouched for its owner
        opened = _ask(owner, encode_frame(Frame.json(MessageType.OPEN, {}))).json_body()
        assert len(opened["id"]) == 32  # the session id is 128 random bits (for logs; never an access key)


def test_a_device_that_goes_silent_is_dropped_and_its_sessions_freed(tiny) -> None:
    """A client that stops answering WebSocket pings (vanished without closing) loses its sessions."""
    import base64
    import os
    import socket

    with body_server("--model", str(tiny), "--layers", "1:4", "--ws-ping-interval", "0.5") as url:
        host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
        sock = socket.create_connection((host, int(port)))
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            f"GET /v1/split HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        assert b" 101 " in sock.recv(4096)

        def send(frame: Frame) -> None:  # one masked binary WebSocket message, written by hand
            data, mask = encode_frame(frame), os.urandom(4)
            header = bytes([0x82, 0x80 | len(data)]) if len(data) < 126 else bytes([0x82, 0xFE]) + len(data).to_bytes(2)
            sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

        send(Frame.json(MessageType.HELLO, {}))
        send(Frame.json(MessageType.OPEN, {}))
        deadline = time.monotonic() + 10
        while metrics(url)["sessions"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metrics(url)["sessions"] == 1
        # Now silent: no pongs (this socket never reads again). Ping every 0.5 s, 0.5 s to answer.
        while metrics(url)["sessions"] == 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert metrics(url)["sessions"] == 0
        sock.close()


def test_oversized_frame_is_refused(tiny) -> None:
    with body_server("--model", str(tiny), "--layers", "1:4", "--max-frame-bytes", "4096") as url:
        ws = connect(url, compression=None, proxy=None, max_size=None).__enter__()
        ws.send(encode_frame(Frame.json(MessageType.HELLO, {})))
        decode_frame(ws.recv(timeout=10))
        session = _ask(ws, encode_frame(Frame.json(MessageType.OPEN, {}))).session
        big = encode_frame(tensor_frame(MessageType.FORWARD, torch.randn(20, 64), "float32", session, 0))  # 5144 B
        assert _code(_ask(ws, big)) == "too_large"
        small = encode_frame(tensor_frame(MessageType.FORWARD, torch.randn(2, 64), "float32", session, 0))
        assert _ask(ws, small).type is MessageType.RESULT
        ws.close()
        # Still serving new connections.
        with CloudClient(url) as client:
            client.ping()


def test_prompt_text_and_token_ids_never_cross_the_wire(tiny, server) -> None:
    split, client = connect_device(server, tiny, token=TOKEN)
    sent: list[bytes] = []
    roundtrip = client.roundtrip

    def recording(data: bytes, epoch: int | None = None) -> bytes:
        sent.append(data)
        reply = roundtrip(data, epoch)
        sent.append(reply)
        return reply

    client.roundtrip = recording  # type: ignore[method-assign]
    prompt = "the quick brown fox jumps over the lazy dog"
    assert split.tokenizer is not None
    ids = split.tokenizer(prompt).input_ids
    with client:
        result = generate(split, prompt, max_new_tokens=12, ignore_eos=True, link=client.open_session("float16"))
    wire = b"".join(sent)
    assert len(wire) > 12 * 64  # hidden states did travel
    assert prompt.encode() not in wire and b"quick brown" not in wire
    for width in (4, 8):  # token ids as int32 / int64, in either byte order
        for order in ("little", "big"):
            encoded = b"".join(i.to_bytes(width, order) for i in ids[:4])
            assert encoded not in wire
    assert result.text and result.text.encode() not in wire


def test_a_body_with_sliding_window_layers_serves_no_token_trees(tiny, server) -> None:
    """Its cache cannot keep a branch: WELCOME says so, a device then drafts chains, and a TREE frame sent anyway
    refuses the FORWARD after it."""
    split, client = connect_device(server, tiny, token=TOKEN)
    with client:
        assert client.welcome["trees"] is False
        link = client.open_session("float32")
        decoder = SplitDecoder(split, link)
        assert not decoder.trees
        link.forward(torch.randn(1, 2, split.hidden_size), 0)
        with pytest.raises(RemoteError) as info:
            link.forward_tree(torch.randn(1, 2, split.hidden_size), 2, [-1, 0], None)
        assert info.value.code == "bad_tree" and "does not verify token trees" in str(info.value)
        link.close()
