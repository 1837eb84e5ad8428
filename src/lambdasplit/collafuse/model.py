"""What CollaFuse's server and clients train: a U-Net each, over the public parts of a Stable Diffusion pipeline.

Both sides load the same public, frozen parts (tokenizer, text encoder and VAE of the pipeline they start from, the
embedded ``shapes-t2i`` by default) and train a fresh `UNet2DConditionModel` of that pipeline's architecture on
its latents with diffusers' DDPM noise schedule. The cut ratio c is the server's share of the denoising: the
hand-off timestep is t_c = (1 - c) T; the server's model learns the timesteps t > t_c, each client's the rest.

A trained side exports a diffusers pipeline folder (`export_pipeline`) with a DDPM scheduler, so inference runs
through the split diffusion server: ``lambdasplit serve --pipeline SERVER`` and ``lambdasplit imagine --pipeline
CLIENT --policy collafuse --cut-ratio c``.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from transformers import CLIPTextModel, CLIPTokenizer

from lambdasplit.config import Runtime
from lambdasplit.diffusion.pipeline import load_pipeline, pipeline_path, unet_fingerprint
from lambdasplit.errors import ConfigError, ModelLoadError

#: diffusers builds and loads models inside accelerate's ``init_empty_weights``, which patches torch.nn.Module
#: for the whole process; two threads doing it at once can leave the patch in place (every later module on the
#: meta device). Clients and servers in one process (tests, benchmarks) build their U-Nets one at a time.
_BUILDING = threading.Lock()

#: diffusers' DDPM schedule of the embedded pipeline (its training schedule).
TRAIN_TIMESTEPS = 1000


def handoff_timestep(cut_ratio: float, timesteps: int = TRAIN_TIMESTEPS) -> int:
    """t_c = (1 - c) T: the server's model takes t > t_c, the client's t <= t_c."""
    if not isinstance(cut_ratio, int | float) or not 0.0 <= cut_ratio <= 1.0:
        raise ConfigError(f"the cut ratio c (the server's share of the steps) is in [0, 1], got {cut_ratio!r}")
    return round((1.0 - cut_ratio) * timesteps)


def ddpm_scheduler(**overrides: Any) -> DDPMScheduler:
    """The training and sampling schedule: the embedded pipeline's betas, DDPM, "trailing" timesteps.

    With trailing spacing the N sampling timesteps are ``T k / N - 1``: none equals a t_c of the form ``(1 - c) T``,
    and the server's share of N steps (t > t_c) is exactly ``c N`` when that is a whole number.
    """
    return DDPMScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        timestep_spacing="trailing",
        steps_offset=1,  # unused by trailing spacing; StableDiffusionPipeline warns on any other value
        **overrides,
    )


@dataclass
class PublicParts:
    """The frozen parts both sides hold: tokenizer and text encoder (captions -> contexts), VAE (images <-> latents),
    and the U-Net architecture to train."""

    source: str
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet_config: dict[str, Any]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where the models compute

    @classmethod
    def load(
        cls,
        source: str | Path = "shapes-t2i",
        unet_config: dict[str, Any] | None = None,
        device: str | torch.device | None = "cpu",
    ) -> PublicParts:
        """The public parts of ``source`` on ``device`` (None: CUDA if there is one), float32: they train."""
        runtime = Runtime.resolve(device, "float32")
        pipe = load_pipeline(source, device=runtime.device, dtype="float32", unet=False)
        if unet_config is None:
            try:
                unet_config = dict(UNet2DConditionModel.load_config(pipeline_path(source), subfolder="unet"))
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"cannot read the U-Net config of {source!r}: {exc}") from exc
        for part in (pipe.text_encoder, pipe.vae):
            part.requires_grad_(False).eval()
        return cls(str(source), pipe.tokenizer, pipe.text_encoder, pipe.vae, unet_config, runtime.device)

    @property
    def fingerprint(self) -> str:
        return unet_fingerprint(self.unet_config)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = int(self.unet_config["sample_size"])
        return int(self.unet_config["in_channels"]), side, side

    @torch.no_grad()
    def contexts(self, captions: list[str]) -> torch.Tensor:
        """The text encoder's (N, L, D) contexts (on the CPU, as every tensor these methods return); ``""`` for an
        unconditional model."""
        ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.device))[0].cpu()

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (the posterior's mean: deterministic)."""
        scaling = float(self.vae.config["scaling_factor"])
        latents = [self.vae.encode(x.to(self.device)).latent_dist.mean * scaling for x in images.split(batch)]
        return torch.cat(latents).cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """Scaled latents -> images in [0, 1]."""
        scaling = float(self.vae.config["scaling_factor"])
        out = [self.vae.decode(z.to(self.device) / scaling).sample for z in latents.split(batch)]
        return (torch.cat(out) / 2 + 0.5).clamp(0, 1).cpu()

    def new_unet(self, seed: int) -> UNet2DConditionModel:
        with _BUILDING, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel.from_config(self.unet_config)  # drawn on the CPU: the same on any device
        return unet.to(self.device)


