"""Weight sharing math: weighted 1-D k-means codebooks per group of channels, and bit-packed index words.

k-means runs on each group's values sorted once: in one dimension every cluster is an interval of the sorted
values, so a Lloyd step is a search of the k-1 midpoints among the sorted values and two differences of running
sums (O(k log n) per group and step, not O(n k)); all groups advance together in flat numpy arrays. Seeding is
at the weighted quantiles (deterministic: the same weight gives the same codebook on every run and machine,
and, being spread by mass, it leaves no cluster empty the way random seeds in a 1-D mode can).

Indices are packed `per_word` to an unsigned word (8/32/64 bits, the densest the runtime's BitShift takes) and
unpacked in the graph by BitShift + Mod; `unpack` is the numpy reference of that decode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .gptq import gptq_columns

__all__ = ["Codebooks", "GroupedValues", "kmeans_groups", "nearest", "gptq_assign", "Scales", "absmax_scales",
           "WordLayout", "word_layout", "pack", "shifts", "unpack"]

_MAX_ITER = 100
_WEIGHT_FLOOR = 1e-3  # relative to the mean weight: a dead input channel still pulls its values a little


@dataclass
class Codebooks:
    """k values per group and, per element, the index of its value in its group's codebook."""

    values: np.ndarray  # float64 [groups, k], ascending in each group
    labels: np.ndarray  # int64, one per element, in the caller's order
    iterations: int
    pinned_zero: np.ndarray  # bool [groups]: value 0 kept exact (its index holds 0.0)


class GroupedValues:
    """Flat values split into groups, sorted once so that codebooks of any size are fitted without sorting again
    (the sort is most of the cost on a large embedding table)."""

    def __init__(self, values: np.ndarray, groups: np.ndarray, n_groups: int,
                 weights: Optional[np.ndarray] = None):
        v = np.asarray(values, np.float64).ravel()
        gid = np.asarray(groups, np.int64).ravel()
        if gid.shape != v.shape or (weights is not None and np.size(weights) != v.size):
            raise ValueError("values, groups and weights must have the same number of elements")
        w = np.ones_like(v) if weights is None else np.asarray(weights, np.float64).ravel()
        w = w + _WEIGHT_FLOOR * (float(w.mean()) if w.size and w.mean() > 0 else 1.0)
        # keys increasing across groups: group offset + value (the order within a group exact up to rounding far
        # below any codebook spacing)
        self.vmin = float(v.min()) if v.size else 0.0
        self.span = 2.0 * (float(v.max()) - self.vmin if v.size else 0.0) + 1.0
        keys = gid * self.span + (v - self.vmin)
        self.order = np.argsort(keys)
        self.keys, self.v, self.gid, self.w = keys[self.order], v[self.order], gid[self.order], w[self.order]
        self.n_groups = n_groups
        self.start = np.searchsorted(self.gid, np.arange(n_groups + 1))
        self.count = np.diff(self.start)
        self.is_zero = self.v == 0.0
        self.zeros = np.bincount(self.gid, weights=self.is_zero, minlength=n_groups)
        self.cw = np.concatenate(([0.0], np.cumsum(self.w)))
        self.cwv = np.concatenate(([0.0], np.cumsum(self.w * self.v)))

    def fit(self, k: int, keep_zero: bool = True) -> Codebooks:
        """Weighted k-means with k values per group; see kmeans_groups."""
        g, start, count, vs = self.n_groups, self.start, self.count, self.v
        pinned = np.zeros(g, bool)
        if keep_zero and k >= 3:
            pinned = (self.zeros * k >= count) & (count > 0)
        # seeds: weighted quantiles of each group's non-pinned mass
        seed_w = np.where(self.is_zero & pinned[self.gid], 0.0, self.w)
        cw_seed = np.concatenate(([0.0], np.cumsum(seed_w)))
        k_free = np.where(pinned, k - 1, k)
        frac = (np.arange(k)[None, :] + 0.5) / k_free[:, None]  # [G, k]; a pinned group's last slot is 0
        lo, hi = cw_seed[start[:-1]], cw_seed[start[1:]]
        target = lo[:, None] + np.minimum(frac, 1.0) * (hi - lo)[:, None]
        pos = np.searchsorted(cw_seed[1:], target.ravel(), side="left").reshape(g, k)
        pos = np.clip(pos, start[:-1, None], np.maximum(start[1:, None] - 1, start[:-1, None]))
        c = vs[np.minimum(pos, max(len(vs) - 1, 0))] if len(vs) else np.zeros((g, k))
        c = np.where(count[:, None] > 0, c, 0.0)
        if pinned.any():
            c[pinned, k - 1] = 0.0
        c = np.sort(c, axis=1)
        zero_slot = np.argmax(c == 0.0, axis=1)
        goff = np.arange(g)[:, None] * self.span

        def assign(c: np.ndarray) -> np.ndarray:  # [G, k+1] sorted positions where each cluster starts / ends
            mids = 0.5 * (c[:, 1:] + c[:, :-1])
            inner = np.searchsorted(self.keys, (goff + (mids - self.vmin)).ravel(), side="left").reshape(g, k - 1)
            b = np.concatenate([start[:-1, None], inner, start[1:, None]], axis=1)
            return np.maximum.accumulate(np.clip(b, start[:-1, None], start[1:, None]), axis=1)

        bounds = assign(c)
        it = 0
        for it in range(1, _MAX_ITER + 1):  # Lloyd: in 1-D the order of the values is kept, so c stays sorted
            mass = self.cw[bounds[:, 1:]] - self.cw[bounds[:, :-1]]
            total = self.cwv[bounds[:, 1:]] - self.cwv[bounds[:, :-1]]
            c = np.where(mass > 0, total / np.where(mass > 0, mass, 1.0), c)
            if pinned.any():
                c[pinned, zero_slot[pinned]] = 0.0
            new = assign(c)
            if np.array_equal(new, bounds):
                break
            bounds = new
        sizes = np.diff(bounds, axis=1).ravel()
        labels_sorted = np.repeat(np.tile(np.arange(k, dtype=np.int64), g), sizes)
        labels = np.empty_like(labels_sorted)
        labels[self.order] = labels_sorted
        return Codebooks(c, labels, it, pinned)


