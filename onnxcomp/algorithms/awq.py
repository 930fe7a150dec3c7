"""Activation-aware weight scaling (AWQ, Lin et al. 2023) for low-bit weights: x·W = (x/s)·(diag(s) W).

Input channels that carry large activations matter most to the output; scaling their weight rows up by s_j
before rounding gives them finer levels relative to their size, and the division by s_j moves to the activation
(a Mul the pass folds into a preceding constant Mul where there is one). s = d**alpha with d the RMS of each
input channel over the calibration data, normalised to a geometric mean of 1; alpha is chosen on a grid by the
layer outputs' error under the same rounding the pass will use, measured against the inputs' second moment
E[x x^T] (exact for a linear layer, no extra inference). alpha = 0 is no scaling, so the choice never makes the
proxy error worse. Inputs read by several weights (Q, K, V) share one s, chosen on their summed error.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .gptq import output_error

__all__ = ["ALPHAS", "SAMPLE_ROWS", "ScaleChoice", "sample_rows", "scaled_error", "search_scale"]

#: alpha grid (AWQ's own search uses 20 points over [0, 1); 11 cost half and chose the same alpha on MiniLM-L3)
ALPHAS = tuple(round(a, 2) for a in np.linspace(0.0, 1.0, 11))

#: rounds an output-major weight [rows, K] given its input's second moment E[x x^T] [K, K] (already in the
#: scaled units); returns the dequantized weight (what the model will compute with)
Rounder = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ScaleChoice:
    """The chosen alpha and per-input-channel scale, with the proxy error (summed relative output error of the
    weights) at every alpha tried."""

    alpha: float
    scale: np.ndarray  # [K] float32; divide the activation by it, multiply the weight rows by it
    errors: dict[float, float]

    @property
    def gain(self) -> float:
        """Fraction of the unscaled (alpha 0) error removed: 0 when scaling does not help."""
        e0 = self.errors[0.0]
        return 0.0 if e0 <= 0 else max(0.0, 1.0 - self.errors[self.alpha] / e0)


#: output channels of each weight the search scores (evenly spread): every output channel is rounded on its own
#: grid against the same E[xx^T], so a sample estimates the error without bias at a fraction of the N·K² cost
SAMPLE_ROWS = 512


def sample_rows(w: np.ndarray, rows: int = SAMPLE_ROWS) -> np.ndarray:
    """Output-major [min(N, rows), K] rows of the input-major weight `w` [K, N], evenly spread over N."""
    n = w.shape[1]
    idx = np.unique(np.linspace(0, n - 1, min(n, rows)).round().astype(np.int64))
    return np.ascontiguousarray(np.asarray(w, np.float64)[:, idx].T)


def search_scale(weights: Sequence[np.ndarray], h: np.ndarray, rounder: Rounder,
                 alphas: Sequence[float] = ALPHAS, rows: int = SAMPLE_ROWS) -> ScaleChoice:
    """The alpha (and its scale) with the least summed output error of `weights` (each input-major [K, N_i],
    all read from the same input of second moment `h` [K, K]) when rounded by `rounder` after scaling; each
    weight scored on `rows` of its output channels (`sample_rows`)."""
    h = np.asarray(h, np.float64)
    d = np.sqrt(np.maximum(np.diag(h), 0.0))
    d = np.where(d > 0, d, d[d > 0].min() if np.any(d > 0) else 1.0)
    wms = [sample_rows(w, rows) for w in weights]  # output-major [<= rows, K]
    errors: dict[float, float] = {}
    scales: dict[float, np.ndarray] = {}
    for a in alphas:
        s = d ** a
        s = s / np.sqrt(s.max() * s.min())  # geometric middle at 1: neither side of the product drifts
        s = np.clip(s, 1e-4, 1e4)
        errors[float(a)], scales[float(a)] = scaled_error(wms, h, s, rounder), s.astype(np.float32)
    best = min(errors, key=lambda k: (errors[k], k))
    return ScaleChoice(best, scales[best], errors)


def scaled_error(wms: Sequence[np.ndarray], h: np.ndarray, s: np.ndarray, rounder: Rounder) -> float:
    """Summed relative output error of the output-major weights `wms` rounded by `rounder` after scaling their
    inputs by `s` (x/s, diag(s) W), against inputs of second moment `h`."""
    h = np.asarray(h, np.float64)
    hs = h / np.outer(s, s)  # E[(x/s)(x/s)^T]
    err = 0.0
    for wm in wms:
        wm = np.asarray(wm, np.float64)
        w_hat = np.asarray(rounder((wm * s[None, :]).astype(np.float32), hs), np.float64)
        err += output_error(wm, w_hat / s[None, :], h)
    return err
