"""Range methods: a quantization range ``(lo, hi)`` from a tensor's :class:`TensorStats`, vectorised in numpy.

* ``minmax``: ``(min, max)``; symmetric: ``(-t, t)`` with ``t = max(|min|, |max|)``.
* ``percentile``: from the histogram's CDF, linear inside a bin. Symmetric: ``t`` = the ``percentile`` of
  ``|x|``, ``(-t, t)``. Asymmetric: ``(value at 100 - percentile, value at percentile)`` of the signed values.
* ``entropy``: TensorRT's KL-divergence threshold search, as ONNX Runtime's ``HistogramCollector`` does it,
  on the ``|x|`` distribution: for each candidate threshold (every bin edge from
  ``ENTROPY_QUANTIZED_BINS`` = 128 bins up to the full range) the clipped distribution P (outliers added to
  its last bin) is compared with Q, P merged into 128 levels and spread back over P's non-empty bins; the
  threshold of least KL(P || Q) wins. Unlike ORT, every bin belongs to a level (ORT drops the remainder bins
  of Q), Q is not truncated to integers, and all candidates are scored at once from prefix sums
  (O(candidates x 128), no Python loop). Symmetric: ``(-t, t)``; asymmetric: ``(max(min, -t), min(max, t))``.
  As in TensorRT and ORT, a sharply peaked distribution drives the search to its smallest candidates (at 128
  bins Q equals P up to the clipped tail): MiniLM's GELU outputs (max 23) get t = 1.45 here, 2.9 from ORT.
* ``mse``: the clip range of least expected squared error for the target integer type: rounding noise
  ``scale**2 / 12`` on the mass inside the range plus the exact clipping error of the mass outside it (values
  uniform inside each histogram bin). Candidates are ``MSE_CANDIDATES`` geometric shrink factors
  (``2**-8`` .. 1) of the minmax range; asymmetric ranges shrink ``lo`` and ``hi`` independently (all
  candidate pairs are scored at once; the zero point's rounding is ignored in the score). Rare outliers are
  kept when clipping them costs more squared error than the rounding it saves (5 values at 50 among 1e5
  N(0, 1) samples: t = 45 for int8; among 1e6: 24; with 4 bits: < 10).

Exact zeros (``TensorStats.zeros``: ReLU outputs, padding) are left out of the entropy and mse scores: they
are exactly representable, and as a spike in one bin they would drag the KL search to its smallest candidate
(ReLU outputs were clipped to under half their range) and inflate the rounding-error term.

Every range contains 0 (ONNX zero points must represent 0 exactly): ``lo <= 0 <= hi``. A degenerate tensor
gives ``(0, 0)`` (all zero, or empty) or ``(min(v, 0), max(v, 0))`` (constant ``v``); one with no finite
value at all raises :class:`~onnxcomp.errors.CalibrationDataError`, as does a histogram method on stats
collected without a histogram. Unknown methods, dtypes or percentiles raise
:class:`~onnxcomp.errors.RecipeError`.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import CalibrationDataError, RecipeError
from .observers import TensorStats

__all__ = ["RANGE_METHODS", "QDTYPE_RANGES", "compute_range", "ENTROPY_QUANTIZED_BINS", "MSE_CANDIDATES"]

RANGE_METHODS = ("minmax", "percentile", "entropy", "mse")
QDTYPE_RANGES: dict[str, tuple[int, int]] = {
    "uint8": (0, 255),
    "int8": (-128, 127),
    "uint16": (0, 65535),
    "int16": (-32768, 32767),
    "uint4": (0, 15),
    "int4": (-8, 7),
}
ENTROPY_QUANTIZED_BINS = 128
MSE_CANDIDATES = 100
_MSE_SMALLEST_SHRINK = 2.0**-8
_KL_EPS = 1e-4  # ORT's smoothing: an empty Q level where P has mass counts as 1e-4 of one element


def compute_range(
    stats: TensorStats,
    method: str = "minmax",
    *,
    qdtype: str = "uint8",
    symmetric: bool = False,
    percentile: float = 99.999,
) -> tuple[float, float]:
    """The ``(lo, hi)`` range of ``stats`` by ``method`` (one of :data:`RANGE_METHODS`); ``lo <= 0 <= hi``."""
    if method not in RANGE_METHODS:
        raise RecipeError(f"unknown calibration method {method!r}; valid: {', '.join(RANGE_METHODS)}")
    if qdtype not in QDTYPE_RANGES:
        raise RecipeError(f"unknown quantized dtype {qdtype!r}; valid: {', '.join(QDTYPE_RANGES)}")
    p = float(percentile)
    if not 50.0 <= p <= 100.0:
        raise RecipeError(f"percentile must be in [50, 100], got {percentile}")

    deg = stats.degenerate
    if deg == "no finite values":
        raise CalibrationDataError(
            f"tensor '{stats.name}': no finite value in {stats.samples} calibration samples "
            f"({stats.nonfinite} NaN/inf); no range can be calibrated"
        )
    if deg is not None:  # empty, all zero, constant
        v = 0.0 if deg == "empty" else float(stats.min)
        return (min(v, 0.0), max(v, 0.0))

    lo0, hi0 = float(stats.min), float(stats.max)
    if method == "minmax":
        lo, hi = lo0, hi0
        if symmetric:
            t = max(abs(lo0), abs(hi0))
            lo, hi = -t, t
    else:
        if stats.hist is None or stats.hist_edges is None:
            raise CalibrationDataError(
                f"tensor '{stats.name}': calibration method '{method}' needs a histogram, and these statistics "
                "have none; collect them with collect_statistics(..., histogram=True)"
            )
        hist = np.asarray(stats.hist, dtype=np.float64)
        edges = np.asarray(stats.hist_edges, dtype=np.float64)
        if hist.sum() <= 0:
            raise CalibrationDataError(f"tensor '{stats.name}': the histogram is empty")
        if method == "percentile":
            lo, hi = _percentile_range(hist, edges, p, symmetric)
        elif method == "entropy":
            t = _entropy_threshold(*_abs_histogram(_without_zeros(hist, edges, stats.zeros), edges))
            lo, hi = (-t, t) if symmetric else (max(lo0, -t), min(hi0, t))
        else:
            hist = _without_zeros(hist, edges, stats.zeros)
            lo, hi = _mse_range(hist, edges, lo0, hi0, QDTYPE_RANGES[qdtype], symmetric)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):  # cannot happen for finite stats; never hand one on
        raise CalibrationDataError(f"tensor '{stats.name}': method '{method}' gave a non-finite range ({lo}, {hi})")
    return (lo, hi)


# ------------------------------------------------------------------------------------------ helpers
def _cumulative(hist: np.ndarray) -> np.ndarray:
    """[0, h0, h0+h1, ...]: the CDF at each edge (counts)."""
    cum = np.empty(len(hist) + 1, dtype=np.float64)
    cum[0] = 0.0
    np.cumsum(hist, out=cum[1:])
    return cum


def _quantile(edges: np.ndarray, cum: np.ndarray, target: float) -> float:
    """Smallest x with CDF(x) >= target, the CDF linear inside each bin."""
    n = len(edges) - 1
    k = int(np.clip(np.searchsorted(cum, target, side="left"), 1, n))
    c0, c1 = cum[k - 1], cum[k]
    frac = 0.0 if c1 <= c0 else min(max((target - c0) / (c1 - c0), 0.0), 1.0)
    return float(edges[k - 1] + frac * (edges[k] - edges[k - 1]))


def _without_zeros(hist: np.ndarray, edges: np.ndarray, zeros: int) -> np.ndarray:
    """The histogram less the exact zeros (in the bin holding 0): they are exactly representable, and as a
    spike inside one bin (ReLU outputs) they would dominate a KL or rounding-error score."""
    if zeros <= 0 or not edges[0] <= 0.0 <= edges[-1]:
        return hist
    k = min(int(np.searchsorted(edges, 0.0, side="right")) - 1, len(hist) - 1)
    out = hist.copy()
    out[k] = max(out[k] - zeros, 0.0)
    return out


def _abs_histogram(hist: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The |x| histogram folded from a signed one: bins of the same width over [0, max|x|].

    The CDF of |x| at a is F(a) - F(-a), with F the signed CDF linear inside each bin.
    """
    amax = max(abs(edges[0]), abs(edges[-1]))
    width = (edges[-1] - edges[0]) / len(hist)
    n = max(1, int(round(amax / width)))
    a = np.linspace(0.0, amax, n + 1)
    cum = _cumulative(hist)
    g = np.interp(a, edges, cum) - np.interp(-a, edges, cum)
    g[-1] = cum[-1]  # all the mass lies within [-amax, amax]
    return np.maximum(np.diff(g), 0.0), a


