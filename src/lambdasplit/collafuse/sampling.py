"""Collaborative sampling, batched: the server's U-Net from T down to t_c, the client's U-Net from there to 0.

The same hand-off as a split ``imagine --policy collafuse`` session (one latent crosses once), run in one process
for the measurements, which need hundreds of images per client and cut ratio.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

from lambdasplit.collafuse.model import ddpm_scheduler, handoff_timestep
from lambdasplit.errors import ConfigError


@dataclass
class Sampled:
    latents: torch.Tensor  # (N, C, h, w): the final latents
    handed_over: torch.Tensor  # the latents after the server's last step (the initial noise when c = 0)
    server_steps: int
    server_cpu_seconds: float = 0.0  # this process's CPU time in each side's U-Net calls
    client_cpu_seconds: float = 0.0


@torch.no_grad()
def sample(
    server: UNet2DConditionModel | None,
    client: UNet2DConditionModel | None,
    cut_ratio: float,
    contexts: torch.Tensor,
    latent_shape: tuple[int, int, int],
    *,
    steps: int = 50,
    generator: torch.Generator,
    batch: int = 128,
) -> Sampled:
    """DDPM with ``steps`` steps for each row of ``contexts``; t > t_c on ``server``, the rest on ``client``.

    The noise comes from ``generator`` (a CPU one), so a run on CUDA draws what a run on the CPU does.
    """
    t_c = handoff_timestep(cut_ratio)
    device = next(u for u in (server, client) if u is not None).device
    scheduler = ddpm_scheduler()
    scheduler.set_timesteps(steps)
    x = torch.randn((len(contexts), *latent_shape), generator=generator).to(device)  # the CPU generator's draws
    contexts = contexts.to(device)
    handed = x.clone()
    server_steps = 0
    cpu = {True: 0.0, False: 0.0}
    for t in scheduler.timesteps:
        on_server = int(t) > t_c
        unet = server if on_server else client
        if unet is None:
            raise ConfigError(f"timestep {int(t)} needs the {'server' if on_server else 'client'}'s U-Net")
        start = time.process_time()
        eps = torch.cat(
            [unet(x_b, t, c_b).sample for x_b, c_b in zip(x.split(batch), contexts.split(batch), strict=True)]
        )
        cpu[on_server] += time.process_time() - start
        x = scheduler.step(eps, t, x, generator=generator, return_dict=False)[0]
        if on_server:
            handed, server_steps = x.clone(), server_steps + 1
    return Sampled(x.cpu(), handed.cpu(), server_steps, cpu[True], cpu[False])
