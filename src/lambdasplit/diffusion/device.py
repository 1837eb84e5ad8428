"""The device's side of split text-to-image: `SplitPipeline.generate` runs head and tail, the link reaches the cloud.

A link is anything with ``open``/``send``/``receive``/``close`` over frames: `LocalLink` (the cloud's sessions
in this process, every frame still encoded and decoded, for tests and benchmarks) or
`lambdasplit.client.RemoteDiffusionLink` (a body server over WebSocket).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline  # not `from diffusers` (see pipeline.py)

from lambdasplit.diffusion.cloud import DiffusionBody
from lambdasplit.diffusion.pictures import picture
from lambdasplit.diffusion.pipeline import Denoising, DeviceEnds, guide, model_input
from lambdasplit.diffusion.protocol import (
    FrameTraffic,
    Granularity,
    Policy,
    SessionOptions,
    decode_generator,
    encode_generator,
    layout,
    restore,
)
from lambdasplit.diffusion.schedulers import (
    apply_state,
    is_stochastic,
    require_deterministic,
    require_reproducible,
    takes_generator,
)
from lambdasplit.diffusion.unet import UNetParts
from lambdasplit.errors import ConfigError, SessionError, WireError
from lambdasplit.wire import (
    Frame,
    MessageType,
    WireDtype,
    decode_frame,
    encode_frame,
    frame_tensor,
    raise_for_error,
    tensor_frame,
)


class Link(Protocol):
    """A channel to a diffusion body: one session at a time."""

    def open(self, options: SessionOptions) -> dict[str, Any]: ...  # OPENED's JSON: the shapes the cloud uses
    def send(self, frame: Frame) -> None: ...
    def receive(self) -> Frame: ...
    def close(self) -> dict[str, Any]: ...  # CLOSED's JSON: the cloud's compute seconds for the image
    @property
    def handle(self) -> int: ...


@dataclass
class SplitImage:
    """One image made split: the picture, what crossed the link, where the time went."""

    image: torch.Tensor  # (1, 3, H, W) in [0, 1]
    policy: Policy
    steps: int
    traffic: FrameTraffic
    device_seconds: float  # head, tail and (unet-lambda, collafuse) the device's U-Net share
    cloud_seconds: float  # the cloud's U-Net compute, as it reports it
    total_seconds: float
    per_step: list[float] = field(default_factory=list)  # wall seconds of each denoising step

    @property
    def communication_seconds(self) -> float:
        """What remains of the wall time: transfer, (de)serialisation and waiting."""
        return max(0.0, self.total_seconds - self.device_seconds - self.cloud_seconds)

    def pil(self) -> Any:
        return picture(self.image)


Shapes = dict[str, tuple[int, ...]]


#: A tensor the cloud sent during a step, and what it is.
Received = tuple[torch.Tensor, str] | None


@dataclass(frozen=True)
class DenoiseStep:
    """One finished denoising step, as ``generate(on_denoise=...)`` reports it (for previews and the wire view)."""

    done: int  # steps done, 1..total
    total: int
    timestep: int
    latents: torch.Tensor  # the latent after this step (decode it with `SplitPipeline.preview`)
    received: torch.Tensor | None  # what came down from the cloud for this step, as decoded from its frame
    what: str  # what ``received`` is: "noise prediction", "U-Net middle", "handed-over latent", or "" (none)
    up_bytes: int  # frames sent and received during this step (LocalLink and RemoteDiffusionLink count them)
    down_bytes: int


@dataclass
class _Clock:
    """Where an image's time goes, filled in as it is made."""

    device: float
    per_step: list[float]
    on_step: Callable[[int, int], None] | None
    on_denoise: Callable[[DenoiseStep], None] | None = None
    traffic: FrameTraffic | None = None  # the link's counters (None: the link keeps none)
    seen: tuple[int, int] = (0, 0)  # bytes up and down already reported

    def report(self, done: int, total: int, t: torch.Tensor, latents: torch.Tensor, received: Received) -> None:
        if self.on_step:
            self.on_step(done, total)
        if self.on_denoise is None:
            return
        up, down = (self.traffic.bytes_up, self.traffic.bytes_down) if self.traffic else (0, 0)
        tensor, what = received if received is not None else (None, "")
        step = DenoiseStep(done, total, int(t), latents, tensor, what, up - self.seen[0], down - self.seen[1])
        self.seen = (up, down)
        self.on_denoise(step)


