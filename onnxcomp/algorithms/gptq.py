"""GPTQ (Frantar et al. 2023): round a weight column by column and spread each column's rounding error over the
columns not yet rounded, so that the layer's *output* error ||X (W - Ŵ)^T|| is small rather than each weight's.

Weights are in output-major layout ``W [rows = outputs, cols = inputs]``; ``H = E[x x^T]`` is the input second
moment [cols, cols] from calibration. The rounding of one column is a callback, so the same loop serves
integer grids (``quantize_grid``: int8 per channel, int4 per block) and codebooks (``palette.gptq_assign``).
Columns run in act-order (decreasing H_jj); the grid's scales are fixed before the loop ("static groups"),
so a block's scale does not depend on the order.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .. import qmath
from .sparsegpt import damped_hessian, inverse_cholesky

# rounder(column_index_in_original_order, column_values [rows]) -> (codes [rows] int64, rounded values [rows])
Rounder = Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]]


def gptq_columns(w: np.ndarray, h: np.ndarray, rounder: Rounder, damping: float = 0.01, blocksize: int = 128,
                 act_order: bool = True) -> np.ndarray:
    """Codes [rows, cols] (int64) for `w`, each column rounded by `rounder` after the error feedback of the
    columns rounded before it (lazy batches of `blocksize` columns, Cholesky factor of the damped H^-1)."""
    rows, cols = w.shape
    h = np.asarray(h, np.float64)
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(cols)
    wk = np.array(np.asarray(w, np.float64)[:, perm], copy=True)
    hinv = inverse_cholesky(damped_hessian(h[np.ix_(perm, perm)], damping), damping)
    codes = np.zeros((rows, cols), np.int64)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = wk[:, i1:i2].copy()
        h1 = hinv[i1:i2, i1:i2]
        err1 = np.zeros_like(w1)
        for i in range(i2 - i1):
            col = w1[:, i]
            code, rounded = rounder(int(perm[i1 + i]), col)
            e = (col - rounded) / h1[i, i]
            w1[:, i:] -= np.outer(e, h1[i, i:])
            err1[:, i] = e
            codes[:, i1 + i] = code
        if i2 < cols:
            wk[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    out = np.empty_like(codes)
    out[:, perm] = codes
    return out


def quantize_grid(w: np.ndarray, h: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int,
                  block_size: int = 0, damping: float = 0.01, act_order: bool = True,
                  pair_limit: int = 0) -> np.ndarray:
    """GPTQ onto an integer grid: q [rows, cols] with Ŵ[r, c] = (q - zp) * scale, the scale and zero point
    per row (`block_size` 0: per output channel; `scale` [rows]) or per row and block of `block_size` inputs
    (`scale` [rows, ceil(cols / block_size)]). Scales are the caller's (e.g. an MSE search on W itself).

    `pair_limit` (zero points 0): the codes of each even-aligned column pair (2i, 2i + 1) of one sign add up to
    at most that in magnitude (`qmath.pair_bounded`): the column rounded second is clipped to the room its
    partner left, and that error spreads like any rounding error. With scales that leave no float pair past
    the limit (`qmath.pair_safe_scales`) such clips are rare; choosing the first code of a pair together with
    its partner measured no better then (digits MLP fc1: 6.56e-6 vs 6.54e-6 output error)."""
    sc = np.asarray(scale, np.float64)
    zp = np.asarray(zero_point, np.float64)
    if sc.ndim == 1:
        sc, zp = sc[:, None], np.broadcast_to(zp, sc.shape)[:, None]
    else:
        zp = np.broadcast_to(zp, sc.shape)
    got = np.zeros(w.shape, np.float64) if pair_limit else None
    done = np.zeros(w.shape[1], bool)

    def rounder(j: int, col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = j // block_size if block_size else 0
        s, z = sc[:, g], zp[:, g]
        q = np.clip(np.rint(col / s) + z, qmin, qmax)
        if got is not None:
            p = j ^ 1
            if p < len(done) and done[p]:
                qp = got[:, p]
                q = np.where(qmath.pairs_over(q, qp, pair_limit), np.sign(q) * (pair_limit - np.abs(qp)), q)
            got[:, j] = q
            done[j] = True
        return q.astype(np.int64), (q - z) * s

    return gptq_columns(w, h, rounder, damping=damping, act_order=act_order)


def output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """tr((W - Ŵ) H (W - Ŵ)^T) / tr(W H W^T): the layer's relative squared output error under inputs with
    second moment H (0 when Ŵ = W)."""
    w = np.asarray(w, np.float64)
    d = w - np.asarray(w_hat, np.float64)
    h = np.asarray(h, np.float64)
    num = float(((d @ h) * d).sum())
    den = float(((w @ h) * w).sum())
    return num / den if den > 0 else num
