"""STIP's model developer: fine-tune a base model on private text (``finetune``), written as a plain checkpoint
with a record of how far every weight moved; package a private model into a server bundle and user bundles
(``package``), with fresh secrets per user group."""

from lambdasplit.developer.finetune import Progress, finetune, relative_change
from lambdasplit.developer.package import PackageReport, package
from lambdasplit.developer.settings import (
    DEFAULT_LR,
    DEFAULT_TARGETS,
    METHODS,
    REPORT_FILE,
    FinetuneReport,
    FinetuneSettings,
)

__all__ = [
    "DEFAULT_LR",
    "DEFAULT_TARGETS",
    "METHODS",
    "REPORT_FILE",
    "FinetuneReport",
    "FinetuneSettings",
    "PackageReport",
    "Progress",
    "finetune",
    "package",
    "relative_change",
]
