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
