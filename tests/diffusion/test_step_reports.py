"""``generate(on_denoise=...)``: every step reported with its latent, what the cloud sent for it and its bytes;
previews decoded from those latents leave the final image as it would have been."""

from __future__ import annotations

import pytest
import torch

from lambdasplit.diffusion import DiffusionBody, LocalLink, SplitPipeline
from lambdasplit.diffusion.device import DenoiseStep
from lambdasplit.wire import MessageType, WireDtype, decode_frame, encode_frame, frame_tensor

PROMPT = "a red circle at the top left on a blue background"


class RecordingLink(LocalLink):
    """A LocalLink that keeps the frames the cloud sent, decoded as the device decodes them."""

    def __init__(self, body: DiffusionBody) -> None:
        super().__init__(body)
        self.results: list[torch.Tensor] = []

    def receive(self):  # type: ignore[no-untyped-def]
        frame = super().receive()
        if frame.type is MessageType.RESULT:
            self.results.append(frame_tensor(decode_frame(encode_frame(frame)), dtype=torch.float32))
        return frame


@pytest.mark.parametrize("policy", ["paper", "unet-lambda"])
def test_every_step_reports_what_the_cloud_sent_and_its_bytes(tiny_sd, policy):
    link = RecordingLink(DiffusionBody(tiny_sd.unet, "tiny"))
    steps: list[DenoiseStep] = []
    image = SplitPipeline(tiny_sd).generate(PROMPT, link, policy=policy, steps=4, seed=3, on_denoise=steps.append)

    assert [s.done for s in steps] == [1, 2, 3, 4] and all(s.total == 4 for s in steps)
    assert steps[-1].latents.shape == (1, 4, 16, 16)
    assert [s.what for s in steps] == ["noise prediction" if policy == "paper" else "U-Net middle"] * 4
    # What the report calls received is what came down, step by step (the wire's float16, decoded).
    for step, sent in zip(steps, link.results, strict=True):
        assert step.received is not None
        torch.testing.assert_close(step.received.float().reshape(sent.shape), sent, rtol=0, atol=0)
    # Bytes: the steps' plus the inputs' (sent once, before the first step) are the image's.
    inputs_up = image.traffic.bytes_up - sum(s.up_bytes for s in steps)
    assert sum(s.down_bytes for s in steps) == image.traffic.bytes_down
    if policy == "paper":  # the noise is streamed: nothing goes up during the steps
        assert all(s.up_bytes == 0 for s in steps) and inputs_up > 0
        noise_frame = len(encode_frame(_noise_frame(steps[0].received)))
        assert all(s.down_bytes == noise_frame for s in steps)
    else:  # two frames up each step (time embedding and the outer blocks' output)
        assert len({s.up_bytes for s in steps}) == 1 and steps[0].up_bytes > 0


def _noise_frame(noise: torch.Tensor):  # type: ignore[no-untyped-def]
    from lambdasplit.diffusion.protocol import layout
    from lambdasplit.wire import tensor_frame

    return tensor_frame(MessageType.RESULT, layout(noise, WireDtype.FLOAT16, "channel"), WireDtype.FLOAT16, 1, 0)


def test_collafuse_reports_the_hand_over_then_its_own_steps(tiny_sd):
    link = LocalLink(DiffusionBody(tiny_sd.unet, "tiny"))
    steps: list[DenoiseStep] = []
    SplitPipeline(tiny_sd).generate(PROMPT, link, policy="collafuse", steps=4, cut_ratio=0.5, on_denoise=steps.append)
    assert [(s.done, s.what) for s in steps] == [(2, "handed-over latent"), (3, ""), (4, "")]
    assert steps[0].received is not None and steps[0].down_bytes > 0
    torch.testing.assert_close(steps[0].received, steps[0].latents)
    assert all(s.received is None and s.up_bytes == s.down_bytes == 0 for s in steps[1:])


def test_previews_along_the_way_leave_the_final_image_unchanged(tiny_sd):
    split = SplitPipeline(tiny_sd)
    plain = split.generate(PROMPT, LocalLink(DiffusionBody(tiny_sd.unet, "tiny")), steps=4, seed=9)
    previews: list[torch.Tensor] = []
    watched = split.generate(
        PROMPT,
        LocalLink(DiffusionBody(tiny_sd.unet, "tiny")),
        steps=4,
        seed=9,
        on_denoise=lambda s: previews.append(split.preview(s.latents)),
    )
    assert torch.equal(plain.image, watched.image)
    assert len(previews) == 4 and previews[0].shape == plain.image.shape
    assert torch.equal(previews[-1], plain.image)  # the last step's latent is the one the tail decodes
    assert not torch.equal(previews[0], previews[-1])
