"""The clients' non-IID parts of the coloured shapes."""

from __future__ import annotations

import pytest
import torch

from lambdasplit.collafuse.data import client_images, client_scenes
from lambdasplit.diffusion.shapes import detect
from lambdasplit.errors import ConfigError


def test_three_clients_share_no_shape_colour_or_background() -> None:
    parts = [client_scenes(k, 3) for k in range(3)]
    for attribute in ("shape", "colour", "background"):
        values = [{getattr(s, attribute) for s in scenes} for scenes in parts]
        assert all(values[i].isdisjoint(values[j]) for i in range(3) for j in range(i + 1, 3)), attribute
    assert all(len(scenes) == 20 for scenes in parts)  # 2 colours x 5 positions x 2 backgrounds
    assert all(s.colour != s.background for scenes in parts for s in scenes)


def test_a_clients_images_are_its_scenes_and_reproducible() -> None:
    first, again = client_images(1, 3, 12, seed=4), client_images(1, 3, 12, seed=4)
    assert torch.equal(first.images, again.images) and first.captions == again.captions
    assert not torch.equal(first.images, client_images(1, 3, 12, seed=5).images)
    allowed = {s.caption for s in client_scenes(1, 3)}
    for image, caption in zip(first.images, first.captions, strict=True):
        assert caption in allowed
        seen = detect(image / 2 + 0.5)
        assert seen is not None and seen.caption == caption


@pytest.mark.parametrize(("client", "clients", "count"), [(3, 3, 4), (-1, 3, 4), (0, 0, 4), (0, 3, 0)])
def test_bad_client_indices_and_counts_are_refused(client: int, clients: int, count: int) -> None:
    with pytest.raises(ConfigError):
        client_images(client, clients, count, seed=0)
