"""Public text that ships offline: what an attacker trains on and what perplexity is measured on.

Source: Python's own documentation topics, ``pydoc_data.topics.topics`` (the pages ``help("if")``
shows: the language reference and the built-in types; English prose with code; PSF licence). The
module is part of every CPython install, so nothing is downloaded. About 465k characters (113k SmolLM2
tokens) on Python 3.11; the exact text changes with the Python version, and so do figures built on it.

The topics (sorted by name) are split by document: every tenth, from the sixth on, is held out (about
8% of the text), so an inverter trained on ``split="train"`` is never scored or measured on its own
training text.
"""

from __future__ import annotations

from typing import Literal, cast

import torch
from transformers import PreTrainedTokenizerBase

from lambdasplit.errors import ConfigError

Split = Literal["train", "heldout", "all"]
SOURCE = "Python documentation topics (pydoc_data.topics, shipped with CPython, PSF licence)"
_HELDOUT_EVERY, _HELDOUT_AT = 10, 5
_SPLITS = ("train", "heldout", "all")


def documents(split: Split = "train") -> list[str]:
    """The public documents of ``split``, in a fixed order (sorted by topic name)."""
    if split not in _SPLITS:
        raise ConfigError(f"split must be one of {_SPLITS}, got {split!r}")
    from pydoc_data.topics import topics  # imported here: nothing happens at import time

    docs = []
    for i, key in enumerate(sorted(topics)):
        heldout = i % _HELDOUT_EVERY == _HELDOUT_AT
        if split == "all" or heldout == (split == "heldout"):
            docs.append(topics[key].strip())
    return docs


def public_text(max_chars: int | None = None, *, split: Split = "train") -> str:
    """The documents of ``split`` joined by blank lines, cut to ``max_chars`` when given."""
    text = "\n\n".join(documents(split))
    return text if max_chars is None else text[:max_chars]


def token_stream(
    tokenizer: PreTrainedTokenizerBase, max_tokens: int | None = None, *, split: Split = "train"
) -> torch.Tensor:
    """The public text of ``split`` as one 1-D int64 tensor of token ids (documents separated by EOS).

    Shorter than ``max_tokens`` when the corpus is (about 104k train / 9k held-out SmolLM2 tokens).
    """
    sep = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    ids: list[int] = []
    for doc in documents(split):
        ids.extend(tokenizer(doc, add_special_tokens=False).input_ids)
        ids.extend(sep)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens is not None else ids, dtype=torch.long)


def _checked_stream(
    tokenizer: PreTrainedTokenizerBase, split: Split, length: int, count: int, what: str, *, windows: int
) -> torch.Tensor:
    """The token stream of ``split``, after checking the arguments and that it holds ``windows`` x ``length``."""
    if length < 1 or count < 0:
        raise ConfigError(f"{what} need length >= 1 and count >= 0, got length={length}, count={count}")
    stream = token_stream(tokenizer, split=split)
    if stream.numel() < windows * length:
        raise ConfigError(f"the {split} corpus has {stream.numel()} tokens: too few for windows of {length}")
    return stream


def chunks(
    tokenizer: PreTrainedTokenizerBase, length: int, count: int, seed: int = 0, *, split: Split = "train"
) -> torch.Tensor:
    """``count`` windows of ``length`` tokens from the public text: (count, length) int64.

    The stream is cut into non-overlapping windows from a seeded offset, shuffled; once those run out,
    another pass from a fresh offset follows (the same text in new contexts), so any ``count`` works.
    """
    stream = _checked_stream(tokenizer, split, length, count, "chunks", windows=2)
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while sum(len(c) for c in out) < count:
        offset = int(torch.randint(0, length, (1,), generator=gen))
        n = (stream.numel() - offset) // length
        windows = stream[offset : offset + n * length].view(n, length)
        out.append(windows[torch.randperm(n, generator=gen)])
    return torch.cat(out)[:count] if out else torch.empty(0, length, dtype=torch.long)


def chat_chunks(
    tokenizer: PreTrainedTokenizerBase, length: int, count: int, seed: int = 0, *, split: Split = "train"
) -> torch.Tensor:
    """``count`` conversations in the tokenizer's own chat template, cut to their first ``length`` tokens.

    Each is a user turn and an assistant turn of public text (random spans of the stream; the user's is
    1 to ``length`` tokens) after whatever the template adds (SmolLM2's: a default system prompt): the
    shape every chat prompt on the wire has, which a model's public template lets any attacker copy.
    (count, length) int64.
    """
    if not tokenizer.chat_template:
        raise ConfigError("this tokenizer has no chat template; use chunks() for plain text windows")
    stream = _checked_stream(tokenizer, split, length, count, "chat_chunks", windows=4)
    gen = torch.Generator().manual_seed(seed)

    def span(n: int) -> str:
        start = int(torch.randint(0, stream.numel() - n, (1,), generator=gen))
        # decode is typed str | list[str] (a batch gives a list); one flat list of ids gives a str
        text = cast(str, tokenizer.decode(stream[start : start + n].tolist(), skip_special_tokens=True))
        return text.strip()

    out: list[list[int]] = []
    while len(out) < count:
        user = span(int(torch.randint(1, length + 1, (1,), generator=gen)))
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": span(length)}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) >= length:  # nearly always: the assistant's span alone is about ``length`` tokens
            out.append(ids[:length])
    return torch.tensor(out, dtype=torch.long).view(count, length)
