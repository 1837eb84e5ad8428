"""A conversation's decoder kept open across turns: each turn sends only what the caches do not hold yet.

The next turn's prompt repeats the previous turns; ``stream(..., decoder=d)`` feeds only the positions
after the longest prefix ``d`` already holds, and the output equals a fresh generation of the whole
prompt, on every family (sliding-window caches included) and over a real body server.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lambdasplit.client import connect_device
from lambdasplit.errors import ConfigError
from lambdasplit.generation import LocalBodyLink, ModelDecoder, SplitDecoder, generate, stream
from lambdasplit.split import load_split
from tiny_models import NUM_LAYERS

LAYERS = f"1:{NUM_LAYERS - 1}"
FIRST = [1, 17, 42, 99, 7, 250, 31, 64, 12]
FOLLOW_UP = [5, 6, 7]
NEW = 10


def two_turns(split, decoder) -> tuple[list[int], list, list[int]]:
    """FIRST, then FIRST + its answer + FOLLOW_UP, on one decoder: (second prompt, results, uplink rows per turn)."""
    prompt, results, rows, before = FIRST, [], [], 0
    for turn in range(2):
        if turn:
            prompt = [*FIRST, *results[0].token_ids, *FOLLOW_UP]
        results.append(stream(split, prompt, decoder=decoder, max_new_tokens=NEW, ignore_eos=True).run())
        sent = decoder.traffic.up_payload_bytes // (4 * split.hidden_size)  # float32 rows
        rows.append(sent - before)
        before = sent
    return prompt, results, rows


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
def test_the_second_turn_feeds_only_new_positions_and_equals_a_fresh_run(tiny_checkpoint, family: str) -> None:
    path, _ = tiny_checkpoint(family)
    split = load_split(path, LAYERS)
    assert split.body is not None
    decoder = SplitDecoder(split, LocalBodyLink(split.body))
    second_prompt, (_, two), rows = two_turns(split, decoder)
    assert two.token_ids == generate(split, second_prompt, max_new_tokens=NEW, ignore_eos=True).token_ids
    # Turn 1: the prompt, then one row per fed-back token. Turn 2: the last answer token (never fed in
    # turn 1) and the three new ones, then the fed-back tokens: not the 9 + 10 positions before them.
    assert rows == [len(FIRST) + NEW - 1, 1 + 3 + NEW - 1]
    # A prompt that departs from the history early rolls every cache back to the shared prefix.
    edited = [*FIRST[:3], 300, 301]
    three = stream(split, edited, decoder=decoder, max_new_tokens=NEW, ignore_eos=True).run()
    assert three.token_ids == generate(split, edited, max_new_tokens=NEW, ignore_eos=True).token_ids
    decoder.close()


def test_conversation_over_a_body_server_reuses_the_session(tiny_checkpoint, llama_server) -> None:
    path, _ = tiny_checkpoint("llama")
    split, client = connect_device(llama_server, path)
    with client:
        decoder = SplitDecoder(split, client.open_session("float32"))
        second_prompt, (_, two), rows = two_turns(split, decoder)
        local = load_split(path, LAYERS)
        assert two.token_ids == generate(local, second_prompt, max_new_tokens=NEW, ignore_eos=True).token_ids
        assert rows == [len(FIRST) + NEW - 1, 1 + 3 + NEW - 1]
        with pytest.raises(ConfigError, match="either a decoder"):
            stream(split, FIRST, decoder=decoder, link=client.open_session("float32"))
        decoder.close()


def test_resume_needs_tokens_and_reuses_nothing_of_a_fresh_decoder(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("llama")
    split = load_split(path, LAYERS)
    assert split.body is not None
    decoder = SplitDecoder(split, LocalBodyLink(split.body))
    fresh = dataclasses.replace(decoder.traffic)
    decoder.resume(FIRST)
    assert decoder.ids == FIRST and decoder.traffic.messages == fresh.messages + 1
    decoder.resume(FIRST)  # the same prompt again: its last position is fed again for the logits
    assert decoder.ids == FIRST and decoder.traffic.up_payload_bytes == (len(FIRST) + 1) * 4 * split.hidden_size
    with pytest.raises(Exception, match="empty"):
        decoder.resume([])


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_stream_drives_the_unsplit_model_through_any_decoder(tiny_checkpoint, family: str) -> None:
    # `generate --unsplit` and the benchmark's local-only row: the same loop, a ModelDecoder instead of the split.
    path, ref = tiny_checkpoint(family)
    split = load_split(path, LAYERS, device="cpu", dtype="float32")
    with torch.no_grad():
        ids = ref.generate(
            torch.tensor([FIRST]), max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    expected = ids[0, len(FIRST) :].tolist()
    decoder = ModelDecoder(ref)
    unsplit = stream(split, FIRST, decoder=decoder, max_new_tokens=NEW, ignore_eos=True).run()
    assert unsplit.token_ids == expected == generate(split, FIRST, max_new_tokens=NEW, ignore_eos=True).token_ids
    assert decoder.ids == [*FIRST, *expected[:-1]]  # left open: the caller's to reuse or close
    decoder.close()
