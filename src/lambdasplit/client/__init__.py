"""The device side of networked split inference: a connection to a body server."""

from lambdasplit.client.connection import CloudClient, CloudText, RemoteBodyLink, SocketBytes
from lambdasplit.client.device import connect_device
from lambdasplit.client.diffusion import RemoteDiffusionLink, restarting

__all__ = [
    "CloudClient",
    "CloudText",
    "RemoteBodyLink",
    "RemoteDiffusionLink",
    "SocketBytes",
    "connect_device",
    "restarting",
]
