"""4-bit (and n-bit) blocked weights as ONNX Runtime's MatMulNBits stores them: per-block scale/zero-point
grids, nearest and GPTQ rounding on them, and nibble packing."""
from __future__ import annotations

from typing import Optional

import numpy as np

from . import gptq


def block_grid(wb: np.ndarray, symmetric: bool, importance: Optional[np.ndarray] = None, bits: int = 4
                ) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) per block of wb [..., blocks, block] for unsigned `bits`-bit codes 0..2**bits-1 with
    w ~ (q - zp) * scale. Symmetric: zero point 2**(bits-1) and a shrink of absmax / (2**(bits-1)-1);
    asymmetric: the block's [min, max] (widened to contain 0) shrunk, zero point rounded. The shrink factor
    (searched over a fixed grid, vectorised over all blocks) is the one with the least squared rounding+clipping
    error, each weight's error weighed by `importance` (broadcast to wb; e.g. E[x_j^2] of its input) when given:
    clipping a block's one or two largest weights often lowers the error of all the others."""
    top, half = (1 << bits) - 1, 1 << (bits - 1)
    if symmetric:
        amax = np.abs(wb).max(axis=-1)
        base = np.where(amax > 0, amax / (half - 1), 1.0)
        mid = np.full(base.shape, float(half), np.float32)
        best_s, best_z = base.astype(np.float32), mid

        def grid(f: np.float32) -> tuple[np.ndarray, np.ndarray]:
            return (base * f).astype(np.float32), mid
    else:
        lo = np.minimum(wb.min(axis=-1), 0.0)
        hi = np.maximum(wb.max(axis=-1), 0.0)
        best_s, best_z = np.ones(lo.shape, np.float32), np.zeros(lo.shape, np.float32)

        def grid(f: np.float32) -> tuple[np.ndarray, np.ndarray]:
            sc = ((hi - lo) * f / top).astype(np.float32)
            sc = np.where(sc > 0, sc, 1.0).astype(np.float32)
            return sc, np.clip(np.rint(-lo * f / sc), 0, top).astype(np.float32)
    best_err = np.full(best_s.shape, np.inf, np.float32)
    for f in np.linspace(1.0, 0.7, 13, dtype=np.float32):
        sc, zp = grid(f)
        deq = (np.clip(np.rint(wb / sc[..., None]) + zp[..., None], 0, top) - zp[..., None]) * sc[..., None]
        err = ((deq - wb) ** 2 if importance is None else (deq - wb) ** 2 * importance).sum(axis=-1)
        better = err < best_err
        best_s, best_z, best_err = (np.where(better, sc, best_s), np.where(better, zp, best_z),
                                    np.where(better, err, best_err))
    return best_s.astype(np.float32), best_z.astype(np.float32)


def nbits_block(block_size: Optional[int], k: int) -> int:
    """MatMulNBits' block along K: the option, else 128 (or the next power of two >= 16 below 128 inputs)."""
    return block_size or (128 if k >= 128 else max(16, 1 << (k - 1).bit_length()))


def block_layout(wm: np.ndarray, importance: Optional[np.ndarray], block_size: int, symmetric: bool, bits: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The output-major weight [n, k] zero-padded to whole blocks [n, blocks, block] and its `block_grid`
    (scale, zero point) per block, each input channel's error weighed by `importance` [k] when given."""
    n, k = wm.shape
    blocks = -(-k // block_size)
    wb = np.zeros((n, blocks * block_size), np.float32)
    wb[:, :k] = wm
    wb = wb.reshape(n, blocks, block_size)
    imp = None
    if importance is not None:
        imp = np.zeros(blocks * block_size, np.float32)
        imp[:k] = importance
        imp = imp.reshape(blocks, block_size)
    scale, zp = block_grid(wb, symmetric, imp, bits)
    return wb, scale, zp


def blocked_rtn(wm: np.ndarray, importance: np.ndarray, block_size: int, symmetric: bool,
                 bits: int = 4) -> np.ndarray:
    """The dequantized output-major weight [n, k] under MatMulNBits' blocked nearest rounding (the grid chosen
    by `block_grid` with each input channel's importance [k]): what the AWQ search scores."""
    wb, scale, zp = block_layout(wm, importance, block_size, symmetric, bits)
    q = np.clip(np.rint(wb / scale[..., None]) + zp[..., None], 0, (1 << bits) - 1)
    return ((q - zp[..., None]) * scale[..., None]).reshape(wm.shape[0], -1)[:, :wm.shape[1]]


def blocked_gptq(wm: np.ndarray, h: np.ndarray, block_size: int, symmetric: bool, damping: float,
                  bits: int = 4) -> np.ndarray:
    """`blocked_rtn` with GPTQ's rounding against `h` on the same grid (what algorithm auto may use)."""
    k = wm.shape[1]
    _, scale, zp = block_layout(wm, np.diag(h), block_size, symmetric, bits)
    q = gptq.quantize_grid(wm, h, scale, zp, 0, (1 << bits) - 1, block_size, damping=damping)
    idx = np.arange(k) // block_size
    return (q - zp[:, idx]) * scale[:, idx]


def pack_nibbles(zp: np.ndarray) -> np.ndarray:
    """4-bit zero points [..., blocks] -> uint8 [..., ceil(blocks / 2)], two a byte, low nibble first."""
    z = np.asarray(zp).astype(np.uint8)
    if z.shape[-1] % 2:
        z = np.concatenate([z, np.full(z.shape[:-1] + (1,), 8, np.uint8)], axis=-1)
    return (z[..., 0::2] | (z[..., 1::2] << 4)).astype(np.uint8)
