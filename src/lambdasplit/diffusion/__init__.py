"""Split text-to-image: diffusers SD 1.x/2.x and SDXL pipelines with the U-Net (or its middle) in the cloud.

Policies (``POLICIES``): ``paper`` (Λ-Split: the cloud holds the U-Net and returns the guided noise each step),
``unet-lambda`` (the outer U-Net blocks and their skips stay on the device) and ``collafuse`` (the cloud runs the
first steps, CollaFuse's cut ratio c of them, the device the last ones). `SplitPipeline.generate` runs the device's
side through a link: `LocalLink` in-process, `lambdasplit.client.RemoteDiffusionLink` over the network.

Names load on first use, so ``import lambdasplit.diffusion`` (and the CLI) does not import diffusers.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from lambdasplit.diffusion.protocol import DEFAULT_PIPELINE, GRANULARITIES, POLICIES, SessionOptions

_EXPORTS = {
    "DiffusionBody": "lambdasplit.diffusion.cloud",
    "DiffusionSession": "lambdasplit.diffusion.cloud",
    "LocalLink": "lambdasplit.diffusion.device",
    "SplitImage": "lambdasplit.diffusion.device",
    "SplitPipeline": "lambdasplit.diffusion.device",
    "FrameTraffic": "lambdasplit.diffusion.protocol",
    "load_pipeline": "lambdasplit.diffusion.pipeline",
    "load_unet": "lambdasplit.diffusion.pipeline",
    "load_unet_config": "lambdasplit.diffusion.pipeline",
    "UNetParts": "lambdasplit.diffusion.unet",
}

__all__ = [
    "DEFAULT_PIPELINE",
    "GRANULARITIES",
    "POLICIES",
    "DiffusionBody",
    "DiffusionSession",
    "FrameTraffic",
    "LocalLink",
    "SessionOptions",
    "SplitImage",
    "SplitPipeline",
    "UNetParts",
    "load_pipeline",
    "load_unet",
    "load_unet_config",
]

if TYPE_CHECKING:
    from lambdasplit.diffusion.cloud import DiffusionBody, DiffusionSession
    from lambdasplit.diffusion.device import LocalLink, SplitImage, SplitPipeline
    from lambdasplit.diffusion.pipeline import load_pipeline, load_unet, load_unet_config
    from lambdasplit.diffusion.protocol import FrameTraffic
    from lambdasplit.diffusion.unet import UNetParts


#: Old names kept working for a while, with a warning that gives the new one.
_DEPRECATED = {"Traffic": "FrameTraffic"}


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED:
        new = _DEPRECATED[name]
        warnings.warn(
            f"lambdasplit.diffusion.{name} is now lambdasplit.diffusion.{new} (the LLM side's Traffic is another "
            "thing); the old name will be removed",
            DeprecationWarning,
            stacklevel=2,
        )
        return __getattr__(new)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lambdasplit.diffusion' has no attribute {name!r}")
