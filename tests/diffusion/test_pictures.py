"""Tensors as pictures: the transmitted noise clipped to +-3 (the Λ-Split paper's Fig. 5(b)) and images."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lambdasplit.diffusion.pictures import MAX_TILES, picture, png, wire_picture


def test_four_channels_are_rgba_clipped_to_three():
    x = torch.zeros(1, 4, 2, 3)
    x[0, 0, 0, 0], x[0, 1, 0, 0], x[0, 2, 0, 0], x[0, 3, 0, 0] = 3.0, -3.0, 10.0, -10.0
    img = wire_picture(x)
    assert img.mode == "RGBA" and img.size == (3, 2)
    a = np.asarray(img)
    assert tuple(a[0, 0]) == (255, 0, 255, 0)  # +-3 at the ends, beyond it clipped
    assert tuple(a[1, 2]) == (128, 128, 128, 128)  # 0 in the middle (127.5 rounds to 128)


def test_a_guided_batch_draws_its_last_row_and_other_channel_counts_tile():
    x = torch.stack([torch.full((4, 2, 2), -3.0), torch.full((4, 2, 2), 3.0)])
    assert np.asarray(wire_picture(x)).min() == 255  # the prompt's row, not the negative prompt's
    many = wire_picture(torch.randn(1, 40, 5, 5))
    assert many.mode == "L"
    side = int(np.ceil(np.sqrt(MAX_TILES)))
    assert many.size == (side * 6 - 1, side * 6 - 1)  # tiles of 5 with a 1-pixel gap
    assert wire_picture(torch.randn(3, 4, 4)).mode == "RGB"
    with pytest.raises(ValueError, match="needs a"):
        wire_picture(torch.randn(4, 4))


def test_picture_and_png_round_trip():
    image = torch.rand(1, 3, 8, 6)
    pil = picture(image)
    assert pil.size == (6, 8) and pil.mode == "RGB"
    back = np.asarray(Image.open(io.BytesIO(png(pil))))
    expected = (image[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(back, expected)
