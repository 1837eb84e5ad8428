"""Prompts in, text out: chat templates, and incremental detokenisation with stop strings."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from lambdasplit.errors import ConfigError

Message = dict[str, str]


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | Sequence[Message],
    *,
    chat: bool = False,
    system: str | None = None,
) -> list[int]:
    """Token ids for a plain prompt, or for a conversation through the tokenizer's own chat template.

    ``prompt`` may be a string (with ``chat=True`` it becomes one user message) or a list of
    ``{"role", "content"}`` messages (always templated).
    """
    if isinstance(prompt, str) and not chat:
        return list(tokenizer(prompt).input_ids)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    if not tokenizer.chat_template:
        raise ConfigError("this model's tokenizer has no chat template; run without --chat")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


class TextStream:
    """Turns the growing list of generated ids into text deltas, stopping at any stop string.

    Text that could still become a stop string, and an incomplete UTF-8 character (decoded as U+FFFD),
    are held back until they are resolved, so a streamed answer never shows a stop string or mojibake.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.text = ""  # emitted so far
        self.stopped = False

    def _decode(self, ids: Sequence[int]) -> str:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=True)
        assert isinstance(text, str)  # one sequence of ids decodes to one string (a batch would give a list)
        return text

    def push(self, ids: Sequence[int]) -> str:
        """All generated ids so far -> the new text to show (possibly ``""``). Sets ``stopped``."""
        full = self._decode(ids)
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        hits = [i for s in self.stop if (i := full.find(s, start)) >= 0]
        if hits:
            self.stopped = True
            return self._emit(full[: min(hits)])
        safe = full.rstrip("\ufffd")
        for s in self.stop:  # hold back a suffix that is the start of a stop string
            for k in range(min(len(s) - 1, len(safe)), 0, -1):
                if safe.endswith(s[:k]):
                    safe = safe[:-k]
                    break
        return self._emit(safe)

    def finish(self, ids: Sequence[int]) -> str:
        """Flush what was held back (the generation ended without a stop string)."""
        return "" if self.stopped else self._emit(self._decode(ids))

    def _emit(self, upto: str) -> str:
        if not upto.startswith(self.text) or len(upto) <= len(self.text):
            return ""
        delta, self.text = upto[len(self.text) :], upto
        return delta
