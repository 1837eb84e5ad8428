"""Which replica a new device connection goes to: the one holding the fewest connections, wherever it runs.

Serve's default router (power of two choices) first tries replicas on the proxy's own node and takes one there
whenever it has room below ``max_ongoing_requests``. For short HTTP requests that saves a hop. A device's WebSocket
instead lasts for the device's whole stay and its steps keep that replica busy, so locality would pile every
device onto the proxy's node while replicas elsewhere sit idle (measured on a two-node cluster: 8 of 8 devices
on one of two replicas). Here every running replica is a candidate, and Serve's own selection then takes the one
that reports the fewest ongoing requests, i.e. open device connections.
"""

from __future__ import annotations

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


class FewestConnectionsRouter(FIFOMixin, RequestRouter):
    """Least-connections routing over all replicas (no node or zone preference)."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        return [list(candidate_replicas)] if candidate_replicas else []
