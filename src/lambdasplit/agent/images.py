"""Split text-to-image in the device agent: ``/v1/images/generations`` and the image page's live view.

The device holds the text encoder, the initial noise, the scheduler and the VAE (`SplitPipeline`); the cloud
runs the U-Net through a `RemoteDiffusionLink`, one image at a time. While an image is made, every step goes to
the network feed as an ``image_step`` event: its bytes each way and what came down from the cloud as a picture
(the noise prediction under the paper's policy, clipped to +-3 as in the Λ-Split paper's Fig. 5(b)); every N
steps the caller gets a preview decoded by the device's VAE. An image whose connection to the diffusion server is
lost mid-way starts again once on a new connection (``image_restart`` in the feed): its steps were on the lost
server, and the seed gives the same image.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lambdasplit.agent.feed import NetworkFeed
from lambdasplit.agent.schema import ImageRequest
from lambdasplit.client.diffusion import restarting
from lambdasplit.diffusion.pictures import picture, png, wire_picture
from lambdasplit.errors import ConnectionLost

if TYPE_CHECKING:  # diffusers loads only with an image model
    from lambdasplit.diffusion.device import DenoiseStep, Link, SplitImage, SplitPipeline


class Cancelled(Exception):
    """The client went away while its image was being made."""


@dataclass(frozen=True)
class Preview:
    """An intermediate image: the VAE's picture of the latent after ``done`` of ``total`` steps."""

    done: int
    total: int
    png: bytes


@dataclass(frozen=True)
class MadeImage:
    image: SplitImage
    png: bytes


class ImageService:
    """The agent's image model: a split pipeline and its link to a diffusion body server (one image at a time)."""

    def __init__(self, pipeline: SplitPipeline, link: Link, name: str, cloud_label: str) -> None:
        self.pipeline, self.link, self.name = pipeline, link, name
        self.cloud_label = cloud_label
        self._lock = threading.Lock()  # a link carries one session at a time
        config = pipeline.ends.unet_config
        side = int(config.sample_size) * int(pipeline.pipe.vae_scale_factor)
        self.size = f"{side}x{side}"

    def info(self) -> dict[str, Any]:
        return {"model": self.name, "size": self.size, "cloud": self.cloud_label}

    def generate(
        self,
        request: ImageRequest,
        request_id: str,
        feed: NetworkFeed,
        on_preview: Callable[[Preview], None] | None = None,
        cancelled: threading.Event | None = None,
    ) -> MadeImage:
        """Make the image of ``request`` (on a worker thread); every step goes to ``feed``, a preview to
        ``on_preview`` every ``request.every()`` steps (before the last: the finished image follows it)."""
        with self._lock:
            return self._generate(request, request_id, feed, on_preview, cancelled)

    def _generate(
        self,
        request: ImageRequest,
        request_id: str,
        feed: NetworkFeed,
        on_preview: Callable[[Preview], None] | None,
        cancelled: threading.Event | None,
    ) -> MadeImage:
        every = request.every()
        traffic = getattr(self.link, "traffic", None)
        before = (0, 0)  # the link's bytes when this attempt started
        inputs_reported = False
        reported = [0, 0]  # bytes up and down published so far (this attempt)

        def watch(step: DenoiseStep) -> None:
            nonlocal inputs_reported
            if cancelled is not None and cancelled.is_set():
                raise Cancelled  # leaves generate(), which closes the cloud's session
            if not inputs_reported:  # at the first step: what the session's start sent, once
                inputs_reported = True
                up, down = (traffic.bytes_up, traffic.bytes_down) if traffic else before
                up, down = up - before[0] - step.up_bytes, down - before[1] - step.down_bytes
                feed.publish({"type": "image_inputs", "request": request_id, "up_bytes": up, "down_bytes": down})
                reported[0], reported[1] = reported[0] + up, reported[1] + down
            reported[0], reported[1] = reported[0] + step.up_bytes, reported[1] + step.down_bytes
            event: dict[str, Any] = {
                "type": "image_step",
                "request": request_id,
                "step": step.done,
                "total": step.total,
                "timestep": step.timestep,
                "up_bytes": step.up_bytes,
                "down_bytes": step.down_bytes,
                "received": step.what,
            }
            if step.received is not None:
                event["received_shape"] = list(step.received.shape)
                event["received_png"] = _b64(png(wire_picture(step.received)))
            feed.publish(event)
            if on_preview is not None and every and step.done % every == 0 and step.done < step.total:
                on_preview(Preview(step.done, step.total, png(picture(self.pipeline.preview(step.latents)))))

        def attempt() -> SplitImage:
            nonlocal before, inputs_reported
            before = (traffic.bytes_up, traffic.bytes_down) if traffic else (0, 0)
            inputs_reported, reported[:] = False, [0, 0]
            return self.pipeline.generate(
                request.prompt,
                self.link,
                policy=request.policy,
                steps=request.steps,
                seed=request.seed,
                guidance_scale=request.guidance_scale,
                negative_prompt=request.negative_prompt,
                wire_dtype=request.wire_dtype,
                blocks=request.blocks,
                cut_ratio=request.cut_ratio,
                on_denoise=watch,
            )

        def restart(lost: ConnectionLost) -> None:  # what the lost attempt sent and received, not yet published
            up, down = (traffic.bytes_up, traffic.bytes_down) if traffic else before
            event = {"type": "image_restart", "request": request_id, "reason": str(lost)}
            feed.publish(
                event | {"up_bytes": up - before[0] - reported[0], "down_bytes": down - before[1] - reported[1]}
            )

        image = restarting(self.link, attempt, restart)
        t = image.traffic
        if traffic is not None:  # closing the session: CLOSE up, CLOSED down
            up, down = traffic.bytes_up - before[0] - reported[0], traffic.bytes_down - before[1] - reported[1]
            feed.publish({"type": "image_close", "request": request_id, "up_bytes": up, "down_bytes": down})
        feed.publish(
            {
                "type": "image_done",
                "request": request_id,
                "up_bytes": t.bytes_up,
                "down_bytes": t.bytes_down,
                "seconds": round(image.total_seconds, 3),
            }
        )
        return MadeImage(image, png(image.pil()))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
