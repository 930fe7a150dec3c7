"""Pruning masks and weight reconstruction for the `sparsify` pass, in numpy.

Every function works on a weight in *output-major* layout ``W [rows = outputs, cols = inputs]`` (PyTorch's
Linear/Conv layout; the reduction axis is the last one), so "within an output" means within a row and N:M
groups run along a row. Patterns:

* unstructured: the lowest-scoring elements (per matrix, or per row with ``per_row``);
* N:M: in every run of M consecutive inputs of a row at most N weights are kept (the last, partial run of a
  row whose length is not a multiple of M keeps at most N too);
* block ``(r, c)``: whole tiles of r outputs x c inputs are zeroed, lowest mean score first (edge tiles
  cropped).

:func:`sparsegpt` is SparseGPT (Frantar & Alistarh 2023): optimal-brain-surgeon mask selection and a
least-squares update of the kept weights against the input second moment ``H = X^T X``, processed in lazy
batches of columns with the Cholesky factor of ``H^-1``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class SparsityPattern:
    """What may be zeroed: kind "unstructured" | "nm" (keep n of every m) | "block" (tiles of rows x cols)."""

    kind: str
    n: int = 0
    m: int = 0
    block: tuple[int, int] = (1, 1)

    @property
    def fixed_sparsity(self) -> Optional[float]:
        """The sparsity an N:M pattern implies (None for the others, which take the requested one)."""
        return 1.0 - self.n / self.m if self.kind == "nm" else None


def split_count(total: int, sizes: np.ndarray) -> np.ndarray:
    """Integers proportional to `sizes` summing to exactly `total` (cumulative rounding)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    cum = np.concatenate([[0.0], np.cumsum(sizes)])
    frac = total / cum[-1] if cum[-1] else 0.0
    marks = np.round(cum * frac).astype(np.int64)
    return np.diff(marks)


def _lowest(score: np.ndarray, count: int) -> np.ndarray:
    """Boolean mask of the `count` lowest entries of `score` (any shape); ties broken by position."""
    flat = score.reshape(-1)
    mask = np.zeros(flat.size, dtype=bool)
    if count >= flat.size:
        mask[:] = True
    elif count > 0:
        mask[np.argpartition(flat, count - 1, kind="introselect")[:count]] = True
    return mask.reshape(score.shape)


