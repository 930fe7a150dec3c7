"""AdaRound (Nagel et al. 2020): learn, per weight, whether to round down or up, so that the layer's *output* on
calibration data changes least; numpy, on the input second moment only.

Weights are output-major ``W [rows = outputs, cols = inputs]`` on a fixed integer grid (scale and zero point per
row, or per row and block of inputs, as `gptq.quantize_grid` takes them). Each weight is ``s · (floor(W/s) + h)``
with ``h = clip(sigmoid(V)·(ζ-γ) + γ, 0, 1)``, the rectified sigmoid; V starts where ``h`` equals the weight's
fractional part (the float weight), and Adam minimises

    tr((W - Ŵ) H (W - Ŵ)^T) / E_rtn  +  λ · mean(1 - |2h - 1|^β)

with ``H = E[x x^T]`` (the reconstruction of the layer output, relative to the nearest-rounding error E_rtn) and
the regulariser that drives every h to 0 or 1 as β anneals from 20 to 2 after a warm-up. The codes are
``floor(W/s) + [h >= 1/2]``. The output error is a quadratic form in H, so no activations are kept: the cost
per step is one [rows, cols] x [cols, cols] product.
"""
from __future__ import annotations

import numpy as np

__all__ = ["adaround_grid"]

_ZETA, _GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound's values)


def _rect_sigmoid(v: np.ndarray) -> np.ndarray:
    return np.clip(1.0 / (1.0 + np.exp(-v)) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)


def adaround_grid(w: np.ndarray, h: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int,
                  block_size: int = 0, iters: int = 1000, lam: float = 10.0, lr: float = 0.02, warmup: float = 0.2
                  ) -> np.ndarray:
    """Codes q [rows, cols] (float64, integers in [qmin, qmax]) with Ŵ = (q - zp) · scale learned against H.

    `scale`/`zero_point`: [rows] (per output channel) or [rows, ceil(cols / block_size)]. `iters` Adam steps
    (learning rate `lr` on V), the first `warmup` fraction without the regulariser; `lam` weighs the regulariser
    against the reconstruction (10: digits fc1 at 4 bits, held-out error 0.00143 where AdaRound's published 0.01
    left it at nearest rounding's 0.0075 under this normalisation)."""
    w = np.asarray(w, np.float64)
    rows, cols = w.shape
    sc = np.asarray(scale, np.float64).reshape(rows, -1)
    zp = np.broadcast_to(np.asarray(zero_point, np.float64).reshape(rows, -1), sc.shape)
    idx = np.arange(cols) // block_size if block_size else np.zeros(cols, np.int64)
    s, z = sc[:, idx], zp[:, idx]
    h = np.asarray(h, np.float64)
    x = w / s
    fl = np.floor(x)
    rtn = np.clip(np.rint(x) + z, qmin, qmax)
    d_rtn = w - (rtn - z) * s
    e_rtn = float(((d_rtn @ h) * d_rtn).sum())
    if e_rtn <= 0:
        return rtn
    frac = np.clip(x - fl, 0.01, 0.99)
    # the loop in float32 (its cost is elementwise): h may not take a code outside the grid, so it is clipped
    # to [lo, hi] there and has no gradient beyond
    f32 = np.float32
    lo, hi = (qmin - z - fl).astype(f32), (qmax - z - fl).astype(f32)
    w32, fl32, s32, h32 = w.astype(f32), fl.astype(f32), s.astype(f32), h.astype(f32)
    v = (-np.log((_ZETA - _GAMMA) / (frac - _GAMMA) - 1.0)).astype(f32)  # h(v) = frac
    m1, m2 = np.zeros_like(v), np.zeros_like(v)
    b1, b2, eps = 0.9, 0.999, 1e-8
    span = f32(_ZETA - _GAMMA)
    rec = f32(-2.0 / e_rtn) * s32
    start = int(warmup * iters)
    for t in range(1, iters + 1):
        sig = 1.0 / (1.0 + np.exp(-v))
        hv = sig * span + f32(_GAMMA)
        gate = (hv > 0) & (hv < 1) & (hv >= lo) & (hv <= hi)
        off = np.clip(np.clip(hv, 0, 1), lo, hi)
        d = w32 - (fl32 + off) * s32
        grad_h = rec * (d @ h32)
        if t > start:
            beta = 20.0 + (2.0 - 20.0) * (t - start) / max(1, iters - start)
            u = 2.0 * hv - 1.0
            grad_h -= f32(2.0 * beta * lam / v.size) * np.abs(u) ** f32(beta - 1.0) * np.sign(u)
        g = grad_h * gate * sig * (1.0 - sig) * span
        m1 = b1 * m1 + (1 - b1) * g
        m2 = b2 * m2 + (1 - b2) * g * g
        v -= f32(lr / (1 - b1 ** t)) * m1 / (np.sqrt(m2 / f32(1 - b2 ** t)) + f32(eps))
    up = (_rect_sigmoid(v.astype(np.float64)) >= 0.5).astype(np.float64)
    return np.clip(fl + up + z, qmin, qmax)
