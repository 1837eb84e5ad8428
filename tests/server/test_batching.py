"""Continuous batching: decode steps of concurrent sessions run as one forward; every output stays its own."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import urllib.request

import pytest
import torch

from lambdasplit.client import connect_device
from lambdasplit.generation import generate
from lambdasplit.server.batching import Batcher, Job, run_batched
from lambdasplit.split import load_split
from lambdasplit.split.state import BodyState
from servers import body_server, http_url, in_threads
from tiny_models import NUM_LAYERS

LAYERS = f"1:{NUM_LAYERS - 1}"
# Different lengths, so the batched caches need padding; one repeats itself so prompt lookup drafts.
PROMPTS = [[1, 17], [1, 250, 31, 64, 12, 5, 9], [1, 3, 3, 3], [1, 200, 100, 50, 25, 12, 7, 7, 9, 11, 13], [1, 40],
           [1, 5, 6, 7, 5, 6, 7, 5, 6]]  # fmt: skip
NEW = 24


def metrics(url: str) -> dict:
    with urllib.request.urlopen(http_url(url, "/metrics"), timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.parametrize("family", ["llama", "olmo2"])
def test_concurrent_sessions_are_batched_and_each_output_equals_its_single_run(tiny_checkpoint, family) -> None:
    path, _ = tiny_checkpoint(family)
    local = load_split(path, LAYERS)
    expected = [generate(local, p, max_new_tokens=NEW, ignore_eos=True).token_ids for p in PROMPTS]
    with body_server("--model", str(path), "--layers", LAYERS) as url:
        start = threading.Barrier(len(PROMPTS))

        def client(i: int) -> list[int]:
            split, conn = connect_device(url, path)
            with conn:
                start.wait(timeout=60)
                drafter = "lookup" if i == len(PROMPTS) - 1 else None  # multi-position steps, rollbacks too
                link = conn.open_session("float32")
                return generate(
                    split, PROMPTS[i], max_new_tokens=NEW, ignore_eos=True, link=link, drafter=drafter
                ).token_ids

        assert in_threads(client, len(PROMPTS)) == expected
        m = metrics(url)
        assert m["batches"] > 0 and m["batched_steps"] >= 2 * m["batches"]  # steps really ran together


@pytest.mark.cuda
def test_batched_steps_on_cuda_equal_single_runs(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("llama")
    local = load_split(path, LAYERS, device="cuda", dtype="float32")
    expected = [generate(local, p, max_new_tokens=NEW, ignore_eos=True).token_ids for p in PROMPTS]
    with body_server("--model", str(path), "--layers", LAYERS, "--device", "cuda", "--dtype", "float32") as url:
        start = threading.Barrier(len(PROMPTS))

        def client(i: int) -> list[int]:
            split, conn = connect_device(url, path, device="cuda", dtype="float32")
            with conn:
                start.wait(timeout=60)
                link = conn.open_session("float32")
                return generate(split, PROMPTS[i], max_new_tokens=NEW, ignore_eos=True, link=link).token_ids

        assert in_threads(client, len(PROMPTS)) == expected
        m = metrics(url)
        assert m["batches"] > 0 and m["batched_steps"] >= 2 * m["batches"]


def test_max_batch_1_turns_batching_off(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("llama")
    with body_server("--model", str(path), "--layers", LAYERS, "--max-batch", "1") as url:
        split, conn = connect_device(url, path)
        with conn:
            generate(split, PROMPTS[0], max_new_tokens=4, ignore_eos=True, link=conn.open_session())
        assert metrics(url)["batches"] == 0


def test_a_batched_step_that_fails_midway_leaves_every_cache_as_it_was(tiny_checkpoint) -> None:
    """A failure while the new position is appended (some layers got it, some not) is undone for every session."""
    path, _ = tiny_checkpoint("llama")
    split = load_split(path, LAYERS, parts=["body"])
    body, d = split.body, split.hidden_size
    assert body is not None
    gen = torch.Generator().manual_seed(0)
    sessions = []
    for prompt in [3, 5]:
        state = BodyState(body)
        state.forward(torch.randn(1, prompt, d, generator=gen), 0)
        sessions.append(state)
    steps = [torch.randn(1, d, generator=gen) for _ in sessions]
    want = [body(step[None], copy.deepcopy(s.cache))[0] for s, step in zip(sessions, steps, strict=True)]
    jobs = [Job(s, step, s.length, False, None) for s, step in zip(sessions, steps, strict=True)]  # type: ignore[arg-type]

    cache = sessions[1].cache
    assert cache is not None
    update, calls = cache.update, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second layer's append of the second session
            raise RuntimeError("injected")
        return update(*args, **kwargs)

    cache.update = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="injected"):
        run_batched(body, jobs)
    for s in sessions:  # every layer of every session holds exactly its old positions
        assert s.cache is not None and {layer.keys.shape[-2] for layer in s.cache.layers} == {s.length}
    cache.update = update  # type: ignore[method-assign]
    got = run_batched(body, jobs)  # the retry (the client's replay) computes what one session alone would
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_steps_run_one_by_one_all_start_before_any_is_waited_for(tiny_checkpoint) -> None:
    """Steps that do not batch are started in turn, then waited for (a chain of stage actors overlaps sessions this
    way); a second step of the same session starts only after the first is done, and a step that fails to start
    or finish fails alone."""
    path, _ = tiny_checkpoint("llama")
    body = load_split(path, LAYERS, parts=["body"]).body
    assert body is not None
    log: list[tuple[str, str]] = []

    class Recorded(BodyState):
        def __init__(self, name: str, fail: str = "") -> None:
            super().__init__(body)
            self.name, self.fail = name, fail

        def start(self, hidden, position, reset=False, last=False, tree=None):  # type: ignore[no-untyped-def]
            log.append(("start", self.name))
            if self.fail == "start":
                raise RuntimeError(f"{self.name} failed to start")

            def finish() -> torch.Tensor:
                log.append(("finish", self.name))
                if self.fail == "finish":
                    raise RuntimeError(f"{self.name} failed")
                return hidden

            return finish

    a, b, c, d = Recorded("a"), Recorded("b"), Recorded("c", "start"), Recorded("d", "finish")
    rows = [torch.full((2, 8), float(i)) for i in range(5)]  # 2 rows: never batched
    jobs = [Job(s, x, 0, False, None) for s, x in zip([a, b, c, d, a], rows, strict=True)]  # type: ignore[arg-type]
    out = Batcher(body, max_batch=8)._run(jobs)
    assert log == [("start", "a"), ("start", "b"), ("start", "c"), ("start", "d"), ("finish", "a"), ("finish", "b"),
                   ("finish", "d"), ("start", "a"), ("finish", "a")]  # fmt: skip
    assert [torch.equal(o, x) for o, x in zip(out, rows, strict=True) if isinstance(o, torch.Tensor)] == [True] * 3
    assert [str(o) for o in out if isinstance(o, BaseException)] == ["c failed to start", "d failed"]


def test_steps_are_decoded_and_encoded_on_the_compute_thread_and_a_failure_there_is_the_steps_own(
    tiny_checkpoint,
) -> None:
    """What decodes a step's hidden state and what makes its reply run on the compute thread, with the forward (a
    server's event loop runs no torch: ``batching.compute_thread``); an exception in either fails that step alone."""
    path, _ = tiny_checkpoint("llama")
    body = load_split(path, LAYERS, parts=["body"]).body
    assert body is not None
    x = torch.randn(3, body.model.config.hidden_size)  # type: ignore[union-attr]
    ran: list[tuple[str, int]] = []

    def decode(tensor: torch.Tensor | None):  # type: ignore[no-untyped-def]
        def run() -> torch.Tensor:
            ran.append(("decode", threading.get_ident()))
            if tensor is None:
                raise ValueError("a bad frame")
            return tensor

        return run

    def encode(out: torch.Tensor) -> tuple[str, torch.Tensor]:
        ran.append(("encode", threading.get_ident()))
        if out.shape[0] != 3:
            raise ValueError("cannot encode")
        return "reply", out

    async def steps() -> list:
        batcher = Batcher(body, max_batch=8)
        try:
            return await asyncio.gather(
                batcher.submit(BodyState(body), decode(x), 0, False, encode=encode),
                batcher.submit(BodyState(body), decode(None), 0, False, encode=encode),
                batcher.submit(BodyState(body), x[:2], 0, False, encode=encode),
                batcher.submit(BodyState(body), x, 0, False),
                return_exceptions=True,
            )
        finally:
            batcher.executor.shutdown()

    encoded, bad_frame, not_encoded, plain = asyncio.run(steps())
    expected = BodyState(body).start(x.unsqueeze(0), 0)()[0]
    assert torch.equal(plain, expected)
    assert encoded[0] == "reply" and torch.equal(encoded[1], expected)
    assert isinstance(bad_frame, ValueError) and str(bad_frame) == "a bad frame"
    assert isinstance(not_encoded, ValueError) and str(not_encoded) == "cannot encode"
    assert sorted(what for what, _ in ran) == ["decode", "decode", "encode", "encode"]  # the bad frame's never ran
    assert len({thread for _, thread in ran}) == 1 and threading.get_ident() not in {thread for _, thread in ran}
