"""Streaming observers: per-tensor running statistics whose memory does not grow with the number of samples.

A :class:`TensorObserver` sees one tensor's value once per sample, in two passes:

1. :meth:`~TensorObserver.observe` keeps the element count, the NaN/inf and exact-zero counts, the running
   min/max over the finite values and, when a channel axis is given, the running per-channel max ``|x|``
   (finite values only) and, when a Gram axis is given, the running second-moment matrix ``X^T X`` of the
   vectors along that axis (every other axis flattened into rows; rows holding NaN/inf are skipped);
2. after :meth:`~TensorObserver.start_histogram` has fixed the bin edges on the pass-1 ``[min, max]``,
   :meth:`~TensorObserver.observe_histogram` adds ``np.histogram`` counts of each value to a fixed-size
   histogram (NaN/inf excluded).

Nothing a sample holds is kept after the call returns. :meth:`~TensorObserver.result` gives the
:class:`TensorStats` that ``compute_range`` reads. :func:`stats_from_arrays` runs both passes over arrays
already in memory (weights, tests).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..errors import CalibrationDataError

__all__ = ["TensorStats", "TensorObserver", "stats_from_arrays", "is_float_dtype"]

_GRAM_BUFFER_ELEMS = 1 << 22  # rows buffered before a Gram update (16 MiB of float32), memory stays bounded


def is_float_dtype(dtype: np.dtype) -> bool:
    """float16/float32/float64 and bfloat16 (ml_dtypes, as ``onnx.helper`` maps it)."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype.name == "bfloat16"


def _as_float(arr: np.ndarray) -> np.ndarray:
    """A float view numpy reduces and bins exactly: float32/float64 as they are, float16/bfloat16 as float32."""
    a = np.asarray(arr)
    if a.dtype == np.float32 or a.dtype == np.float64:
        return a
    return a.astype(np.float32)


@dataclass
class TensorStats:
    """Statistics of one tensor over every calibration sample.

    ``count`` counts every element seen, NaN/inf included; ``nonfinite`` counts the NaN/inf ones, which are
    left out of ``min``/``max``/``hist``/``channel_absmax`` (so ``hist.sum() == count - nonfinite``).
    ``min``/``max`` are NaN when no finite value was seen. ``hist`` holds ``len(hist_edges) - 1`` counts
    over ``[min, max]`` (signed values; numpy's rule widens a constant tensor's range to ``[v-0.5, v+0.5]``);
    both are None when no histogram was collected. ``channel_absmax`` is the max ``|x|`` per index of the
    requested channel axis, reduced over every other axis (float64), when one was requested. ``zeros`` counts
    the elements exactly 0 (ReLU outputs, padding): every quantization represents them exactly, so the
    entropy and mse range methods leave them out of the error they weigh.
    """

    name: str
    dtype: np.dtype
    count: int
    samples: int
    min: float
    max: float
    nonfinite: int
    hist: np.ndarray | None = None
    hist_edges: np.ndarray | None = None
    channel_absmax: np.ndarray | None = None
    zeros: int = 0
    gram: np.ndarray | None = None  # float64 [d, d] = sum over rows x of x^T x (the Gram axis as the vector)
    gram_rows: int = 0
    gram_sum: np.ndarray | None = None  # float64 [d]: sum of the rows (with gram_rows, their mean)
    #: with a channel axis: finite min / max per channel (+inf / -inf where a channel had no finite value)
    channel_min: np.ndarray | None = None
    channel_max: np.ndarray | None = None

    @property
    def second_moment(self) -> np.ndarray | None:
        """E[x x^T] over the observed rows (the input covariance a layer's weights are fitted in), or None."""
        if self.gram is None or self.gram_rows == 0:
            return None
        return self.gram / self.gram_rows

    @property
    def finite_count(self) -> int:
        return self.count - self.nonfinite

    @property
    def absmax(self) -> float:
        """max(|min|, |max|) (NaN when no finite value was seen)."""
        return max(abs(self.min), abs(self.max)) if self.finite_count else math.nan

    @property
    def degenerate(self) -> str | None:
        """Why no real range can be calibrated, or None.

        ``"empty"`` (no element in any sample), ``"no finite values"``, ``"all zero"``, ``"constant value 3.0"``.
        """
        if self.count == 0:
            return "empty"
        if self.finite_count == 0:
            return "no finite values"
        if self.min == self.max:
            return "all zero" if self.min == 0 else f"constant value {float(self.min)!r}"
        return None