def _percentile_range(hist: np.ndarray, edges: np.ndarray, p: float, symmetric: bool) -> tuple[float, float]:
    if symmetric:
        ahist, aedges = _abs_histogram(hist, edges)
        cum = _cumulative(ahist)
        t = _quantile(aedges, cum, cum[-1] * p / 100.0)
        return -t, t
    cum = _cumulative(hist)
    total = cum[-1]
    return _quantile(edges, cum, total * (100.0 - p) / 100.0), _quantile(edges, cum, total * p / 100.0)


def _xlogx(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)


def _entropy_threshold(hist: np.ndarray, edges: np.ndarray, nq: int = ENTROPY_QUANTIZED_BINS) -> float:
    """The KL-optimal clip threshold of an |x| histogram (see the module docstring).

    For a candidate keeping the first ``i`` bins: P_b = h_b (b < i-1), P_{i-1} = h_{i-1} + outliers;
    level g holds bins [ceil(g i / nq), ceil((g+1) i / nq)); Q_b = (sum of h over b's level) / (number of
    non-empty P bins in that level) where P_b > 0. With T = sum P and S = sum Q = sum_{b<i} h_b,
    KL(P/T || Q/S) = (sum P log P - sum_g Pg_g log q_g) / T - log T + log S, which needs only prefix sums.
    """
    n = len(hist)
    if n <= nq:
        return float(edges[-1])
    h = hist.astype(np.float64)
    total = float(h.sum())
    csum = _cumulative(h)
    cnz = _cumulative((h > 0).astype(np.float64))
    cplp = _cumulative(_xlogx(h))

    i = np.arange(nq, n + 1, dtype=np.int64)  # number of bins kept
    out = total - csum[i]  # mass beyond the threshold, folded into the last kept bin
    last = h[i - 1] + out
    sum_plogp = cplp[i - 1] + _xlogx(last)

    g = np.arange(nq + 1, dtype=np.int64)
    bounds = (g[None, :] * i[:, None] + nq - 1) // nq  # [candidates, nq+1]: level g = bins [b_g, b_{g+1})
    qs = csum[bounds[:, 1:]] - csum[bounds[:, :-1]]  # level sums of the clipped histogram (no outliers)
    nz = cnz[bounds[:, 1:]] - cnz[bounds[:, :-1]]
    nz[:, -1] += (h[i - 1] == 0) & (out > 0)  # the last bin is non-empty in P once outliers land there
    pg = qs.copy()
    pg[:, -1] += out  # level sums of P
    q_level = np.where(qs > 0, qs / np.maximum(nz, 1.0), _KL_EPS)  # Q value of P's non-empty bins
    s = csum[i]
    kl = (sum_plogp - (pg * np.log(q_level)).sum(axis=1)) / total - math.log(total) + np.log(np.maximum(s, _KL_EPS))
    kl[s <= 0] = np.inf  # nothing below the threshold: Q is empty (ORT: smoothing fails, KL = inf)
    best = int(np.argmin(kl))
    return float(edges[i[best]])


