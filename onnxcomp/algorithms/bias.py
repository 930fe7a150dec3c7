"""Bias correction (as in NNCF's fast bias correction and Quark): the mean output shift a weight error causes.

A layer y = x W + b whose weight is rounded to W_q outputs, on average over the calibration data, (W_q - W)^T E[x]
more than the float one; subtracting that from b removes the mean part of the output error exactly (on that
data), whatever the rounding. Needs only E[x], which the Gram collection (sum of the rows) already gives.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np


def output_mean_shift(kind: str, attrs: Mapping[str, Any], dw: np.ndarray, mean: np.ndarray) -> Optional[np.ndarray]:
    """The per-output mean shift of weight error `dw` for inputs of mean `mean`, in the bias's units: `kind`
    MatMul (dw [K, N], mean [K]), Gemm (dw as `attrs`' transB stores it; alpha applied, divided by beta, the
    bias's scale), Conv (dw [O, I, kh, kw], mean per input channel [I]; padding ignored). None when the shapes
    do not fit (a grouped Conv, a mean over another axis)."""
    mean = np.asarray(mean, np.float64)
    if kind == "Conv":
        if attrs.get("group", 1) != 1 or dw.ndim < 3 or dw.shape[1] != mean.shape[0]:
            return None
        return dw.reshape(dw.shape[0], dw.shape[1], -1).sum(axis=2) @ mean
    m = dw.T if kind == "Gemm" and attrs.get("transB", 0) else dw
    if m.ndim != 2 or m.shape[0] != mean.shape[0]:
        return None
    shift = mean @ m
    if kind == "Gemm":
        shift = shift * float(attrs.get("alpha", 1.0)) / float(attrs.get("beta", 1.0))
    return shift
