"""A local Ray cluster of two nodes on this machine (a head and a worker raylet), started once per test session.

``ray_cluster`` yields ``lambdasplit.rayserve.local.LocalCluster`` (``address``, ``node_ids`` head first) with this
process connected as the driver. Each node gets 4 logical CPUs (scheduling slots for a few stage actors and Serve
replicas, not threads) and a 128 MiB object store; the start is bounded, Ray's files go to a temporary folder.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from ray import serve

from lambdasplit.rayserve.local import LocalCluster, local_cluster


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[LocalCluster]:
    with local_cluster(nodes=2, cpus_per_node=4, object_store_bytes=128 << 20, timeout=120) as cluster:
        try:
            yield cluster
        finally:
            serve.shutdown()  # Serve's controller and proxy, if a test started them


@pytest.fixture(scope="session")
def serve_port(ray_cluster: LocalCluster) -> int:
    """The port of Serve's proxy on the test cluster: Serve keeps the HTTP options of its first start on a cluster,
    so every deployment of the session uses this one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
