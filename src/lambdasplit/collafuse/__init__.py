"""CollaFuse (collaborative training of a split diffusion model): a server U-Net learns the noisy timesteps
t > t_c = (1 - c) T from every client, each client's U-Net the rest, and client images stay on the client.

``lambdasplit collafuse server|client`` runs the training over WebSockets (`CollaFuseServer`, `CollaFuseClient`);
each side exports a diffusers pipeline, and inference is the split ``collafuse`` policy (``serve`` +
``imagine --policy collafuse --cut-ratio c``). docs/collafuse.md has the protocol, the measurements and what the
server can still learn from the rows it receives.
"""

from __future__ import annotations

from lambdasplit.collafuse.client import ClientReport, CollaFuseClient
from lambdasplit.collafuse.data import ClientImages, client_images, client_scenes
from lambdasplit.collafuse.model import Learner, PublicParts, export_pipeline, handoff_timestep
from lambdasplit.collafuse.server import CollaFuseServer, ServerReport, ServerSettings

__all__ = [
    "ClientImages",
    "ClientReport",
    "CollaFuseClient",
    "CollaFuseServer",
    "Learner",
    "PublicParts",
    "ServerReport",
    "ServerSettings",
    "client_images",
    "client_scenes",
    "export_pipeline",
    "handoff_timestep",
]
