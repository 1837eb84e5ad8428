"""What the network sees: every frame the agent exchanges with the cloud, as events for the web UI.

``ObservedLink`` wraps a ``RemoteBodyLink``: after each step it decodes the frame exactly as it was sent
(so the heatmap shows the transmitted values, after the wire dtype's rounding) and publishes its size,
position and last row. ``NetworkFeed`` fans events out to the UI's server-sent-event subscribers; it is
fed from generation threads and read on the event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from lambdasplit.client.connection import RemoteBodyLink
from lambdasplit.generation.session import Traffic
from lambdasplit.wire import decode_frame, frame_tensor

#: Events whose bytes count in the totals: a text step's round trip; an image's inputs, steps and close, and what a
#: lost attempt sent that its steps had not reported.
_COUNTED = ("step", "image_inputs", "image_step", "image_close", "image_restart")
#: Events kept for a subscriber that reads slowly; older ones are dropped (the totals stay right).
QUEUE_SIZE = 256


@dataclass
class NetworkFeed:
    """Totals since the agent started, the last step, and live subscribers."""

    up_bytes: int = 0
    down_bytes: int = 0
    steps: int = 0
    requests: int = 0
    last: dict[str, Any] | None = None
    _subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[dict[str, Any]]]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_SIZE)
        with self._lock:
            self._subscribers.append((asyncio.get_running_loop(), queue))
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        with self._lock:
            self._subscribers = [(loop, q) for loop, q in self._subscribers if q is not queue]

    def totals(self) -> dict[str, int]:
        return {
            "up_bytes": self.up_bytes,
            "down_bytes": self.down_bytes,
            "steps": self.steps,
            "requests": self.requests,
        }

    def publish(self, event: dict[str, Any]) -> None:
        """Send ``event`` (with the current totals) to every subscriber; callable from any thread."""
        with self._lock:
            if event["type"] in _COUNTED:
                self.up_bytes += event["up_bytes"]
                self.down_bytes += event["down_bytes"]
            if event["type"] in ("step", "image_step"):
                self.steps += 1
            if event["type"] == "step":
                self.last = event
            event = {**event, "totals": self.totals()}
            subscribers = list(self._subscribers)
        for loop, queue in subscribers:
            loop.call_soon_threadsafe(_offer, queue, event)

    def new_request(self, prompt_view: Any, endpoint: str) -> str:
        """Announce a request; ``prompt_view`` is what a cloud-only service would have received in plain text."""
        with self._lock:
            self.requests += 1
            request_id = f"r{next(self._ids)}"
        self.publish(
            {"type": "request", "request": request_id, "endpoint": endpoint, "cloud_only_would_see": prompt_view}
        )
        return request_id


def _offer(queue: asyncio.Queue[dict[str, Any]], event: dict[str, Any]) -> None:
    if queue.full():
        queue.get_nowait()  # drop the oldest: a UI that lags sees the newest state
    queue.put_nowait(event)


class ObservedLink:
    """A ``BodyLink`` that reports each round trip of ``link`` to ``feed``."""

    def __init__(self, link: RemoteBodyLink, feed: NetworkFeed, request: str) -> None:
        self.link, self.feed, self.request = link, feed, request

    @property
    def traffic(self) -> Traffic:
        return self.link.traffic

    @property
    def trees(self) -> bool:
        return self.link.trees

    def forward(self, hidden: torch.Tensor, position: int, reset: bool = False, last: bool = False) -> torch.Tensor:
        out = self.link.forward(hidden, position, reset, last)
        self._publish(position)
        return out

    def forward_tree(
        self, hidden: torch.Tensor, position: int, parents: list[int] | None, keep: tuple[int, list[int]] | None
    ) -> torch.Tensor:
        out = self.link.forward_tree(hidden, position, parents, keep)
        self._publish(position)
        return out

    def _publish(self, position: int) -> None:
        sent = decode_frame(self.link.last_sent, self.link.client.limits)
        transmitted = frame_tensor(sent, dtype=torch.float32)  # (rows, D) as it crossed the wire
        self.feed.publish(
            {
                "type": "step",
                "request": self.request,
                "position": position,
                "rows": int(transmitted.shape[0]),
                "hidden_size": int(transmitted.shape[1]),
                "wire_dtype": self.link.wire_dtype.name.lower(),
                "up_bytes": self.link.last_sent_bytes,
                "down_bytes": len(self.link.last_received),
                "last_row": [round(float(x), 4) for x in transmitted[-1].tolist()],
            }
        )

    def close(self) -> None:
        self.link.close()
