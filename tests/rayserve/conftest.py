"""A local Ray cluster of two nodes on this machine (a head and a worker raylet), started once per test session.

``ray_cluster`` yields ``lambdasplit.rayserve.local.LocalCluster`` (``address``, ``node_ids`` head first) with this
process connected as the driver. Each node gets 4 logical CPUs (scheduling slots for a few stage actors and Serve
replicas, not threads) and a 128 MiB object store; the start is bounded, Ray's files go to a temporary folder.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    pytest.importorskip("ray")
    from lambdasplit.rayserve.local import local_cluster

    with local_cluster(nodes=2, cpus_per_node=4, object_store_bytes=128 << 20, timeout=120) as cluster:
        yield cluster
