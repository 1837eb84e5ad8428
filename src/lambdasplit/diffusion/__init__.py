"""Split text-to-image: diffusers SD 1.x/2.x and SDXL pipelines with the U-Net (or its middle) in the cloud.

Policies (``POLICIES``): ``paper`` (Λ-Split: the cloud holds the U-Net and returns the guided noise each step),
``unet-lambda`` (the outer U-Net blocks and their skips stay on the device) and ``collafuse`` (the cloud runs the
first steps, the device the last ones). `SplitPipeline.generate` runs the device's side through a link:
`LocalLink` in-process, `lambdasplit.client.RemoteDiffusionLink` over the network.
"""

from lambdasplit.diffusion.cloud import DiffusionBody, DiffusionSession
from lambdasplit.diffusion.device import LocalLink, SplitImage, SplitPipeline, Traffic
from lambdasplit.diffusion.pipeline import DEFAULT_PIPELINE, load_pipeline, load_unet, load_unet_config
from lambdasplit.diffusion.protocol import GRANULARITIES, POLICIES, SessionOptions
from lambdasplit.diffusion.unet import UNetParts

__all__ = [
    "DEFAULT_PIPELINE",
    "GRANULARITIES",
    "POLICIES",
    "DiffusionBody",
    "DiffusionSession",
    "LocalLink",
    "SessionOptions",
    "SplitImage",
    "SplitPipeline",
    "Traffic",
    "UNetParts",
    "load_pipeline",
    "load_unet",
    "load_unet_config",
]
