"""Coloured shapes: the procedural captioned dataset the default text-to-image model learns, and the detector that
scores whether a generated image follows its prompt.

A caption reads "a red circle at the top left on a blue background". Every word of the vocabulary is one token of
the default model's tokenizer (`vocabulary_files`), so no caption is cut short by the 16-token context.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import CLIPTextConfig, CLIPTokenizer

SIZE = 32
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# Centre of each position on the 32x32 canvas.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (9.0, 9.0),
    "top right": (23.0, 9.0),
    "bottom left": (9.0, 23.0),
    "bottom right": (23.0, 23.0),
    "center": (16.0, 16.0),
}
# How much of its bounding box each shape fills (the detector's shape cue).
FILL = {"circle": 0.785, "square": 1.0, "triangle": 0.5}


@dataclass(frozen=True)
class Scene:
    """One image's content; `caption` is the prompt that describes it."""

    colour: str
    shape: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.colour} {self.shape} {where} on a {self.background} background"


def all_scenes() -> list[Scene]:
    """Every scene the dataset draws from (shape colour never equals the background)."""
    return [Scene(c, s, p, b) for c, s, p, b in itertools.product(COLOURS, SHAPES, POSITIONS, COLOURS) if c != b]


def random_scenes(n: int, seed: int) -> list[Scene]:
    rng = random.Random(seed)
    scenes = all_scenes()
    return [rng.choice(scenes) for _ in range(n)]


def render(scenes: list[Scene], seed: int = 0, jitter: float = 1.5) -> torch.Tensor:
    """Draw scenes as a (N, 3, 32, 32) float batch in [-1, 1]; positions and sizes jitter slightly."""
    gen = torch.Generator().manual_seed(seed)
    n = len(scenes)
    ys, xs = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    centres = torch.tensor([POSITIONS[s.position] for s in scenes])
    centres = centres + (torch.rand(n, 2, generator=gen) * 2 - 1) * jitter
    radius = 5.5 + torch.rand(n, generator=gen) * 1.5
    dx = xs[None] - centres[:, 0, None, None]
    dy = ys[None] - centres[:, 1, None, None]
    r = radius[:, None, None]
    masks = {
        "circle": dx**2 + dy**2 <= r**2,
        "square": (dx.abs() <= r * 0.85) & (dy.abs() <= r * 0.85),
        # Upward triangle: apex at the top, base at the bottom, width growing with depth.
        "triangle": (dy >= -r) & (dy <= r) & (dx.abs() <= (dy + r) / 2),
    }
    images = torch.empty(n, 3, SIZE, SIZE)
    for i, scene in enumerate(scenes):
        fg = torch.tensor(COLOURS[scene.colour], dtype=torch.float32)[:, None, None]
        bg = torch.tensor(COLOURS[scene.background], dtype=torch.float32)[:, None, None]
        images[i] = torch.where(masks[scene.shape][i][None], fg, bg)
    return images / 127.5 - 1.0


def _nearest(rgb: torch.Tensor) -> str:
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)
    return list(COLOURS)[int(((palette - rgb) ** 2).sum(-1).argmin())]


def detect(image: torch.Tensor) -> Scene | None:
    """Read colour, shape, position and background off one (3, H, W) image in [0, 1] (H = W = 32).

    Background: the palette colour nearest the border's median; foreground: pixels far from it. None when the border
    is no palette colour or the foreground is too small or too large to be one shape. Shape: how much of its
    bounding box the foreground fills; position: the nearest position centre.
    """
    pixels = image.float().clamp(0, 1) * 255
    border = torch.cat([pixels[:, 0], pixels[:, -1], pixels[:, :, 0], pixels[:, :, -1]], dim=1)
    border_colour = border.median(dim=1).values
    background = _nearest(border_colour)
    bg = torch.tensor(COLOURS[background], dtype=torch.float32)[:, None, None]
    if float(((bg[:, 0, 0] - border_colour) ** 2).sum().sqrt()) > 80:
        return None  # the border is no palette colour: no background to speak of
    mask = ((pixels - bg) ** 2).sum(0).sqrt() > 80
    if not 12 <= int(mask.sum()) <= mask.numel() // 2:
        return None
    colour = _nearest(pixels[:, mask].median(dim=1).values)
    # Soft edges: a pixel belongs to the shape when it is nearer the shape's colour than the background's.
    fg = torch.tensor(COLOURS[colour], dtype=torch.float32)[:, None, None]
    mask = ((pixels - fg) ** 2).sum(0) < ((pixels - bg) ** 2).sum(0)
    if not bool(mask.any()):
        return None  # no pixel is nearer the shape's colour than the background's: no shape to measure
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    fill = float(mask.sum() / box)
    shape = min(FILL, key=lambda s: abs(FILL[s] - fill))
    ys, xs = mask.nonzero(as_tuple=True)
    cx, cy = float(xs.float().mean()) + 0.5, float(ys.float().mean()) + 0.5
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    return Scene(colour, shape, position, background)


def caption_words() -> list[str]:
    words = {w for scene in all_scenes() for w in scene.caption.split()}
    return sorted(words)


def shapes_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer (16-token context) over `vocabulary_files` written to ``folder``."""
    from transformers import CLIPTokenizer

    vocabulary_files(folder)
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=16
    )


def shapes_text_config(tokenizer: CLIPTokenizer, **sizes: int) -> CLIPTextConfig:
    """A 2-layer CLIP text-encoder config over ``tokenizer``'s vocabulary and 16-token context; ``sizes``
    override hidden_size (64), intermediate_size (128), heads (4), ... ."""
    from transformers import CLIPTextConfig

    vocab = tokenizer.get_vocab()
    end = vocab["<|endoftext|>"]
    defaults: dict[str, Any] = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    return CLIPTextConfig(
        vocab_size=len(vocab),
        max_position_embeddings=16,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=end,
        pad_token_id=end,
        **(defaults | sizes),
    )


def vocabulary_files(folder: Path) -> None:
    """Write a CLIP BPE vocab.json/merges.txt in which every caption word is one token.

    Merges are added until the real CLIPTokenizer reads each word whole; single characters stay in the vocabulary
    so unknown words still tokenize (into letters).
    """
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-")
    vocab: dict[str, int] = {}
    for token in [*letters, *(c + "</w>" for c in letters), "<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []

    def tokenizer() -> CLIPTokenizer:
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>")

    for word in caption_words():
        while len(pieces := tokenizer().tokenize(word)) > 1:
            a, b = pieces[0], pieces[1]
            merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))
    tokenizer()
