"""Session options are validated on both sides; quantization granularity is the shape a tensor travels in."""

from __future__ import annotations

import pytest
import torch

from lambdasplit.diffusion.protocol import SessionOptions, layout, restore
from lambdasplit.errors import ConfigError
from lambdasplit.wire import WireDtype, decode_tensor, encode_tensor

GOOD = {
    "policy": "paper",
    "family": "sd",
    "steps": 10,
    "guidance_scale": 5.0,
    "scheduler": {"_class_name": "DDIMScheduler"},
    "latent_shape": [1, 4, 16, 16],
    "inputs": {"prompt_embeds": [2, 16, 32]},
}


def test_options_round_trip_through_json():
    options = SessionOptions.from_json(GOOD)
    assert SessionOptions.from_json(options.to_json()) == options
    assert options.cloud_steps(10) == 5 and SessionOptions.from_json({**GOOD, "cut_ratio": 0.7}).cloud_steps(10) == 7


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"policy": "teleport"}, "unknown policy"),
        ({"steps": 0}, "steps must be"),
        ({"steps": "10"}, "steps must be"),
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"wire_dtype": "int3"}, "unknown wire dtype"),
        ({"granularity": "pixel"}, "granularity"),
        ({"cut_ratio": 1.5}, "CollaFuse's cut ratio c"),
        ({"cut": 1.5}, r"old cut \(the device's share"),
        ({"latent_shape": [2, 4, 16, 16]}, "latent_shape"),
        ({"latent_shape": [1, 4, 16, 1 << 20]}, "1-4 dims"),
        ({"inputs": {"text_embeds": [2, 32]}}, "inputs are"),
        ({"scheduler": "DDIMScheduler"}, "scheduler must be"),
        ({"surprise": 1}, "bad session options"),
    ],
)
def test_bad_options_are_refused_with_a_reason(change, message):
    with pytest.raises(ConfigError, match=message):
        SessionOptions.from_json({**GOOD, **change})


@pytest.mark.parametrize(
    ("granularity", "shape", "scales"), [("tensor", (1, 4096), 1), ("channel", (1, 4, 1024), 4), ("row", None, 128)]
)
def test_granularity_picks_the_rows_that_get_a_scale(granularity, shape, scales):
    noise = torch.randn(1, 4, 32, 32)
    noise[:, 3] *= 50  # one loud channel: per-tensor scales pay for it everywhere
    wire = layout(noise, WireDtype.QINT8, granularity)
    assert tuple(wire.shape) == (shape or tuple(noise.shape))
    payload, sent = encode_tensor(wire, WireDtype.QINT8)
    assert len(payload) == 4096 + 8 * scales
    back = restore(decode_tensor(payload, WireDtype.QINT8, sent), (1, 4, 32, 32), "noise")
    quiet_error = (back - noise)[:, :3].abs().max().item()
    if granularity == "tensor":
        assert 0.1 < quiet_error < 1.0  # the loud channel's range sets everyone's step
    else:
        assert quiet_error < 0.05


def test_float_wire_keeps_the_shape_and_restore_checks_sizes():
    x = torch.randn(2, 8, 4, 4)
    assert layout(x, WireDtype.FLOAT16, "tensor") is x
    with pytest.raises(ConfigError, match=r"should hold a \(2, 8, 4, 5\)"):
        restore(x, (2, 8, 4, 5), "the sample")


def test_the_old_traffic_name_still_works_with_a_warning() -> None:
    import lambdasplit.diffusion as diffusion

    with pytest.warns(DeprecationWarning, match="FrameTraffic"):
        old = diffusion.Traffic
    assert old is diffusion.FrameTraffic
