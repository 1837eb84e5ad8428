"""The procedural dataset and its detector: every scene drawn is read back, every caption word is one token."""

from __future__ import annotations

import torch
from transformers import CLIPTokenizer

from lambdasplit.diffusion.shapes import (
    COLOURS,
    all_scenes,
    caption_words,
    detect,
    random_scenes,
    render,
    vocabulary_files,
)


def test_detector_reads_back_every_rendered_scene():
    scenes = random_scenes(600, seed=5)
    images = (render(scenes, seed=5) + 1) / 2
    assert [detect(images[i]) for i in range(len(scenes))] == scenes


def test_detector_sees_nothing_on_a_blank_image():
    assert detect(torch.full((3, 32, 32), 0.5)) is None


def test_every_caption_word_is_one_token(tmp_path):
    vocabulary_files(tmp_path)
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), pad_token="<|endoftext|>")
    assert all(len(tokenizer.tokenize(w)) == 1 for w in caption_words())
    assert max(len(tokenizer(s.caption).input_ids) for s in all_scenes()) <= 16
    assert len(tokenizer.tokenize("zebra")) == 5  # unknown words fall back to letters


def test_a_blob_of_the_background_colour_family_is_no_shape() -> None:
    """A patch far from the blue background in pixels but nearest blue in the palette: nothing to measure (once an
    IndexError on a generated image)."""
    image = torch.tensor(COLOURS["blue"], dtype=torch.float32)[:, None, None].expand(3, 32, 32).clone()
    image[:, 10:18, 10:18] = torch.tensor([107.0, 141.0, 243.0])[:, None, None]
    assert detect(image / 255) is None
