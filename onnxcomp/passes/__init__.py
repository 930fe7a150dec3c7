"""Compression passes, one module each, registered explicitly here (no import side effects)."""
from __future__ import annotations

from .base import LayerChange, Pass, PassContext, PassOutcome
from .cleanup import Cleanup
from .lowrank import Lowrank
from .palettize import Palettize
from .quantize import Quantize
from .sparsify import Sparsify

#: recipe `type` -> pass class. Adding a pass = one module + one line here + its tests.
REGISTRY: dict[str, type[Pass]] = {
    Cleanup.name: Cleanup,
    Lowrank.name: Lowrank,
    Palettize.name: Palettize,
    Quantize.name: Quantize,
    Sparsify.name: Sparsify,
}

__all__ = ["LayerChange", "Pass", "PassContext", "PassOutcome", "Cleanup", "Lowrank", "Palettize", "Quantize", "Sparsify", "REGISTRY"]
