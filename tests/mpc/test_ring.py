import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lambdasplit.errors import ConfigError
from lambdasplit.mpc.ring import Ring, random_elements


@given(st.floats(min_value=-1e9, max_value=1e9, allow_nan=False))
def test_encode_decode_round_trips_within_half_a_unit(x):
    ring = Ring()
    assert abs(ring.decode(ring.encode(x), torch.float64).item() - x) <= 0.5 / ring.scale + abs(x) * 1e-15


def test_arithmetic_wraps_around_modulo_2_64():
    big = torch.tensor([2**62], dtype=torch.int64)
    assert (big * 4).item() == 0 and (big + big).item() == -(2**63)


def test_out_of_range_values_and_frac_bits_are_refused():
    with pytest.raises(ConfigError, match="2\\^47"):
        Ring(16).encode(2.0**48)
    with pytest.raises(ConfigError, match="frac_bits"):
        Ring(31)


def test_random_elements_cover_the_whole_ring():
    r = random_elements((100_000,), torch.Generator().manual_seed(0))
    assert r.dtype == torch.int64
    assert (r < -(2**62)).float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert (r > 2**62).float().mean().item() == pytest.approx(0.25, abs=0.01)
