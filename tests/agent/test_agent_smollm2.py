"""`lambdasplit up --cloud local` on the embedded SmolLM2: the official openai client gets the unsplit answer."""

from __future__ import annotations

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lambdasplit.agent.run import READY
from lambdasplit.generation import Generation, ModelDecoder, SamplingParams
from lambdasplit.generation.text import encode_prompt
from lambdasplit.models import DEFAULT_MODEL, resolve_checkpoint
from lambdasplit.server.process import lambdasplit_process

pytestmark = pytest.mark.smollm2
MESSAGES = [{"role": "user", "content": "Write a haiku about autumn rain."}]
NEW = 32


def test_greedy_chat_through_the_agent_equals_the_unsplit_model() -> None:
    path = resolve_checkpoint(DEFAULT_MODEL, quiet=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = encode_prompt(tokenizer, MESSAGES, chat=True)
    eos = {tokenizer.eos_token_id, *([model.generation_config.eos_token_id] if model.generation_config else [])}
    want = Generation(
        ModelDecoder(model),
        ids,
        SamplingParams(max_new_tokens=NEW),
        tokenizer=tokenizer,
        eos_token_ids={e for e in eos if isinstance(e, int)},
    ).run()
    args = ["up", "--cloud", "local", "--layers", "4:26", "--wire-dtype", "float32", "--port", "0", "--no-attack"]
    with lambdasplit_process(args, READY, timeout=300) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, temperature=0, max_tokens=NEW)
        streamed = client.chat.completions.create(
            model=DEFAULT_MODEL, messages=MESSAGES, temperature=0, max_tokens=NEW, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert reply.choices[0].message.content == want.text == text
    assert reply.usage is not None and reply.usage.completion_tokens == want.new_tokens
    assert reply.usage.prompt_tokens == len(ids)
