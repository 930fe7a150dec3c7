"""One exception hierarchy: every error onnxcomp raises derives from OnnxCompError."""
from __future__ import annotations


class OnnxCompError(Exception):
    """Base class of every error raised by onnxcomp (CLI exit code 2 unless stated)."""

    exit_code = 2


class InvalidModelError(OnnxCompError):
    """The model file or ModelProto cannot be read, or a produced model fails onnx.checker/ORT."""


class UnsupportedModelError(OnnxCompError):
    """The model is valid ONNX but uses something onnxcomp cannot handle (op, dtype, size)."""


class RecipeError(OnnxCompError):
    """The recipe has an unknown key or value, or an option out of range."""


class CalibrationDataError(OnnxCompError):
    """Calibration/validation feeds do not fit the model (names, shapes, dtypes, emptiness)."""


class MetricError(RecipeError):
    """The accuracy budget's task metric (the user's callable) raised or returned something that is not a number."""


class SaveError(OnnxCompError):
    """The output cannot be written (permissions, a full disk, a path that is not a folder): nothing partial is
    left behind and an existing file at that path is unchanged."""


class RewriteError(OnnxCompError):
    """A rewrite rule or pass produced an invalid graph that could not be rolled back."""


class AccuracyBudgetError(OnnxCompError):
    """The compressed model does not meet the recipe's accuracy_budget."""

    exit_code = 1


class InternalError(OnnxCompError):
    """A fault inside onnxcomp, not in the input: the message says it is a bug and where (pass, step)."""

    exit_code = 3


__all__ = [
    "OnnxCompError",
    "InvalidModelError",
    "UnsupportedModelError",
    "RecipeError",
    "CalibrationDataError",
    "MetricError",
    "RewriteError",
    "SaveError",
    "AccuracyBudgetError",
    "InternalError",
]
