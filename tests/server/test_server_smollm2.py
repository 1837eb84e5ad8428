"""The embedded SmolLM2 over a real loopback connection: float32 wire exact, float16 identical on these prompts."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import AutoModelForCausalLM

from lambdasplit.client import connect_device
from lambdasplit.generation import generate, prompt_ids
from lambdasplit.models import DEFAULT_MODEL, resolve_checkpoint
from servers import body_server

pytestmark = pytest.mark.smollm2
PROMPTS = [
    "List ten facts about the ocean.",
    "Write a haiku about autumn rain.",
    "Explain what a hash table is to a beginner.",
]
NEW = 48


@pytest.fixture(scope="module")
def unsplit() -> Callable[[list[int]], tuple[list[int], torch.Tensor]]:
    """``unsplit(ids)`` -> the unsplit model's greedy tokens and scores, computed once per prompt (each wire and
    each body device compares against the same reference)."""
    model = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(DEFAULT_MODEL), dtype=torch.float32).eval()
    cache: dict[tuple[int, ...], tuple[list[int], torch.Tensor]] = {}

    def expected(ids: list[int]) -> tuple[list[int], torch.Tensor]:
        if tuple(ids) not in cache:
            cache[tuple(ids)] = _expected(model, ids)
        return cache[tuple(ids)]

    return expected


@pytest.fixture(scope="module")
def device():
    with body_server("--layers", "4:26") as url:
        split, client = connect_device(url, DEFAULT_MODEL, quiet=True)
        with client:
            yield split, client


def _expected(unsplit, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    with torch.no_grad():
        out = unsplit.generate(
            torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    return out.sequences[0, len(ids) :].tolist(), torch.stack(out.scores)[:, 0]


@pytest.mark.parametrize("wire", ["float32", "float16"])
def test_network_split_greedy_equals_unsplit(unsplit, device, wire: str) -> None:
    split, client = device
    assert split.points.head_layers == 4 and split.points.body_end == 26  # from the server's handshake
    assert_greedy_equals_unsplit(unsplit, split, client, wire)


@pytest.mark.cuda
def test_body_on_cuda_serves_a_cpu_device(unsplit) -> None:
    """The deployment the project is for: the body on the cloud's GPU, head and tail on a CPU device."""
    with body_server("--layers", "4:26", "--device", "cuda", "--dtype", "float32") as url:
        split, client = connect_device(url, DEFAULT_MODEL, device="cpu", dtype="float32", quiet=True)
        with client:
            assert_greedy_equals_unsplit(unsplit, split, client, "float16")


def assert_greedy_equals_unsplit(unsplit, split, client, wire: str) -> None:
    for prompt in PROMPTS:
        ids = prompt_ids(split, prompt, chat=True)
        expected, scores = unsplit(ids)
        got = generate(split, ids, max_new_tokens=NEW, link=client.open_session(wire)).token_ids
        if got != expected[: len(got)]:
            i = next(k for k, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b)
            top2 = scores[i].topk(2).values
            pytest.fail(
                f"{wire} wire diverged at token {i} of {prompt!r}: top-1 margin of the unsplit model there "
                f"was {float(top2[0] - top2[1]):.4f}"
            )
        assert len(got) == len(expected)
