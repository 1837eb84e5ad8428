"""The public corpus: offline, deterministic, and split so that held-out text never trains the inverter."""

from __future__ import annotations

import pytest
import torch

from lambdasplit.audit.corpus import chat_chunks, chunks, documents, public_text, token_stream
from lambdasplit.errors import ConfigError
from tiny_models import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_train_and_heldout_are_disjoint_and_cover_all() -> None:
    train, heldout = documents("train"), documents("heldout")
    assert train and heldout
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(documents("all"))
    held_chars = sum(map(len, heldout))
    assert 0.03 < held_chars / (held_chars + sum(map(len, train))) < 0.2


def test_public_text_is_cut_to_max_chars() -> None:
    text = public_text(1000)
    assert len(text) == 1000
    assert public_text(split="heldout").startswith(documents("heldout")[0])
    with pytest.raises(ConfigError, match="split must be one of"):
        public_text(split="test")  # type: ignore[arg-type]


def test_token_stream_is_bounded_and_separates_documents(tokenizer) -> None:
    ids = token_stream(tokenizer, 5000, split="heldout")
    assert ids.shape == (5000,) and ids.dtype == torch.long
    whole = token_stream(tokenizer, split="heldout")
    assert int((whole == tokenizer.eos_token_id).sum()) == len(documents("heldout"))  # one EOS per document
    assert torch.equal(ids[:100], token_stream(tokenizer, 100, split="heldout"))


def test_chunks_are_seeded_windows_of_the_stream(tokenizer) -> None:
    stream = token_stream(tokenizer, split="heldout")
    a = chunks(tokenizer, 32, 10, seed=3, split="heldout")
    assert a.shape == (10, 32)
    assert torch.equal(a, chunks(tokenizer, 32, 10, seed=3, split="heldout"))
    assert not torch.equal(a, chunks(tokenizer, 32, 10, seed=4, split="heldout"))
    text = ",".join(map(str, stream.tolist())) + ","
    assert all(",".join(map(str, w.tolist())) + "," in text for w in a)
    # More windows than the stream holds: further passes from fresh offsets.
    many = chunks(tokenizer, 64, stream.numel() // 64 + 5, split="heldout")
    assert many.shape == (stream.numel() // 64 + 5, 64)
    with pytest.raises(ConfigError, match="length >= 1"):
        chunks(tokenizer, 0, 1)


def test_chat_chunks_start_like_a_chat_prompt(tokenizer) -> None:
    windows = chat_chunks(tokenizer, 48, 6, seed=1)
    assert windows.shape == (6, 48)
    start = tokenizer("<|user|>", add_special_tokens=False).input_ids
    assert all(w[: len(start)].tolist() == start for w in windows)  # the template's opening, every time
    assert torch.equal(windows, chat_chunks(tokenizer, 48, 6, seed=1))
    tokenizer_without = make_tokenizer()
    tokenizer_without.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        chat_chunks(tokenizer_without, 48, 1)
