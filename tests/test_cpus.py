"""CPUs a process may use: cgroup quotas (v2 and v1, the tightest up the tree), and the cap on torch's threads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lambdasplit import cpus
from lambdasplit.bench.cpulimit import CpuLimit, cpu_limit_unavailable
from lambdasplit.cpus import SERVER_SPINCOUNT, cpu_budget, cpu_quota, openmp_waiting, thread_cap, visible_cpus


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v2_quota_is_the_tightest_of_the_cgroup_and_those_above(tmp_path: Path) -> None:
    proc, root = tmp_path / "cgroup", tmp_path / "fs"
    _write(proc, "0::/pods/web\n")
    _write(root / "pods" / "web" / "cpu.max", "150000 100000\n")
    _write(root / "pods" / "cpu.max", "max 100000\n")
    assert cpu_quota(proc, root) == 1.5
    _write(root / "pods" / "cpu.max", "50000 100000\n")  # the parent's quota binds its children
    assert cpu_quota(proc, root) == 0.5
    _write(root / "pods" / "cpu.max", "max 100000\n")
    _write(root / "pods" / "web" / "cpu.max", "max 100000\n")
    assert cpu_quota(proc, root) is None


def test_v1_quota_and_a_container_that_sees_only_its_own_cgroup(tmp_path: Path) -> None:
    proc, root = tmp_path / "cgroup", tmp_path / "fs"
    _write(proc, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/docker/abc\n")
    # Without a cgroup namespace the path is the host's; the container's own cgroup is the mount's root.
    _write(root / "cpu" / "cpu.cfs_quota_us", "200000\n")
    _write(root / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert cpu_quota(proc, root) == 2.0
    _write(root / "cpu" / "cpu.cfs_quota_us", "-1\n")  # no quota
    assert cpu_quota(proc, root) is None
    _write(root / "cpu" / "docker" / "abc" / "cpu.cfs_quota_us", "250000\n")
    _write(root / "cpu" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    assert cpu_quota(proc, root) == 2.5


def test_no_cgroup_files_no_quota(tmp_path: Path) -> None:
    assert cpu_quota(tmp_path / "missing", tmp_path) is None
    _write(tmp_path / "cgroup", "0::/\n")
    _write(tmp_path / "cpu.max", "garbage\n")
    assert cpu_quota(tmp_path / "cgroup", tmp_path) is None


def test_the_budget_rounds_the_quota_down_and_caps_torch_only_where_it_binds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus, "visible_cpus", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for quota, budget in ((None, 8), (2.9, 2), (0.25, 1), (16.0, 8)):
        monkeypatch.setattr(cpus, "cpu_quota", lambda q=quota: q)
        assert cpu_budget() == budget
        assert thread_cap() == ({"OMP_NUM_THREADS": str(budget)} if budget < 8 else {})
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands
    assert thread_cap() == {}


def test_openmp_threads_wait_passively_and_a_body_server_spins_first_unless_the_user_said(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert openmp_waiting(serving=False) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp_waiting(serving=True) == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": SERVER_SPINCOUNT}
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")  # a device's default, inherited by the server it starts
    assert openmp_waiting(serving=True) == {"GOMP_SPINCOUNT": SERVER_SPINCOUNT}
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice stands
    assert openmp_waiting(serving=True) == openmp_waiting(serving=False) == {}
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")
    assert openmp_waiting(serving=True) == {}


def test_the_command_line_sets_the_waiting_for_serve_only() -> None:
    code = (
        "import os, sys; import lambdasplit.cli.app as app; from lambdasplit.cli import main; "
        "app.run = lambda: print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY')); "
        "sys.argv = ['lambdasplit', *sys.argv[1:]]; main()"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    seen = []
    for args in (["serve", "--port", "0"], ["generate", "serve"], ["--help"]):
        run = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120)
        seen.append(run.stdout.split())
    assert seen == [[SERVER_SPINCOUNT, "PASSIVE"], ["None", "PASSIVE"], ["None", "PASSIVE"]]


@pytest.mark.skipif(cpu_limit_unavailable() is not None, reason=str(cpu_limit_unavailable()))
@pytest.mark.skipif(torch.get_num_threads() < 2, reason="torch runs 1 thread here anyway: no quota to show binding")
def test_a_process_in_a_one_cpu_cgroup_runs_torch_on_one_thread() -> None:
    # A real cgroup with a quota (as root); the child is started inside it, as a container's process would be.
    code = (
        "import os; from lambdasplit.cpus import cpu_budget, thread_cap; os.environ.update(thread_cap()); "
        "import torch; print(cpu_budget(), torch.get_num_threads())"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    with CpuLimit(1.0) as limit, limit.applied():
        inside = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    outside = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout.split() == ["1", "1"]
    assert outside.stdout.split() == [str(visible_cpus()), str(torch.get_num_threads())]  # torch's own default
