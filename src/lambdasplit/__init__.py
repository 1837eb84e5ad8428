"""lambdasplit: privacy-preserving split inference of generative AI (Λ-Split).

    >>> import lambdasplit
    >>> split = lambdasplit.load_split("smollm2-135m-instruct", layers="2:28")
    >>> lambdasplit.generate(split, "Why is the sky blue?", chat=True, max_new_tokens=64).text

The names below are the public API; they are imported on first use, so ``import lambdasplit`` is cheap
and does nothing else.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # split engine
    "load_split": "lambdasplit.split",
    "SplitModel": "lambdasplit.split",
    "Head": "lambdasplit.split",
    "Body": "lambdasplit.split",
    "Tail": "lambdasplit.split",
    "verify_split": "lambdasplit.generation.verify",
    # configuration
    "SplitPoints": "lambdasplit.config",
    "Runtime": "lambdasplit.config",
    # generation
    "generate": "lambdasplit.generation",
    "stream": "lambdasplit.generation",
    "SamplingParams": "lambdasplit.generation",
    "GenerationResult": "lambdasplit.generation",
    "TokenEvent": "lambdasplit.generation",
    "BodyLink": "lambdasplit.generation",
    "LocalBodyLink": "lambdasplit.generation",
    "Traffic": "lambdasplit.generation",
    # speculative steps
    "Drafter": "lambdasplit.generation",
    "DraftLength": "lambdasplit.generation",
    "PromptLookupDrafter": "lambdasplit.generation",
    "ModelDrafter": "lambdasplit.generation",
    # privacy: what the link carries, keys
    "intercept": "lambdasplit.privacy",
    "Intercept": "lambdasplit.privacy",
    "ObfuscationKey": "lambdasplit.privacy",
    "make_key": "lambdasplit.privacy",
    "protect": "lambdasplit.privacy",
    # PrivateLoRA: private adapters on the device, the decoder stack in the cloud
    "AdapterLayout": "lambdasplit.privatelora",
    "AdapterLink": "lambdasplit.privatelora",
    "AdapterServer": "lambdasplit.privatelora",
    "PrivateAdapters": "lambdasplit.privatelora",
    "SplitTrainer": "lambdasplit.privatelora",
    # TLS: what a device trusts (a pinned fingerprint, a CA, or trust on first use)
    "TlsTrust": "lambdasplit.tls",
    # the research suite that measures them (imported on first use, like every name here)
    "AuditSettings": "lambdasplit.audit",
    "run_audit": "lambdasplit.audit",
    # split text-to-image
    "SplitPipeline": "lambdasplit.diffusion",
    "DiffusionBody": "lambdasplit.diffusion",
    "load_pipeline": "lambdasplit.diffusion",
    # models
    "DEFAULT_MODEL": "lambdasplit.models",
    "resolve_checkpoint": "lambdasplit.models",
    # errors
    "LambdaSplitError": "lambdasplit.errors",
    "ConfigError": "lambdasplit.errors",
    "SplitPointError": "lambdasplit.errors",
    "ModelLoadError": "lambdasplit.errors",
    "UnsupportedModelError": "lambdasplit.errors",
    "SessionError": "lambdasplit.errors",
    "WireError": "lambdasplit.errors",
    "FrameError": "lambdasplit.errors",
    "RemoteError": "lambdasplit.errors",
    "UntrustedCertificate": "lambdasplit.errors",
}

__all__ = [
    "DEFAULT_MODEL",
    "AdapterLayout",
    "AdapterLink",
    "AdapterServer",
    "AuditSettings",
    "Body",
    "BodyLink",
    "ConfigError",
    "DiffusionBody",
    "DraftLength",
    "Drafter",
    "FrameError",
    "GenerationResult",
    "Head",
    "Intercept",
    "LambdaSplitError",
    "LocalBodyLink",
    "ModelDrafter",
    "ModelLoadError",
    "ObfuscationKey",
    "PrivateAdapters",
    "PromptLookupDrafter",
    "RemoteError",
    "Runtime",
    "SamplingParams",
    "SessionError",
    "SplitModel",
    "SplitPipeline",
    "SplitPointError",
    "SplitPoints",
    "SplitTrainer",
    "Tail",
    "TlsTrust",
    "TokenEvent",
    "Traffic",
    "UnsupportedModelError",
    "UntrustedCertificate",
    "WireError",
    "generate",
    "intercept",
    "load_pipeline",
    "load_split",
    "make_key",
    "protect",
    "resolve_checkpoint",
    "run_audit",
    "stream",
    "verify_split",
]

if TYPE_CHECKING:
    from lambdasplit.audit import AuditSettings, run_audit
    from lambdasplit.config import Runtime, SplitPoints
    from lambdasplit.diffusion import DiffusionBody, SplitPipeline, load_pipeline
    from lambdasplit.errors import (
        ConfigError,
        FrameError,
        LambdaSplitError,
        ModelLoadError,
        RemoteError,
        SessionError,
        SplitPointError,
        UnsupportedModelError,
        UntrustedCertificate,
        WireError,
    )
    from lambdasplit.generation import (
        BodyLink,
        Drafter,
        DraftLength,
        GenerationResult,
        LocalBodyLink,
        ModelDrafter,
        PromptLookupDrafter,
        SamplingParams,
        TokenEvent,
        Traffic,
        generate,
        stream,
    )
    from lambdasplit.generation.verify import verify_split
    from lambdasplit.models import DEFAULT_MODEL, resolve_checkpoint
    from lambdasplit.privacy import Intercept, ObfuscationKey, intercept, make_key, protect
    from lambdasplit.privatelora import AdapterLayout, AdapterLink, AdapterServer, PrivateAdapters, SplitTrainer
    from lambdasplit.split import Body, Head, SplitModel, Tail, load_split
    from lambdasplit.tls import TlsTrust


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lambdasplit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
