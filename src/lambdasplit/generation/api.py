"""One-call generation on a ``SplitModel``: pick the decoder, encode the prompt, run the loop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lambdasplit.errors import ConfigError
from lambdasplit.generation.drafting import Drafter, make_drafter
from lambdasplit.generation.generate import Generation, GenerationResult
from lambdasplit.generation.sampling import SamplingParams
from lambdasplit.generation.session import BodyLink, Decoder, LocalBodyLink, SplitDecoder
from lambdasplit.generation.text import Message, encode_prompt
from lambdasplit.split.loader import SplitModel

Prompt = str | Sequence[Message] | Sequence[int]


def prompt_ids(split: SplitModel, prompt: Prompt, *, chat: bool = False, system: str | None = None) -> list[int]:
    """Token ids for a string, a list of chat messages, or ids given directly."""
    if isinstance(prompt, Sequence) and not isinstance(prompt, str) and all(isinstance(t, int) for t in prompt):
        return list(prompt)  # type: ignore[arg-type]
    if split.tokenizer is None:
        raise ConfigError(f"{split.path} has no tokenizer files; pass token ids instead of text")
    return encode_prompt(split.tokenizer, prompt, chat=chat, system=system)  # type: ignore[arg-type]


def stream(
    split: SplitModel,
    prompt: Prompt,
    *,
    chat: bool = False,
    system: str | None = None,
    link: BodyLink | None = None,
    use_cache: bool = True,
    params: SamplingParams | None = None,
    drafter: Drafter | str | None = None,
    decoder: Decoder | None = None,
    **sampling: Any,
) -> Generation:
    """Start a generation; iterate it for streamed ``TokenEvent``s, then read ``.result``.

    ``link`` reaches the body (default: this process's body). ``sampling`` are ``SamplingParams`` fields
    (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``seed``, ``stop``).
    ``drafter`` turns on speculative steps: a ``Drafter`` or a name from ``DRAFTERS`` (``lookup``, ``self``);
    the output is unchanged (greedy: token for token; sampling: in distribution), the round trips fewer.
    ``decoder``: any ``Decoder``, which stays the caller's: a conversation's ``SplitDecoder``, kept open across
    turns, or a ``ModelDecoder`` (the unsplit model, for ``--unsplit`` and benchmarks), so every mode runs this
    same loop. The prompt reuses the positions its caches already hold (the previous turns; none when fresh,
    which is a prefill), ``link`` and ``use_cache`` are its own, and it is left open: close it when done.
    """
    if params is None:
        if "stop" in sampling:
            sampling["stop"] = tuple(sampling["stop"] or ())
        params = SamplingParams(**sampling)
    elif sampling:
        raise ConfigError("pass either params or sampling keywords, not both")
    keep_open = decoder is not None
    if decoder is not None and link is not None:
        raise ConfigError("pass either a decoder (it has its link) or a link, not both")
    if decoder is None:
        if link is None:
            if split.body is None:
                raise ConfigError("this SplitModel holds no body; pass a link to a body server")
            link = LocalBodyLink(split.body)
        decoder = SplitDecoder(split, link, use_cache=use_cache)
    if isinstance(drafter, str):
        drafter = make_drafter(drafter, split)
    return Generation(
        decoder,
        prompt_ids(split, prompt, chat=chat, system=system),
        params,
        tokenizer=split.tokenizer,
        eos_token_ids=split.eos_token_ids(),
        device=split.runtime.device,
        drafter=drafter,
        keep_open=keep_open,
    )


def generate(split: SplitModel, prompt: Prompt, **kwargs: Any) -> GenerationResult:
    """Generate to the end; same arguments as ``stream``."""
    return stream(split, prompt, **kwargs).run()
