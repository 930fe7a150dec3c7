"""Per-output error metrics of a candidate against a reference, accumulated streaming over many feeds.

Memory stays flat in the number of samples: each update folds one pair of output arrays into a handful of
float64 sums (sum |d|, max |d|, sum d^2, sum r^2, sum c^2, sum r*c), never a concatenation.

Definitions (r = reference, c = candidate, d = c - r, over all elements of all samples, flattened):

* ``max_abs_err``  = max |d|
* ``mean_abs_err`` = mean |d|
* ``rel_l2_err``   = ||d||_2 / max(||r||_2, EPS)  (EPS = 1e-12)
* ``cosine``       = <r, c> / (||r|| ||c||); exactly 1.0 when r == c (all-zero included), 0.0 when only one is zero
* ``exact_match``  = fraction of equal elements (integer and bool outputs; None for floats)
* ``nonfinite``    = number of NaN/inf elements in the candidate

Positions where the reference itself is NaN/inf are left out of the sums (and counted in
``ref_nonfinite``). A NaN/inf in the candidate where the reference is finite is an error that no metric may
hide: max/mean/rel errors become inf and cosine NaN, so any budget check on them fails.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["EPS", "METRICS", "OutputError", "OutputAccumulator", "compare_arrays"]

EPS = 1e-12
METRICS = ("max_abs_err", "mean_abs_err", "rel_l2_err", "cosine")
HIGHER_IS_BETTER = {"cosine": True, "exact_match": True}


@dataclass
class OutputError:
    """Errors of one output, over every compared sample."""

    name: str
    shape: list[int | None]  # reference shape; a dim that varied between samples is None
    dtype: str  # reference dtype (numpy name)
    max_abs_err: float
    mean_abs_err: float
    rel_l2_err: float
    cosine: float
    nonfinite: int = 0  # NaN/inf elements in the candidate
    ref_nonfinite: int = 0  # NaN/inf elements in the reference (left out of the metrics)
    exact_match: float | None = None  # integer/bool outputs: fraction of equal elements
    elements: int = 0  # elements compared
    samples: int = 0
    candidate_dtype: str | None = None  # set when it differs from the reference's
    problem: str | None = None  # e.g. a shape mismatch; the metrics are then inf/NaN

    def metric(self, name: str) -> float:
        if name in ("nonfinite", "ref_nonfinite", "elements", "samples"):
            return float(getattr(self, name))
        if name in METRICS or name == "exact_match":
            v = getattr(self, name)
            return float("nan") if v is None else float(v)
        raise ValueError(f"unknown metric '{name}'; valid: {', '.join(METRICS + ('exact_match', 'nonfinite'))}")

    @property
    def ok(self) -> bool:
        """False when the candidate produced NaN/inf where the reference did not, or shapes differed."""
        return self.problem is None and all(math.isfinite(getattr(self, m)) for m in METRICS)


def _structured(v: Any) -> bool:
    """A sequence (list of tensors) or an empty optional (None): not one array."""
    return v is None or isinstance(v, (list, tuple))


def _flat(v: Any) -> Any:
    """A sequence's elements raveled into one array (recursively); None stays None."""
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        parts = [_flat(x) for x in v]
        if any(p is None for p in parts):
            return None
        return np.concatenate([np.ravel(p) for p in parts]) if parts else np.zeros((0,), np.float32)
    return np.asarray(v)


def _layout(v: Any) -> Any:
    """The shape structure of a sequence/optional value (lengths and element shapes), to compare exactly."""
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return [_layout(x) for x in v]
    return tuple(np.shape(v))


