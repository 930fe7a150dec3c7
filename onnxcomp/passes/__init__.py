"""Compression passes, one module each, registered explicitly here (no import side effects)."""
from __future__ import annotations

from .base import Pass, PassContext, PassManager, PassOutcome, PassRecord
from .cleanup import Cleanup
from .quantize import Quantize

#: recipe `type` -> pass class. Adding a pass = one module + one line here + its tests.
REGISTRY: dict[str, type[Pass]] = {
    Cleanup.name: Cleanup,
    Quantize.name: Quantize,
}

__all__ = ["Pass", "PassContext", "PassManager", "PassOutcome", "PassRecord", "Cleanup", "Quantize", "REGISTRY"]
