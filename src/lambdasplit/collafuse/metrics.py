"""The measurements of CollaFuse's paper, offline: KID in the features of a shapes classifier, and pixel MSE.

KID needs image features. Inception-v3's (the usual ones) cannot be downloaded here, and they were learned on
photographs. `ShapeFeatures` is a small CNN trained by `train_features` on the procedural shapes to name each
image's shape colour, shape, position and background: its 128 penultimate features (scaled to a fixed norm) are
what tells these images apart, and it names the attributes of held-out renders almost perfectly (`train_features`
returns the accuracy).
KID itself is torchmetrics' `KernelInceptionDistance` (unbiased polynomial-kernel MMD) over these features.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lambdasplit.diffusion.shapes import COLOURS, POSITIONS, SHAPES, Scene, random_scenes, render

_HEADS = {"colour": list(COLOURS), "shape": list(SHAPES), "position": list(POSITIONS), "background": list(COLOURS)}


class ShapeFeatures(nn.Module):
    """(N, 3, 32, 32) images in [0, 1] -> (N, 128) features; ``heads`` name the scene's attributes in training."""

    def __init__(self, width: int = 32, features: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(2 * width * 16, features), nn.SiLU(),
        )  # fmt: skip
        self.heads = nn.ModuleDict({k: nn.Linear(features, len(v)) for k, v in _HEADS.items()})

    def attributes(self, images: torch.Tensor) -> torch.Tensor:
        """The penultimate features the heads read."""
        return self.body(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """KID's features: the penultimate ones scaled to norm sqrt(d), so the kernel's x.y / d lies in [-1, 1]."""
        features = self.attributes(images)
        return F.normalize(features, dim=1) * features.shape[1] ** 0.5


def _targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([v.index(getattr(s, k)) for s in scenes]) for k, v in _HEADS.items()}


@dataclass
class TrainedFeatures:
    model: ShapeFeatures
    accuracy: dict[str, float]  # per attribute, on 1,000 held-out renders


def train_features(steps: int = 1500, batch: int = 128, seed: int = 0, width: int = 32) -> TrainedFeatures:
    """Train `ShapeFeatures` to name the attributes of freshly drawn scenes (every scene of the dataset)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ShapeFeatures(width)
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
        for step in range(steps):
            scenes = random_scenes(batch, seed=seed * 100_000 + step)
            images = render(scenes, seed=seed * 100_000 + step) / 2 + 0.5
            features = model.attributes(images)
            loss = sum(
                F.cross_entropy(head(features), target)
                for head, target in zip(model.heads.values(), _targets(scenes).values(), strict=True)
            )
            optimizer.zero_grad()
            loss.backward()  # type: ignore[union-attr]  # a sum of tensors
            optimizer.step()
    return TrainedFeatures(model.eval().requires_grad_(False), attribute_accuracy(model, seed=seed + 7))


@torch.no_grad()
def attribute_accuracy(model: ShapeFeatures, seed: int, count: int = 1000) -> dict[str, float]:
    scenes = random_scenes(count, seed=10_000_000 + seed)
    features = model.attributes(render(scenes, seed=10_000_000 + seed) / 2 + 0.5)
    targets = _targets(scenes)
    return {k: float((model.heads[k](features).argmax(-1) == targets[k]).float().mean()) for k in _HEADS}


def cached_features(steps: int = 1500, seed: int = 0, folder: Path | None = None) -> TrainedFeatures:
    """`train_features` once per (steps, seed), kept in lambdasplit's cache folder (about 1 MB)."""
    folder = folder or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lambdasplit"
    key = hashlib.sha256(f"shape-features-v1-{steps}-{seed}".encode()).hexdigest()[:12]
    path = folder / f"shape-features-{key}.safetensors"
    if path.is_file():
        model = ShapeFeatures()
        model.load_state_dict(load_file(path))
        model.eval().requires_grad_(False)
        return TrainedFeatures(model, attribute_accuracy(model, seed=seed + 7))
    trained = train_features(steps, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(trained.model.state_dict(), str(path))
    return trained


def kid(features: ShapeFeatures, real: torch.Tensor, fake: torch.Tensor, subset_size: int = 100) -> tuple[float, float]:
    """Kernel Inception Distance between two image sets in [0, 1], in ``features``' space (torchmetrics): the mean
    and standard deviation over 50 subsets. The estimator is unbiased, so sets from one distribution score
    around 0, sometimes below."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(fake))
    metric = KernelInceptionDistance(feature=features, subsets=50, subset_size=size)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the subsets are drawn at random: the same ones on every call
        mean, std = metric.compute()
    return float(mean), float(std)


def nearest_mse(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Each image's pixel MSE to its nearest reference image (images in [0, 1]): (N,)."""
    flat, refs = images.flatten(1), references.flatten(1)
    distances = torch.cdist(flat, refs).pow(2) / flat.shape[1]
    return distances.min(dim=1).values
