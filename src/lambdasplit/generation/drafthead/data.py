"""Training data for a draft head: the target model's own answers, with its hidden states.

Prompts come from a file (``read_prompts``) or from the model itself (``synthetic_prompts``: the chat template up
to the start of a user message, sampled, as in Magpie, Xu et al. 2024), so the amount of training data is bounded
by generation time, not by a licensed prompt set.

Each prompt goes through the model's chat template and is answered greedily by the unsplit model (Hugging Face
``generate``, batched, left-padded). A forward pre-hook on the LM head records what it was given at each step:
the last prompt position's hidden state, then each generated token's. Those are exactly the features the split's
tail holds on the device while decoding, so the head is trained on what it will see.

An ``Answer`` holds, for one prompt: ``features`` (n, D) at positions ``start .. start + n - 1`` (``start`` is the
last prompt position) and ``tokens`` (n,), the token that followed each of those positions (the answer); and, for a
head that reads the device's first layers, ``states`` (n, D): their output at each answer token's position
(``add_states``, one forward of those layers over prompt and answer, as a split device's head computes them).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lambdasplit.errors import ConfigError
from lambdasplit.generation.text import encode_prompt
from lambdasplit.split.parts import lm_head_inputs


@dataclass
class Answer:
    start: int  # absolute position of the first feature row (the last prompt token)
    features: torch.Tensor  # (n, D), float16
    tokens: torch.Tensor  # (n,), int64: the token after each position
    states: torch.Tensor | None = None  # (n, D), float16: the first layers' output at each token's position


def add_states(
    head: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Answer],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Set each answer's ``states``: ``head`` (a split's ``Head`` part: the target's first layers) run over its
    prompt (token ids) and answer, kept at the answer tokens' positions. ``progress(done, total)`` every 64."""
    if len(prompts) != len(answers):
        raise ConfigError(f"{len(prompts)} prompts for {len(answers)} answers")
    device = next(head.parameters()).device
    for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        if len(prompt) - 1 != answer.start:
            raise ConfigError(f"answer {i} starts at position {answer.start}, its prompt has {len(prompt)} tokens")
        ids = torch.tensor([[*prompt, *answer.tokens.tolist()]], device=device)
        with torch.inference_mode():
            answer.states = head(ids)[0, len(prompt) :].to(torch.float16).cpu()
        if progress is not None and ((i + 1) % 64 == 0 or i + 1 == len(answers)):
            progress(i + 1, len(answers))


