"""What crossed the device/cloud boundary: one counter that every body link fills in the same way."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Traffic:
    """What crossed the device/cloud boundary, counted by the link that carried it.

    ``*_bytes`` are whole messages as sent (for a network link: wire frames, header included);
    ``*_payload_bytes`` are the hidden-state tensors alone. In process, both are the tensor bytes.
    """

    up_bytes: int = 0
    down_bytes: int = 0
    up_payload_bytes: int = 0
    down_payload_bytes: int = 0
    messages: int = 0  # round trips
    seconds: float = 0.0  # wall time waiting on the body: its compute plus, over a network, the transfer

    def add(
        self, up: int, down: int, up_payload: int | None = None, down_payload: int | None = None, seconds: float = 0.0
    ) -> None:
        self.seconds += seconds
        self.up_bytes += up
        self.down_bytes += down
        self.up_payload_bytes += up if up_payload is None else up_payload
        self.down_payload_bytes += down if down_payload is None else down_payload
        self.messages += 1