class LocalLink:
    """The cloud's `DiffusionBody` in this process. Frames are encoded and decoded as on the network; ``traffic``
    counts the tensor and STATE frames (OPEN/OPENED and CLOSE/CLOSED do not exist in-process)."""

    def __init__(self, body: DiffusionBody) -> None:
        self.body = body
        self.traffic = FrameTraffic()
        self._session: Any = None
        self._replies: list[Iterator[Frame]] = []

    @property
    def handle(self) -> int:
        return 1

    def open(self, options: SessionOptions) -> dict[str, Any]:
        self._session = self.body.open(SessionOptions.from_json(options.to_json()), self.handle)
        self._replies = []
        return {"session": self.handle, "shapes": self._session.shapes()}

    def send(self, frame: Frame) -> None:
        data = encode_frame(frame)
        self.traffic.frames_up += 1
        self.traffic.bytes_up += len(data)
        self._replies.append(self._session.feed(decode_frame(data)))

    def receive(self) -> Frame:
        while self._replies:
            frame = next(self._replies[0], None)
            if frame is not None:
                data = encode_frame(frame)
                self.traffic.frames_down += 1
                self.traffic.bytes_down += len(data)
                return decode_frame(data)
            self._replies.pop(0)
        raise WireError("the cloud has nothing more to send for this session")

    def close(self) -> dict[str, Any]:
        seconds = self._session.compute_seconds if self._session else 0.0
        self._session = None
        return {"compute_seconds": seconds}


