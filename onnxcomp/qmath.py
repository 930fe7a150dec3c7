"""Quantization arithmetic, vectorised in numpy: scales, zero points, quantize/dequantize.

ONNX semantics: q = saturate(round_half_even(x / scale) + zero_point); x' = (q - zero_point) * scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
from onnx import TensorProto


@dataclass(frozen=True)
class QType:
    """An integer type a tensor can be quantized to."""

    name: str
    np_dtype: type
    qmin: int
    qmax: int
    onnx_type: int

    @property
    def signed(self) -> bool:
        return self.qmin < 0


QTYPES: dict[str, QType] = {
    "int8": QType("int8", np.int8, -128, 127, TensorProto.INT8),
    "uint8": QType("uint8", np.uint8, 0, 255, TensorProto.UINT8),
    # 4-bit weights for DequantizeLinear (opset 21); numpy holds them one per byte (ml_dtypes, onnx's own)
    "int4": QType("int4", ml_dtypes.int4, -8, 7, TensorProto.INT4),
    "uint4": QType("uint4", ml_dtypes.uint4, 0, 15, TensorProto.UINT4),
    "int16": QType("int16", np.int16, -32768, 32767, TensorProto.INT16),
    "uint16": QType("uint16", np.uint16, 0, 65535, TensorProto.UINT16),
}


def _sym_bounds(qt: QType) -> tuple[int, int]:
    """Symmetric range: [-127, 127] for int8 (keeps -x representable), [0, 255] centred at 128 for uint8."""
    if qt.signed:
        return -qt.qmax, qt.qmax
    return qt.qmin, qt.qmax


def reduced(qt: QType) -> QType:
    """The same type with one bit less of range (int8 -> [-64, 63], uint8 -> [0, 127]): ORT's `reduce_range`.

    x86 CPUs without VNNI multiply uint8 x int8 with vpmaddubsw, which adds pairs of products in int16 and
    saturates; with 7-bit weights every pair fits (255 * 64 * 2 < 32768)."""
    return QType(qt.name, qt.np_dtype, qt.qmin // 2 if qt.signed else qt.qmin, (qt.qmax - 1) // 2 if qt.signed
                 else qt.qmax // 2, qt.onnx_type)


#: The most two int8 weight codes of one sign may add up to, in each even-aligned pair (2i, 2i + 1) of the inner
#: (K) dimension, for ORT CPU's uint8 x int8 kernels on x86 without VNNI (AVX2, AVX512BW): vpmaddubsw adds the
#: two products of such a pair in int16 and saturates, so 255 * 128 = 32640 fits and 255 * 129 does not. Pairs of
#: opposite signs never saturate (255 * 127). Read in MLAS (QgemmU8S8KernelAvx2.S, QgemvU8S8KernelAvx2.S: A and
#: B packed four K elements per 32-bit lane) and measured under QEMU's Haswell CPU: pairs (0, 1), (128, 129),
#: (256, 257) saturate at 127 + 127 and at 100 + 29, pairs (1, 2) and (257, 258) do not, 100 + 28 is exact.
PAIR_LIMIT = 128


def pair_bounded(q: np.ndarray, target: np.ndarray, qmax: int, weight: np.ndarray | None = None,
                 limit: int = PAIR_LIMIT) -> np.ndarray:
    """Symmetric integer codes `q` [rows, K] (zero point 0) made safe for saturating pair sums: where an even-aligned
    pair of one sign adds up to more than `limit` in magnitude, the pair on that bound nearest to the unrounded
    codes `target` (squared error of column k weighted by `weight[k]`, e.g. its input's second moment), each
    within [-qmax, qmax]. Other codes are unchanged. Vectorised; a copy of q's dtype."""
    dtype = np.asarray(q).dtype
    q = np.array(q, dtype=np.float64)  # int8 codes would overflow in |a| + |b|
    k = q.shape[1] // 2 * 2
    a, b = q[:, 0:k:2], q[:, 1:k:2]  # views into q
    over = pairs_over(a, b, limit)
    if not over.any():
        return q.astype(dtype)
    r, c = np.nonzero(over)
    t = np.abs(np.asarray(target, np.float64))
    ta, tb = t[:, 0:k:2][r, c], t[:, 1:k:2][r, c]
    wv = np.ones(q.shape[1]) if weight is None else np.maximum(np.asarray(weight, np.float64), 1e-30)
    wa, wb = wv[0:k:2][c], wv[1:k:2][c]
    lo, hi = max(limit - qmax, 0), min(qmax, limit)  # |a'| in [lo, hi] so that |b'| = limit - |a'| <= qmax
    x = np.clip((wa * ta + wb * (limit - tb)) / (wa + wb), lo, hi)  # the weighted nearest point on the bound
    cands = np.stack([np.clip(np.floor(x), lo, hi), np.clip(np.ceil(x), lo, hi)])
    cost = wa * (cands - ta) ** 2 + wb * (limit - cands - tb) ** 2
    mag = np.take_along_axis(cands, np.argmin(cost, axis=0)[None], axis=0)[0]
    sign = np.sign(a[r, c])
    a[r, c] = sign * mag
    b[r, c] = sign * (limit - mag)
    return q.astype(dtype)


def pair_scales(wm: np.ndarray, qmax: int, weight: np.ndarray | None = None, limit: int = PAIR_LIMIT,
                steps: int = 16) -> np.ndarray:
    """Per-row symmetric scales [rows] for the output-major `wm` [rows, K] under `pair_bounded`: the row's absmax
    lands on one of `steps` codes from qmax down to limit / 2 (where no pair can exceed the limit, i.e. 7-bit
    weights), whichever gives the smallest squared error of the bounded nearest codes (column k weighted by
    `weight[k]`). A full-range grid clips many pairs where a few input rows are large (SmoothQuant's outlier
    channels): MiniLM-L3's layers measured 40x the output error of unbounded 8-bit weights that way."""
    wm = np.asarray(wm, np.float64)
    amax = np.abs(wm).max(axis=1)
    amax = np.where(amax > 0, amax, 1.0)
    wv = np.ones(wm.shape[1]) if weight is None else np.asarray(weight, np.float64)
    best_err = np.full(wm.shape[0], np.inf)
    best = amax / qmax
    for top in np.unique(np.linspace(qmax, limit / 2, steps).round()):
        s = amax / top
        u = wm / s[:, None]
        q = pair_bounded(np.clip(np.rint(u), -qmax, qmax), u, qmax, wv, limit)
        err = (((u - q) * s[:, None]) ** 2 * wv).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, s, best)
    return best.astype(np.float32)