class TensorObserver:
    """Running statistics of one tensor (see the module docstring); ``channel_axis`` may be negative."""

    def __init__(self, name: str, dtype: np.dtype, channel_axis: int | None = None, gram_axis: int | None = None):
        self.name = name
        self.dtype = np.dtype(dtype)
        self.channel_axis = channel_axis
        self.gram_axis = gram_axis
        self._gram: np.ndarray | None = None
        self._gram_sum: np.ndarray | None = None
        self._gram_rows = 0
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self.count = 0
        self.samples = 0
        self.nonfinite = 0
        self.zeros = 0
        self._min = math.inf
        self._max = -math.inf
        self._chan: np.ndarray | None = None
        self._chan_min: np.ndarray | None = None
        self._chan_max: np.ndarray | None = None
        self._hist: np.ndarray | None = None
        self._edges: np.ndarray | None = None
        self._range: tuple[float, float] | None = None
        self._hist_samples = 0

    # ---------------------------------------------------------------------------------------- pass 1
    def observe(self, arr: np.ndarray) -> None:
        """Pass 1: count, NaN/inf count, finite min/max and per-channel max |x| of one sample's value."""
        a = _as_float(arr)
        sample = self.samples
        self.samples += 1
        self.count += a.size
        if self.channel_axis is not None:
            axis = self._axis(a, sample)
        if a.size == 0:
            return
        mn, mx = a.min(), a.max()
        finite = None
        if not (math.isfinite(mn) and math.isfinite(mx)):  # NaN propagates through min/max; inf shows as is
            finite = np.isfinite(a)
            n_finite = int(np.count_nonzero(finite))
            self.nonfinite += a.size - n_finite
            if n_finite:
                vals = a[finite]
                mn, mx = vals.min(), vals.max()
                del vals
            else:
                mn = mx = None
        if mn is not None:
            mn, mx = float(mn), float(mx)
            self._min = min(self._min, mn)
            self._max = max(self._max, mx)
            if mn <= 0.0 <= mx:
                self.zeros += int(np.count_nonzero(a == 0))
        if self.channel_axis is not None:
            self._observe_channels(a, axis, finite, sample)
        if self.gram_axis is not None:
            self._observe_gram(a, sample)

    def _observe_gram(self, a: np.ndarray, sample: int) -> None:
        ax = self.gram_axis
        norm = ax + a.ndim if ax < 0 else ax
        if not 0 <= norm < a.ndim:
            raise CalibrationDataError(f"tensor '{self.name}': Gram axis {ax} is out of range for its rank {a.ndim} "
                                       f"(shape {list(a.shape)}) in sample {sample}")
        d = a.shape[norm]
        if self._gram is not None and self._gram.shape[0] != d:
            raise CalibrationDataError(f"tensor '{self.name}': axis {ax} has {d} features in sample {sample} but "
                                       f"{self._gram.shape[0]} in earlier samples (shape {list(a.shape)})")
        rows = np.moveaxis(a, norm, -1).reshape(-1, d).astype(np.float32, copy=False)
        ok = np.isfinite(rows).all(axis=1)
        if not ok.all():
            rows = rows[ok]
        if self._gram is None:
            self._gram = np.zeros((d, d), np.float64)
            self._gram_sum = np.zeros(d, np.float64)
        self._gram_sum += rows.sum(axis=0, dtype=np.float64)
        self._gram_rows += rows.shape[0]
        # rows are buffered (a bounded amount) so that X^T X is one large float32 BLAS product per ~4k rows
        # instead of a d x d update per sample; each product is accumulated in float64
        self._pending.append(np.array(rows, dtype=np.float32, copy=True))
        self._pending_rows += rows.shape[0]
        if self._pending_rows * d >= _GRAM_BUFFER_ELEMS or self._pending_rows >= 4096:
            self._flush_gram()

    def _flush_gram(self) -> None:
        if not self._pending:
            return
        x = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending, self._pending_rows = [], 0
        self._gram += x.T @ x

    def _axis(self, a: np.ndarray, sample: int) -> int:
        ax = self.channel_axis
        assert ax is not None
        norm = ax + a.ndim if ax < 0 else ax
        if not 0 <= norm < a.ndim:
            raise CalibrationDataError(
                f"tensor '{self.name}': channel axis {ax} is out of range for its rank {a.ndim} "
                f"(shape {list(a.shape)}) in sample {sample}"
            )
        return norm

    def _observe_channels(self, a: np.ndarray, axis: int, finite: np.ndarray | None, sample: int) -> None:
        n = a.shape[axis]
        if self._chan is not None and len(self._chan) != n:
            raise CalibrationDataError(
                f"tensor '{self.name}': channel axis {self.channel_axis} has {n} channels in sample {sample} "
                f"but {len(self._chan)} in earlier samples (shape {list(a.shape)})"
            )
        others = tuple(i for i in range(a.ndim) if i != axis)
        lo = np.min(a if finite is None else np.where(finite, a, np.inf), axis=others, initial=np.inf)
        hi = np.max(a if finite is None else np.where(finite, a, -np.inf), axis=others, initial=-np.inf)
        lo, hi = lo.astype(np.float64), hi.astype(np.float64)
        cm = np.maximum(np.maximum(-lo, hi), 0.0)  # max |x| (0 for a channel with no finite value)
        if self._chan is None:
            self._chan, self._chan_min, self._chan_max = cm, lo, hi
        else:
            self._chan = np.maximum(self._chan, cm)
            self._chan_min = np.minimum(self._chan_min, lo)
            self._chan_max = np.maximum(self._chan_max, hi)

    # ---------------------------------------------------------------------------------------- pass 2
    def start_histogram(self, bins: int) -> None:
        """Fix ``bins`` equal bins over the pass-1 [min, max] (numpy's widening for a constant)."""
        if self.count - self.nonfinite == 0:
            self._hist = self._edges = self._range = None
            return
        lo, hi = self._min, self._max
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        self._range = (lo, hi)
        self._hist = np.zeros(bins, dtype=np.int64)
        self._edges = np.linspace(lo, hi, bins + 1)
        self._hist_samples = 0

    def observe_histogram(self, arr: np.ndarray) -> None:
        """Pass 2: add the histogram counts of one sample's finite values over the fixed range."""
        self._hist_samples += 1
        if self._hist is None or np.size(arr) == 0:
            return
        a = _as_float(arr)
        lo, hi = self._range  # type: ignore[misc]
        mn, mx = a.min(), a.max()
        if not (math.isfinite(mn) and math.isfinite(mx) and lo <= mn and mx <= hi):
            # NaN/inf are left out; a finite value outside [lo, hi] (an EP whose results differ between the
            # two passes in the last bit) goes to the edge bin rather than being lost
            a = np.clip(a[np.isfinite(a)], lo, hi)
        counts, _ = np.histogram(a, bins=len(self._hist), range=self._range)
        self._hist += counts

    # ---------------------------------------------------------------------------------------- result
    def result(self) -> TensorStats:
        """The statistics; the Gram is handed over, not copied (it may be GBs): call once, when done observing."""
        self._flush_gram()
        gram, self._gram = self._gram, None
        has_finite = self.count - self.nonfinite > 0
        return TensorStats(
            name=self.name,
            dtype=self.dtype,
            count=self.count,
            samples=self.samples,
            min=self._min if has_finite else math.nan,
            max=self._max if has_finite else math.nan,
            nonfinite=self.nonfinite,
            hist=None if self._hist is None else self._hist.copy(),
            hist_edges=None if self._edges is None else self._edges.copy(),
            channel_absmax=None if self._chan is None else self._chan.copy(),
            channel_min=None if self._chan_min is None else self._chan_min.copy(),
            channel_max=None if self._chan_max is None else self._chan_max.copy(),
            zeros=self.zeros,
            gram=gram,
            gram_rows=self._gram_rows,
            gram_sum=None if self._gram_sum is None else self._gram_sum.copy(),
        )


def stats_from_arrays(
    name: str,
    arrays: Iterable[np.ndarray] | np.ndarray,
    *,
    histogram: bool = True,
    bins: int = 2048,
    channel_axis: int | None = None,
) -> TensorStats:
    """TensorStats of arrays already in memory, one "sample" each (a single ndarray is one sample)."""
    arrs = [arrays] if isinstance(arrays, np.ndarray) else [np.asarray(a) for a in arrays]
    dtype = arrs[0].dtype if arrs else np.dtype(np.float32)
    obs = TensorObserver(name, dtype, channel_axis)
    for a in arrs:
        obs.observe(a)
    if histogram:
        obs.start_histogram(bins)
        for a in arrs:
            obs.observe_histogram(a)
    return obs.result()