class SplitPipeline:
    """A diffusers SD/SDXL pipeline on the device, generating through a link to the cloud's U-Net.

    The device pipeline needs its U-Net only for ``unet-lambda`` (outer blocks) and ``collafuse`` (the last
    steps); for ``paper`` load it without (``load_pipeline(..., unet=False)``) and pass ``unet_config``
    (``load_unet_config``).
    """

    def __init__(self, pipe: DiffusionPipeline, unet_config: Any = None) -> None:
        self.pipe = pipe
        self.ends = DeviceEnds(pipe, unet_config)
        self._parts: dict[int, UNetParts] = {}

    def generate(
        self,
        prompt: str,
        link: Link,
        *,
        policy: Policy = "paper",
        steps: int = 20,
        seed: int = 0,
        guidance_scale: float = 7.5,
        negative_prompt: str | None = None,
        wire_dtype: WireDtype | str = "float16",
        input_dtype: WireDtype | str = "float16",
        granularity: Granularity = "channel",
        blocks: int = 1,
        cut_ratio: float = 0.5,
        conditioned: bool = True,
        on_step: Callable[[int, int], None] | None = None,
        cut: float | None = None,
        on_denoise: Callable[[DenoiseStep], None] | None = None,
    ) -> SplitImage:
        """One image for ``prompt``. ``on_step(done, total)`` is called after every denoising step, and
        ``on_denoise`` with the step's latent, what the cloud sent for it and the bytes (for previews).

        The steps follow diffusers' ``StableDiffusionPipeline.__call__``; the session with the cloud (steps 4-6)
        stands where the pipeline calls its U-Net.

        collafuse: ``cut_ratio`` is CollaFuse's cut ratio c, the cloud's share of the steps: the cloud runs the
        first round(c·steps), this device the rest (0: the device alone, 1: the cloud alone). ``cut`` (the device's
        share) is deprecated: ``cut_ratio = 1 - cut``. A stochastic scheduler (DDPM, ancestral) is taken there:
        the cloud draws its steps' noise from this device's generator stream, so the image is the unsplit
        pipeline's for the seed (and the cloud knows the noise this device adds; docs/protocol.md).
        """
        started = time.perf_counter()
        # 1. Check inputs (what can be refused before any model runs)
        if cut is not None:
            warnings.warn(
                "SplitPipeline.generate(cut=...) is deprecated: cut was the device's share of the steps; pass "
                f"cut_ratio = 1 - cut = {1 - cut:g} (CollaFuse's c, the server's share)",
                DeprecationWarning,
                stacklevel=2,
            )
            if cut_ratio != 0.5:
                raise ConfigError("give cut_ratio (the cloud's share of the steps) or the old cut, not both")
            cut_ratio = 1.0 - cut
        if policy == "collafuse" and not conditioned and guidance_scale <= 1.0:
            raise ConfigError(
                "collafuse without conditioning sends the negative prompt's embedding only; it needs guidance_scale > 1"
            )

        # 2. Encode the prompt, set the timesteps, prepare the seeded initial latent (the head, `DeviceEnds.start`)
        denoising = self.ends.start(
            prompt, steps=steps, seed=seed, guidance_scale=guidance_scale, negative_prompt=negative_prompt
        )
        scheduler = denoising.scheduler
        generator_state = None
        if policy == "collafuse":
            # One hand-off, no lockstep: a stochastic step is reproduced from this device's generator stream.
            shared = is_stochastic(scheduler) and takes_generator(scheduler)
            require_reproducible(scheduler, generator_shared=shared)
            generator_state = encode_generator(denoising.generator) if shared else None
        else:
            require_deterministic(scheduler, f"the {policy} policy")

        # 3. Choose what the cloud receives: the conditioning (unet-lambda: the prompt embeddings alone; collafuse
        #    unconditioned: the negative prompt's row alone) and, below, the initial latent unless unet-lambda
        cond = denoising.conditioning
        inputs = cond.tensors() if policy != "unet-lambda" else {"prompt_embeds": cond.prompt_embeds}
        if policy == "collafuse" and not conditioned:
            inputs = {k: v[:1] for k, v in inputs.items()}
        sent = [*inputs.values(), *([] if policy == "unet-lambda" else [denoising.latents])]

        # 4. Describe the session for the cloud: policy, schedule, tensor shapes, wire dtypes
        options = SessionOptions(
            policy=policy,
            family=self.ends.family,
            steps=steps,
            guidance_scale=guidance_scale,
            scheduler=dict(denoising.scheduler.config),
            latent_shape=tuple(denoising.latents.shape),
            inputs={k: tuple(v.shape) for k, v in inputs.items()},
            wire_dtype=WireDtype.parse(wire_dtype).name.lower(),
            input_dtype=WireDtype.parse(input_dtype).name.lower(),
            granularity=granularity,
            blocks=blocks,
            cut_ratio=cut_ratio,
            conditioned=conditioned,
            generator_state=generator_state,
        )
        options.scheduler["_class_name"] = type(denoising.scheduler).__name__
        traffic: FrameTraffic | None = getattr(link, "traffic", None)
        clock = _Clock(time.perf_counter() - started, [], on_step, on_denoise, traffic)

        # 5. Open the session and send the inputs
        before = dataclasses.replace(traffic or FrameTraffic())
        opened = link.open(options)
        shapes = {k: tuple(v) for k, v in opened.get("shapes", {}).items()}
        try:
            for tensor in sent:
                wire = layout(tensor, options.inputs_dtype, granularity)
                link.send(tensor_frame(MessageType.FORWARD, wire, options.inputs_dtype, link.handle, 0))
            if traffic is not None:  # steps report their own bytes; the inputs are the image's, sent once
                clock.seen = (traffic.bytes_up, traffic.bytes_down)

            # 6. Denoising loop, shared with the cloud the policy's way (`_paper`, `_unet_lambda`, `_collafuse`)
            run = {"paper": self._paper, "unet-lambda": self._unet_lambda, "collafuse": self._collafuse}[policy]
            latents = run(denoising, link, options, shapes, clock)
        finally:
            closed = link.close()

        # 7. Decode the final latent with the VAE (the tail)
        start = time.perf_counter()
        image = self.ends.decode(latents, denoising.generator)
        clock.device += time.perf_counter() - start
        return SplitImage(
            image=image.float().cpu(),
            policy=policy,
            steps=steps,
            traffic=(traffic or FrameTraffic()) - before,
            device_seconds=clock.device,
            cloud_seconds=float(closed.get("compute_seconds", 0.0)),
            total_seconds=time.perf_counter() - started,
            per_step=clock.per_step,
        )

    # --- policies: each predicts the guided noise of one step; `_denoise` steps the scheduler on it ---------------
    def _denoise(
        self,
        denoising: Denoising,
        latents: torch.Tensor,
        first: int,
        predict: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, float, Received]],
        clock: _Clock,
    ) -> torch.Tensor:
        """Steps ``first``.. of the schedule; ``predict(i, t, latents)`` -> (noise, device seconds inside it, what
        the cloud sent for the step)."""
        n = len(denoising.timesteps)
        for i in range(first, n):
            tick = time.perf_counter()
            t = denoising.timesteps[i]
            noise, local, received = predict(i, t, latents)
            start = time.perf_counter()
            latents = self.ends.step(denoising, noise, t, latents)
            clock.device += local + time.perf_counter() - start
            clock.per_step.append(time.perf_counter() - tick)
            clock.report(i + 1, n, t, latents, received)
        return latents

    def preview(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's picture of an intermediate latent, (1, 3, H, W) in [0, 1]: what the image looks like so far.

        It draws nothing from the image's generator, so previews leave the final image as it would be."""
        return self.ends.decode(latents).float().cpu()

    def _receive(self, link: Link, step: int, what: str, kind: MessageType) -> Frame:
        frame = raise_for_error(link.receive())
        if frame.type is not kind or frame.position != step:
            raise WireError(f"expected {what} for step {step}, got {frame.type.name} at position {frame.position}")
        return frame

    def _tensor(self, link: Link, step: int, shape: tuple[int, ...], what: str) -> torch.Tensor:
        frame = self._receive(link, step, what, MessageType.RESULT)
        return restore(frame_tensor(frame, dtype=self.ends.device_dtype, device=self.ends.device), shape, what)

    def _paper(
        self, denoising: Denoising, link: Link, options: SessionOptions, shapes: Shapes, clock: _Clock
    ) -> torch.Tensor:
        """The noise arrives, streamed: the device only steps its scheduler."""
        shape = tuple(denoising.latents.shape)

        def predict(i: int, t: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, float, Received]:
            noise = self._tensor(link, i, shape, "the noise prediction")
            return noise, 0.0, (noise, "noise prediction")

        return self._denoise(denoising, denoising.latents, 0, predict, clock)

    def _unet_lambda(
        self, denoising: Denoising, link: Link, options: SessionOptions, shapes: Shapes, clock: _Clock
    ) -> torch.Tensor:
        """Outer blocks here, the middle in the cloud, once per step."""
        parts, cond = self.parts(options.blocks), denoising.conditioning

        def predict(i: int, t: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, float, Received]:
            start = time.perf_counter()
            with torch.no_grad():
                x = model_input(denoising.scheduler, latents, t, cond.guided)
                emb = parts.embed(x, t, cond.prompt_embeds, cond.added or None)
                sample, skips = parts.outer_down(x, emb, cond.prompt_embeds)
            for tensor in (emb, sample):
                wire = layout(tensor, options.dtype, options.granularity)
                link.send(tensor_frame(MessageType.FORWARD, wire, options.dtype, link.handle, i))
            local = time.perf_counter() - start
            middle = self._tensor(link, i, shapes["result"], "the U-Net's middle")
            start = time.perf_counter()
            with torch.no_grad():
                noise = guide(parts.outer_up(middle, skips, emb, cond.prompt_embeds), cond.guidance_scale)
            return noise, local + time.perf_counter() - start, (middle, "U-Net middle")

        return self._denoise(denoising, denoising.latents, 0, predict, clock)

    def _collafuse(
        self, denoising: Denoising, link: Link, options: SessionOptions, shapes: Shapes, clock: _Clock
    ) -> torch.Tensor:
        """The cloud's first steps come back as one latent and the scheduler's state; the device runs the rest."""
        state = self._receive(link, 0, "the scheduler STATE", MessageType.STATE).json_body()
        m = int(state["step"])
        expected = options.cloud_steps(len(denoising.timesteps))
        if m != expected:
            raise WireError(f"the cloud handed over after {m} steps, not {expected}")
        latents = self._tensor(link, m, tuple(denoising.latents.shape), "the handed-over latent")
        tensors = [self._tensor(link, m, tuple(s), "scheduler state") for s in state["tensors"]]
        apply_state(denoising.scheduler, state["state"], tensors)
        if options.generator_state is not None:
            # The stream where the cloud's steps left it: this device's steps draw what the unsplit pipeline would.
            if "generator_state" not in state:
                raise WireError("the cloud drew from the shared generator but did not hand its state back")
            try:
                returned = decode_generator(state["generator_state"], "the cloud's generator_state")
            except ConfigError as exc:
                raise WireError(str(exc)) from None
            denoising.generator.set_state(returned.get_state())
        if m:
            hand_over = (latents, "handed-over latent")
            clock.report(m, len(denoising.timesteps), denoising.timesteps[m - 1], latents, hand_over)
        elif clock.on_step:
            clock.on_step(0, len(denoising.timesteps))  # the cloud ran no step: progress starts here at 0
        cond, unet = denoising.conditioning, self.pipe.unet
        if unet is None:
            raise SessionError("collafuse runs the last steps with the device's U-Net: load the pipeline with it")

        def predict(i: int, t: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, float, Received]:
            start = time.perf_counter()
            with torch.no_grad():
                x = model_input(denoising.scheduler, latents, t, cond.guided)
                out = unet(x, t, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=cond.added or None)
            return guide(out.sample, cond.guidance_scale), time.perf_counter() - start, None

        return self._denoise(denoising, latents, m, predict, clock)

    def parts(self, blocks: int) -> UNetParts:
        if blocks not in self._parts:
            if getattr(self.pipe, "unet", None) is None:
                raise SessionError("unet-lambda runs the U-Net's outer blocks on the device: load its U-Net")
            self._parts[blocks] = UNetParts(self.pipe.unet, blocks)
        return self._parts[blocks]
