"""Statistics collected once per compression: `collect_statistics` memoized by model bytes, request and samples.

Every pass of a recipe and every accuracy-budget back-off round asks through one cache, so a pass whose input
model did not change (the first pass of each back-off round, a pass after an unchanged one) does not run its
calibration again. The key is exact: the SHA-256 of the model's bytes, the tensors and options asked for, and
the identity of the sample dicts (kept alive by the cache, so an id is never reused while it is a key).
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from .. import ir
from .collect import collect_statistics
from .observers import TensorStats


#: Gram matrices beyond this many bytes in all the answers kept are not kept for later requests, nor any of a
#: model over 2 GB: holding them for the whole compression would multiply the peak memory of a large model (34
#: Grams of 4096^2 float64 are 4.6 GB, and a pass collecting them a chunk at a time would keep every chunk); the
#: pass that asked frees them when done, and a later request collects them again
MEMO_MAX_GRAM_BYTES = 1 << 30


def model_digest(model: onnx.ModelProto) -> str:
    """SHA-256 of the model's deterministic serialization (part by part over 2 GB): equal digests mean the same
    model."""
    h = hashlib.sha256()
    for chunk in ir.serialized_chunks(model):
        h.update(chunk)
    return h.hexdigest()


def _frozen(v: Any) -> Any:
    if isinstance(v, Mapping):
        return tuple(sorted((str(k), _frozen(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_frozen(x) for x in v)
    if isinstance(v, np.generic):
        return v.item()
    return v


class StatisticsCache:
    """`collect(model, names, feeds, **options)` returns what `collect_statistics` would, computed once.

    A request is answered from an earlier one on the same model and samples with the same options whose tensors
    (and channel/Gram axes) include it: a back-off round that excludes layers asks for fewer tensors."""

    def __init__(self) -> None:
        self._memo: dict[tuple, list[tuple[set, dict, dict, list, dict[str, TensorStats]]]] = {}
        self._pinned: dict[int, tuple[onnx.ModelProto, str]] = {}
        self._gram_bytes = 0  # Gram bytes the memo holds
        self.hits = 0
        self.misses = 0

    def pin(self, model: onnx.ModelProto, digest: str) -> None:
        """Record the digest of a model that is not modified any more (a pass's source), so that the many
        requests on it do not serialize it again; the model stays referenced, so its id is not reused."""
        self._pinned[id(model)] = (model, digest)

    def unpin(self, model: onnx.ModelProto) -> None:
        self._pinned.pop(id(model), None)

    def digest(self, model: onnx.ModelProto) -> str:
        hit = self._pinned.get(id(model))
        return hit[1] if hit is not None and hit[0] is model else model_digest(model)

    def collect(self, model: onnx.ModelProto, tensor_names: Sequence[str], feeds: Sequence[Mapping[str, Any]],
                progress: Any = False, channel_axes: Mapping[str, int] | None = None,
                gram_axes: Mapping[str, int] | None = None, **options: Any) -> dict[str, TensorStats]:
        feeds = list(feeds)
        caxes, gaxes = dict(channel_axes or {}), dict(gram_axes or {})
        wanted = set(tensor_names) | set(caxes) | set(gaxes)
        key = (self.digest(model), tuple(id(f) for f in feeds), _frozen(options))
        for names, c, g, _, stats in self._memo.get(key, []):
            if wanted <= names and all(c.get(n) == a for n, a in caxes.items()) \
                    and all(g.get(n) == a for n, a in gaxes.items()):
                self.hits += 1
                return {n: st for n, st in stats.items() if n in wanted}
        self.misses += 1
        stats = collect_statistics(model, tensor_names, feeds, progress=progress, channel_axes=caxes,
                                   gram_axes=gaxes, **options)
        grams = sum(st.gram.nbytes for st in stats.values() if st.gram is not None)
        if not grams or (self._gram_bytes + grams <= MEMO_MAX_GRAM_BYTES and not ir.is_big(model)):
            self._memo.setdefault(key, []).append((wanted, caxes, gaxes, feeds, stats))  # feeds kept: ids stay unique
            self._gram_bytes += grams
        return stats


class ProbeErrors:
    """End-to-end errors measured by sensitivity probes, kept for the whole compression: an accuracy-budget
    back-off round that runs a pass again on the same model and samples asks for the same candidate weights, and
    gets each error without a session or a run. Keyed by the model's digest, the samples (ids, kept alive), the
    providers and the candidate weights' bytes (a BLAKE2 digest per array)."""

    def __init__(self) -> None:
        self._errors: dict[tuple, tuple[float, Any]] = {}  # key -> (error, the samples: kept alive, ids unique)
        self.hits = 0
        self.misses = 0

    def key(self, digest: str, feeds: Sequence[Mapping[str, Any]], providers: Any,
            replace: Mapping[str, np.ndarray]) -> tuple:
        weights = tuple(sorted((n, a.dtype.str, a.shape, hashlib.blake2b(np.ascontiguousarray(a).view(np.uint8),
                                                                          digest_size=16).digest())
                               for n, a in ((n, np.asarray(v)) for n, v in replace.items())))
        return digest, tuple(id(f) for f in feeds), _frozen(list(providers or ())), weights  # (name, {options})

    def get(self, key: tuple) -> float | None:
        hit = self._errors.get(key)
        if hit is None:
            self.misses += 1
            return None
        self.hits += 1
        return hit[0]

    def put(self, key: tuple, error: float, feeds: Sequence[Mapping[str, Any]]) -> None:
        self._errors[key] = (error, list(feeds))
