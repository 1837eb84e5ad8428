"""The embedded default text-to-image model (shapes-t2i): it loads offline, splits exactly, follows prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lambdasplit.bench.t2i import measure_adherence, unsplit_image
from lambdasplit.diffusion import DEFAULT_PIPELINE, DiffusionBody, LocalLink, SplitPipeline, load_pipeline
from lambdasplit.diffusion.pipeline import pipeline_path


@pytest.fixture(scope="module")
def shapes_pipe():
    return load_pipeline(DEFAULT_PIPELINE, device="cpu", dtype="float32")


def test_weights_ship_with_the_package_and_are_small():
    folder = Path(pipeline_path(DEFAULT_PIPELINE))
    weights = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    assert 1 << 20 < weights < 10 << 20  # a few MB (float16)
    assert (folder / "tokenizer" / "vocab.json").exists() and (folder / "model_index.json").exists()


@pytest.mark.parametrize("policy", ["paper", "unet-lambda", "collafuse"])
def test_default_model_split_equals_unsplit(shapes_pipe, policy):
    prompt = "a blue square at the bottom right on a white background"
    reference = unsplit_image(shapes_pipe, prompt, steps=10, seed=3, guidance_scale=4.0)
    body = DiffusionBody(shapes_pipe.unet, DEFAULT_PIPELINE)
    out = SplitPipeline(shapes_pipe).generate(
        prompt,
        LocalLink(body),
        policy=policy,
        steps=10,
        seed=3,
        guidance_scale=4.0,
        wire_dtype="float32",
        input_dtype="float32",
    )
    assert out.image.shape == (1, 3, 32, 32)
    assert (out.image - reference).abs().max().item() <= 1e-5


def test_samples_follow_their_prompts(shapes_pipe):
    split = SplitPipeline(shapes_pipe)
    scores = measure_adherence(split, DiffusionBody(shapes_pipe.unet, DEFAULT_PIPELINE), 24, 20, 0, 4.0)
    # Chance is 1/6 for the colour and 1/18 for colour and shape; the full figure is in docs/benchmarks.md.
    assert scores["colour_and_shape"] >= 0.5, scores
    assert torch.is_tensor(shapes_pipe.unet.conv_in.weight)
