"""Validation: compare a candidate model with its reference in ONNX Runtime (numerics, latency, size)."""
from __future__ import annotations

from .numerics import OutputError
from .validator import ValidationReport, validate

__all__ = ["validate", "ValidationReport", "OutputError"]
