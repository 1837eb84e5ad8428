"""Tensors as pictures: the image so far, and what crossed the wire (the Λ-Split paper's Fig. 5).

``picture`` turns a decoded image (1, 3, H, W) in [0, 1] into a PIL image. ``wire_picture`` shows a tensor the
cloud sent, clipped to +-3 (the paper's Fig. 5(b)): a 4-channel latent-shaped tensor (the noise prediction) as an
RGBA image, as the paper draws SDXL's; any other channel count as a grid of grey tiles, one per channel (the
first 16). ``png`` encodes either for the web UI and the CLI.
"""

from __future__ import annotations

import io
import math
from typing import Any

import torch

#: The paper clips the transmitted noise to this many standard deviations before drawing it.
CLIP = 3.0
#: Channels drawn at most, as tiles, for tensors that are not 3- or 4-channel.
MAX_TILES = 16


def picture(image: torch.Tensor) -> Any:
    """A (1, 3, H, W) or (3, H, W) image in [0, 1] as a PIL RGB image."""
    from PIL import Image

    x = image[0] if image.dim() == 4 else image
    array = (x.detach().float().permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(array)


def wire_picture(tensor: torch.Tensor, clip: float = CLIP) -> Any:
    """A transmitted (B, C, h, w) or (C, h, w) tensor as a picture: values in [-clip, clip] mapped to 0..255.

    With classifier-free guidance the cloud's tensors may carry a batch of 2; the last (the prompt's) is drawn.
    """
    from PIL import Image

    if tensor.dim() == 4:
        tensor = tensor[-1]
    if tensor.dim() != 3:
        raise ValueError(f"a wire picture needs a (C, h, w) tensor, got shape {tuple(tensor.shape)}")
    x = ((tensor.detach().float().clamp(-clip, clip) + clip) / (2 * clip) * 255).round().to(torch.uint8).cpu()
    channels, h, w = x.shape
    if channels in (3, 4):
        return Image.fromarray(x.permute(1, 2, 0).numpy())  # (h, w, 4) is RGBA, (h, w, 3) RGB
    tiles = min(channels, MAX_TILES)
    cols = math.ceil(math.sqrt(tiles))
    rows = math.ceil(tiles / cols)
    grid = torch.zeros(rows * (h + 1) - 1, cols * (w + 1) - 1, dtype=torch.uint8)
    for k in range(tiles):
        r, c = divmod(k, cols)
        grid[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = x[k]
    return Image.fromarray(grid.numpy())  # (h, w) uint8 is greyscale


def png(image: Any) -> bytes:
    """A PIL image as PNG bytes."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
