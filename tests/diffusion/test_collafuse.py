"""CollaFuse's cut ratio c (the cloud's share of the steps) and stochastic samplers (DDPM) reproduced by seed."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionPipeline,
)

from lambdasplit.diffusion import DiffusionBody, LocalLink, SessionOptions, SplitPipeline
from lambdasplit.diffusion.protocol import GENERATOR_STATE_BYTES, decode_generator, encode_generator
from lambdasplit.diffusion.schedulers import is_stochastic, require_reproducible, takes_generator
from lambdasplit.errors import ConfigError
from tiny_pipelines import unsplit

PROMPT = "a blue square at the bottom left on a white background"
EXACT = {"wire_dtype": "float32", "input_dtype": "float32"}
GOOD = {
    "policy": "collafuse",
    "family": "sd",
    "steps": 10,
    "guidance_scale": 5.0,
    "scheduler": {"_class_name": "DDPMScheduler"},
    "latent_shape": [1, 4, 16, 16],
    "inputs": {"prompt_embeds": [2, 16, 32]},
}


@pytest.fixture
def ddpm_sd(tiny_sd: StableDiffusionPipeline) -> Iterator[StableDiffusionPipeline]:
    """The tiny SD pipeline with a DDPMScheduler (a fresh noise draw at every step but the last)."""
    original = tiny_sd.scheduler
    tiny_sd.scheduler = DDPMScheduler.from_config(original.config)
    try:
        yield tiny_sd
    finally:
        tiny_sd.scheduler = original


def _collafuse(pipe: StableDiffusionPipeline, seed: int, cut_ratio: float = 0.5, steps: int = 6) -> torch.Tensor:
    link = LocalLink(DiffusionBody(pipe.unet, "tiny"))
    out = SplitPipeline(pipe).generate(
        PROMPT, link, policy="collafuse", steps=steps, seed=seed, guidance_scale=5.0, cut_ratio=cut_ratio, **EXACT
    )
    return out.image


@pytest.mark.parametrize("cut_ratio", [0.0, 0.5, 1.0])
def test_ddpm_collafuse_equals_the_unsplit_pipeline_with_the_same_seed(ddpm_sd, cut_ratio):
    reference = unsplit(ddpm_sd, PROMPT, steps=6, seed=11, guidance=5.0)
    image = _collafuse(ddpm_sd, seed=11, cut_ratio=cut_ratio)
    assert torch.equal(image, reference)


@pytest.mark.parametrize(
    "make",
    [
        EulerAncestralDiscreteScheduler.from_config,
        lambda config: DPMSolverMultistepScheduler.from_config(config, algorithm_type="sde-dpmsolver++"),
    ],
    ids=["euler-ancestral", "dpmsolver-sde"],
)
def test_other_stochastic_samplers_whose_step_takes_a_generator(tiny_sd, make):
    original = tiny_sd.scheduler
    tiny_sd.scheduler = make(original.config)
    try:
        reference = unsplit(tiny_sd, PROMPT, steps=6, seed=2, guidance=5.0)
        image = _collafuse(tiny_sd, seed=2)
    finally:
        tiny_sd.scheduler = original
    assert torch.equal(image, reference)


def test_ddpm_collafuse_is_reproducible_by_seed(ddpm_sd):
    first, again, other = (_collafuse(ddpm_sd, seed) for seed in (4, 4, 5))
    assert torch.equal(first, again)
    assert (first - other).abs().max().item() > 1e-3


def test_the_noise_stream_matters(ddpm_sd, monkeypatch):
    """Were the cloud to draw its own noise (a fresh generator), the image would not be the unsplit one."""
    reference = unsplit(ddpm_sd, PROMPT, steps=6, seed=11, guidance=5.0)
    monkeypatch.setattr("lambdasplit.diffusion.cloud.decode_generator", lambda _: torch.Generator().manual_seed(0))
    assert (_collafuse(ddpm_sd, seed=11) - reference).abs().max().item() > 1e-3


@pytest.mark.parametrize(("cut_ratio", "cloud", "device"), [(0.0, 0, 5), (1.0, 5, 0), (0.4, 2, 3), (0.7, 4, 1)])
def test_cut_ratio_is_the_clouds_share(tiny_sd, cut_ratio, cloud, device):
    seen: list[tuple[int, int]] = []
    link = LocalLink(DiffusionBody(tiny_sd.unet, "tiny"))
    out = SplitPipeline(tiny_sd).generate(
        PROMPT,
        link,
        policy="collafuse",
        steps=5,
        cut_ratio=cut_ratio,
        on_step=lambda done, total: seen.append((done, total)),
        **EXACT,
    )
    assert seen[0] == (cloud, 5) and len(seen) == 1 + device and seen[-1] == (5, 5)
    assert len(out.per_step) == device
    reference = unsplit(tiny_sd, PROMPT, steps=5, seed=0, guidance=7.5)
    assert (out.image - reference).abs().max().item() <= 1e-5


def test_the_old_cut_keyword_warns_and_means_the_devices_share(tiny_sd):
    seen: list[tuple[int, int]] = []
    link = LocalLink(DiffusionBody(tiny_sd.unet, "tiny"))
    with pytest.warns(DeprecationWarning, match=r"cut_ratio = 1 - cut = 0\.75 \(CollaFuse's c, the server's share\)"):
        SplitPipeline(tiny_sd).generate(
            PROMPT, link, policy="collafuse", steps=4, cut=0.25, on_step=lambda d, t: seen.append((d, t))
        )
    assert seen == [(3, 4), (4, 4)]  # the cloud ran 3 steps, the device the last one
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError, match="not both"):
        SplitPipeline(tiny_sd).generate(PROMPT, link, policy="collafuse", steps=4, cut=0.25, cut_ratio=0.1)


def test_old_cut_key_converts_to_the_cut_ratio():
    options = SessionOptions.from_json({**GOOD, "scheduler": {"_class_name": "DDIMScheduler"}, "cut": 0.3})
    assert options.cut_ratio == pytest.approx(0.7) and options.cloud_steps(10) == 7
    assert "cut" not in options.to_json() and options.to_json()["cut_ratio"] == pytest.approx(0.7)
    # An old device counted the cloud's steps as T - round(cut·T); at a tie that count is kept.
    old = SessionOptions.from_json({**GOOD, "cut": 0.5})
    assert old.cloud_steps(5) == 3 and SessionOptions.from_json({**GOOD, "cut_ratio": 0.5}).cloud_steps(5) == 2
    with pytest.raises(ConfigError, match="not both"):
        SessionOptions.from_json({**GOOD, "cut": 0.3, "cut_ratio": 0.7})
    with pytest.raises(ConfigError, match=r"old cut \(the device's share"):
        SessionOptions.from_json({**GOOD, "cut": 2})


@pytest.mark.parametrize("ratio", [-0.1, 1.5, "half", True])
def test_bad_cut_ratio_names_collafuses_c(ratio):
    with pytest.raises(ConfigError, match=r"CollaFuse's cut ratio c, the cloud's share"):
        SessionOptions.from_json({**GOOD, "cut_ratio": ratio})


def test_generator_state_round_trips():
    generator = torch.Generator().manual_seed(9)
    torch.randn(3, generator=generator)
    copy = decode_generator(encode_generator(generator))
    assert torch.equal(torch.randn(5, generator=copy), torch.randn(5, generator=generator))
    assert len(encode_generator(generator)) == 4 * ((GENERATOR_STATE_BYTES + 2) // 3)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ("not base64!", "not base64"),
        ("AAAA", r"holds 3 bytes; a CPU torch.Generator's state is \d+ bytes"),
        (encode_generator(torch.Generator())[:-8], "not base64|holds"),
        (base64.b64encode(bytes(GENERATOR_STATE_BYTES)).decode(), "not a CPU torch.Generator's state"),  # zeros
        (12, "base64 text, got int"),
    ],
)
def test_a_bad_generator_state_is_refused(state, message):
    with pytest.raises(ConfigError, match=f"^generator_state .*({message})"):
        SessionOptions.from_json({**GOOD, "generator_state": state})


def test_generator_state_only_with_collafuse():
    state = encode_generator(torch.Generator().manual_seed(1))
    assert SessionOptions.from_json({**GOOD, "generator_state": state}).generator_state == state
    with pytest.raises(ConfigError, match="generator_state is for the collafuse policy"):
        SessionOptions.from_json({**GOOD, "policy": "paper", "generator_state": state})


def test_cloud_refuses_a_stochastic_collafuse_without_the_generator(tiny_sd):
    body = DiffusionBody(tiny_sd.unet, "tiny")
    options = {**GOOD, "scheduler": {**tiny_sd.scheduler.config, "_class_name": "DDPMScheduler"}}
    with pytest.raises(ConfigError, match=r"reproduces it only from the device generator's state \(generator_state\)"):
        body.open(SessionOptions.from_json(options), 1)
    state = encode_generator(torch.Generator().manual_seed(1))
    assert body.open(SessionOptions.from_json({**options, "generator_state": state}), 1).generator is not None
    deterministic = {**options, "scheduler": dict(tiny_sd.scheduler.config)}
    deterministic["scheduler"]["_class_name"] = "DDIMScheduler"
    assert body.open(SessionOptions.from_json(deterministic), 1).generator is None


@pytest.mark.parametrize("policy", ["paper", "unet-lambda"])
def test_lockstep_policies_still_refuse_ddpm(ddpm_sd, policy):
    link = LocalLink(DiffusionBody(ddpm_sd.unet, "tiny"))
    with pytest.raises(ConfigError, match=f"DDPMScheduler draws fresh noise at every step, so the {policy} policy"):
        SplitPipeline(ddpm_sd).generate(PROMPT, link, policy=policy, steps=3)
    body = DiffusionBody(ddpm_sd.unet, "tiny")
    options = {**GOOD, "policy": policy, "scheduler": {**ddpm_sd.scheduler.config, "_class_name": "DDPMScheduler"}}
    with pytest.raises(ConfigError, match="cannot keep device and cloud in lockstep"):
        body.open(SessionOptions.from_json(options), 1)


def test_stochastic_detection_and_a_step_without_a_generator(ddpm_sd):
    scheduler = ddpm_sd.scheduler
    assert is_stochastic(scheduler) and takes_generator(scheduler)
    assert not is_stochastic(DDIMScheduler.from_config(scheduler.config))
    # Like DPMSolverSDEScheduler (torchsde's noise, not installed here): a stochastic step that takes no generator.
    blind = DDPMScheduler.from_config(scheduler.config)
    blind.step = lambda model_output, timestep, sample, return_dict=True: None
    assert is_stochastic(blind) and not takes_generator(blind)
    with pytest.raises(ConfigError, match="its step takes no generator"):
        require_reproducible(blind, generator_shared=True)
    require_reproducible(DDIMScheduler.from_config(scheduler.config), generator_shared=False)
