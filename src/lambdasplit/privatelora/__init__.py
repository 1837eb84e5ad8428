"""PrivateLoRA (``../shared/papers/privatelora.txt``): private low-rank adapters on the device, the shared decoder
stack in the cloud, low-rank residual transmission between them, and fine-tuning across the split.

- ``AdapterLayout``: which projections carry ``Delta W = A M B``, the ranks, the seed A and B come from;
- ``PrivateAdapters``: the device's M (trained, saved and loaded on the device only);
- ``CloudAdapters``: the cloud's frozen A and B wrapped around a body's own projections;
- ``AdapterServer`` / ``AdapterLink``: the body server and the device's session (``messages`` has the protocol);
- ``SplitTrainer``: fine-tuning M across the split; ``LocalAdapterBody``: the same in one process;
- ``merge_into``: W + A M B folded into a whole model (the reference a split run equals).

What the cloud can still read is measured, not assumed: docs/threat-model.md.
"""

from lambdasplit.privatelora.cloud import CloudAdapters, LocalExchange, exchanging
from lambdasplit.privatelora.layout import DEFAULT_RANK, DEFAULT_TARGETS, AdapterLayout
from lambdasplit.privatelora.link import AdapterLink
from lambdasplit.privatelora.merge import merge_into
from lambdasplit.privatelora.private import PrivateAdapters
from lambdasplit.privatelora.server import AdapterServer
from lambdasplit.privatelora.training import LocalAdapterBody, SplitTrainer, StepReport

__all__ = [
    "DEFAULT_RANK",
    "DEFAULT_TARGETS",
    "AdapterLayout",
    "AdapterLink",
    "AdapterServer",
    "CloudAdapters",
    "LocalAdapterBody",
    "LocalExchange",
    "PrivateAdapters",
    "SplitTrainer",
    "StepReport",
    "exchanging",
    "merge_into",
]