def pair_safe_scales(wm: np.ndarray, qmax: int, limit: int = PAIR_LIMIT) -> np.ndarray:
    """Per-row symmetric scales [rows] for the output-major `wm` [rows, K] with which no even-aligned same-sign
    pair of the float weights reaches past `limit` codes (the row's absmax at qmax where none would): for error
    feedback (GPTQ), which pushes codes outward, so that clipped pairs stay rare. On the digits MLP's first
    layer, GPTQ's output error was 6.9e-6 this way, 6.2e-5 with `pair_scales` (3.9e-6 unbounded 8-bit, 1.5e-5
    7-bit)."""
    w = np.abs(np.asarray(wm, np.float64))
    k = w.shape[1] // 2 * 2
    a, b = np.asarray(wm)[:, 0:k:2], np.asarray(wm)[:, 1:k:2]
    pair = np.where(np.sign(a) == np.sign(b), w[:, 0:k:2] + w[:, 1:k:2], 0.0)
    amax = w.max(axis=1)
    need = pair.max(axis=1, initial=0.0)  # the largest same-sign pair sum, in the weight's units
    scale = np.maximum(amax / qmax, need / limit)
    return np.where(scale > 0, scale, 1.0).astype(np.float32)


def kernel_rows(v: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(output-major rows [outputs, K] of weight `v` in the order ORT CPU's integer kernels run along K, that
    order as indices into `v.reshape(outputs, -1)`, None where it is that order already). MatMul/Gemm: the input
    axis. Conv [O, C/group, k...]: the NHWC im2col order, spatial offsets outer and channels inner, so that the
    even-aligned pairs the saturating kernels add are channel pairs at one offset where C/group is even and
    straddle two offsets where it is odd (measured under QEMU's Haswell CPU: C 1, 2, 3, 5, 6, 8, 16, group 2)."""
    if v.ndim == 2:
        return (v.T if axis % 2 == 1 else v), None
    idx = np.arange(int(np.prod(v.shape[1:]))).reshape(v.shape[1:])
    order = idx.transpose(*range(1, v.ndim - 1), 0).ravel()
    return v.reshape(v.shape[0], -1)[:, order], order


def from_kernel_rows(rows: np.ndarray, order: np.ndarray | None, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """The inverse of `kernel_rows`: `rows` [outputs, K] (in `order`) back to a weight of `shape`."""
    if order is not None:
        rows = rows[:, np.argsort(order)]
    return rows.T if len(shape) == 2 and axis % 2 == 1 else rows.reshape(shape)


def pairs_over(a: np.ndarray, b: np.ndarray, limit: int = PAIR_LIMIT) -> np.ndarray:
    """Where codes a and b, partners of a pair, share a sign and add up past `limit` in magnitude (broadcast)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)  # int8 would overflow in |a| + |b|
    return (np.sign(a) == np.sign(b)) & (np.abs(a) + np.abs(b) > limit)


def pairs_fit(q: np.ndarray, limit: int = PAIR_LIMIT) -> bool:
    """Whether every even-aligned same-sign pair of codes [rows, K] along K stays within `limit` (`pair_bounded`)."""
    k = np.shape(q)[-1] // 2 * 2
    return not bool(pairs_over(q[..., 0:k:2], q[..., 1:k:2], limit).any())


def activation_params(lo: float, hi: float, qdtype: str, symmetric: bool) -> tuple[np.float32, np.ndarray]:
    """Per-tensor (scale, zero_point) for a calibrated range; the range is widened to contain 0."""
    qt = QTYPES[qdtype]
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        a = max(abs(lo), abs(hi))
        qlo, qhi = _sym_bounds(qt)
        scale = a / ((qhi - qlo) / 2.0)
        zp = 0 if qt.signed else (qt.qmin + qt.qmax + 1) // 2
    else:
        scale = (hi - lo) / (qt.qmax - qt.qmin)
        zp = 0 if scale == 0 else int(np.clip(round(qt.qmin - lo / scale), qt.qmin, qt.qmax))
    if not np.isfinite(scale) or scale <= 0:  # degenerate (all-zero) range: any positive scale is exact
        scale = 1.0
    return np.float32(scale), np.asarray(zp, dtype=qt.np_dtype)


def weight_params(w: np.ndarray, axis: int | None, qdtype: str = "int8", symmetric: bool = True,
                  reduce_range: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zero points of a weight, per channel along `axis` (None: per tensor). Vectorised.

    `reduce_range` uses one bit less (see `reduced`); the quantized values then stay inside that range."""
    qt = reduced(QTYPES[qdtype]) if reduce_range else QTYPES[qdtype]
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        red = tuple(range(w.ndim))
    else:
        axis = axis % w.ndim
        red = tuple(i for i in range(w.ndim) if i != axis)
    if symmetric:
        a = np.max(np.abs(w), axis=red) if w.size else np.zeros(())
        qlo, qhi = _sym_bounds(qt)
        scale = a / ((qhi - qlo) / 2.0)
        zp = np.full(scale.shape, 0 if qt.signed else (qt.qmin + qt.qmax + 1) // 2)
    else:
        lo = np.minimum(np.min(w, axis=red), 0.0)
        hi = np.maximum(np.max(w, axis=red), 0.0)
        scale = (hi - lo) / (qt.qmax - qt.qmin)
        with np.errstate(divide="ignore", invalid="ignore"):
            zp = np.clip(np.round(qt.qmin - lo / np.where(scale > 0, scale, 1.0)), qt.qmin, qt.qmax)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # all-zero channel: exact with any scale
    return scale, np.asarray(zp).astype(qt.np_dtype)


def _expand(p: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None or p.ndim == 0:
        return p
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return p.reshape(shape)


def quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None, qdtype: str) -> np.ndarray:
    """ONNX QuantizeLinear in numpy (round half to even, saturate)."""
    qt = QTYPES[qdtype]
    x = np.asarray(x, dtype=np.float32)
    s = _expand(np.asarray(scale, dtype=np.float32), x.ndim, axis)
    z = _expand(np.asarray(zero_point).astype(np.int32), x.ndim, axis)
    q = np.rint(x / s) + z
    return np.clip(q, qt.qmin, qt.qmax).astype(qt.np_dtype)


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None) -> np.ndarray:
    """ONNX DequantizeLinear in numpy."""
    s = _expand(np.asarray(scale, dtype=np.float32), q.ndim, axis)
    z = _expand(np.asarray(zero_point).astype(np.int32), q.ndim, axis)
    return ((q.astype(np.int32) - z) * s).astype(np.float32)