def _clip_error(hist: np.ndarray, a: np.ndarray, b: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """For each candidate (rows of lo/hi, [K, 1]): mass outside [lo, hi] and its squared clipping error.

    Values are uniform inside each bin [a, b]; the error of x > hi is (x - hi)**2, of x < lo (lo - x)**2.
    """
    dens = hist / (b - a)  # per unit length
    up_in = np.maximum(a - hi, 0.0)  # distance from hi to the part of the bin above hi: [max(a,hi), b]
    up_out = np.maximum(b - hi, 0.0)
    dn_in = np.maximum(lo - b, 0.0)
    dn_out = np.maximum(lo - a, 0.0)
    mass = ((up_out - up_in) + (dn_out - dn_in)) * dens
    err = ((up_out**3 - up_in**3) + (dn_out**3 - dn_in**3)) * (dens / 3.0)
    return mass.sum(axis=1), err.sum(axis=1)


def _mse_range(
    hist: np.ndarray, edges: np.ndarray, lo0: float, hi0: float, qrange: tuple[int, int], symmetric: bool
) -> tuple[float, float]:
    qmin, qmax = qrange
    shrink = np.geomspace(_MSE_SMALLEST_SHRINK, 1.0, MSE_CANDIDATES)
    a, b = edges[:-1][None, :], edges[1:][None, :]
    total = float(hist.sum())
    if symmetric:
        levels = 2 * qmax if qmin < 0 else qmax - qmin  # int8 symmetric: -127..127
        t = (max(abs(lo0), abs(hi0)) * shrink)[:, None]
        m_out, e_clip = _clip_error(hist, a, b, -t, t)
        scale = 2.0 * t[:, 0] / levels
        score = (total - m_out) * scale**2 / 12.0 + e_clip
        k = int(np.argmin(score))
        return -float(t[k, 0]), float(t[k, 0])
    levels = qmax - qmin
    lo_c = (min(lo0, 0.0) * shrink)[:, None]
    hi_c = (max(hi0, 0.0) * shrink)[:, None]
    inf = np.full_like(lo_c, np.inf)
    m_lo, e_lo = _clip_error(hist, a, b, lo_c, inf)  # below lo only
    m_hi, e_hi = _clip_error(hist, a, b, -inf, hi_c)  # above hi only
    width = hi_c[:, 0][None, :] - lo_c[:, 0][:, None]  # [lo candidate, hi candidate]
    inside = total - m_lo[:, None] - m_hi[None, :]
    score = inside * (width / levels) ** 2 / 12.0 + e_lo[:, None] + e_hi[None, :]
    j, k = np.unravel_index(int(np.argmin(score)), score.shape)
    return float(lo_c[j, 0]), float(hi_c[k, 0])
