"""The developer's private text, cut into training and held-out token blocks.

The split is by document, never by token: a held-out block is text the model has not trained on, not the
other half of a sentence it has. Documents are the blank-line separated paragraphs of a file (or the strings
given); text with fewer than two paragraphs is split by its lines instead. A seeded draw picks which documents
are held out, so one seed gives one split, whatever the training settings.

Each part is tokenised as one stream (documents separated by the end-of-sequence token) and cut into
non-overlapping blocks of ``seq_len`` tokens; the shorter rest is dropped. Shapes: ``N`` blocks, ``T`` =
``seq_len``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from lambdasplit.errors import ConfigError

#: A text file, or the documents themselves.
Text = str | os.PathLike[str] | Sequence[str]


@dataclass(frozen=True)
class Blocks:
    """Token blocks of both parts: ``train`` (N_train, T) and ``heldout`` (N_heldout, T), int64."""

    train: torch.Tensor
    heldout: torch.Tensor
    documents: tuple[int, int]  # (training documents, held-out documents)


def read_documents(text: Text) -> list[str]:
    """The documents of ``text``: a path is read and cut at blank lines (at lines if it has one paragraph),
    a sequence of strings is taken as it is. Empty documents are dropped."""
    if isinstance(text, str | os.PathLike):
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"text file {str(path)!r} does not exist (give a UTF-8 text file)")
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read text file {str(path)!r} as UTF-8: {exc}") from exc
        docs = [d.strip() for d in re.split(r"\n\s*\n", content)]
        if sum(1 for d in docs if d) < 2:
            docs = [line.strip() for line in content.splitlines()]
        where = f"text file {str(path)!r}"
    else:
        docs = [str(d).strip() for d in text]
        where = "the texts given"
    docs = [d for d in docs if d]
    if not docs:
        raise ConfigError(f"{where} is empty: fine-tuning needs some text")
    return docs


def split_documents(docs: Sequence[str], held_out: float, seed: int) -> tuple[list[str], list[str]]:
    """(training, held-out) documents: ``round(held_out * n)`` drawn with ``seed``, at least one in each part,
    both kept in their original order."""
    if len(docs) < 2:
        raise ConfigError(
            f"the text has {len(docs)} document: a training and a held-out part need at least two "
            "(paragraphs separated by a blank line, or lines)"
        )
    n_heldout = min(max(1, round(held_out * len(docs))), len(docs) - 1)
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed))
    heldout = set(order[:n_heldout].tolist())
    train = [d for i, d in enumerate(docs) if i not in heldout]
    return train, [d for i, d in enumerate(docs) if i in heldout]


def token_blocks(tokenizer: PreTrainedTokenizerBase, docs: Sequence[str], seq_len: int) -> torch.Tensor:
    """``docs`` as one token stream (EOS between documents) cut into blocks: (N, seq_len) int64."""
    sep = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False).input_ids)
        ids.extend(sep)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def make_blocks(
    tokenizer: PreTrainedTokenizerBase, train_docs: Sequence[str], heldout_docs: Sequence[str], seq_len: int
) -> Blocks:
    """Tokenise both parts; refuse text too short for one block in each."""
    train, heldout = token_blocks(tokenizer, train_docs, seq_len), token_blocks(tokenizer, heldout_docs, seq_len)
    if len(train) == 0 or len(heldout) == 0:
        raise ConfigError(
            f"the text is too short for seq_len={seq_len}: {len(train)} training and {len(heldout)} held-out "
            f"blocks (from {len(train_docs)} and {len(heldout_docs)} documents); at least one of each is needed: "
            "give more text, a lower seq_len or a larger held-out fraction"
        )
    return Blocks(train, heldout, (len(train_docs), len(heldout_docs)))
