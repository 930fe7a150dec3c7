"""onnxcomp: framework-agnostic ONNX model compression, validated in ONNX Runtime.

    result = onnxcomp.compress("model.onnx", recipe, calibration_data=...)
    result.save("model.compressed.onnx"); print(result.report)
"""
from __future__ import annotations

from .api import CompressionResult, compress, validate
from .errors import (AccuracyBudgetError, CalibrationDataError, InternalError, InvalidModelError, MetricError,
                     OnnxCompError, RecipeError, RewriteError, SaveError, UnsupportedModelError)
from .recipe import AccuracyBudget, AutoSearch, Recipe, presets
from .report import Report

__version__ = "0.1.0"

__all__ = [
    "compress", "validate", "presets", "CompressionResult", "Recipe", "AccuracyBudget", "AutoSearch", "Report",
    "OnnxCompError", "InvalidModelError", "UnsupportedModelError", "RecipeError", "CalibrationDataError",
    "MetricError", "RewriteError", "SaveError", "AccuracyBudgetError", "InternalError", "__version__",
]
