"""Prompt inversion from CLIP prompt embeddings reads the prompt back, through a float16 wire too."""

from __future__ import annotations

import pytest
import torch

from lambdasplit.audit.attacks.clip_inversion import invert_prompt_embeds
from tiny_pipelines import tiny_sd_pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_sd_pipeline(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("wire", [torch.float32, torch.float16])
def test_prompt_read_back_from_its_embeddings(pipe, wire):
    prompt = "a white triangle at the bottom left on a red background"
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=16, return_tensors="pt").input_ids[0]
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    result = invert_prompt_embeds(pipe.text_encoder, embeds[0].to(wire), ids.tolist(), bos=int(ids[0]))
    assert result.recovered == ids.tolist()
    assert pipe.tokenizer.decode(result.recovered, skip_special_tokens=True) == prompt


def test_random_embeddings_are_not_read_as_the_prompt(pipe):
    ids = pipe.tokenizer("a red circle", padding="max_length", max_length=16, return_tensors="pt").input_ids[0]
    noise = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    result = invert_prompt_embeds(pipe.text_encoder, noise, ids.tolist(), bos=int(ids[0]))
    assert result.token_accuracy < 0.5
