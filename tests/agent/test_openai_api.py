"""`lambdasplit up`: the OpenAI-compatible device agent, driven by the official `openai` client.

A real body server subprocess and a real agent subprocess on loopback. Between them sits a TCP relay
that records every byte the agent sends to the cloud, so the test can look for the prompt in it.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from urllib.parse import urlsplit

import openai
import pytest

from lambdasplit.agent.run import READY
from lambdasplit.generation import Generation, ModelDecoder, SamplingParams
from lambdasplit.generation.text import encode_prompt
from lambdasplit.server.process import lambdasplit_process
from lambdasplit.split import load_split
from servers import body_server
from tiny_models import NUM_LAYERS

TOKEN = "agent-test-token"
MODEL_LAYERS = f"1:{NUM_LAYERS - 1}"


class Relay:
    """A TCP relay on 127.0.0.1 that forwards to ``target`` and records what the client side sends."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.sent = target, bytearray()
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    with self._lock:
                        self.sent += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def recorded(self) -> bytes:
        with self._lock:
            return bytes(self.sent)

    def close(self) -> None:
        self.listener.close()


@contextmanager
def agent(*args: str) -> Iterator[str]:
    with lambdasplit_process(["up", "--port", "0", "--no-attack", *args], READY, token=TOKEN, timeout=180) as url:
        yield url


@pytest.fixture(scope="module")
def stack(tiny_checkpoint):
    """(agent base URL, relay, checkpoint path, unsplit reference model, body server URL)."""
    path, ref = tiny_checkpoint("llama")
    with body_server("--model", str(path), "--layers", MODEL_LAYERS, "--token", TOKEN) as server:
        parts = urlsplit(server)
        relay = Relay((parts.hostname or "127.0.0.1", int(parts.port or 0)))
        cloud = f"ws://127.0.0.1:{relay.port}/v1/split"
        try:
            with agent("--cloud", cloud, "--model", str(path), "--wire-dtype", "float32") as url:
                yield url, relay, path, ref, server
        finally:
            relay.close()


@pytest.fixture(scope="module")
def client(stack):
    url = stack[0]
    return openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed-on-the-device", max_retries=0, timeout=120)


def model_name(stack) -> str:
    return str(stack[2])  # a checkpoint folder is named by its path


def unsplit_answer(stack, messages: list[dict[str, str]] | str, max_tokens: int) -> tuple[str, int]:
    """The plain unsplit HF model's greedy answer, decoded the same way."""
    _, _, path, ref, _ = stack
    split = load_split(path, MODEL_LAYERS, parts=["head", "tail"])
    assert split.tokenizer is not None
    ids = encode_prompt(split.tokenizer, messages, chat=not isinstance(messages, str))
    params = SamplingParams(max_new_tokens=max_tokens)
    run = Generation(ModelDecoder(ref), ids, params, tokenizer=split.tokenizer, eos_token_ids=split.eos_token_ids())
    result = run.run()
    return result.text, result.new_tokens


MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick brown fox"}]


def test_models_lists_the_one_served_model(stack, client) -> None:
    assert [m.id for m in client.models.list()] == [model_name(stack)]


def test_an_agent_without_an_image_model_says_how_to_start_one(client) -> None:
    with pytest.raises(openai.NotFoundError, match="--image-cloud"):
        client.images.generate(prompt="a red circle")


def test_chat_completion_equals_the_unsplit_model(stack, client) -> None:
    reply = client.chat.completions.create(model=model_name(stack), messages=MESSAGES, temperature=0, max_tokens=16)
    text, n = unsplit_answer(stack, MESSAGES, 16)
    assert reply.choices[0].message.content == text and reply.choices[0].message.role == "assistant"
    assert reply.usage is not None and reply.usage.completion_tokens == n
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + n
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")