class Learner:
    """One side's U-Net with its optimiser: ``step`` on (x_t, noise, t, context) rows, checkpoints on disk."""

    def __init__(self, unet: UNet2DConditionModel, lr: float = 1e-3) -> None:
        self.unet = unet.train()
        self.lr = lr
        self.optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-4)
        self.steps = 0
        self.samples = 0
        self.cpu_seconds = 0.0

    def step(self, x_t: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> float | None:
        """One AdamW step on the epsilon-prediction loss; None (no step) for an empty batch."""
        if len(t) == 0:
            return None
        start = time.process_time()
        device = next(self.unet.parameters()).device
        x_t, noise, t, context = (x.to(device) for x in (x_t, noise, t, context))
        pred = self.unet(x_t.float(), t, context.float()).sample
        loss = F.mse_loss(pred, noise.float())
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.optimizer.step()
        self.steps += 1
        self.samples += len(t)
        self.cpu_seconds += time.process_time() - start
        return float(loss.detach())

    def save(self, folder: Path, state: dict[str, Any]) -> None:
        """The U-Net (diffusers folder), the optimiser and ``state`` (the round reached, ...) under ``folder``.

        Everything is written beside the checkpoint first, then swapped in with ``state.json`` last, after the old
        one was removed: a process killed while saving leaves the last checkpoint whole, or no ``state.json``
        (``has_checkpoint`` then refuses to resume), never new weights under an old round."""
        folder.mkdir(parents=True, exist_ok=True)
        unet, optimizer, state_file = folder / "unet.partial", folder / "optimizer.pt.partial", folder / "state.partial"
        self.unet.save_pretrained(unet)
        torch.save(self.optimizer.state_dict(), optimizer)
        counters = {"steps": self.steps, "samples": self.samples, "cpu_seconds": self.cpu_seconds}
        state_file.write_text(json.dumps({**state, **counters}, indent=1))
        (folder / "state.json").unlink(missing_ok=True)
        shutil.rmtree(folder / "unet", ignore_errors=True)
        unet.rename(folder / "unet")
        optimizer.replace(folder / "optimizer.pt")
        state_file.replace(folder / "state.json")

    @staticmethod
    def has_checkpoint(folder: Path) -> bool:
        """Whether ``folder`` holds a checkpoint to resume from; one left half-written (the process was killed while
        saving) is a ``ModelLoadError`` rather than a fresh start that would overwrite it."""
        if (folder / "state.json").is_file():
            return True
        if (folder / "unet").exists() or (folder / "unet.partial").exists():
            raise ModelLoadError(
                f"the checkpoint in {folder} is incomplete (no state.json: the process was killed while saving it); "
                "start without --resume in a new folder, or restore the folder from a copy"
            )
        return False

    @classmethod
    def resume(
        cls, folder: Path, lr: float = 1e-3, device: torch.device | str = "cpu"
    ) -> tuple[Learner, dict[str, Any]]:
        try:
            with _BUILDING:
                unet = UNet2DConditionModel.from_pretrained(folder / "unet")
            unet = unet.to(device)
            state = json.loads((folder / "state.json").read_text())
            learner = cls(unet, lr)
            saved = torch.load(folder / "optimizer.pt", weights_only=True, map_location=device)
            learner.optimizer.load_state_dict(saved)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot resume from the checkpoint in {folder}: {exc}") from exc
        learner.steps, learner.samples = int(state["steps"]), int(state["samples"])
        learner.cpu_seconds = float(state["cpu_seconds"])
        return learner, state


def noised(latents: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, noise, t) for a batch of clean latents, t uniform over the training timesteps."""
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, TRAIN_TIMESTEPS, (len(latents),), generator=generator)
    return _SCHEDULE.add_noise(latents, noise, cast(torch.IntTensor, t)), noise, t


_SCHEDULE = ddpm_scheduler()


def export_pipeline(parts: PublicParts, unet: UNet2DConditionModel, out: Path) -> Path:
    """A diffusers pipeline folder: ``parts``' tokenizer, text encoder and VAE, this U-Net, the DDPM schedule."""
    source = Path(pipeline_path(parts.source))
    if not (source / "model_index.json").is_file():
        raise ModelLoadError(f"exporting needs the public pipeline as a local folder; {parts.source!r} is not one")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer", "text_encoder", "vae"):
        shutil.rmtree(out / name, ignore_errors=True)
        shutil.copytree(source / name, out / name)
    index = json.loads((source / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "DDPMScheduler"]
    (out / "model_index.json").write_text(json.dumps(index, indent=1))
    ddpm_scheduler().save_pretrained(out / "scheduler")
    unet.save_pretrained(out / "unet")
    return out