class OutputAccumulator:
    """Streaming accumulator of one output's errors; ``update`` per sample, ``result`` at the end."""

    def __init__(self, name: str):
        self.name = name
        self.samples = 0
        self.n = 0  # elements in the sums (reference finite, candidate finite)
        self.sum_abs = 0.0
        self.max_abs = 0.0
        self.sum_d2 = 0.0
        self.sum_r2 = 0.0
        self.sum_c2 = 0.0
        self.sum_rc = 0.0
        self.equal = 0
        self.total = 0
        self.nonfinite = 0
        self.new_nonfinite = 0  # candidate NaN/inf where the reference is finite (or differs from it)
        self.ref_nonfinite = 0
        self.shape: list[int | None] | None = None
        self.dtype: str | None = None
        self.cand_dtype: str | None = None
        self.integral = False
        self.problem: str | None = None

    def _flatten(self, ref: Any, cand: Any, idx: int) -> tuple[np.ndarray, np.ndarray] | None:
        """A sequence/optional sample as two flat arrays to compare, or None when there is nothing to compare
        (both empty optionals) or their structure differs (recorded as the output's problem)."""
        if _layout(ref) != _layout(cand):
            if self.problem is None:
                self.problem = (f"sequence/optional structure differs on sample {idx}: reference "
                                f"{_layout(ref)}, candidate {_layout(cand)}")
            return None
        r, c = _flat(ref), _flat(cand)
        if r is None:
            return None
        return r, c

    def update(self, ref: Any, cand: Any) -> None:
        idx = self.samples
        if _structured(ref) or _structured(cand):
            flat = self._flatten(ref, cand, idx)
            if flat is None:
                self.samples += 1
                return
            ref, cand = flat
        r = np.asarray(ref)
        c = np.asarray(cand)
        self.samples += 1
        if self.shape is None:
            self.shape = list(r.shape)
            self.dtype = r.dtype.name
            self.cand_dtype = c.dtype.name
            self.integral = r.dtype.kind in "biu"
        elif len(self.shape) == r.ndim:
            self.shape = [a if a == b else None for a, b in zip(self.shape, r.shape)]
        if r.shape != c.shape:
            if self.problem is None:
                self.problem = f"shape mismatch on sample {idx}: reference {list(r.shape)}, candidate {list(c.shape)}"
            return
        if r.dtype.kind not in "biuf" or c.dtype.kind not in "biuf":
            # strings / objects: exact comparison only
            eq = int(np.count_nonzero(r == c)) if r.size else 0
            self.equal += eq
            self.total += r.size
            if eq != r.size and self.problem is None:
                self.problem = f"non-numeric values differ on sample {idx}"
            return
        self.total += r.size
        if self.integral or c.dtype.kind in "biu":
            self.equal += int(np.count_nonzero(r == c))
        r64 = r.astype(np.float64, copy=False).ravel()
        c64 = c.astype(np.float64, copy=False).ravel()
        rf = np.isfinite(r64)
        cf = np.isfinite(c64)
        if not (rf.all() and cf.all()):
            self.nonfinite += int(np.count_nonzero(~cf))
            self.ref_nonfinite += int(np.count_nonzero(~rf))
            same = (r64 == c64) | (np.isnan(r64) & np.isnan(c64))  # inf==inf, nan~nan where the reference has them
            self.new_nonfinite += int(np.count_nonzero(~cf & ~(~rf & same)))
            keep = rf & cf
            r64, c64 = r64[keep], c64[keep]
        if not r64.size:
            return
        d = c64 - r64
        ad = np.abs(d)
        self.n += d.size
        self.sum_abs += float(ad.sum())
        self.max_abs = max(self.max_abs, float(ad.max()))
        self.sum_d2 += float(d @ d)
        self.sum_r2 += float(r64 @ r64)
        self.sum_c2 += float(c64 @ c64)
        self.sum_rc += float(r64 @ c64)

    def result(self) -> OutputError:
        bad = self.problem is not None or self.new_nonfinite > 0
        if bad:
            mx = mean = rel = float("inf")
            cos = float("nan")
        else:
            mx = self.max_abs
            mean = self.sum_abs / self.n if self.n else 0.0
            rel = math.sqrt(self.sum_d2) / max(math.sqrt(self.sum_r2), EPS)
            # identical outputs give exactly 1.0 (the sums alone can round to 0.9999999999999998)
            cos = 1.0 if self.sum_d2 == 0.0 else cosine_from_sums(self.sum_rc, self.sum_r2, self.sum_c2)
        return OutputError(
            name=self.name,
            shape=list(self.shape or []),
            dtype=self.dtype or "unknown",
            max_abs_err=mx,
            mean_abs_err=mean,
            rel_l2_err=rel,
            cosine=cos,
            nonfinite=self.nonfinite,
            ref_nonfinite=self.ref_nonfinite,
            exact_match=(self.equal / self.total if self.total else 1.0) if self.integral else None,
            elements=self.n,
            samples=self.samples,
            candidate_dtype=self.cand_dtype if self.cand_dtype != self.dtype else None,
            problem=self.problem,
        )


def cosine_from_sums(rc: float, r2: float, c2: float) -> float:
    if r2 == 0.0 and c2 == 0.0:
        return 1.0
    if r2 == 0.0 or c2 == 0.0:
        return 0.0
    return max(-1.0, min(1.0, rc / (math.sqrt(r2) * math.sqrt(c2))))


def compare_arrays(name: str, pairs: Any) -> OutputError:
    """Metrics over an iterable of (reference, candidate) array pairs (convenience for one-off checks)."""
    acc = OutputAccumulator(name)
    for r, c in pairs:
        acc.update(r, c)
    return acc.result()
