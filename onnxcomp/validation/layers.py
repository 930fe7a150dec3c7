"""Errors of intermediate tensors (per layer), candidate vs reference, on the same feeds.

Used for sensitivity reports: which quantized/factorized layer departs most from the float model.
Both models are copied with the tensors added as graph outputs; errors accumulate streaming.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
import onnx

from .numerics import OutputAccumulator, OutputError
from ..runtime import observable_tensors, run_session, session_with_outputs


@dataclass
class ReferenceValues:
    """A reference model's values of some tensors on some feeds, computed once to compare many candidates."""

    names: list[str]
    values: list[list[np.ndarray]]  # per feed, per name


def reference_values(reference: onnx.ModelProto, names: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]],
                     providers: Optional[Sequence[str]] = None, max_samples: int = 16) -> ReferenceValues:
    """Run `reference` once over the feeds, keeping the values of the `names` it can return."""
    names = [n for n in names if n in observable_tensors(reference)]
    if not names:
        return ReferenceValues([], [])
    sess = session_with_outputs(reference, names, providers=providers, name="reference (layers)").session
    have = {o.name for o in sess.get_outputs()}
    names = [n for n in names if n in have]
    inputs = {i.name for i in sess.get_inputs()}
    values = [run_session(sess, {k: v for k, v in feed.items() if k in inputs}, names, name="reference", sample=i)
              for i, feed in enumerate(list(feeds)[:max_samples])] if names else []
    return ReferenceValues(names, values)


def compare_to(ref: ReferenceValues, candidate: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]],
               providers: Optional[Sequence[str]] = None) -> dict[str, OutputError]:
    """Per tensor of `ref` that `candidate` also has: max/mean abs, relative L2 and cosine over the same feeds."""
    names = [n for n in ref.names if n in observable_tensors(candidate)]
    if not names:
        return {}
    cand = session_with_outputs(candidate, names, providers=providers, name="candidate (layers)").session
    have = {o.name for o in cand.get_outputs()}
    common = [n for n in names if n in have]
    if not common:
        return {}
    accs = {n: OutputAccumulator(n) for n in common}
    pos = {n: i for i, n in enumerate(ref.names)}
    inputs = {i.name for i in cand.get_inputs()}
    for i, (feed, r) in enumerate(zip(feeds, ref.values)):
        c = run_session(cand, {k: v for k, v in feed.items() if k in inputs}, common, name="candidate", sample=i)
        for n, b in zip(common, c):
            accs[n].update(r[pos[n]], b)
    return {n: acc.result() for n, acc in accs.items()}
