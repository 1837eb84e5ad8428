"""The cloud's side of split text-to-image: a U-Net and one state machine per image (sans-IO: frames in, frames out).

`DiffusionSession.feed` takes one frame and yields the frames to send back, computing lazily, so the server can
stream a paper-policy generation step by step and stop when the client has gone; `LocalLink` runs the same
sessions in-process for tests and benchmarks, so what is measured there is what the network carries.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, cast

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import nn

from lambdasplit.diffusion.pipeline import guide, model_input, unet_fingerprint
from lambdasplit.diffusion.protocol import SessionOptions, decode_generator, encode_generator, layout, restore
from lambdasplit.diffusion.schedulers import (
    require_deterministic,
    require_reproducible,
    scheduler_from_config,
    state_after_steps,
    takes_generator,
    twin,
)
from lambdasplit.diffusion.unet import UNetParts, resnets
from lambdasplit.errors import ConfigError, SessionError
from lambdasplit.wire import Frame, MessageType, WireDtype, decode_tensor, encode_tensor

_EMB = "emb"


class DiffusionBody:
    """What a diffusion body server holds: one U-Net, run whole (paper, collafuse) or in its middle (unet-lambda)."""

    def __init__(self, unet: UNet2DConditionModel, name: str) -> None:
        self.unet, self.name = unet.eval(), name
        self.fingerprint = unet_fingerprint(unet.config)
        self.device, self.dtype = unet.device, unet.dtype
        self._parts: dict[int, UNetParts] = {}
        self.compute_seconds = 0.0

    def parts(self, blocks: int) -> UNetParts:
        if blocks not in self._parts:
            self._parts[blocks] = UNetParts(self.unet, blocks)
        return self._parts[blocks]

    def describe(self) -> dict[str, Any]:
        c: Any = self.unet.config  # a FrozenDict, read by attribute (ConfigMixin types it dict[str, Any])
        return {
            "in_channels": c.in_channels,
            "sample_size": c.sample_size,
            "cross_attention_dim": c.cross_attention_dim,
            "down_blocks": len(self.unet.down_blocks),
            "addition_embed_type": c.addition_embed_type,
        }

    def open(self, options: SessionOptions, handle: int) -> DiffusionSession:
        return DiffusionSession(self, options, handle)


class DiffusionSession:
    """One image on the cloud. Inputs arrive as FORWARD frames in the order of ``options.inputs`` (then the latent,
    except for unet-lambda); what follows depends on the policy (docs/protocol.md)."""

    def __init__(self, body: DiffusionBody, options: SessionOptions, handle: int) -> None:
        self.body, self.options, self.handle = body, options, handle
        self._check_shapes()
        self._shapes = self._shapes_sent()
        self.scheduler = scheduler_from_config(options.scheduler)
        if options.policy == "collafuse":
            require_reproducible(self.scheduler, generator_shared=options.generator_state is not None)
        else:
            require_deterministic(self.scheduler, f"the {options.policy} policy")
        # collafuse: the device's noise stream, continued here (None: a deterministic scheduler, nothing to draw)
        self.generator = None if options.generator_state is None else decode_generator(options.generator_state)
        self.scheduler.set_timesteps(options.steps, device=body.device)
        if options.family == "sdxl" and hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        self.fresh = twin(self.scheduler)
        self.pending = [*options.inputs, *([] if options.policy == "unet-lambda" else ["latents"])]
        self.received: dict[str, torch.Tensor] = {}
        self.step = 0
        self.done = False
        self.compute_seconds = 0.0

    # --- shapes ------------------------------------------------------------------------------------------------
    def _check_shapes(self) -> None:
        options = self.options
        config: Any = self.body.unet.config  # a FrozenDict, read by attribute
        batch = options.inputs["prompt_embeds"][0]
        wanted = 2 if options.guided and not (options.policy == "collafuse" and not options.conditioned) else 1
        if options.latent_shape[1] != config.in_channels:
            raise ConfigError(
                f"the latent has {options.latent_shape[1]} channels; this U-Net takes {config.in_channels}"
            )
        if batch != wanted:
            raise ConfigError(
                f"prompt_embeds must hold {wanted} row(s) here (guidance {options.guidance_scale}), got {batch}"
            )
        dims = {"prompt_embeds": 3, "text_embeds": 2, "time_ids": 2}
        for name, shape in options.inputs.items():
            if len(shape) != dims[name] or shape[0] != batch:
                raise ConfigError(f"{name} must be {dims[name]}-D with {batch} row(s), got {list(shape)}")
        if options.inputs["prompt_embeds"][-1] != config.cross_attention_dim:
            raise ConfigError(f"prompt_embeds' last dim must be {config.cross_attention_dim}")
        added = "text_embeds" in options.inputs and "time_ids" in options.inputs
        if options.policy != "unet-lambda" and (config.addition_embed_type == "text_time") != added:
            raise ConfigError("an SDXL U-Net needs text_embeds and time_ids, and only it takes them")
        if options.policy != "unet-lambda" and added:
            width = config.addition_time_embed_dim * options.inputs["time_ids"][-1] + options.inputs["text_embeds"][-1]
            takes = cast(nn.Linear, self.body.unet.add_embedding.linear_1).in_features
            if width != takes:
                raise ConfigError(
                    f"text_embeds and time_ids add up to {width} features; this U-Net's added embedding takes {takes}"
                )
        if options.policy == "unet-lambda":
            self.body.parts(options.blocks)
            if any(side % 2**self.body.unet.num_upsamplers for side in options.latent_shape[2:]):
                raise ConfigError("unet-lambda needs latent sides divisible by 2^upsamplers")

    def shapes(self) -> dict[str, list[int]]:
        """The shapes of the tensors the cloud sends and (unet-lambda) receives each step; goes in OPENED."""
        return self._shapes

    def _shapes_sent(self) -> dict[str, list[int]]:
        options, unet = self.options, self.body.unet
        _, ch, h, w = options.latent_shape
        if options.policy in ("paper", "collafuse"):  # the noise, or the handed-over latent
            return {"result": [1, ch, h, w]}
        b, k = 2 if options.guided else 1, options.blocks
        n = len(unet.down_blocks)
        up = unet.up_blocks[n - k - 1]
        out_ch = cast(nn.Conv2d, resnets(up)[-1].conv2).out_channels
        down_ch = cast(nn.Conv2d, resnets(unet.down_blocks[k - 1])[-1].conv2).out_channels
        emb_dim = unet.time_embedding.linear_2.out_features
        return {
            "sample": [b, down_ch, h >> k, w >> k],
            "emb": [b, emb_dim],
            "result": [b, out_ch, h >> (k - 1), w >> (k - 1)],
        }

    # --- frames ------------------------------------------------------------------------------------------------
    def feed(self, frame: Frame) -> Iterator[Frame]:
        """The frames answering ``frame`` (a FORWARD), computed as they are taken."""
        if frame.type is not MessageType.FORWARD:
            raise SessionError(f"a diffusion session takes FORWARD frames, not {frame.type.name}", "unexpected_type")
        if self.done:
            raise SessionError("this image is finished; open a new session", "session_done")
        if self.pending:
            name = self.pending.pop(0)
            shape = self.options.latent_shape if name == "latents" else self.options.inputs[name]
            self.received[name] = self._tensor(frame, shape, name, self.options.inputs_dtype)
            if self.pending:
                return iter(())
            if self.options.policy == "paper":
                return self._paper()
            if self.options.policy == "collafuse":
                return self._collafuse()
            return iter(())
        if self.options.policy != "unet-lambda":
            raise SessionError("all inputs were received; this policy takes no more frames", "unexpected_frame")
        return self._lambda_step(frame)

    def _tensor(
        self, frame: Frame, shape: tuple[int, ...] | list[int], what: str, dtype: WireDtype | None = None
    ) -> torch.Tensor:
        dtype = dtype or self.options.dtype
        if frame.dtype is not dtype:
            raise SessionError(
                f"{what} arrived as {frame.dtype.name.lower()}; this session sends it as {dtype.name.lower()}",
                "bad_dtype",
            )
        b = self.body
        x = decode_tensor(frame.payload, frame.dtype, frame.shape, dtype=b.dtype, device=b.device)
        try:
            return restore(x, tuple(shape), what)
        except ConfigError as exc:
            raise SessionError(str(exc), "bad_shape") from None

    def _send(self, tensor: torch.Tensor, position: int) -> tuple[Frame, torch.Tensor]:
        """A RESULT frame of ``tensor`` and the tensor as the device will decode it (quantization included)."""
        options = self.options
        wire = layout(tensor, options.dtype, options.granularity)
        payload, shape = encode_tensor(wire, options.dtype)
        seen = decode_tensor(payload, options.dtype, shape, dtype=tensor.dtype, device=tensor.device)
        seen = seen.reshape(tensor.shape)
        return Frame(MessageType.RESULT, self.handle, position, 0, options.dtype, shape, payload), seen

    def _noise(self, latents: torch.Tensor, t: torch.Tensor, guided: bool) -> torch.Tensor:
        r = self.received
        added = {k: r[k] for k in ("text_embeds", "time_ids") if k in r} or None
        x = model_input(self.scheduler, latents, t, guided)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.body.unet(
                x, t, encoder_hidden_states=r["prompt_embeds"], added_cond_kwargs=added, return_dict=False
            )[0]
        self._timed(start)
        return guide(out, self.options.guidance_scale) if guided else out

    def _timed(self, start: float) -> None:
        spent = time.perf_counter() - start
        self.compute_seconds += spent
        self.body.compute_seconds += spent

    def _paper(self) -> Iterator[Frame]:
        """Every step: the guided noise goes down; the cloud steps its own scheduler on what the device decodes."""
        latents = self.received.pop("latents")
        for i, t in enumerate(self.scheduler.timesteps):
            self.step = i
            frame, seen = self._send(self._noise(latents, t, self.options.guided), i)
            latents = self.scheduler.step(seen, t, latents, return_dict=False)[0]
            yield frame
        self.done = True

    def _collafuse(self) -> Iterator[Frame]:
        """The first round(c·T) steps (c = ``cut_ratio``), then the latent and the scheduler's state go to the device.

        With a stochastic scheduler the steps draw their noise from the device's generator stream (sent in OPEN),
        and STATE returns the stream where these steps left it, so the device's steps draw what the unsplit
        pipeline's would. Plainly: that stream also tells the cloud the noise the device adds in its own steps. The
        cloud already holds the latent it hands over, so the device's U-Net is all it lacks to redo the rest: with
        the same U-Net it can compute the final image, as it can with a deterministic scheduler.
        """
        options = self.options
        latents = self.received.pop("latents")
        guided = options.guided and options.conditioned
        m = options.cloud_steps(len(self.scheduler.timesteps))
        extra: dict[str, Any] = {}
        if self.generator is not None and takes_generator(self.scheduler):
            extra["generator"] = self.generator
        for i, t in enumerate(self.scheduler.timesteps[:m]):
            self.step = i
            noise = self._noise(latents, t, guided)
            latents = self.scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
        spec, tensors = state_after_steps(self.scheduler, self.fresh)
        self.done = True
        state: dict[str, Any] = {"step": m, "state": spec, "tensors": [list(t.shape) for t in tensors]}
        if self.generator is not None:
            state["generator_state"] = encode_generator(self.generator)
        yield Frame.json(MessageType.STATE, state, session=self.handle)
        yield self._send(latents, m)[0]
        for t in tensors:  # exact: the state steers every later step
            payload, shape = encode_tensor(t.float(), WireDtype.FLOAT32)
            yield Frame(MessageType.RESULT, self.handle, m, 0, WireDtype.FLOAT32, shape, payload)

    def _lambda_step(self, frame: Frame) -> Iterator[Frame]:
        shapes = self.shapes()
        if frame.position != self.step:
            raise SessionError(f"step {frame.position} arrived, expected step {self.step}", "bad_position")
        if _EMB not in self.received:
            self.received[_EMB] = self._tensor(frame, shapes["emb"], "the time embedding")
            return iter(())
        emb = self.received.pop(_EMB)
        sample = self._tensor(frame, shapes["sample"], "the sample")
        self.step += 1
        self.done = self.step >= len(self.scheduler.timesteps)
        return self._middle(sample, emb, frame.position)

    def _middle(self, sample: torch.Tensor, emb: torch.Tensor, position: int) -> Iterator[Frame]:
        """The U-Net's middle for one step, run when its answer is taken (the server's compute thread)."""
        start = time.perf_counter()
        with torch.no_grad():
            out = self.body.parts(self.options.blocks).inner(sample, emb, self.received["prompt_embeds"])
        self._timed(start)
        yield self._send(out, position)[0]
