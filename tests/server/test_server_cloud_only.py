"""`serve --cloud-only`: the baseline where the prompt goes up as text and the whole model runs on the server."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from websockets.sync.client import connect

from lambdasplit.client import CloudClient, connect_device
from lambdasplit.errors import ConfigError, RemoteError
from lambdasplit.generation import generate
from lambdasplit.split import load_split
from lambdasplit.wire import Frame, MessageType, encode_frame
from servers import body_server, http_url
from tiny_models import NUM_LAYERS


@pytest.fixture(scope="module")
def cloud_only(tiny_checkpoint):
    path, _ = tiny_checkpoint("qwen2")
    with body_server("--model", str(path), "--cloud-only", "--max-context", "64") as url:
        yield url, path


def test_text_in_text_out_equals_local_generation(cloud_only) -> None:
    url, path = cloud_only
    local = generate(load_split(path, "0:"), "hello world", chat=True, max_new_tokens=12, ignore_eos=True)
    with CloudClient(url) as client:
        assert client.mode == "cloud-only" and client.welcome["layers"] == [0, NUM_LAYERS]
        reply = client.generate_text("hello world", chat=True, max_new_tokens=12, ignore_eos=True)
        # The request was the prompt as JSON text; no tensor went either way.
        assert client.frames_sent == 2 and client.bytes_sent < 300
    assert reply.text == local.text and reply.new_tokens == 12 and reply.prompt_tokens == local.prompt_tokens
    assert reply.finish_reason == "length"


def test_bad_requests_are_refused_and_the_server_keeps_serving(cloud_only) -> None:
    url, _ = cloud_only
    with CloudClient(url) as client:
        for body, code in [
            ({"prompt": 5}, "bad_request"),
            ({"prompt": "x", "temperature": -1}, "bad_request"),
            ({"prompt": "x", "nonsense": 1}, "bad_request"),
            ({"prompt": [{"role": "user"}]}, "bad_request"),
            ({"prompt": "x", "stop": [1]}, "bad_request"),
            ({"prompt": "x", "max_new_tokens": 500}, "context_full"),
        ]:
            with pytest.raises(RemoteError) as err:
                client.request(Frame.json(MessageType.GENERATE, body))
            assert err.value.code == code, body
        with pytest.raises(RemoteError) as err:  # no body sessions on a cloud-only server
            client.open_session()
        assert err.value.code == "wrong_mode"
        assert client.generate_text("again", max_new_tokens=2, ignore_eos=True).new_tokens == 2
        # A stop string given as a plain string is one stop string, not a list of characters.
        reply = client.request(Frame.json(MessageType.GENERATE, {"prompt": "x", "stop": "zz", "max_new_tokens": 2}))
        assert reply.type is MessageType.TEXT


def test_split_clients_and_cloud_only_requests_do_not_mix(cloud_only, llama_server) -> None:
    url, path = cloud_only
    with pytest.raises(ConfigError, match="cloud-only server"):
        connect_device(url, path)
    with CloudClient(llama_server) as client:  # a split server (its model does not matter here)
        assert client.mode == "split"
        with pytest.raises(RemoteError) as err:
            client.generate_text("hello", max_new_tokens=2)
        assert err.value.code == "wrong_mode"


def test_a_generation_stops_when_its_client_disconnects(tiny_checkpoint) -> None:
    """Nobody reads the answer of a client that went away: the server stops generating it within a token."""
    path, _ = tiny_checkpoint("qwen2")

    def metrics(url: str) -> dict:
        with urllib.request.urlopen(http_url(url, "/metrics"), timeout=10) as r:
            return json.loads(r.read())

    with body_server("--model", str(path), "--cloud-only", "--max-context", "100000") as url:
        with connect(url, compression=None, proxy=None) as ws:
            ws.send(encode_frame(Frame.json(MessageType.HELLO, {})))
            ws.recv(timeout=30)
            request = {"prompt": "hello", "max_new_tokens": 50_000, "ignore_eos": True}
            ws.send(encode_frame(Frame.json(MessageType.GENERATE, request)))
            deadline = time.monotonic() + 60
            while metrics(url)["compute_seconds"] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)  # the generation is running
        deadline = time.monotonic() + 30
        while metrics(url)["generations_abandoned"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        after = metrics(url)
        assert after["generations_abandoned"] == 1 and after["generations"] == 0 and after["generated_tokens"] == 0
        time.sleep(0.5)
        assert metrics(url)["compute_seconds"] == after["compute_seconds"]  # nothing runs for it any more
        with CloudClient(url) as client:  # and the server serves the next client
            assert client.generate_text("again", max_new_tokens=2, ignore_eos=True).new_tokens == 2
