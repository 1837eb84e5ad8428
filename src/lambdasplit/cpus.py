"""How many CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota.

A container's ``--cpus`` or a Kubernetes CPU limit is a quota of CPU time (cgroup v2 ``cpu.max``, v1
``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``), not fewer visible cores: torch still starts a thread per core of
the host, and the kernel throttles them all once the group has used its share of a period. Measured on this
project's 2-core VM with SmolLM2-135M in a 1-CPU quota (``bench.cpulimit.CpuLimit(1.0)``): a forward over 8 rows
took 125.8 ms with torch's 2 threads against 115.2 with 1, over 64 rows 395.4 against 334.3 (+9% and +18%); on a
host with many more cores than its quota the loss is larger. The command line and the test suite set ``OMP_NUM_THREADS``
to the quota where it is tighter than the affinity mask (``thread_cap``), before torch loads.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from lambdasplit.errors import ConfigError

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def own_cgroup(controller: str | None, proc_cgroup: Path = PROC_CGROUP) -> str:
    """This process's cgroup path for the v1 ``controller`` (None: the v2 unified hierarchy)."""
    for line in proc_cgroup.read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (controller is None and controllers == "") or (controller in controllers.split(",")):
            return path
    raise ConfigError(f"this process is in no {'cgroup v2' if controller is None else controller} cgroup")


def cpu_quota(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time this process's CPU quota allows (1.5: 150 ms per 100 ms), the tightest over its cgroup
    and the cgroups above it, v2 and v1; None where no quota is set or none can be read."""
    quotas: list[float] = []
    for controller, folder, read in ((None, root, _v2_quota), ("cpu", root / "cpu", _v1_quota)):
        try:
            path = own_cgroup(controller, proc_cgroup)
        except (OSError, ConfigError, ValueError):
            continue
        # The cgroup, then each one above it; inside a container without a cgroup namespace the path is the host's
        # and only the mount's own files (the container's cgroup) exist.
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            quota = read(folder.joinpath(*parts[:depth]))
            if quota is not None:
                quotas.append(quota)
    return min(quotas) if quotas else None


def _v2_quota(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def visible_cpus() -> int:
    """CPUs in this process's affinity mask (all of the machine's where the platform has no mask)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_budget() -> int:
    """CPUs this process can keep busy: the affinity mask's, capped by the quota rounded down (at least 1): one
    thread more than the quota runs gets the whole group throttled."""
    quota = cpu_quota()
    visible = visible_cpus()
    return visible if quota is None else max(1, min(visible, math.floor(quota)))


def thread_cap() -> dict[str, str]:
    """What to add to the environment before torch loads so that its threads (and those of processes started from
    here) fit a CPU quota tighter than the affinity mask: ``{"OMP_NUM_THREADS": "N"}``, or nothing where no quota
    binds or ``OMP_NUM_THREADS`` is set already."""
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    budget = cpu_budget()
    return {"OMP_NUM_THREADS": str(budget)} if budget < visible_cpus() else {}


#: GOMP_SPINCOUNT for a body server (``openmp_waiting``): about a millisecond of spinning on this project's VMs.
SERVER_SPINCOUNT = "100000"


def openmp_waiting(serving: bool) -> dict[str, str]:
    """What to add to the environment before torch loads so that its idle OpenMP threads wait as this process should.

    Everywhere: ``OMP_WAIT_POLICY=PASSIVE``, unless set: by default libgomp's idle threads spin for a while after every
    parallel region, so a device and a body server taking turns on the same cores steal each other's CPU (the body's
    forward took 48.7 ms instead of 42.8 on 2 cores).

    A body server (``serving``) also spins ``SERVER_SPINCOUNT`` times before it sleeps (``GOMP_SPINCOUNT``), unless
    either variable is set otherwise. Waking a sleeping thread for each of a forward's few hundred parallel regions
    cost a 10-row token tree 64.2 ms a step instead of 44.7 over an emulated wireless link (SmolLM2 at 2:-2, 2
    threads, an ad hoc run); a one-row step took 44.8 against 44.3. Spinning about 1 ms keeps the second thread
    awake through a forward and costs the device sharing the machine about that much of one core after it. The
    server runs all its torch work on one thread for this (``server.batching.compute_thread``): libgomp barely spins
    once more threads than CPUs are in its teams."""
    out = {} if "OMP_WAIT_POLICY" in os.environ else {"OMP_WAIT_POLICY": "PASSIVE"}
    policy = os.environ.get("OMP_WAIT_POLICY", "PASSIVE").strip().upper()
    if serving and policy == "PASSIVE" and "GOMP_SPINCOUNT" not in os.environ:
        out["GOMP_SPINCOUNT"] = SERVER_SPINCOUNT
    return out
