"""A trained deployment generates through the split diffusion server: ``serve`` the server's exported pipeline,
the collafuse policy with the client's (what ``imagine --policy collafuse`` runs); the image is the one the
benchmark's batched sampler makes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from collafuse_helpers import run_deployment, tiny_parts
from diffusers import UNet2DConditionModel

from lambdasplit.client import CloudClient, RemoteDiffusionLink
from lambdasplit.collafuse.data import client_images
from lambdasplit.collafuse.model import PublicParts
from lambdasplit.collafuse.sampling import sample
from lambdasplit.collafuse.server import ServerSettings
from lambdasplit.diffusion import SplitPipeline, load_pipeline
from lambdasplit.diffusion.pipeline import unet_fingerprint
from servers import body_server


@pytest.fixture(scope="module")
def parts() -> PublicParts:
    return tiny_parts()


def test_serve_runs_the_trained_hand_off(parts: PublicParts, tmp_path: Path) -> None:
    run_deployment(parts, ServerSettings(clients=2, cut_ratio=0.6, rounds=2, batch=4), clients=2, out=tmp_path)
    server_pipeline, client_pipeline = tmp_path / "server" / "pipeline", tmp_path / "client-1" / "pipeline"
    prompt = client_images(1, 2, 1, seed=9).captions[0]

    server = UNet2DConditionModel.from_pretrained(tmp_path / "server" / "unet").eval()
    client = UNet2DConditionModel.from_pretrained(tmp_path / "client-1" / "unet").eval()
    generator = torch.Generator().manual_seed(5)
    expected = sample(server, client, 0.6, parts.contexts([prompt]), parts.latent_shape, steps=10, generator=generator)
    assert expected.server_steps == 6

    pipe = load_pipeline(client_pipeline)
    with body_server("--pipeline", str(server_pipeline)) as url:
        with CloudClient(url, fingerprint=unet_fingerprint(pipe.unet.config)) as link:
            out = SplitPipeline(pipe).generate(
                prompt, RemoteDiffusionLink(link), policy="collafuse", steps=10, seed=5, guidance_scale=1.0,
                cut_ratio=0.6, wire_dtype="float32", input_dtype="float32",
            )  # fmt: skip
        assert (out.image - parts.decode(expected.latents)).abs().max().item() <= 1e-5
