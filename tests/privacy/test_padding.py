"""PaddedLink: the prefill's size on the wire no longer gives the prompt's length; the output is unchanged."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from lambdasplit.cli.app import app
from lambdasplit.client import connect_device
from lambdasplit.errors import ConfigError
from lambdasplit.generation import LocalBodyLink, generate
from lambdasplit.privacy.padding import PaddedLink
from lambdasplit.split import load_split
from tiny_models import NUM_LAYERS

LAYERS = f"1:{NUM_LAYERS - 1}"
PROMPTS = [[1, 5, 9], [1, 5, 9, 200, 7, 31, 44, 18], [1, 5, 9, 200, 7, 31, 44, 18, 3, 90, 12, 60, 61]]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return tiny_checkpoint("llama")[0]


def test_padding_is_exact_and_rolled_back_in_process(tiny) -> None:
    split = load_split(tiny, LAYERS)
    assert split.body is not None
    for prompt in PROMPTS:
        plain = generate(split, prompt, max_new_tokens=6, ignore_eos=True).token_ids
        local = LocalBodyLink(split.body)
        padded = PaddedLink(local, 8)
        out = padded.forward(split.head(torch.tensor([prompt]), split.head.new_cache()), 0)
        assert out.shape[1] == len(prompt) and local.length == -(-len(prompt) // 8) * 8  # padding in the cache
        got = generate(split, prompt, max_new_tokens=6, ignore_eos=True, link=PaddedLink(LocalBodyLink(split.body), 8))
        assert got.token_ids == plain, prompt


def test_padding_in_stip_layout_keeps_the_prompts_last_row(tiny) -> None:
    split = load_split(tiny, layout="stip")  # every layer in the body, which returns logits
    assert split.body is not None and split.tail is None
    for prompt in PROMPTS:
        plain = generate(split, prompt, max_new_tokens=6, ignore_eos=True).token_ids
        got = generate(split, prompt, max_new_tokens=6, ignore_eos=True, link=PaddedLink(LocalBodyLink(split.body), 8))
        head_tail = generate(load_split(tiny, LAYERS), prompt, max_new_tokens=6, ignore_eos=True).token_ids
        assert got.token_ids == plain == head_tail


def test_over_a_server_every_prompt_length_sends_the_same_bytes(tiny, llama_server) -> None:
    split, client = connect_device(llama_server, tiny)
    with client:
        sizes: dict[bool, list[int]] = {False: [], True: []}
        for pad in (False, True):
            for prompt in PROMPTS[1:]:  # 8 and 13 tokens: one 16-row prefill each when padded
                session = client.open_session("float32")
                link = PaddedLink(session, 16) if pad else session
                result = generate(split, prompt, max_new_tokens=5, ignore_eos=True, link=link)
                reference = generate(load_split(tiny, LAYERS), prompt, max_new_tokens=5, ignore_eos=True)
                assert result.token_ids == reference.token_ids
                sizes[pad].append(result.traffic.up_bytes)
                link.close()
    assert sizes[False][0] != sizes[False][1]  # the control: the prompt's length shows
    assert sizes[True][0] == sizes[True][1]  # padded: it does not


def test_bad_multiples_and_padding_without_a_cloud_are_refused(tiny) -> None:
    split = load_split(tiny, LAYERS)
    assert split.body is not None
    with pytest.raises(ConfigError, match="at least 2 rows"):
        PaddedLink(LocalBodyLink(split.body), 1)
    result = CliRunner().invoke(app, ["generate", "hi", "--model", str(tiny), "--pad-prompt", "16"])
    assert isinstance(result.exception, ConfigError) and "needs --cloud" in str(result.exception)
