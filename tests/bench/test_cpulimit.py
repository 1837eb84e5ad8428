"""CpuLimit: a cgroup quota really slows this process down, and only inside the block."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lambdasplit.bench.cpulimit import CpuLimit, cpu_limit_unavailable
from lambdasplit.errors import ConfigError


def spin(cpu_seconds: float) -> float:
    """Burn ``cpu_seconds`` of this thread's CPU time; return the wall time it took."""
    start, cpu0 = time.perf_counter(), time.thread_time()
    while time.thread_time() - cpu0 < cpu_seconds:
        pass
    return time.perf_counter() - start


def test_quota_slows_the_process_inside_the_block_only() -> None:
    if reason := cpu_limit_unavailable():
        pytest.skip(reason)
    with CpuLimit(0.2) as limit:
        with limit.applied():
            assert str(os.getpid()) in (limit.path / "cgroup.procs").read_text().split()
            throttled = spin(0.1)
        free = spin(0.1)
        assert str(os.getpid()) not in (limit.path / "cgroup.procs").read_text().split()
    assert not Path(limit.path).exists()
    # 0.1 s of CPU at 0.2 CPUs needs >= 0.4 s more of waiting in 100 ms periods (20 ms each).
    assert throttled >= 0.3 and throttled > 2 * free


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ConfigError, match="> 0"):
        CpuLimit(0)
