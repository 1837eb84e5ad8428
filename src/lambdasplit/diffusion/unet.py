"""The U-Net Λ split: the outer blocks of a diffusers UNet2DConditionModel and their skip connections stay on the
device, its middle runs in the cloud.

    device: time embedding, conv_in, down_blocks[:k]  --sample, emb-->  cloud: down_blocks[k:], mid_block,
    device: up_blocks[-k:], conv_out                <--sample--         up_blocks[:-k]

The blocks are diffusers' own modules, called in `UNet2DConditionModel.forward`'s order with its arguments (this
file only routes tensors between them); the tests hold ``outer_up(inner(outer_down(x)))`` to ``unet(x)``. The
cloud sees the feature map after k down blocks and the time embedding, never the latent or the predicted noise;
what an attacker can still recover from them is the audit's question, not this file's claim.

The skip connections line up at a block boundary: the cloud's up blocks need one skip from the device side, the
last output of down block k-1, which is the very sample the device sends; every other device skip stays home.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import nn

from lambdasplit.errors import ConfigError


def resnets(block: nn.Module) -> nn.ModuleList:
    """A U-Net block's resnets (nn.Module types the attribute of a block it does not know as Tensor | Module)."""
    return cast(nn.ModuleList, block.resnets)


class UNetParts:
    """Runs the outer (``outer_down``/``outer_up``, device) and inner (``inner``, cloud) parts of ``unet``.

    ``blocks`` (k, 1 <= k < number of down blocks) is how many down and up blocks stay on the device.
    """

    def __init__(self, unet: UNet2DConditionModel, blocks: int = 1) -> None:
        n = len(unet.down_blocks)
        if not 1 <= blocks < n:
            raise ConfigError(f"unet-lambda keeps 1..{n - 1} outer blocks on the device for this U-Net, got {blocks}")
        config: Any = unet.config  # a FrozenDict, read by attribute (ConfigMixin types it dict[str, Any])
        if config.class_embed_type is not None or config.time_cond_proj_dim is not None or config.encoder_hid_dim_type:
            raise ConfigError("unet-lambda does not support U-Nets with class embeddings or timestep conditions")
        if config.addition_embed_type not in (None, "text_time"):
            raise ConfigError(
                f"unet-lambda supports addition_embed_type None or 'text_time', not {config.addition_embed_type!r}"
            )
        self.unet, self.blocks = unet, blocks
        cloud_up = unet.up_blocks[: n - blocks]
        self._cloud_skips = sum(len(resnets(b)) for b in cloud_up)
        produced = sum(len(resnets(b)) + (1 if b.downsamplers is not None else 0) for b in unet.down_blocks[blocks:])
        if self._cloud_skips != produced + 1 or unet.down_blocks[blocks - 1].downsamplers is None:
            raise ConfigError(f"this U-Net's skip connections do not line up at down block {blocks}")

    # --- device -------------------------------------------------------------------------------------------------
    def embed(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The time embedding (with SDXL's added conditions) that every resnet block takes."""
        u = self.unet
        emb = u.time_embedding(u.get_time_embed(sample=sample, timestep=timestep), None)
        aug = u.get_aug_embed(
            emb=emb,
            encoder_hidden_states=encoder_hidden_states,
            # diffusers types it dict[str, Any], yet its own forward passes None (no added conditions) as here
            added_cond_kwargs=added_cond_kwargs,  # type: ignore[arg-type]
        )
        emb = emb + aug if aug is not None else emb
        return u.time_embed_act(emb) if u.time_embed_act is not None else emb

    def outer_down(
        self, sample: torch.Tensor, emb: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """conv_in and the first k down blocks: (sample for the cloud, skips kept on the device)."""
        factor = 2**self.unet.num_upsamplers
        if any(side % factor for side in sample.shape[-2:]):
            raise ConfigError(f"unet-lambda needs latent sides divisible by {factor}, got {tuple(sample.shape[-2:])}")
        sample = self.unet.conv_in(sample)
        skips: tuple[torch.Tensor, ...] = (sample,)
        for block in self.unet.down_blocks[: self.blocks]:
            sample, res = self._down(block, sample, emb, context)
            skips += res
        return sample, skips[:-1]  # skips[-1] is `sample` itself: the cloud gets it with the sample

    def outer_up(
        self, sample: torch.Tensor, skips: tuple[torch.Tensor, ...], emb: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """The last k up blocks (on the device's skips) and the output convolution: the noise prediction."""
        u = self.unet
        sample = self._up(u.up_blocks[len(u.up_blocks) - self.blocks :], sample, skips, emb, context)
        if u.conv_norm_out is not None:
            sample = u.conv_act(u.conv_norm_out(sample))
        return u.conv_out(sample)

    # --- cloud --------------------------------------------------------------------------------------------------
    def inner(self, sample: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Down blocks k.., the mid block and the up blocks before the last k: sample in, sample out."""
        u = self.unet
        skips: tuple[torch.Tensor, ...] = (sample,)
        for block in u.down_blocks[self.blocks :]:
            sample, res = self._down(block, sample, emb, context)
            skips += res
        if u.mid_block is not None:
            if getattr(u.mid_block, "has_cross_attention", False):
                sample = u.mid_block(sample, emb, encoder_hidden_states=context)
            else:
                sample = u.mid_block(sample, emb)
        return self._up(u.up_blocks[: len(u.up_blocks) - self.blocks], sample, skips, emb, context)

    def drop(self, side: str) -> None:
        """Free the other side's weights: ``"device"`` keeps only the outer blocks, ``"cloud"`` only the inner."""
        u, n, k = self.unet, len(self.unet.down_blocks), self.blocks
        if side == "cloud":
            for i in range(k):
                u.down_blocks[i] = torch.nn.Identity()
                u.up_blocks[n - 1 - i] = torch.nn.Identity()
            u.conv_in = u.conv_out = torch.nn.Identity()  # type: ignore[assignment]  # diffusers declares Conv2d
        elif side == "device":
            for i in range(k, n):
                u.down_blocks[i] = torch.nn.Identity()
                u.up_blocks[n - 1 - i] = torch.nn.Identity()
            u.mid_block = None
        else:
            raise ConfigError(f"side is 'device' or 'cloud', not {side!r}")

    # --- the routing of UNet2DConditionModel.forward ---------------------------------------------------------------
    @staticmethod
    def _down(
        block: Any, sample: torch.Tensor, emb: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        if getattr(block, "has_cross_attention", False):
            return block(hidden_states=sample, temb=emb, encoder_hidden_states=context)
        return block(hidden_states=sample, temb=emb)

    @staticmethod
    def _up(
        blocks: Any, sample: torch.Tensor, skips: tuple[torch.Tensor, ...], emb: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        # upsample_size stays None: outer_down refuses latents whose sides need it (not multiples of 2^upsamplers).
        for block in blocks:
            res, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
            if getattr(block, "has_cross_attention", False):
                sample = block(
                    hidden_states=sample, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=context
                )
            else:
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res)
        return sample
