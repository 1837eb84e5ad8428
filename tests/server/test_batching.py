"""Continuous batching: decode steps of concurrent sessions run as one forward; every output stays its own."""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest

from lambdasplit.client import connect_device
from lambdasplit.generation import generate
from lambdasplit.split import load_split
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


def test_max_batch_1_turns_batching_off(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("llama")
    with body_server("--model", str(path), "--layers", LAYERS, "--max-batch", "1") as url:
        split, conn = connect_device(url, path)
        with conn:
            generate(split, PROMPTS[0], max_new_tokens=4, ignore_eos=True, link=conn.open_session())
        assert metrics(url)["batches"] == 0
