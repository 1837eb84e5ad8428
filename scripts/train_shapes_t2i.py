"""Train lambdasplit's embedded default text-to-image model on the procedural coloured-shapes dataset.

    python scripts/train_shapes_t2i.py --out src/lambdasplit/diffusion/default_model

A Stable Diffusion 1.x pipeline in miniature, all diffusers/transformers classes: a CLIP tokenizer whose every
caption word is one token, a 2-layer CLIPTextModel, an AutoencoderKL (32x32x3 images <-> 16x16x4 latents) and a
3-level UNet2DConditionModel with cross-attention. The VAE is trained first, then the U-Net and text encoder
together on its latents with 10% caption dropout (for classifier-free guidance). Everything is drawn on the fly
by `lambdasplit.diffusion.shapes` from fixed seeds, so a run is reproducible; weights are saved in float16.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import CLIPTextModel, CLIPTokenizer

from lambdasplit.diffusion.shapes import SIZE, random_scenes, render, shapes_text_config, shapes_tokenizer

SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def components(folder: Path) -> tuple[CLIPTokenizer, CLIPTextModel, AutoencoderKL, UNet2DConditionModel]:
    tokenizer = shapes_tokenizer(folder / "tokenizer")
    text_encoder = CLIPTextModel(shapes_text_config(tokenizer))
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=SIZE,
    )
    unet = UNet2DConditionModel(
        sample_size=SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    return tokenizer, text_encoder, vae, unet


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
    )


def lr_at(step: int, steps: int, peak: float) -> float:
    warmup = min(200, steps // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_vae(vae: AutoencoderKL, steps: int, batch: int) -> float:
    """Reconstruction (L1 + MSE) with a small KL term; returns the latent scaling factor (1 / latent std)."""
    optim = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    with progress() as bar:
        task = bar.add_task("VAE", total=steps, loss=0.0)
        for step in range(steps):
            images = render(random_scenes(batch, seed=1_000_000 + step), seed=step)
            posterior = vae.encode(images).latent_dist
            recon = vae.decode(posterior.sample()).sample
            loss = F.l1_loss(recon, images) + F.mse_loss(recon, images) + 1e-6 * posterior.kl().mean()
            for group in optim.param_groups:
                group["lr"] = lr_at(step, steps, 1e-3)
            optim.zero_grad()
            loss.backward()
            optim.step()
            bar.update(task, advance=1, loss=loss.item())
    with torch.no_grad():
        latents = vae.encode(render(random_scenes(512, seed=7), seed=7)).latent_dist.mean
    return float(1.0 / latents.std())


def train_unet(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    scaling: float,
    steps: int,
    batch: int,
) -> None:
    noise_scheduler = DDPMScheduler(**SCHEDULE)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optim = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-4)
    vae.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    with progress() as bar:
        task = bar.add_task("U-Net", total=steps, loss=0.0)
        for step in range(steps):
            scenes = random_scenes(batch, seed=step)
            captions = [s.caption if torch.rand((), generator=gen) > 0.1 else "" for s in scenes]
            with torch.no_grad():
                latents = vae.encode(render(scenes, seed=step)).latent_dist.sample(gen) * scaling
            ids = tokenizer(captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
            context = text_encoder(ids.input_ids)[0]
            noise = torch.randn(latents.shape, generator=gen)
            t = torch.randint(0, 1000, (batch,), generator=gen)
            pred = unet(noise_scheduler.add_noise(latents, noise, t), t, context).sample
            loss = F.mse_loss(pred, noise)
            for group in optim.param_groups:
                group["lr"] = lr_at(step, steps, 5e-4)
            optim.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            bar.update(task, advance=1, loss=loss.item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the diffusers pipeline")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--unet-steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    tokenizer, text_encoder, vae, unet = components(args.out)
    scaling = train_vae(vae, args.vae_steps, args.batch)
    vae.register_to_config(scaling_factor=scaling)
    train_unet(tokenizer, text_encoder, vae, unet, scaling, args.unet_steps, args.batch)
    scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(args.out, safe_serialization=True)
    print(f"saved to {args.out} after {time.perf_counter() - started:.0f} s (VAE scaling factor {scaling:.4f})")


if __name__ == "__main__":
    main()
