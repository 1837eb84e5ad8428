"""What device and cloud agree on for one split image: the session options and how tensors travel.

A session is one image. OPEN carries `SessionOptions` as JSON; the cloud answers OPENED with the shapes it will
send back. Then FORWARD frames (``position`` = step index) carry, in order, the inputs the policy names
(`inputs`), and per step what the policy exchanges; the conversation of each policy is in docs/protocol.md.

Quantized wire dtypes scale each row of the tensor's last dim (docs/wire-format.md). The ``granularity`` option
picks which rows, by the layout the tensor travels in: ``tensor`` (one scale for all), ``channel`` (one per
sample and channel: (B, C, H*W)) or ``row`` (one per last-dim row, the LLM default). The receiver knows each
tensor's real shape and reshapes.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from lambdasplit.errors import ConfigError
from lambdasplit.wire import WireDtype

#: The embedded default text-to-image model (lambdasplit/diffusion/default_model, scripts/train_shapes_t2i.py).
DEFAULT_PIPELINE = "shapes-t2i"
Policy = Literal["paper", "unet-lambda", "collafuse"]
POLICIES: tuple[Policy, ...] = ("paper", "unet-lambda", "collafuse")
Granularity = Literal["tensor", "channel", "row"]
GRANULARITIES: tuple[Granularity, ...] = ("tensor", "channel", "row")
#: Conditioning tensors the cloud may receive, by pipeline family.
CONDITIONING = {"sd": ("prompt_embeds",), "sdxl": ("prompt_embeds", "text_embeds", "time_ids")}


@dataclass(frozen=True)
class SessionOptions:
    """One split image's settings, validated on both sides (the cloud trusts none of it)."""

    policy: Policy
    family: Literal["sd", "sdxl"]
    steps: int
    guidance_scale: float
    scheduler: dict[str, Any]  # the device scheduler's config, "_class_name" included
    latent_shape: tuple[int, ...]  # (1, C, h, w)
    inputs: dict[str, tuple[int, ...]]  # conditioning tensors sent once, in this order, before the latent
    wire_dtype: str = "float16"  # the tensors of every step
    input_dtype: str = "float16"  # the conditioning and the initial latent, sent once
    granularity: Granularity = "channel"
    blocks: int = 1  # unet-lambda: outer blocks on the device
    cut_ratio: float = 0.5  # collafuse: CollaFuse's c, the cloud's share of the steps (the first ones)
    conditioned: bool = True  # collafuse: whether the cloud gets the prompt (else the negative prompt only)
    #: collafuse with a stochastic scheduler: the device's CPU generator state after the initial latent, base64
    #: (`encode_generator`), so the cloud's steps draw the noise the unsplit pipeline would.
    generator_state: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.family not in CONDITIONING:
            raise ConfigError(f"unknown pipeline family {self.family!r}")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 1000:
            raise ConfigError(f"steps must be 1..1000, got {self.steps!r}")
        if not isinstance(self.guidance_scale, int | float) or not 0 <= self.guidance_scale <= 100:
            raise ConfigError(f"guidance_scale must be in [0, 100], got {self.guidance_scale!r}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity is one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        WireDtype.parse(self.wire_dtype)
        WireDtype.parse(self.input_dtype)
        ratio = self.cut_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0.0 <= ratio <= 1.0:
            raise ConfigError(
                f"cut_ratio is CollaFuse's cut ratio c, the cloud's share of the steps (t_c = (1-c)T), in [0, 1]; "
                f"got {ratio!r}"
            )
        if self.generator_state is not None:
            if self.policy != "collafuse":
                raise ConfigError(
                    f"generator_state is for the collafuse policy (its one hand-off); {self.policy} steps in "
                    "lockstep and takes no stochastic scheduler"
                )
            decode_generator(self.generator_state)
        shapes = [self.latent_shape, *self.inputs.values()]
        if len(self.latent_shape) != 4 or self.latent_shape[0] != 1:
            raise ConfigError(f"latent_shape is (1, C, h, w), got {self.latent_shape!r}")
        if any(not all(isinstance(d, int) and 1 <= d <= 1 << 16 for d in s) or len(s) > 4 for s in shapes):
            raise ConfigError("every tensor shape has 1-4 dims of 1..65536")
        allowed = CONDITIONING[self.family]
        if [n for n in self.inputs if n not in allowed] or "prompt_embeds" not in self.inputs:
            raise ConfigError(
                f"{self.family} inputs are {', '.join(allowed)} (prompt_embeds first), got {list(self.inputs)}"
            )

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    def cloud_steps(self, timesteps: int) -> int:
        """CollaFuse: how many of the ``timesteps`` scheduler steps (the first ones) the cloud runs: round(c·T).

        Options from an old peer's ``cut`` (the device's share) keep that peer's count, T - round(cut·T), which at
        a tie (cut·T ending in .5) differs from round((1 - cut)·T); the device checks the count it is handed.
        """
        legacy: float | None = getattr(self, "_legacy_cut", None)
        if legacy is not None:
            return timesteps - round(legacy * timesteps)
        return round(self.cut_ratio * timesteps)

    @property
    def dtype(self) -> WireDtype:
        return WireDtype.parse(self.wire_dtype)

    @property
    def inputs_dtype(self) -> WireDtype:
        return WireDtype.parse(self.input_dtype)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SessionOptions:
        try:
            body = dict(body)
            body["latent_shape"] = tuple(body["latent_shape"])
            body["inputs"] = {str(k): tuple(v) for k, v in dict(body.get("inputs", {})).items()}
            if not isinstance(body.get("scheduler"), dict):
                raise ConfigError("scheduler must be the scheduler's config (a JSON object)")
            legacy = body.pop("cut", None)
            if legacy is not None:
                # An old peer's ``cut``: the device's share of the steps, 1 - CollaFuse's c.
                if "cut_ratio" in body:
                    raise ConfigError(
                        "give cut_ratio (CollaFuse's c, the cloud's share of the steps) or the old cut (the "
                        "device's share, 1 - c), not both"
                    )
                if isinstance(legacy, bool) or not isinstance(legacy, int | float) or not 0.0 <= legacy <= 1.0:
                    raise ConfigError(f"the old cut (the device's share of the steps) is in [0, 1], got {legacy!r}")
                body["cut_ratio"] = 1.0 - legacy
            options = cls(**body)
            if legacy is not None:
                object.__setattr__(options, "_legacy_cut", float(legacy))
            return options
        except (TypeError, KeyError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"bad session options: {exc}") from exc


#: Bytes of a CPU ``torch.Generator``'s state (``get_state()``, a uint8 tensor): 5056 on torch 2.x.
GENERATOR_STATE_BYTES = torch.Generator().get_state().numel()


def encode_generator(generator: torch.Generator) -> str:
    """A CPU generator's state as base64 text, for a JSON frame."""
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode("ascii")


def decode_generator(text: object, what: str = "generator_state") -> torch.Generator:
    """A CPU generator set to the state ``encode_generator`` wrote; a ConfigError saying why when it is not one."""
    if not isinstance(text, str):
        raise ConfigError(f"{what} is a CPU torch.Generator's state in base64 text, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ConfigError(f"{what} is not base64: {exc}") from None
    if len(raw) != GENERATOR_STATE_BYTES:
        raise ConfigError(
            f"{what} holds {len(raw)} bytes; a CPU torch.Generator's state is {GENERATOR_STATE_BYTES} bytes"
        )
    generator = torch.Generator("cpu")
    try:
        generator.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    except RuntimeError as exc:
        raise ConfigError(f"{what} is not a CPU torch.Generator's state: {exc}") from None
    return generator


@dataclass
class FrameTraffic:
    """Frames and bytes (whole encoded frames) each way of one image's session.

    Not the LLM side's ``lambdasplit.traffic.Traffic``, which counts round trips and tensor payloads.
    """

    frames_up: int = 0
    frames_down: int = 0
    bytes_up: int = 0
    bytes_down: int = 0

    def __sub__(self, other: FrameTraffic) -> FrameTraffic:
        return FrameTraffic(*(getattr(self, f.name) - getattr(other, f.name) for f in dataclasses.fields(self)))


def layout(tensor: torch.Tensor, wire_dtype: WireDtype, granularity: Granularity) -> torch.Tensor:
    """The view a tensor travels in: quantized dtypes get one scale per row of the last dim of this view."""
    if wire_dtype.bits is None or granularity == "row":
        return tensor
    if granularity == "tensor" or tensor.ndim < 3:
        return tensor.reshape(1, -1)
    return tensor.reshape(tensor.shape[0], tensor.shape[1], -1)


def restore(tensor: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """A received tensor back in its real ``shape``; a ConfigError if the element counts differ."""
    if math.prod(tensor.shape) != math.prod(shape):
        raise ConfigError(f"{what} should hold a {tuple(shape)} tensor, got {tuple(tensor.shape)}")
    return tensor.reshape(shape)
