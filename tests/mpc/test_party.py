import pytest
import torch
from mpc_helpers import parties

from lambdasplit.errors import WireError
from lambdasplit.mpc.party import local_channels, run_pair
from lambdasplit.mpc.shares import open_shared


def test_opening_costs_one_round_and_eight_bytes_per_element_each_way():
    p0, p1 = parties()
    x = torch.arange(10, dtype=torch.int64)
    a, b = run_pair(lambda: open_shared(p0, x), lambda: open_shared(p1, 2 * x))
    assert torch.equal(a, 3 * x) and torch.equal(b, 3 * x)
    assert (p0.counter.rounds, p0.counter.sent, p0.counter.received) == (1, 80, 80)


def test_a_peer_out_of_step_is_a_clear_error():
    p0, p1 = parties()
    with pytest.raises(WireError, match="out of step"):
        run_pair(
            lambda: p0.exchange(torch.zeros(3, dtype=torch.int64)),
            lambda: p1.exchange(torch.zeros(4, dtype=torch.int64)),
        )


def test_a_silent_peer_times_out_instead_of_hanging():
    c0, _ = local_channels(timeout=0.2)
    with pytest.raises(WireError, match="sent nothing"):
        c0.exchange(torch.zeros(1, dtype=torch.int64))
