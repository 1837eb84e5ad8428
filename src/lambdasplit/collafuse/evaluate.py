"""CollaFuse's measurements for one trained deployment (a server U-Net and its clients' U-Nets).

Per client: image quality (KID of collaboratively generated images against held-out images of the client's own
distribution), how well generated images follow their captions (the shapes detector), the paper's disclosure
(the server's images at t_c, decoded, against the client's private images: KID and nearest-image pixel MSE), the
client's compute per image, and one measurement the paper does not make: the server inverting its own training
traffic. A training row carries x_t, the noise and t, so x_0 = (x_t - sqrt(1 - a_t) noise) / sqrt(a_t) is
exact up to the wire's rounding; `inverted` decodes it and compares it with the client's private images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

from lambdasplit.collafuse.data import client_images
from lambdasplit.collafuse.messages import Batch
from lambdasplit.collafuse.metrics import ShapeFeatures, kid, nearest_mse
from lambdasplit.collafuse.model import PublicParts, ddpm_scheduler
from lambdasplit.collafuse.sampling import sample
from lambdasplit.diffusion.shapes import detect


@dataclass
class ClientFigures:
    client: int
    kid: float  # generated vs the client's held-out images
    kid_std: float  # over KID's subsets
    adherence: float | None  # share of images whose detected scene is their caption's (conditional only)
    disclosure_kid: float  # the server's images at t_c vs the client's private images
    disclosure_kid_std: float
    disclosure_mse: float  # median nearest-private-image pixel MSE of the server's images at t_c
    client_cpu_seconds_per_image: float
    server_cpu_seconds_per_image: float
    inverted_mse: float | None  # median nearest-private-image MSE of x_0 inverted from training rows
    inverted_rows: int


def inverted(parts: PublicParts, batches: list[Batch]) -> torch.Tensor:
    """The images a server reads back from training rows: x_0 from (x_t, noise, t), decoded. (N, 3, H, W) in [0, 1]."""
    alphas = ddpm_scheduler().alphas_cumprod
    rows = [b for b in batches if len(b)]
    if not rows:
        return torch.empty(0, 3, 0, 0)
    x_t = torch.cat([b.x_t.float() for b in rows])
    noise = torch.cat([b.noise.float() for b in rows])
    a = alphas[torch.cat([b.t for b in rows])].view(-1, 1, 1, 1)
    return parts.decode((x_t - (1 - a).sqrt() * noise) / a.sqrt())


def evaluate_client(
    parts: PublicParts,
    features: ShapeFeatures,
    server: UNet2DConditionModel | None,
    client: UNet2DConditionModel | None,
    *,
    index: int,
    clients: int,
    cut_ratio: float,
    private_images: int,
    data_seed: int,
    count: int,
    steps: int,
    conditional: bool,
    traffic: list[Batch],
    seed: int = 1234,
) -> ClientFigures:
    """Generate ``count`` images for client ``index`` (captions of fresh draws from its distribution) and score
    them; ``traffic`` is what the server received from this client (possibly a sample of it)."""
    private = client_images(index, clients, private_images, seed=data_seed)
    held_out = client_images(index, clients, count, seed=data_seed + 100)
    captions = held_out.captions if conditional else [""] * count
    contexts = parts.contexts(captions)
    for unet in (server, client):
        if unet is not None:
            unet.eval()
    generator = torch.Generator().manual_seed(seed + index)
    out = sample(server, client, cut_ratio, contexts, parts.latent_shape, steps=steps, generator=generator)
    images = parts.decode(out.latents)
    at_handoff = parts.decode(out.handed_over)
    private01, held01 = private.images / 2 + 0.5, held_out.images / 2 + 0.5
    adherence = None
    if conditional:
        hits = [detect(image) for image in images]
        adherence = sum(h is not None and h.caption == c for h, c in zip(hits, captions, strict=True)) / count
    one = sample(server, client, cut_ratio, contexts[:4], parts.latent_shape, steps=steps, generator=generator, batch=1)
    readback = inverted(parts, traffic)
    quality, quality_std = kid(features, held01, images)
    disclosed, disclosed_std = kid(features, private01, at_handoff)
    return ClientFigures(
        client=index,
        kid=quality,
        kid_std=quality_std,
        adherence=adherence,
        disclosure_kid=disclosed,
        disclosure_kid_std=disclosed_std,
        disclosure_mse=float(nearest_mse(at_handoff, private01).median()),
        client_cpu_seconds_per_image=one.client_cpu_seconds / 4,
        server_cpu_seconds_per_image=one.server_cpu_seconds / 4,
        inverted_mse=float(nearest_mse(readback, private01).median()) if len(readback) else None,
        inverted_rows=len(readback),
    )
