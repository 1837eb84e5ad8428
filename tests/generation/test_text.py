"""Streaming text: deltas add up to the answer; stop strings end it and are never shown."""

from __future__ import annotations

import pytest

from lambdasplit.errors import ConfigError
from lambdasplit.generation import SamplingParams, TextStream, encode_prompt, generate
from lambdasplit.split import load_split
from tiny_models import make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _stream(tok, text: str, stop: tuple[str, ...]) -> tuple[list[str], TextStream]:
    ids = tok(text).input_ids
    stream, deltas = TextStream(tok, stop), []
    for i in range(1, len(ids) + 1):
        deltas.append(stream.push(ids[:i]))
        if stream.stopped:
            break
    else:
        deltas.append(stream.finish(ids))
    return deltas, stream


def test_deltas_concatenate_to_the_decoded_text(tok) -> None:
    text = "the quick brown fox jumps over the lazy dog"
    deltas, stream = _stream(tok, text, ())
    assert "".join(deltas) == text == stream.text


def test_stop_string_ends_text_and_is_never_emitted(tok) -> None:
    deltas, stream = _stream(tok, "hello world, this is a tiny tokenizer", ("this is",))
    assert stream.stopped
    assert "".join(deltas) == "hello world, " == stream.text
    assert not any("this" in d for d in deltas)


def test_partial_stop_string_is_held_back_then_released(tok) -> None:
    deltas, stream = _stream(tok, "the lazy dog", ("lazy cat",))
    assert not stream.stopped
    assert "".join(deltas) == "the lazy dog"


def test_chat_template_is_the_tokenizers_own(tok) -> None:
    ids = encode_prompt(tok, "hello", chat=True, system="be brief")
    assert tok.decode(ids) == "<|system|>be brief</s><|user|>hello</s><|assistant|>"
    assert encode_prompt(tok, [{"role": "user", "content": "hi"}]) == tok("<|user|>hi</s><|assistant|>").input_ids


def test_sampling_params_are_validated() -> None:
    for bad in [dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=0), dict(stop=("",))]:
        with pytest.raises(ConfigError):
            SamplingParams(**bad)


def test_text_generation_on_a_tiny_split_stops_at_a_stop_string(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("llama")
    split = load_split(path, "1:4")
    free = generate(split, "hello world", max_new_tokens=30, ignore_eos=True)
    assert free.finish_reason == "length" and len(free.token_ids) == 30
    stop = free.text[5:8]
    assert stop.strip(), "need a non-blank stop string"
    cut = generate(split, "hello world", max_new_tokens=30, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.find(stop)]