def kmeans_groups(values: np.ndarray, groups: np.ndarray, n_groups: int, k: int,
                  weights: Optional[np.ndarray] = None, keep_zero: bool = True) -> Codebooks:
    """Weighted k-means (sum of w_i (v_i - c_{a_i})^2 per group) of flat `values` split by `groups` (ids 0..n-1).

    `weights` (same length, >= 0) weigh each value's squared error (None: all equal). With `keep_zero`, a group
    in which at least 1/k of the values are exactly 0 (a pruned weight) keeps 0 as one exact codebook value."""
    return GroupedValues(values, groups, n_groups, weights).fit(k, keep_zero)


@dataclass(frozen=True)
class WordLayout:
    """How `bits`-bit indices are packed: `per_word` of them in each unsigned word of `dtype`."""

    bits: int
    dtype: np.dtype
    per_word: int

    @property
    def bits_per_index(self) -> float:
        return self.dtype.itemsize * 8 / self.per_word


def word_layout(bits: int) -> WordLayout:
    """The densest packing of `bits`-bit indices into the words ONNX Runtime's BitShift takes (uint8/32/64);
    among equally dense ones, the smaller word (less memory while the decode runs at load)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    best = None
    for dt in (np.uint8, np.uint32, np.uint64):
        size = np.dtype(dt).itemsize * 8
        lay = WordLayout(bits, np.dtype(dt), size // bits)
        if best is None or lay.bits_per_index < best.bits_per_index - 1e-12:
            best = lay
    return best


def pack(labels: np.ndarray, layout: WordLayout) -> np.ndarray:
    """Flat indices -> words [n_words, 1]: index i sits in word i // per_word at bit (i % per_word) * bits."""
    lab = np.asarray(labels).ravel().astype(np.uint64)
    if lab.size and int(lab.max()) >= 1 << layout.bits:
        raise ValueError(f"index {int(lab.max())} does not fit in {layout.bits} bits")
    if layout.per_word == 1:
        return lab.astype(layout.dtype)
    n_words = -(-lab.size // layout.per_word)
    padded = np.zeros(n_words * layout.per_word, np.uint64)
    padded[:lab.size] = lab
    shifts = (np.arange(layout.per_word, dtype=np.uint64) * np.uint64(layout.bits))[None, :]
    words = np.bitwise_or.reduce(padded.reshape(n_words, layout.per_word) << shifts, axis=1)
    return words.astype(layout.dtype).reshape(n_words, 1)


def shifts(layout: WordLayout) -> np.ndarray:
    """The BitShift amounts that unpack one word (broadcast over [n_words, 1])."""
    return (np.arange(layout.per_word, dtype=np.uint64) * np.uint64(layout.bits)).astype(layout.dtype)


def unpack(words: np.ndarray, layout: WordLayout, n: int) -> np.ndarray:
    """The numpy reference of the graph's decode: words -> the first `n` indices (int64)."""
    if layout.per_word == 1:
        return np.asarray(words).ravel()[:n].astype(np.int64)
    s = np.asarray(words).reshape(-1, 1) >> shifts(layout)[None, :]
    return (s % np.asarray(1 << layout.bits, layout.dtype)).reshape(-1)[:n].astype(np.int64)


def nearest(values: np.ndarray, codebooks: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Index of the nearest value of codebook `group[i]` (rows of sorted `codebooks` [G, k]) for each values[i]."""
    n_groups, k = codebooks.shape
    mids = 0.5 * (codebooks[:, 1:] + codebooks[:, :-1])
    lo = min(float(codebooks.min()), float(np.min(values))) if values.size else 0.0
    span = 2.0 * (max(float(codebooks.max()), float(np.max(values)) if values.size else 0.0) - lo) + 1.0
    keys = (np.arange(n_groups)[:, None] * span + (mids - lo)).ravel()
    pos = np.searchsorted(keys, group * span + (values - lo), side="left")
    return np.clip(pos - group * (k - 1), 0, k - 1)


@dataclass(frozen=True)
class Scales:
    """Scales a codebook's values are multiplied by in the decode: one per output channel (`block` 0), or per
    output channel and block of `block` consecutive elements along `block_axis` (2-D weights).

    `stored` is what the file holds: the channel scales broadcast against the weight, or for blocks
    [n_blocks, 1, C] (block axis 0) / [C, n_blocks, 1] (block axis 1), which broadcast against the weight's
    indices laid out as `blocked(shape)` (the block axis padded to whole blocks); `full` is one scale per element
    in float32."""

    stored: np.ndarray  # float16 where every scale is a normal float16, else float32
    block: int = 0
    block_axis: int = 0

    def blocked(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The 3-D layout [n_blocks, block, C] / [C, n_blocks, block] of a weight of `shape` (blocks only)."""
        st = self.stored.shape
        return (st[0], self.block, shape[1]) if self.block_axis == 0 else (shape[0], st[1], self.block)

    def padded(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """`shape` with the block axis grown to whole blocks (blocks only)."""
        b = self.blocked(shape)
        return (b[0] * b[1], b[2]) if self.block_axis == 0 else (b[0], b[1] * b[2])

    def apply(self, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Codebook values in the index layout (`blocked(shape)` with blocks, else `shape`) times the scales, in
        float32 and `shape`: the numpy reference of the decode's Mul, Reshape and Slice."""
        out = np.asarray(values, np.float32) * self.stored.astype(np.float32)
        if not self.block:
            return out
        out = out.reshape(self.padded(shape))
        return out[:shape[0]] if self.block_axis == 0 else out[:, :shape[1]]

    def full(self, shape: tuple[int, ...]) -> np.ndarray:
        """One scale per element of a weight of `shape`, float32."""
        if not self.block:
            return np.broadcast_to(self.stored.astype(np.float32), shape)
        return self.apply(np.ones(self.blocked(shape), np.float32), shape)

    @property
    def nbytes(self) -> int:
        return int(self.stored.nbytes)


_F16_MIN_NORMAL = float(np.finfo(np.float16).tiny)
_F16_MAX = float(np.finfo(np.float16).max)


def absmax_scales(w: np.ndarray, axis: int, block: int = 0) -> Scales:
    """Each output channel's (along `axis`) largest magnitude, or per channel and block of `block` elements of
    the other axis of a 2-D weight (the last block may be short); 1 where all values are 0. Stored as float16
    when every scale is a normal float16 (half the bytes; the codebook fit uses the rounded scales)."""
    a = np.abs(np.asarray(w, np.float32))
    if block and a.ndim == 2:
        b = 1 - axis
        length = a.shape[b]
        nb = -(-length // block)
        pad = [(0, 0), (0, 0)]
        pad[b] = (0, nb * block - length)
        a = np.pad(a, pad)
        s = a.reshape(nb, block, a.shape[1]).max(axis=1)[:, None, :] if b == 0 else \
            a.reshape(a.shape[0], nb, block).max(axis=2)[:, :, None]
    else:
        block, b = 0, 0
        s = a.max(axis=tuple(i for i in range(a.ndim) if i != axis), keepdims=True)
    s = np.where(s > 0, s, 1.0).astype(np.float32)
    if float(s.min()) >= _F16_MIN_NORMAL and float(s.max()) <= _F16_MAX:
        s = s.astype(np.float16)
    return Scales(s, block, b)


def gptq_assign(w: np.ndarray, h: np.ndarray, codebooks: np.ndarray, row_group: np.ndarray,
                damping: float = 0.01, blocksize: int = 128, scale: Optional[np.ndarray] = None) -> np.ndarray:
    """Codebook indices for `w` [rows = outputs, cols = inputs] chosen column by column with GPTQ's error
    feedback (Frantar et al. 2023): each column is rounded to its row's nearest codebook value and the rounding
    error is spread over the columns not yet rounded through the Cholesky factor of H^-1 (H = E[x x^T] over
    inputs), in order of decreasing H_jj (act-order). Minimises ||X (W - W_hat)^T|| far better than nearest
    rounding of each weight alone. `row_group[r]` is the codebook of row r; codebooks [G, k] are ascending in
    each row (as kmeans_groups returns them). With `scale` [rows, cols] (> 0), the value of index i at (r, c) is
    codebooks[row_group[r], i] * scale[r, c]. Returns int64 [rows, cols]."""
    cb = np.asarray(codebooks, np.float64)
    rg = np.asarray(row_group, np.int64)
    sc = None if scale is None else np.asarray(scale, np.float64)

    def rounder(j: int, col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if sc is None:
            lab = nearest(col, cb, rg)
            return lab, cb[rg, lab]
        s = sc[:, j]
        lab = nearest(col / s, cb, rg)  # nearest of s * values, s > 0
        return lab, cb[rg, lab] * s

    return gptq_columns(w, h, rounder, damping=damping, blocksize=blocksize)
