"""lambdasplit: privacy-preserving split inference of generative AI (Λ-Split)."""

from __future__ import annotations

__version__ = "0.1.0"