def answer_prompts(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 192,
    batch_size: int = 16,
    pad_token_id: int | None = None,
    progress: Callable[[int, int, int], None] | None = None,
) -> list[Answer]:
    """Greedy answers to ``prompts`` (token ids, e.g. ``chat_prompts``), with the hidden state the LM head saw at
    each position.

    ``progress(done, total, tokens)`` is called after each batch. An answer ends at the first EOS (kept as its
    last token: the head also learns where answers stop) or at ``max_new_tokens``. Batches are formed from prompts
    of similar length (the answers come back in the prompts' order): a batch pads every prompt to its longest, and
    AlpacaEval's prompts in file order padded to 4.1 times their tokens.
    """
    configured = model.generation_config.eos_token_id
    eos = {int(t) for t in ([configured] if isinstance(configured, int) else configured or [])}
    pad = pad_token_id if pad_token_id is not None else min(eos, default=0)
    answers: dict[int, Answer] = {}
    total_tokens = 0
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    with lm_head_inputs(model) as seen:
        for at in range(0, len(prompts), batch_size):
            chosen = order[at : at + batch_size]
            batch = [list(prompts[i]) for i in chosen]
            width = max(len(ids) for ids in batch)
            ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch])
            seen.clear()
            with torch.inference_mode():
                out = cast(Any, model).generate(
                    input_ids=ids.to(model.device),
                    attention_mask=mask.to(model.device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                    eos_token_id=sorted(eos) or None,
                    min_new_tokens=0 if eos else max_new_tokens,
                )
            new = out[:, width:].cpu()
            # (B, steps, D): one row per generated token (each call's last position: generate keeps one logit)
            feats = torch.stack([x[:, -1] for x in seen[: new.shape[1]]], dim=1).to(torch.float16).cpu()
            for b, (index, prompt) in enumerate(zip(chosen, batch, strict=True)):
                row = new[b].tolist()
                n = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
                answers[index] = Answer(len(prompt) - 1, feats[b, :n].clone(), new[b, :n].clone())
                total_tokens += n
            if progress is not None:
                progress(min(at + batch_size, len(prompts)), len(prompts), total_tokens)
    return [answers[i] for i in range(len(prompts))]


def synthetic_prompts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    count: int,
    *,
    batch_size: int = 64,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    exclude: Sequence[str] = (),
    openings: Sequence[str] = (),
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """``count`` distinct user messages written by the model: its chat template up to where a user's text begins,
    sampled at ``temperature`` (Magpie). A message is kept when the model closed the turn (EOS) within
    ``max_new_tokens`` and wrote at least three words; duplicates (ignoring case) and ``exclude`` are dropped.

    With ``openings`` (e.g. "Write a blog post"), batches take turns starting the message with each, and the model
    writes the rest: this steers the messages toward a kind of request (the opening stays part of the message).

    ``progress(kept, count)`` is called after each batch. Raises ``ConfigError`` when the model has no chat
    template, or when it cannot write enough distinct messages (at most ``4 * count / batch_size + 4`` batches).
    """
    if not tokenizer.chat_template:
        raise ConfigError("synthetic prompts need a chat template")
    if count <= 0:
        return []
    marker = "\x00user text\x00"
    text = str(tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False))
    before = text[: text.index(marker)]
    starts = [o.strip() for o in openings if o.strip()] or [""]
    configured = model.generation_config.eos_token_id
    eos = sorted({int(t) for t in ([configured] if isinstance(configured, int) else configured or [])})
    if not eos:
        raise ConfigError("synthetic prompts need an end-of-turn token (generation_config.eos_token_id)")
    seen = {p.strip().lower() for p in exclude}
    kept: list[str] = []
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for attempt in range(4 * count // batch_size + 4):
            opening = starts[attempt % len(starts)]
            prefix = tokenizer(before + opening, add_special_tokens=False, return_tensors="pt").input_ids
            ids = prefix.repeat(batch_size, 1).to(model.device)
            with torch.inference_mode():
                out = cast(Any, model).generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    temperature=temperature,
                    top_p=1.0,
                    top_k=0,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=eos[0],
                    eos_token_id=eos,
                )
            for row in out[:, prefix.shape[1] :].tolist():
                end = next((i for i, t in enumerate(row) if t in eos), None)
                if end is None:
                    continue  # the model did not finish the message
                written = str(tokenizer.decode(row[:end], skip_special_tokens=True))
                message = (opening + written if opening else written).strip()
                if len(message.split()) < 3 + len(opening.split()) or message.lower() in seen:
                    continue
                seen.add(message.lower())
                kept.append(message)
            if progress is not None:
                progress(min(len(kept), count), count)
            if len(kept) >= count:
                return kept[:count]
    finally:
        torch.random.set_rng_state(generator_state)
    raise ConfigError(f"the model wrote {len(kept)} distinct messages, fewer than the {count} asked for")


def chat_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], system: str | None = None
) -> list[list[int]]:
    """Each prompt as one user message through the model's chat template, as the agent and ``chat`` send it."""
    return [encode_prompt(tokenizer, p, chat=True, system=system) for p in prompts]


def draft_vocabulary(answers: Sequence[Answer], size: int, always: Sequence[int] = ()) -> torch.Tensor:
    """The ``size`` tokens the answers use most (and ``always``, e.g. EOS), as target ids, most frequent first."""
    counts = torch.bincount(torch.cat([a.tokens for a in answers]))
    for t in always:
        if t < counts.numel():
            counts[t] = counts.max() + 1
    order = torch.argsort(counts, descending=True, stable=True)
    used = int((counts > 0).sum())
    return order[: min(size, used)].clone()


def coverage(answers: Sequence[Answer], draft_ids: torch.Tensor) -> float:
    """The share of answer tokens that the draft vocabulary holds."""
    tokens = torch.cat([a.tokens for a in answers])
    return float(torch.isin(tokens, draft_ids).float().mean())


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: a JSON list (strings, or objects with ``instruction``, ``prompt`` or ``turns``), JSON
    lines of such objects, or plain text with one prompt per line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no prompts file at {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        records = json.loads(text)
    elif path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        records = [line for line in text.splitlines() if line.strip()]
    prompts = [_prompt_of(r, path) for r in records]
    if not prompts:
        raise ConfigError(f"{path} holds no prompts")
    return prompts


def _prompt_of(record: object, path: Path) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for key in ("instruction", "prompt"):
            if isinstance(record.get(key), str):
                return str(record[key])
        turns = record.get("turns")
        if isinstance(turns, list) and turns and isinstance(turns[0], str):
            return turns[0]
    raise ConfigError(f"{path}: a record must be a string or have 'instruction', 'prompt' or 'turns': {record!r:.80}")
