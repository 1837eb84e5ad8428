"""Split images equal the unsplit diffusers pipeline's, bit for bit, with a float32 wire."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

from lambdasplit.diffusion import DiffusionBody, LocalLink, SplitPipeline, load_pipeline, load_unet_config
from lambdasplit.errors import ConfigError, SessionError
from tiny_pipelines import unsplit

PROMPT = "a red circle at the top left on a blue background"
EXACT = {"wire_dtype": "float32", "input_dtype": "float32"}


@pytest.mark.parametrize("policy", ["paper", "unet-lambda", "collafuse"])
def test_split_image_equals_unsplit_pipeline(tiny_pipe, policy):
    reference = unsplit(tiny_pipe, PROMPT, steps=6, seed=42, guidance=5.0)
    link = LocalLink(DiffusionBody(tiny_pipe.unet, "tiny"))
    out = SplitPipeline(tiny_pipe).generate(PROMPT, link, policy=policy, steps=6, seed=42, guidance_scale=5.0, **EXACT)
    assert out.image.shape == reference.shape
    assert (out.image - reference).abs().max().item() <= 1e-5
    assert out.traffic.bytes_up > 0 and out.traffic.bytes_down > 0


@pytest.mark.parametrize(
    "scheduler", [DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler], ids=lambda s: s.__name__
)
@pytest.mark.parametrize("policy", ["paper", "unet-lambda", "collafuse"])
def test_schedulers_with_state_stay_in_lockstep(tiny_sd, scheduler, policy):
    original = tiny_sd.scheduler
    tiny_sd.scheduler = scheduler.from_config(original.config)
    try:
        reference = unsplit(tiny_sd, "a green square", steps=7, seed=3, guidance=4.0)
        link = LocalLink(DiffusionBody(tiny_sd.unet, "tiny"))
        out = SplitPipeline(tiny_sd).generate(
            "a green square", link, policy=policy, steps=7, seed=3, guidance_scale=4.0, cut_ratio=0.6, **EXACT
        )
    finally:
        tiny_sd.scheduler = original
    assert (out.image - reference).abs().max().item() <= 1e-5


def test_paper_traffic_is_inputs_once_then_one_noise_per_step(tiny_sd):
    link = LocalLink(DiffusionBody(tiny_sd.unet, "tiny"))
    out = SplitPipeline(tiny_sd).generate(
        PROMPT,
        link,
        policy="paper",
        steps=5,
        seed=0,
        guidance_scale=5.0,
        wire_dtype="int8",
        input_dtype="float16",
        granularity="channel",
    )
    embeds, latent = 2 * 16 * 32 * 2, 4 * 16 * 16 * 2  # float16 prompt embeddings and initial latent
    headers = (16 + 3 * 4) + (16 + 4 * 4)  # 16 fixed bytes + 4 per dim
    assert out.traffic.frames_up == 2 and out.traffic.bytes_up == embeds + latent + headers
    # Per step one (1, 4, 256) int8 noise frame: 1024 codes + 4 channel scales and offsets, 28-byte header.
    assert out.traffic.frames_down == 5 and out.traffic.bytes_down == 5 * (28 + 1024 + 4 * 8)


@pytest.mark.parametrize("dtype", ["int8", "int4", "int2"])
def test_quantized_noise_changes_the_image_by_a_bounded_amount(tiny_sd, dtype):
    reference = unsplit(tiny_sd, PROMPT, steps=5, seed=0, guidance=5.0)
    link = LocalLink(DiffusionBody(tiny_sd.unet, "tiny"))
    out = SplitPipeline(tiny_sd).generate(
        PROMPT, link, steps=5, seed=0, guidance_scale=5.0, wire_dtype=dtype, input_dtype="float32"
    )
    error = (out.image - reference).abs().max().item()
    assert 0 < error < {"int8": 0.02, "int4": 0.2, "int2": 1.0}[dtype]


def test_collafuse_without_conditioning_sends_only_the_negative_prompt(tiny_sd):
    link = LocalLink(DiffusionBody(tiny_sd.unet, "tiny"))
    split = SplitPipeline(tiny_sd)
    blind = split.generate(
        PROMPT, link, policy="collafuse", steps=6, seed=1, guidance_scale=5.0, conditioned=False, **EXACT
    )
    told = split.generate(PROMPT, link, policy="collafuse", steps=6, seed=1, guidance_scale=5.0, **EXACT)
    assert blind.traffic.bytes_up < told.traffic.bytes_up  # one embedding row instead of two
    assert (blind.image - told.image).abs().max().item() > 1e-3


def test_ancestral_scheduler_refused_for_lockstep(tiny_sd):
    original = tiny_sd.scheduler
    tiny_sd.scheduler = EulerAncestralDiscreteScheduler.from_config(original.config)
    try:
        with pytest.raises(ConfigError, match="draws fresh noise"):
            SplitPipeline(tiny_sd).generate(PROMPT, LocalLink(DiffusionBody(tiny_sd.unet, "tiny")), steps=3)
    finally:
        tiny_sd.scheduler = original


def test_progress_callback_sees_every_step(tiny_sd):
    seen: list[tuple[int, int]] = []
    link = LocalLink(DiffusionBody(tiny_sd.unet, "tiny"))
    SplitPipeline(tiny_sd).generate(
        PROMPT, link, policy="collafuse", steps=4, cut_ratio=0.5, on_step=lambda done, total: seen.append((done, total))
    )
    assert seen == [(2, 4), (3, 4), (4, 4)]
    assert torch.is_tensor(link.body.unet.conv_in.weight)


def test_paper_device_never_loads_the_unet_weights(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    device_pipe = load_pipeline(tmp_path / "pipe", device="cpu", dtype="float32", unet=False)
    assert device_pipe.unet is None
    reference = unsplit(tiny_pipe, PROMPT, steps=4, seed=5, guidance=5.0)
    split = SplitPipeline(device_pipe, load_unet_config(tmp_path / "pipe"))
    out = split.generate(
        PROMPT, LocalLink(DiffusionBody(tiny_pipe.unet, "tiny")), steps=4, seed=5, guidance_scale=5.0, **EXACT
    )
    assert (out.image - reference).abs().max().item() <= 1e-5
    with pytest.raises(SessionError, match="load the pipeline with it"):
        split.generate(PROMPT, LocalLink(DiffusionBody(tiny_pipe.unet, "tiny")), policy="collafuse", steps=4)


@pytest.fixture(scope="module")
def tiny_sd_cuda(tiny_sd):
    pipe = copy.deepcopy(tiny_sd).to("cuda")
    assert pipe.unet.device.type == "cuda" and pipe.vae.device.type == "cuda"
    return pipe


@pytest.mark.cuda
@pytest.mark.parametrize("policy", ["paper", "unet-lambda", "collafuse"])
def test_split_image_on_cuda_equals_unsplit_on_cuda(tiny_sd_cuda, policy):
    reference = unsplit(tiny_sd_cuda, PROMPT, steps=6, seed=42, guidance=5.0).cpu()
    link = LocalLink(DiffusionBody(tiny_sd_cuda.unet, "tiny"))
    out = SplitPipeline(tiny_sd_cuda).generate(
        PROMPT, link, policy=policy, steps=6, seed=42, guidance_scale=5.0, **EXACT
    )
    assert (out.image - reference).abs().max().item() <= 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("policy", ["paper", "unet-lambda", "collafuse"])
def test_cloud_unet_on_cuda_with_a_cpu_device(tiny_sd, tiny_sd_cuda, policy, record_property):
    """Cloud on the GPU, device on the CPU: the image equals the CPU-only one up to GPU rounding."""
    reference = unsplit(tiny_sd, PROMPT, steps=6, seed=42, guidance=5.0)
    link = LocalLink(DiffusionBody(tiny_sd_cuda.unet, "tiny"))
    out = SplitPipeline(tiny_sd).generate(PROMPT, link, policy=policy, steps=6, seed=42, guidance_scale=5.0, **EXACT)
    error = (out.image - reference).abs().max().item()
    record_property("max_abs_diff_vs_cpu", error)
    assert error <= 1e-3


def test_unconditioned_collafuse_without_guidance_is_refused_before_the_head_runs(tiny_sd, monkeypatch):
    split = SplitPipeline(tiny_sd)
    monkeypatch.setattr(split.ends, "start", lambda *a, **k: pytest.fail("the head ran"))
    link = LocalLink(DiffusionBody(tiny_sd.unet, "tiny"))
    with pytest.raises(ConfigError, match="needs guidance_scale > 1"):
        split.generate(PROMPT, link, policy="collafuse", conditioned=False, guidance_scale=1.0)
