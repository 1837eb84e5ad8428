"""A local Ray cluster of two nodes on this machine (a head and a worker raylet), started once per session."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import ray
from ray.cluster_utils import Cluster


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Cluster]:
    """Two raylets (head + worker), each with 4 logical CPUs and a small object store; this process is the
    driver. Replicas and stage actors ask for fractions of a CPU, so several fit on this 2-core machine."""
    node = {"num_cpus": 4, "object_store_memory": 100 * 2**20, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=node)
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="session")
def serve_port(ray_cluster: Cluster) -> int:
    """The port of Serve's proxy on the test cluster: Serve keeps the HTTP options of its first start on a cluster,
    so every deployment of the session uses this one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
