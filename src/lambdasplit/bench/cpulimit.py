"""A weaker device on one machine: cap this process's CPU time with a Linux cgroup while a row runs.

Fewer threads alone need not make a device slower: on the 2-core VM these benchmarks ran on, SmolLM2 with
one thread was faster than with two (per-token work there is many small ops, where a second thread costs
more in hand-offs than it brings). A CPU quota does make it slower, the way a phone's power budget does:
``CpuLimit(0.25)`` lets the process run 25 ms per 100 ms period, whatever its thread count.

Only this process moves into the limited cgroup, and only inside ``applied()``: servers and helpers
started before keep their own cgroup, so the cloud stays at full speed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lambdasplit.cpus import own_cgroup
from lambdasplit.errors import ConfigError

_V1 = Path("/sys/fs/cgroup/cpu")
_V2 = Path("/sys/fs/cgroup")
_PERIOD_US = 100_000


def cpu_limit_unavailable() -> str | None:
    """Why a CPU quota cannot be set here, or None."""
    if os.geteuid() != 0:
        return "a CPU quota needs root (cgroups)"
    if (_V1 / "cpu.cfs_quota_us").is_file() or "cpu" in (_V2 / "cgroup.controllers").read_text().split():
        return None
    return "no cgroup cpu controller (neither v1 cpu.cfs_quota_us nor v2 cpu.max)"


class CpuLimit:
    """A cgroup allowing ``cpus`` CPUs' worth of time (e.g. 0.25 or 1.5) to the processes inside it."""

    def __init__(self, cpus: float) -> None:
        if not cpus > 0:
            raise ConfigError(f"a CPU limit must be > 0 CPUs, got {cpus}")
        if reason := cpu_limit_unavailable():
            raise ConfigError(reason)
        self.cpus = cpus
        quota = max(1000, int(cpus * _PERIOD_US))
        name = f"lambdasplit-device-{os.getpid()}"
        if (_V1 / "cpu.cfs_quota_us").is_file():
            self.home = _V1 / own_cgroup("cpu").lstrip("/")
            self.path = _V1 / name
            self.path.mkdir(exist_ok=True)
            (self.path / "cpu.cfs_period_us").write_text(str(_PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            self.home = _V2 / own_cgroup(None).lstrip("/")
            self.path = _V2 / name
            self.path.mkdir(exist_ok=True)
            (self.path / "cpu.max").write_text(f"{quota} {_PERIOD_US}")

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Run the block inside the limit (this process, all its threads), then move back."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))
        try:
            yield
        finally:
            (self.home / "cgroup.procs").write_text(str(os.getpid()))

    def close(self) -> None:
        if self.path.exists():
            self.path.rmdir()

    def __enter__(self) -> CpuLimit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
