"""A Ray cluster of several nodes on this one machine: for tests, benchmarks and demos of bodies across machines.

Each node is its own raylet with its own object store, so actors placed on different nodes pass tensors the way
actors on two machines do (object store to object store), only over loopback. Logical CPUs (``cpus_per_node``)
are scheduling slots, not threads: more than the machine's cores lets a few actors (stages, Serve replicas) fit.
Ray's files go to a short temporary folder (its Unix socket paths must stay under ~100 characters) removed
afterwards, and the node's dashboard agent takes a free port: concurrent clusters on one machine do not collide.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
from ray._private.utils import get_ray_address_file
from ray.cluster_utils import Cluster

from lambdasplit.errors import ConfigError


@dataclass(frozen=True)
class LocalCluster:
    """A running local cluster: its address (what ``ray.init`` and Serve connect to) and node ids, head first."""

    address: str
    node_ids: tuple[str, ...]
    temp_dir: str


@contextlib.contextmanager
def local_cluster(
    nodes: int = 2,
    *,
    cpus_per_node: int = 4,
    object_store_bytes: int = 128 << 20,
    timeout: float = 120.0,
    connect: bool = True,
) -> Iterator[LocalCluster]:
    """Start ``nodes`` Ray nodes on this machine (a head and ``nodes - 1`` workers) and, with ``connect``, connect
    this process as the driver; everything is shut down and removed on exit. ``timeout`` bounds the start.

    Worker processes start from this process's environment (``PYTHONPATH`` included), so actors import the same
    lambdasplit as the caller.
    """
    if nodes < 1:
        raise ConfigError(f"a cluster needs at least one node, got nodes={nodes}")
    if ray.is_initialized():
        raise ConfigError("this process is already connected to Ray; call ray.shutdown() before a local cluster")
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    node: dict[str, Any] = dict(
        num_cpus=cpus_per_node,
        object_store_memory=object_store_bytes,
        temp_dir=temp,
        dashboard_agent_listen_port=None,  # a free port, not 52365
    )
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Cluster records the head's address in Ray's default temp folder whatever temp_dir says, and does not create
    # that folder: on a machine where Ray never ran, the start fails with FileNotFoundError.
    os.makedirs(os.path.dirname(get_ray_address_file(None)), exist_ok=True)
    start = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(**node)
        cluster.wait_for_nodes(timeout=timeout)
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"the local Ray cluster of {nodes} nodes took over {timeout:.0f} s to start")
        if connect:
            ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
        assert cluster.head_node is not None  # initialize_head=True
        head = cluster.head_node.node_id
        workers = sorted(n.node_id for n in cluster.worker_nodes)
        yield LocalCluster(cluster.address, (head, *workers), temp)
    finally:
        if connect:
            ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
