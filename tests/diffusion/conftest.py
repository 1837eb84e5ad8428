"""Fixtures: tiny SD 1.x and SDXL pipelines (tests/tiny_pipelines.py), built once per session."""

from __future__ import annotations

import pytest
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from tiny_pipelines import tiny_sd_pipeline, tiny_sdxl_pipeline


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> StableDiffusionPipeline:
    return tiny_sd_pipeline(tmp_path_factory.mktemp("sd-tokenizer"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> StableDiffusionXLPipeline:
    return tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl-tokenizer"))


@pytest.fixture(params=["tiny_sd", "tiny_sdxl"])
def tiny_pipe(request: pytest.FixtureRequest) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    return request.getfixturevalue(request.param)
