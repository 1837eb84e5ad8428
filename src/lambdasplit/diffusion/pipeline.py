"""The device's ends of a split text-to-image pipeline: diffusers' own components, called in the pipeline's order.

Head: ``encode_prompt`` (tokenizer and text encoders), the initial latent (``prepare_latents`` with the one seeded
generator) and, for SDXL, the added conditions. Tail: the scheduler step and the VAE decoder. What runs between
them (the U-Net, whole or in part, on either side) is the policy's business: `SplitPipeline` in
`lambdasplit.diffusion.device` on the device, `DiffusionSession` in `lambdasplit.diffusion.cloud` on the cloud.

Every step mirrors `StableDiffusionPipeline.__call__` / `StableDiffusionXLPipeline.__call__` (diffusers 0.3x-0.4x)
for the features lambdasplit supports: one prompt, one image, classifier-free guidance, no IP-adapter,
ControlNet or guidance rescale; the equivalence tests hold it to the unsplit pipeline bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers.configuration_utils import FrozenDict
from transformers.utils import logging as _hf_logging

from lambdasplit.config import Runtime
from lambdasplit.diffusion.protocol import DEFAULT_PIPELINE
from lambdasplit.errors import ConfigError, ModelLoadError

# diffusers' SD pipelines import transformers' CLIPImageProcessor (for the safety checker, unused here), which
# warns twice on every start when torchvision is absent; lambdasplit never uses image processors.
_verbosity = _hf_logging.get_verbosity()
_hf_logging.set_verbosity_error()
try:
    # From the modules that define them (the same classes at run time): for a type checker, `from diffusers
    # import X` resolves to diffusers' placeholder classes for missing backends, which have no attributes.
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
finally:
    _hf_logging.set_verbosity(_verbosity)

Family = Literal["sd", "sdxl"]
#: Where the embedded default model lives inside the package (trained by scripts/train_shapes_t2i.py).
_EMBEDDED = {DEFAULT_PIPELINE: "default_model"}


def pipeline_path(source: str | Path) -> str:
    """A local folder or hub id for ``source``; ``"shapes-t2i"`` is the embedded default model."""
    if str(source) in _EMBEDDED:
        return str(resources.files("lambdasplit.diffusion") / _EMBEDDED[str(source)])
    return str(source)


def family_of(pipe: DiffusionPipeline) -> Family:
    if isinstance(pipe, StableDiffusionXLPipeline):
        return "sdxl"
    if isinstance(pipe, StableDiffusionPipeline):
        return "sd"
    raise ModelLoadError(
        f"{type(pipe).__name__} is not supported: lambdasplit splits StableDiffusionPipeline (SD 1.x/2.x) and "
        "StableDiffusionXLPipeline text-to-image pipelines"
    )


def load_pipeline(
    source: str | Path = DEFAULT_PIPELINE,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    unet: bool = True,
) -> DiffusionPipeline:
    """The diffusers pipeline at ``source`` (folder, hub id or ``"shapes-t2i"``) on the chosen device and dtype.

    ``unet=False`` leaves the U-Net's weights on disk: a paper-policy device never runs it (its config is read
    by `load_unet_config`).
    """
    rt = Runtime.resolve(device, dtype)
    path = pipeline_path(source)
    skip = {} if unet else {"unet": None}
    try:
        with _quiet():
            pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=rt.dtype, **skip)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a diffusers pipeline from {source!r}: {exc}") from exc
    family_of(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(rt.device)


def load_unet(
    source: str | Path = DEFAULT_PIPELINE,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> UNet2DConditionModel:
    """Only the U-Net of the pipeline at ``source``: all the cloud loads."""
    rt = Runtime.resolve(device, dtype)
    try:
        with _quiet():
            unet = UNet2DConditionModel.from_pretrained(pipeline_path(source), subfolder="unet", torch_dtype=rt.dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the U-Net of {source!r}: {exc}") from exc
    return unet.to(rt.device).eval()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """diffusers >= 0.40 renames ``torch_dtype`` to ``dtype`` with a FutureWarning; older ones know only the first."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        yield


