"""The clients' private images: the coloured-shapes dataset cut so that every client's images differ (non-IID).

Client k of K draws one shape (``SHAPES[k % 3]``), foreground colours from one pair of the palette and backgrounds
from another, over every position: with three clients no two share a shape, a shape colour or a background. A
client's images are rendered once from its own seed and stay in its process; the server never receives them (it
receives noised latents, which is another matter: docs/collafuse.md, "What the server learns").
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from lambdasplit.diffusion.shapes import COLOURS, POSITIONS, SHAPES, Scene, render
from lambdasplit.errors import ConfigError

_PAIRS = [list(COLOURS)[i : i + 2] for i in range(0, len(COLOURS), 2)]  # (red, green), (blue, yellow), (white, black)


def client_scenes(client: int, clients: int) -> list[Scene]:
    """Every scene client ``client`` (0-based) of ``clients`` may draw: its shape, colours and backgrounds."""
    if clients < 1:
        raise ConfigError(f"CollaFuse needs at least one client, got {clients}")
    if not 0 <= client < clients:
        raise ConfigError(f"client index {client} is outside 0..{clients - 1}")
    shape = SHAPES[client % len(SHAPES)]
    colours, backgrounds = _PAIRS[client % len(_PAIRS)], _PAIRS[(client + 1) % len(_PAIRS)]
    return [Scene(c, shape, p, b) for c in colours for p in POSITIONS for b in backgrounds]


@dataclass
class ClientImages:
    """One client's images (N, 3, 32, 32) in [-1, 1] and their captions."""

    images: torch.Tensor
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def client_images(client: int, clients: int, count: int, seed: int) -> ClientImages:
    """``count`` images of client ``client``'s distribution, drawn and rendered from ``seed``."""
    if count < 1:
        raise ConfigError(f"a client needs at least one image, got {count}")
    scenes = client_scenes(client, clients)
    rng = random.Random(seed * 1_000 + client)
    drawn = [rng.choice(scenes) for _ in range(count)]
    return ClientImages(render(drawn, seed=seed * 1_000 + client), [s.caption for s in drawn])
