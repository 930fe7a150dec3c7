"""Errors of intermediate tensors (per layer), candidate vs reference, on the same feeds.

Used for sensitivity reports: which quantized/factorized layer departs most from the float model.
Both models are copied with the tensors added as graph outputs; errors accumulate streaming.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import onnx

from .numerics import OutputAccumulator, OutputError
from .session import make_session, run_session


def compare_tensors(reference: onnx.ModelProto, candidate: onnx.ModelProto, names: Sequence[str],
                    feeds: Sequence[Mapping[str, np.ndarray]], providers: Optional[Sequence[str]] = None,
                    max_samples: int = 16) -> dict[str, OutputError]:
    """Per tensor name present in both models: max/mean abs, relative L2 and cosine over the feeds."""
    from ..calibration.collect import with_outputs

    names = [n for n in names if n in _observable(reference) and n in _observable(candidate)]
    if not names:
        return {}
    ref = make_session(with_outputs(reference, names), providers, name="reference (layers)").session
    cand = make_session(with_outputs(candidate, names), providers, name="candidate (layers)").session
    have_r = {o.name for o in ref.get_outputs()}
    have_c = {o.name for o in cand.get_outputs()}
    common = [n for n in names if n in have_r and n in have_c]
    if not common:
        return {}
    accs = {n: OutputAccumulator(n) for n in common}
    ref_inputs = {i.name for i in ref.get_inputs()}
    cand_inputs = {i.name for i in cand.get_inputs()}
    for i, feed in enumerate(list(feeds)[:max_samples]):
        r = run_session(ref, {k: v for k, v in feed.items() if k in ref_inputs}, common, name="reference", sample=i)
        c = run_session(cand, {k: v for k, v in feed.items() if k in cand_inputs}, common, name="candidate",
                        sample=i)
        for n, a, b in zip(common, r, c):
            accs[n].update(a, b)
    return {n: acc.result() for n, acc in accs.items()}


def _observable(model: onnx.ModelProto) -> set[str]:
    """Tensors of the main graph ORT can return: graph inputs and node outputs."""
    names = {i.name for i in model.graph.input}
    for n in model.graph.node:
        names.update(n.output)
    return names
