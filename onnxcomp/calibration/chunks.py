"""Second moments of many layer inputs, a few layers at a time, for models whose Grams do not fit at once.

GPTQ and AWQ round each weight against E[x x^T] of its input. On a 34-layer 4096-wide model those Grams are
4.6 GB of float64 -- twice the weights -- if they are all collected in one calibration run. `MomentChunks` holds
the moments of a few inputs at a time (up to `chunk_bytes` of Grams, in the order the pass reads them): asking
for an input outside the chunk held drops that chunk and collects the next one, starting at the input asked for.
A pass that reads its inputs in that order collects each input once, at the price of one calibration run per
chunk.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import numpy as np

#: Gram bytes one chunk may hold (two 4096-wide layers)
CHUNK_BYTES = 1 << 28

Moments = dict[str, tuple[np.ndarray, np.ndarray]]


class MomentChunks:
    """(E[x x^T], E[x]) of named inputs, collected by `load({name: axis})` a chunk at a time.

    `order`: (name, axis, width) in the order the inputs are read; width is the Gram's side (its bytes are
    8 * width^2). `chunk_bytes`: default CHUNK_BYTES; a chunk holds one input at least."""

    def __init__(self, order: Sequence[tuple[str, int, int]], load: Callable[[dict[str, int]], Moments],
                 chunk_bytes: Optional[int] = None) -> None:
        self._order = [name for name, _, _ in order]
        self._at = {name: i for i, name in enumerate(self._order)}
        self._axis = {name: axis for name, axis, _ in order}
        self._bytes = {name: 8 * width * width for name, _, width in order}
        self._load = load
        self.chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        self._held: Moments = {}
        self._names: list[str] = []  # the inputs of the chunk held
        self.collections = 0  # calibration runs made so far

    def __contains__(self, name: object) -> bool:
        return name in self._at

    def __len__(self) -> int:
        return len(self._order)

    def get(self, name: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """The moments of `name` (None when it is not one of the inputs, or was never observed)."""
        if name not in self._at:
            return None
        if name not in self._names:
            self._collect(self._at[name])
        return self._held.get(name)

    def chunks(self) -> Iterator[Moments]:
        """Every input's moments, chunk by chunk in order (each chunk dropped when the next is collected)."""
        i = 0
        while i < len(self._order):
            i = self._collect(i)
            yield dict(self._held)

    def clear(self) -> None:
        self._held, self._names = {}, []

    @property
    def grams(self) -> "_Part":
        """The E[x x^T] of each input, as a read-only mapping (get, in, truth, clear)."""
        return _Part(self, 0)

    @property
    def means(self) -> "_Part":
        """The E[x] of each input, likewise."""
        return _Part(self, 1)

    def _collect(self, start: int) -> int:
        """Collect the chunk starting at order[start]; returns where the next chunk starts."""
        self.clear()  # the chunk held goes first: never two at once
        names, used, i = [], 0, start
        while i < len(self._order) and (not names or used + self._bytes[self._order[i]] <= self.chunk_bytes):
            names.append(self._order[i])
            used += self._bytes[self._order[i]]
            i += 1
        self._held = self._load({n: self._axis[n] for n in names})
        self._names = names
        self.collections += 1
        return i


class _Part:
    """One of the two moments of a `MomentChunks`, read like the dict a pass holds for a small model."""

    def __init__(self, chunks: MomentChunks, part: int) -> None:
        self._chunks, self._part = chunks, part

    def get(self, name: str, default: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        m = self._chunks.get(name)
        return default if m is None else m[self._part]

    def __contains__(self, name: object) -> bool:
        return name in self._chunks

    def __bool__(self) -> bool:
        return len(self._chunks) > 0

    def pop(self, name: str, default: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """Done with `name`: nothing to free one by one (a chunk goes as a whole when the next is collected)."""
        return default

    def clear(self) -> None:
        self._chunks.clear()
