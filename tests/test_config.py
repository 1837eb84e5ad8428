from __future__ import annotations

import pytest
import torch

from lambdasplit.config import Runtime, SplitPoints, parse_dtype
from lambdasplit.errors import ConfigError, SplitPointError


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("2:28", (2, 28)),
        ("2:-2", (2, 28)),
        (":28", (0, 28)),
        ("4:", (4, 30)),
        ((1, 29), (1, 29)),
        ("0:30", (0, 30)),
    ],
)
def test_parse_split_points(spec, expected) -> None:
    p = SplitPoints.parse(spec, 30)
    assert (p.head_layers, p.body_end) == expected
    assert p.head_layers + p.body_layers + p.tail_layers == 30


@pytest.mark.parametrize("spec", ["5", "a:b", "1:2:3", "20:10", "0:31", (1,), "-40:2"])
def test_bad_split_points(spec) -> None:
    with pytest.raises(SplitPointError):
        SplitPoints.parse(spec, 30)


def test_balanced_split_puts_extra_layer_in_head() -> None:
    assert str(SplitPoints.balanced(30, 8)) == "4:26"
    assert str(SplitPoints.balanced(30, 3)) == "2:29"
    assert str(SplitPoints.balanced(30, 0)) == "0:30"


def test_dtypes_and_devices() -> None:
    assert parse_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert Runtime.resolve("cpu", None).dtype is torch.float32
    with pytest.raises(ConfigError, match="float32, float16, bfloat16"):
        parse_dtype("int3", torch.device("cpu"))
    with pytest.raises(ConfigError, match="unknown device"):
        Runtime.resolve("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            Runtime.resolve("cuda")