def _lowest_per_row(score: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per row i, the `counts[i]` lowest entries of that row."""
    order = np.argsort(score, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(score.shape[1])[None, :].repeat(score.shape[0], 0), axis=1)
    return ranks < np.asarray(counts)[:, None]


def nm_mask(score: np.ndarray, n: int, m: int) -> np.ndarray:
    """Prune all but the `n` highest-scoring weights of every run of `m` consecutive columns of each row."""
    rows, cols = score.shape
    groups = -(-cols // m)
    pad = np.full((rows, groups * m), np.inf)
    pad[:, :cols] = score
    g = pad.reshape(rows, groups, m)
    sizes = np.full(groups, m)
    sizes[-1] = cols - (groups - 1) * m
    prune = np.maximum(sizes - n, 0)  # per group (padding scores +inf never get pruned)
    ranks = np.argsort(np.argsort(g, axis=2, kind="stable"), axis=2, kind="stable")
    return (ranks < prune[None, :, None]).reshape(rows, groups * m)[:, :cols]


def block_mask(score: np.ndarray, block: tuple[int, int], count: int) -> np.ndarray:
    """Zero `count` whole tiles of block[0] rows x block[1] cols with the lowest mean score."""
    r, c = block
    rows, cols = score.shape
    gr, gc = -(-rows // r), -(-cols // c)
    pad = np.zeros((gr * r, gc * c))
    real = np.zeros_like(pad)
    pad[:rows, :cols] = score
    real[:rows, :cols] = 1.0
    tile_sum = pad.reshape(gr, r, gc, c).sum(axis=(1, 3))
    tile_n = real.reshape(gr, r, gc, c).sum(axis=(1, 3))
    chosen = _lowest(tile_sum / tile_n, count)
    return np.repeat(np.repeat(chosen, r, axis=0), c, axis=1)[:rows, :cols]


def block_count(shape: tuple[int, int], block: tuple[int, int], sparsity: float) -> int:
    """Tiles to zero so that about `sparsity` of the tiles go."""
    tiles = (-(-shape[0] // block[0])) * (-(-shape[1] // block[1]))
    return int(round(sparsity * tiles))


def select_mask(score: np.ndarray, pattern: SparsityPattern, sparsity: float, per_row: bool = False,
                count: Optional[int] = None) -> np.ndarray:
    """True where a weight is pruned. Unstructured: exactly `count` (default round(sparsity * size)) entries,
    split evenly over the rows with `per_row` (Wanda compares weights within one output); block: `count` tiles."""
    if pattern.kind == "nm":
        return nm_mask(score, pattern.n, pattern.m)
    if pattern.kind == "block":
        return block_mask(score, pattern.block, block_count(score.shape, pattern.block, sparsity)
                          if count is None else count)
    total = int(round(sparsity * score.size)) if count is None else count
    if per_row:
        return _lowest_per_row(score, split_count(total, np.full(score.shape[0], score.shape[1])))
    return _lowest(score, total)


def damped_hessian(h: np.ndarray, damping: float) -> np.ndarray:
    """H + damping * mean(diag H) * I, with inputs never seen (zero diagonal) given a unit diagonal."""
    h = np.array(h, dtype=np.float64, copy=True)
    d = np.diag(h).copy()
    dead = d <= 0
    h[dead, dead] = 1.0
    mean = float(np.mean(d[~dead])) if (~dead).any() else 1.0
    h[np.diag_indices_from(h)] += damping * mean
    return h


def inverse_cholesky(h: np.ndarray, damping: float) -> np.ndarray:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U), adding damping until H is numerically positive definite."""
    eye_scale = float(np.mean(np.diag(h)))
    for attempt in range(8):
        try:
            hi = np.linalg.inv(np.linalg.cholesky(h))  # L^-1 with H = L L^T, so H^-1 = L^-T L^-1
            return np.linalg.cholesky(hi.T @ hi).T
        except np.linalg.LinAlgError:
            h = h + np.eye(len(h)) * eye_scale * damping * 10 ** attempt
    raise np.linalg.LinAlgError("the input second moment is not positive definite even after extra damping")


def sparsegpt(w: np.ndarray, h: Optional[np.ndarray], pattern: SparsityPattern, sparsity: float,
              damping: float = 0.01, blocksize: int = 128, count: Optional[int] = None,
              hinv: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """Prune `w` [rows, cols] to `pattern`/`sparsity` and update the kept weights to minimise ||X W^T - X Ŵ^T||
    for inputs with second moment `h` [cols, cols] (or its precomputed `hinv` = inverse_cholesky(...)).
    `count`: elements (unstructured) or tiles (block) to zero, default from `sparsity`. Returns (Ŵ float32,
    pruned mask)."""
    rows, cols = w.shape
    wk = np.array(w, dtype=np.float64, copy=True)
    if hinv is None:
        hinv = inverse_cholesky(damped_hessian(h, damping), damping)
    mask = np.zeros((rows, cols), dtype=bool)
    step = {"nm": pattern.m, "block": pattern.block[1]}.get(pattern.kind, 1)
    bs = max(step, blocksize // step * step)
    starts = list(range(0, cols, bs))
    sizes = np.array([min(bs, cols - s) for s in starts])
    if pattern.kind == "unstructured":
        counts = split_count(int(round(sparsity * w.size)) if count is None else count, sizes * rows)
    elif pattern.kind == "block":
        tile_cols = -(-sizes // pattern.block[1])
        counts = split_count(block_count(w.shape, pattern.block, sparsity) if count is None else count, tile_cols)
    for b, i1 in enumerate(starts):
        i2 = i1 + sizes[b]
        w1 = wk[:, i1:i2].copy()
        h1 = hinv[i1:i2, i1:i2]
        err1 = np.zeros_like(w1)
        d = np.diag(h1)
        m1 = np.zeros_like(w1, dtype=bool)
        if pattern.kind == "unstructured":
            m1 = _lowest(w1 ** 2 / d[None, :] ** 2, int(counts[b]))
        elif pattern.kind == "block":
            m1 = block_mask(w1 ** 2 / d[None, :] ** 2, pattern.block, int(counts[b]))
        for i in range(i2 - i1):
            if pattern.kind == "nm" and i % pattern.m == 0:
                j = min(i + pattern.m, i2 - i1)
                m1[:, i:j] = nm_mask(w1[:, i:j] ** 2 / d[None, i:j] ** 2, pattern.n, pattern.m)
            col = w1[:, i]
            e = np.where(m1[:, i], col, 0.0) / d[i]
            w1[:, i:] -= np.outer(e, h1[i, i:])
            w1[:, i] = np.where(m1[:, i], 0.0, w1[:, i])  # exact zeros (the update leaves rounding residue)
            err1[:, i] = e
        wk[:, i1:i2] = w1
        mask[:, i1:i2] = m1
        if i2 < cols:
            wk[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    wk[mask] = 0.0
    return wk.astype(np.float32), mask


def error_terms(w: np.ndarray, w_new: np.ndarray, h: np.ndarray) -> tuple[float, float]:
    """(||X D^T||^2, ||X W^T||^2) with D = Ŵ - W, from the inputs' second moment `h` = X^T X (rows = outputs):
    sqrt of their ratio is the layer's relative output error."""
    w64 = np.asarray(w, np.float64)
    dlt = np.asarray(w_new, np.float64) - w64
    return max(float(np.sum((dlt @ h) * dlt)), 0.0), float(np.sum((w64 @ h) * w64))