def load_unet_config(source: str | Path = DEFAULT_PIPELINE) -> Any:
    """The U-Net's config alone (no weights), as a FrozenDict with attribute access."""
    try:
        return FrozenDict(UNet2DConditionModel.load_config(pipeline_path(source), subfolder="unet"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the U-Net config of {source!r}: {exc}") from exc


def unet_fingerprint(unet_config: Any) -> str:
    """Short hash of the U-Net's architecture; device and cloud must agree on it (HELLO's fingerprint)."""
    items = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Conditioning:
    """What the head produces for one image: everything a U-Net call needs besides the latent and the timestep."""

    prompt_embeds: torch.Tensor  # (B, L, D); B = 2 with guidance: [negative, positive]
    added: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL: text_embeds (B, P), time_ids (B, 6)
    guidance_scale: float = 7.5

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": self.prompt_embeds, **self.added}


@dataclass
class Denoising:
    """One image being made on the device: its conditioning, scheduler, generator and latent."""

    conditioning: Conditioning
    scheduler: Any
    generator: torch.Generator
    latents: torch.Tensor  # the initial latent (1, C, h, w), already scaled by init_noise_sigma
    timesteps: torch.Tensor
    extra_step_kwargs: dict[str, Any]


class DeviceEnds:
    """Head and tail of a diffusers SD/SDXL pipeline, for one prompt and one image at a time."""

    def __init__(self, pipe: DiffusionPipeline, unet_config: Any = None) -> None:
        self.pipe, self.family = pipe, family_of(pipe)
        self.device = pipe._execution_device
        self.device_dtype = (
            pipe.text_encoder.dtype if getattr(pipe, "text_encoder", None) is not None else torch.float32
        )
        if unet_config is None and getattr(pipe, "unet", None) is not None:
            unet_config = pipe.unet.config
        self.unet_config = unet_config

    def start(
        self,
        prompt: str,
        *,
        steps: int,
        seed: int,
        guidance_scale: float = 7.5,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> Denoising:
        """The head: prompt embeddings (and SDXL's added conditions), timesteps, and the seeded initial latent."""
        if steps < 1:
            raise ConfigError(f"steps must be >= 1, got {steps}")
        pipe, unet_config = self.pipe, self.unet_config
        if unet_config is None:
            raise ConfigError("a pipeline loaded without its U-Net needs the U-Net's config (load_unet_config)")
        factor = pipe.vae_scale_factor
        height = height or unet_config.sample_size * factor
        width = width or unet_config.sample_size * factor
        if height % 8 or width % 8:
            raise ConfigError(f"height and width must be multiples of 8, got {height}x{width}")
        guided = guidance_scale > 1.0
        generator = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            if self.family == "sdxl":
                added, embeds = self._encode_sdxl(prompt, negative_prompt, guided, height, width)
            else:
                embeds, negative = pipe.encode_prompt(prompt, self.device, 1, guided, negative_prompt)
                embeds = torch.cat([negative, embeds]) if guided else embeds
                added = {}
            scheduler = pipe.scheduler
            try:
                scheduler.set_timesteps(steps, device=self.device)
            except ValueError as exc:
                raise ConfigError(f"{type(scheduler).__name__} cannot run {steps} steps: {exc}") from None
            timesteps = scheduler.timesteps
            latents = pipe.prepare_latents(
                1, unet_config.in_channels, height, width, embeds.dtype, self.device, generator, None
            )
        if self.family == "sdxl" and hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        return Denoising(
            Conditioning(embeds, added, guidance_scale),
            scheduler,
            generator,
            latents,
            timesteps,
            pipe.prepare_extra_step_kwargs(generator, 0.0),
        )

    def _encode_sdxl(
        self, prompt: str, negative_prompt: str | None, guided: bool, height: int, width: int
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        pipe = self.pipe
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompt,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=guided,
            negative_prompt=negative_prompt,
        )
        # What StableDiffusionXLPipeline._get_add_time_ids returns for the defaults (original and target size =
        # the image's, no crop), without reading the U-Net it checks against: the cloud checks the widths instead.
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=embeds.dtype)
        if guided:
            embeds = torch.cat([negative, embeds])
            pooled = torch.cat([negative_pooled, pooled])
            time_ids = torch.cat([time_ids, time_ids])
        return {"text_embeds": pooled.to(self.device), "time_ids": time_ids.to(self.device)}, embeds.to(self.device)

    def step(self, denoising: Denoising, noise: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The tail's scheduler step on the (guided) noise prediction."""
        return denoising.scheduler.step(noise, t, latents, **denoising.extra_step_kwargs, return_dict=False)[0]

    def decode(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The tail's VAE decoder: final latent -> (1, 3, H, W) image in [0, 1] (the pipeline's "pt" output)."""
        pipe, vae = self.pipe, self.pipe.vae
        with torch.no_grad():
            if self.family == "sdxl":
                upcast = vae.dtype == torch.float16 and vae.config.force_upcast
                if upcast:
                    pipe.upcast_vae()
                    latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
                mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
                if mean is not None and std is not None:
                    view = (1, len(mean), 1, 1)
                    mean_t = torch.tensor(mean).view(view).to(latents.device, latents.dtype)
                    std_t = torch.tensor(std).view(view).to(latents.device, latents.dtype)
                    latents = latents * std_t / vae.config.scaling_factor + mean_t
                else:
                    latents = latents / vae.config.scaling_factor
                image = vae.decode(latents, return_dict=False)[0]
                if upcast:
                    vae.to(dtype=torch.float16)
            else:
                kwargs = {"generator": generator} if "generator" in inspect.signature(vae.decode).parameters else {}
                image = vae.decode(latents / vae.config.scaling_factor, return_dict=False, **kwargs)[0]
            return pipe.image_processor.postprocess(image, output_type="pt", do_denormalize=[True] * image.shape[0])


def guide(noise_pred: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on a [negative, positive] batch, as the pipelines compute it."""
    if guidance_scale <= 1.0:
        return noise_pred
    uncond, text = noise_pred.chunk(2)
    return uncond + guidance_scale * (text - uncond)


def model_input(scheduler: Any, latents: torch.Tensor, t: torch.Tensor, guided: bool) -> torch.Tensor:
    """The U-Net's input at timestep ``t``: the latent, doubled for guidance, scaled by the scheduler."""
    x = torch.cat([latents] * 2) if guided else latents
    return scheduler.scale_model_input(x, t)
