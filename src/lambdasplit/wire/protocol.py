"""The conversation's constants, and how an ERROR frame becomes a typed exception.

``PROTOCOL`` is the version of the device/server conversation (docs/protocol.md), announced in HELLO and
WELCOME; ``VERSION`` in ``frames.py`` is the byte layout's. Both sides import them from here.
"""

from __future__ import annotations

from lambdasplit.errors import RemoteError
from lambdasplit.wire.frames import Frame, MessageType

PROTOCOL = 1
PATH = "/v1/split"  # the WebSocket endpoint of every lambdasplit server


def raise_for_error(frame: Frame) -> Frame:
    """``frame`` itself, unless it is an ERROR frame: then the ``RemoteError`` it carries (code and message)."""
    if frame.type is MessageType.ERROR:
        body = frame.json_body()
        raise RemoteError(str(body.get("message", "")), str(body.get("code", "error")))
    return frame
