"""The device side of networked split inference: a connection to a body server."""

from lambdasplit.client.connection import CloudClient, RemoteBodyLink, SocketBytes
from lambdasplit.client.device import connect_device

__all__ = ["CloudClient", "RemoteBodyLink", "SocketBytes", "connect_device"]
