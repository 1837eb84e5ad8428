"""The U-Net Λ split: outer and inner blocks chained equal the U-Net's own forward."""

from __future__ import annotations

import pytest
import torch

from lambdasplit.diffusion.unet import UNetParts
from lambdasplit.errors import ConfigError


@pytest.mark.parametrize("blocks", [1, 2])
def test_outer_inner_outer_equals_forward(tiny_sd, blocks):
    unet = tiny_sd.unet
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(501)
    with torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=context).sample
        parts = UNetParts(unet, blocks)
        emb = parts.embed(x, t, context)
        sample, skips = parts.outer_down(x, emb, context)
        got = parts.outer_up(parts.inner(sample, emb, context), skips, emb, context)
    assert sample.shape[-1] == 16 >> blocks  # the cloud never sees the latent's resolution
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_sdxl_added_conditions_go_into_the_embedding(tiny_sdxl):
    unet = tiny_sdxl.unet
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 16, 64, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    t = torch.tensor(21)
    with torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
        parts = UNetParts(unet, 1)
        emb = parts.embed(x, t, context, added)
        sample, skips = parts.outer_down(x, emb, context)
        got = parts.outer_up(parts.inner(sample, emb, context), skips, emb, context)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_block_counts_and_odd_latents_refused(tiny_sd):
    with pytest.raises(ConfigError, match=r"1\.\.2 outer blocks"):
        UNetParts(tiny_sd.unet, 3)
    parts = UNetParts(tiny_sd.unet, 1)
    x = torch.randn(2, 4, 18, 18)
    with pytest.raises(ConfigError, match="divisible by 4"):
        parts.outer_down(x, parts.embed(x, torch.tensor(1), torch.randn(2, 16, 32)), torch.randn(2, 16, 32))
