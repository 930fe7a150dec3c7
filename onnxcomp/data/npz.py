"""Feeds to disk in the forms `load_feeds` reads: one .npz of arrays stacked on axis 0, or a folder of one
.npz per sample (for feeds whose shapes differ, e.g. sentences of different lengths)."""
from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np

from ..errors import CalibrationDataError
from .feeds import Feed


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def to_npz(feeds: Sequence[Feed], path: Union[str, os.PathLike]) -> Path:
    """Write `feeds` to `path`: a `.npz` file (every feed's arrays concatenated on axis 0; the shapes must agree
    beyond it), or any other path as a folder of `000000.npz`, ... (one per feed). Written atomically."""
    from ..ir import atomic_write

    feeds = list(feeds)
    if not feeds:
        raise CalibrationDataError("to_npz: no feeds to write")
    p = Path(os.fspath(path))
    if p.suffix.lower() != ".npz":
        p.mkdir(parents=True, exist_ok=True)
        width = max(6, len(str(len(feeds))))
        for i, f in enumerate(feeds):
            atomic_write(p / f"{i:0{width}d}.npz", _npz_bytes(dict(f)))
        return p
    names = list(feeds[0])
    for i, f in enumerate(feeds):
        if list(f) != names:
            raise CalibrationDataError(f"to_npz: feed {i} has inputs {list(f)}, feed 0 has {names}")
        for k in names:
            if f[k].shape[1:] != feeds[0][k].shape[1:]:
                raise CalibrationDataError(
                    f"to_npz: input '{k}' has shape {list(f[k].shape)} in feed {i} and {list(feeds[0][k].shape)} in "
                    "feed 0: arrays of different shapes cannot be stacked in one .npz; write a folder (a path "
                    "without .npz), or pad them to one length (from_texts(pad_to=N); CLI: --pad-to N)")
    atomic_write(p, _npz_bytes({k: np.concatenate([f[k] for f in feeds]) for k in names}))
    return p
