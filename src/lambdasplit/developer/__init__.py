"""The model developer's tools (STIP's third party): package a private model into bundles."""

from lambdasplit.developer.package import PackageReport, package

__all__ = ["PackageReport", "package"]
