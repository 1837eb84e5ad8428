"""Faults survived: the body server killed mid-generation, restarted, evicting the session, or replaced by
another URL. The device replays what it has sent and the output is token-identical to an uninterrupted run.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest
import torch

from lambdasplit.client import CloudClient, connect_device
from lambdasplit.errors import WireError
from lambdasplit.generation import LocalBodyLink, SplitDecoder, generate, stream
from lambdasplit.server.process import lambdasplit_process
from lambdasplit.server.run import READY
from lambdasplit.split import load_split
from servers import body_server, proc_kill
from tiny_models import NUM_LAYERS

LAYERS = f"1:{NUM_LAYERS - 1}"
PROMPT = [1, 17, 42, 99, 7, 250, 31]
NEW = 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_on(path, port: int, *extra: str) -> Iterator[str]:
    args = ["serve", "--model", str(path), "--layers", LAYERS, "--port", str(port), *extra]
    with lambdasplit_process(args, READY, timeout=120) as url:
        yield url


def expected(path) -> list[int]:
    return generate(load_split(path, LAYERS), PROMPT, max_new_tokens=NEW, ignore_eos=True).token_ids


def test_server_killed_and_restarted_mid_generation_gives_the_same_tokens(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("qwen2")  # sliding-window layers in the body: the replayed cache must match
    port = free_port()
    with ExitStack() as stack:
        first = stack.enter_context(server_on(path, port))
        split, client = connect_device(first, path, timeout=10)
        stack.enter_context(client)
        link = client.open_session("float32")
        restarted: list[str] = []

        def restart() -> None:
            # The old process is gone; a new one on the same port (loading takes seconds: the client retries).
            restarted.append(stack.enter_context(server_on(path, port)))

        run = stream(split, PROMPT, max_new_tokens=NEW, ignore_eos=True, link=link)
        tokens: list[int] = []
        killer: threading.Thread | None = None
        for event in run:
            assert event.token_id is not None
            tokens.append(event.token_id)
            if len(tokens) == 12:
                proc_kill(port)
                killer = threading.Thread(target=restart)
                killer.start()
        assert killer is not None
        killer.join(timeout=120)
        assert tokens == expected(path)
        assert client.reconnects == 1 and len(link.recoveries) == 1
        recovery = link.recoveries[0]
        assert "connection lost" in recovery.reason and recovery.replayed_positions >= len(PROMPT) + 11
        print(f"detected and recovered in {recovery.seconds:.2f} s (server restart included)")
        # Between requests too: the server dies again, and the next session opens on a new connection.
        proc_kill(port)
        restart()
        again = generate(split, PROMPT, max_new_tokens=NEW, ignore_eos=True, link=client.open_session("float32"))
        assert again.token_ids == tokens and client.reconnects == 2


def test_fails_over_to_the_next_url_when_the_first_server_dies(tiny_checkpoint, llama_server) -> None:
    path, _ = tiny_checkpoint("llama")
    b = llama_server  # the survivor
    with body_server("--model", str(path), "--layers", LAYERS) as a:
        split, _ = connect_device(a, path)  # the device's parts
        with CloudClient([a, b], timeout=10) as client:
            assert client.url == a
            link = client.open_session("float32")
            tokens: list[int] = []
            for event in stream(split, PROMPT, max_new_tokens=NEW, ignore_eos=True, link=link):
                assert event.token_id is not None
                tokens.append(event.token_id)
                if len(tokens) == 5:
                    proc_kill(int(a.rsplit(":", 1)[1].split("/")[0]))
            assert client.url == b and link.recoveries
        assert tokens == expected(path)


def test_an_evicted_session_is_rebuilt_on_the_same_connection(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("llama")
    with body_server("--model", str(path), "--layers", LAYERS, "--idle-ttl", "1") as url:
        split, client = connect_device(url, path)
        with client:
            decoder = SplitDecoder(split, client.open_session("float32"))
            local = SplitDecoder(load_split(path, LAYERS), LocalBodyLink(load_split(path, LAYERS).body))
            a, b = decoder.prefill(torch.tensor([PROMPT])), local.prefill(torch.tensor([PROMPT]))
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
            time.sleep(2.5)  # idle longer than the TTL: the server frees the session
            for token in (5, 6, 7):
                a, b = decoder.step(token), local.step(token)
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
            link = decoder.link
            assert client.reconnects == 0 and len(link.recoveries) == 1, link.recoveries  # type: ignore[attr-defined]
            assert "evicted" in link.recoveries[0].reason  # type: ignore[attr-defined]


def test_without_resume_a_lost_server_is_an_error(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("llama")
    port = free_port()
    with server_on(path, port) as url:
        split, client = connect_device(url, path, timeout=5)
        link = client.open_session("float32")
        link.resume = False
    with client:
        decoder = SplitDecoder(split, link)
        with pytest.raises(WireError):
            decoder.prefill(torch.tensor([PROMPT]))  # the server stopped when its block ended


def test_reconnect_gives_up_after_its_deadline(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("llama")
    port = free_port()
    with server_on(path, port) as url:
        split, _ = connect_device(url, path)
        client = CloudClient(url, timeout=5, reconnect_deadline=2.0)
        link = client.open_session("float32")
    with client:
        start = time.monotonic()
        with pytest.raises(WireError, match="could not reconnect within 2 s"):
            SplitDecoder(split, link).prefill(torch.tensor([PROMPT]))
        assert time.monotonic() - start < 10


def test_a_timeout_closes_the_connection_so_no_late_reply_is_misread(tiny_checkpoint, llama_server) -> None:
    path, _ = tiny_checkpoint("llama")
    split, client = connect_device(llama_server, path)
    with client:
        link = client.open_session("float32")
        link.resume = False
        decoder = SplitDecoder(split, link)
        client.timeout = 0.0005  # the reply cannot come in time
        with pytest.raises(WireError, match="no answer"):
            decoder.prefill(torch.tensor([PROMPT]))
        client.timeout = 60
        with pytest.raises(WireError, match="lost"):
            client.ping()  # the connection was closed, not left with a late RESULT in it
        again = generate(split, PROMPT, max_new_tokens=NEW, ignore_eos=True, link=client.open_session("float32"))
        assert again.token_ids == expected(path) and client.reconnects == 1


def test_a_session_never_sends_its_old_handle_on_a_new_connection(tiny_checkpoint, llama_server) -> None:
    """After a reconnect, handle numbers may name other sessions: the old session rebuilds instead."""
    path, _ = tiny_checkpoint("llama")
    local = load_split(path, LAYERS)
    split, client = connect_device(llama_server, path)
    with client:
        a = SplitDecoder(split, client.open_session("float32"))
        ref_a = SplitDecoder(local, LocalBodyLink(local.body))
        torch.testing.assert_close(a.prefill(torch.tensor([PROMPT])), ref_a.prefill(torch.tensor([PROMPT])))
        client.reconnect(client.epoch)  # as another session would after a lost connection
        b = SplitDecoder(split, client.open_session("float32"))
        ref_b = SplitDecoder(local, LocalBodyLink(local.body))
        torch.testing.assert_close(b.prefill(torch.tensor([[1, 9, 9]])), ref_b.prefill(torch.tensor([[1, 9, 9]])))
        for token in (5, 6, 7):
            torch.testing.assert_close(a.step(token), ref_a.step(token), atol=1e-5, rtol=0)
            torch.testing.assert_close(b.step(token), ref_b.step(token), atol=1e-5, rtol=0)
        assert [r.reason for r in a.link.recoveries] == ["the connection was re-established for another session"]  # type: ignore[attr-defined]
        assert not b.link.recoveries  # type: ignore[attr-defined]