def test_streamed_chat_completion_equals_the_unsplit_model_and_ends_with_usage(stack, client) -> None:
    chunks = list(
        client.chat.completions.create(
            model=model_name(stack),
            messages=MESSAGES,
            temperature=0,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text, n = unsplit_answer(stack, MESSAGES, 16)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # really streamed
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == n


def test_text_completion_and_sampling_parameters(stack, client) -> None:
    reply = client.completions.create(model=model_name(stack), prompt="hello world", temperature=0, max_tokens=10)
    text, _ = unsplit_answer(stack, "hello world", 10)
    assert reply.choices[0].text == text and reply.object == "text_completion"
    streamed = client.completions.create(
        model=model_name(stack), prompt="hello world", temperature=0, max_tokens=10, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text
    # Sampling with a seed is reproducible; max_tokens bounds the answer.
    kwargs = {"model": model_name(stack), "messages": MESSAGES, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    a = client.chat.completions.create(**kwargs, max_tokens=12)
    b = client.chat.completions.create(**kwargs, max_tokens=12)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage is not None and a.usage.completion_tokens <= 12
    # A stop string ends the answer before it.
    full = client.chat.completions.create(model=model_name(stack), messages=MESSAGES, temperature=0, max_tokens=16)
    content = full.choices[0].message.content or ""
    if len(content) > 4:
        stop = content[2:4]
        cut = client.chat.completions.create(
            model=model_name(stack), messages=MESSAGES, temperature=0, max_tokens=16, stop=[stop]
        )
        assert cut.choices[0].message.content == content[: content.index(stop)]
        assert cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("kwargs", "status", "param"),
    [
        ({"temperature": 5}, 400, "temperature"),
        ({"messages": []}, 400, "messages"),
        ({"n": 2}, 400, "n"),
        ({"top_p": 0}, 400, "top_p"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"max_tokens": 100000}, 400, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
        ({"model": "gpt-4o"}, 404, "model"),
    ],
)
def test_bad_requests_get_openai_style_errors(stack, client, kwargs, status, param) -> None:
    request = {"model": model_name(stack), "messages": MESSAGES, "max_tokens": 4} | kwargs
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**request)
    assert info.value.status_code == status
    error = info.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]
    assert error["type"] == "invalid_request_error"


def http(url: str, body: bytes | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a GET, or a POST of ``body``."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_malformed_bodies_and_unknown_routes_get_openai_style_errors(stack) -> None:
    url = stack[0]
    status, body = http(f"{url}/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = http(f"{url}/v1/chat/completions", b"[1, 2]")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert http(f"{url}/v1/nothing")[0] == 404
    status, body = http(f"{url}/v1/chat/completions")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"


def test_several_requests_at_once_each_get_their_own_answer(stack, client) -> None:
    prompts = ["the quick brown fox", "hello world", "split inference", "Paris is the capital"]

    def ask(prompt: str) -> str | None:
        messages = [{"role": "user", "content": prompt}]
        reply = client.chat.completions.create(model=model_name(stack), messages=messages, temperature=0, max_tokens=12)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    assert together == [unsplit_answer(stack, [{"role": "user", "content": p}], 12)[0] for p in prompts]


def test_the_agent_never_sends_prompt_or_answer_text_to_the_cloud(stack, client) -> None:
    before = len(stack[1].recorded())
    secret = "my bank password is hunter2 and my name is Alice Example"
    messages = [{"role": "user", "content": secret}]
    reply = client.chat.completions.create(model=model_name(stack), messages=messages, temperature=0, max_tokens=12)
    answer = reply.choices[0].message.content or ""
    wire = stack[1].recorded()[before:]
    assert len(wire) > 1000  # hidden states did go up
    split = load_split(stack[2], MODEL_LAYERS, parts=["head", "tail"])
    assert split.tokenizer is not None
    ids = encode_prompt(split.tokenizer, messages, chat=True)
    # As they crossed the socket (a WebSocket client masks its payloads, so this alone would prove little) ...
    for needle in (secret.encode(), b"hunter2", b"Alice Example", answer.encode() if len(answer) > 3 else b"\x00" * 64):
        assert needle not in wire
    for width in (4, 8):
        for order in ("little", "big"):
            assert b"".join(i.to_bytes(width, order) for i in ids[-6:]) not in wire
    # ... and unmasked: the payloads of the WebSocket frames the agent sent.
    payloads = b"".join(_unmask(wire))
    assert len(payloads) > 1000
    assert secret.encode() not in payloads and b"hunter2" not in payloads
    for width in (4, 8):
        for order in ("little", "big"):
            assert b"".join(i.to_bytes(width, order) for i in ids[-6:]) not in payloads
    if len(answer) > 3:
        assert answer.encode() not in payloads
    # What did go up: lambdasplit frames of float32 hidden states (magic CE 9B), nothing else.
    frames = list(_unmask(wire))
    assert frames and all(f[:2] == b"\xce\x9b" for f in frames)


def _unmask(stream: bytes) -> Iterator[bytes]:
    """Client-to-server WebSocket frames (RFC 6455: always masked) -> payloads, after the HTTP upgrade."""
    start = stream.find(b"\r\n\r\n")
    i = start + 4 if start >= 0 and stream.startswith(b"GET ") else 0
    while i + 2 <= len(stream):
        b1 = stream[i + 1]
        length, i = b1 & 0x7F, i + 2
        if length == 126:
            length, i = int.from_bytes(stream[i : i + 2], "big"), i + 2
        elif length == 127:
            length, i = int.from_bytes(stream[i : i + 8], "big"), i + 8
        key, i = stream[i : i + 4], i + 4
        data = stream[i : i + length]
        i += length
        if len(data) < length:
            return
        yield bytes(b ^ key[k % 4] for k, b in enumerate(data))


def test_info_and_network_feed_report_the_split_and_the_bytes(stack, client) -> None:
    url = stack[0]
    info = http(f"{url}/v1/lambdasplit/info")[1]
    assert info["layers"] == {"head": [0, 1], "body": [1, NUM_LAYERS - 1], "tail": [NUM_LAYERS - 1, NUM_LAYERS]}
    assert info["wire_dtype"] == "float32" and info["model"] == model_name(stack)
    events: list[dict] = []

    def listen() -> None:
        with urllib.request.urlopen(f"{url}/v1/lambdasplit/network", timeout=60) as r:
            for raw in r:
                line = raw.decode()
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    if events[-1]["type"] == "step" and events[-1]["position"] > 0 and events[-1]["rows"] == 1:
                        return

    listener = threading.Thread(target=listen)
    listener.start()
    for _ in range(200):  # the subscription is open once its "hello" arrived
        if events:
            break
        threading.Event().wait(0.05)
    client.chat.completions.create(model=model_name(stack), messages=MESSAGES, temperature=0, max_tokens=4)
    listener.join(timeout=60)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "hello" and "request" in kinds and "step" in kinds
    request = next(e for e in events if e["type"] == "request")
    assert request["cloud_only_would_see"][-1]["content"] == MESSAGES[-1]["content"]
    step = events[-1]
    assert step["up_bytes"] == 24 + 4 * 64 and step["down_bytes"] == 24 + 4 * 64  # one float32 row + header
    assert len(step["last_row"]) == 64 and any(v != 0 for v in step["last_row"])
    assert step["totals"]["up_bytes"] >= step["up_bytes"]


def test_a_client_that_leaves_mid_stream_frees_its_body_session(stack, client) -> None:
    server = stack[4]
    request = urllib.request.Request(
        f"{stack[0]}/v1/chat/completions",
        data=json.dumps(
            {"model": model_name(stack), "messages": MESSAGES, "max_tokens": 200, "stream": True, "temperature": 0}
        ).encode(),
    )
    with urllib.request.urlopen(request, timeout=60) as r:
        for _ in range(4):  # a few chunks, then hang up
            r.readline()
        assert sessions(server) == 1
    for _ in range(100):
        if sessions(server) == 0:
            break
        threading.Event().wait(0.1)
    assert sessions(server) == 0
    # The agent still serves.
    reply = client.chat.completions.create(model=model_name(stack), messages=MESSAGES, temperature=0, max_tokens=3)
    assert reply.usage is not None and reply.usage.completion_tokens == 3


def sessions(server: str) -> int:
    url = server.replace("ws://", "http://").removesuffix("/v1/split") + "/metrics"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return int(json.loads(r.read())["sessions"])


def test_agent_refuses_a_bad_cloud_url(tiny_checkpoint) -> None:
    import subprocess

    path, _ = tiny_checkpoint("llama")
    res = subprocess.run(
        ["lambdasplit", "up", "--cloud", "http://example", "--model", str(path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "--cloud takes" in res.stderr
