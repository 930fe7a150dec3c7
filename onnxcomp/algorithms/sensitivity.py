"""End-to-end sensitivity of a model to changes of its weights, and budget allocation across layers.

Passes that compress each layer at a chosen level (sparsity, rank) should spend a global budget where it hurts
the model's *outputs* least: the layer whose own error is smallest is often not the one the outputs tolerate
best (measured on MiniLM, tools/bench_sparsify.py --sensitivity). :class:`WeightProbe` measures that cheaply: one ORT session in which the
probed weights are graph inputs, so trying a candidate weight is one run per feed, with no new session.
:func:`allocate` then picks one level per layer under the budget.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ..calibration import ProbeErrors
from ..ir import tensor_in_memory
from ..errors import InternalError
from ..progress import Counter
from ..runtime import make_session, run_session

__all__ = ["WeightProbe", "allocate"]


class WeightProbe:
    """Normalized squared output error of `proto` when some of its constant weights are replaced.

    The named initializers become graph inputs of a private copy (the caller's proto is untouched); reference
    outputs come from the same session fed the original weights, so the error measures only the change.
    `counter` (from `PassContext.counter`, sized to the planned probes) ticks once per `error()` call. With
    `errors` (the compression's ProbeErrors) and the model's `digest`, an error measured before (an earlier
    back-off round) is answered from there; the session is made only when some error has to be measured."""

    def __init__(self, proto: onnx.ModelProto, weights: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]],
                 providers: Any = None, counter: Counter | None = None, errors: ProbeErrors | None = None,
                 digest: str | None = None):
        self.counter = counter
        self.providers = providers
        self._samples = list(feeds)  # the caller's sample dicts (their ids key the errors)
        self.feeds = [dict(f) for f in self._samples]
        if not self.feeds:
            from ..errors import CalibrationDataError

            raise CalibrationDataError("sensitivity needs at least one sample")
        self.names = set(weights)
        missing = self.names - {t.name for t in proto.graph.initializer}
        if missing:
            raise InternalError(f"bug in onnxcomp: sensitivity probe asked for weights that are not initializers of "
                                f"the main graph: {sorted(missing)[:5]}")
        self._errors = errors if digest is not None else None
        self._digest = digest
        self._proto: onnx.ModelProto | None = proto
        self.session = None

    def _open(self) -> None:
        """The probe session (the weights as graph inputs) and the reference outputs."""
        probe = onnx.ModelProto()
        probe.CopyFrom(self._proto)
        self._proto = None
        listed = {i.name for i in probe.graph.input}  # IR < 4 models list initializers as inputs already
        keep, self.weights = [], {}
        for t in probe.graph.initializer:
            if t.name in self.names:
                self.weights[t.name] = numpy_helper.to_array(tensor_in_memory(t))
                if t.name not in listed:
                    probe.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
            else:
                keep.append(t)
        del probe.graph.initializer[:]
        probe.graph.initializer.extend(keep)
        self.session = make_session(probe, self.providers, name="sensitivity probe").session
        self.outputs = [o.name for o in self.session.get_outputs() if o.type in ("tensor(float)", "tensor(double)",
                                                                                  "tensor(float16)")]
        self.reference = [self._run(f, {}) for f in self.feeds]
        self.ref_energy = sum(float(np.sum(np.square(y, dtype=np.float64))) for ys in self.reference for y in ys)

    def _run(self, feed: Mapping[str, np.ndarray], replace: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        full = dict(feed)
        for name, w in self.weights.items():
            full[name] = np.ascontiguousarray(replace.get(name, w), dtype=w.dtype)
        return run_session(self.session, full, self.outputs, name="sensitivity probe")

    def error(self, replace: Mapping[str, np.ndarray]) -> float:
        """sum ||y' - y||^2 / sum ||y||^2 over every feed and float output (0 = identical; inf on NaN/inf)."""
        bad = [n for n in replace if n not in self.names]
        if bad:
            raise InternalError(f"bug in onnxcomp: sensitivity probe asked to replace weights it does not probe: "
                                f"{bad[:5]}")
        try:
            if self._errors is None:
                return self._error(replace)
            key = self._errors.key(self._digest, self._samples, self.providers, replace)
            err = self._errors.get(key)
            if err is None:
                err = self._error(replace)
                self._errors.put(key, err, self._samples)
            return err
        finally:
            if self.counter is not None:
                self.counter.tick()

    def _error(self, replace: Mapping[str, np.ndarray]) -> float:
        if self.session is None:
            self._open()
        err = 0.0
        for feed, ref in zip(self.feeds, self.reference):
            for y, r in zip(self._run(feed, replace), ref):
                d = np.asarray(y, np.float64) - r
                e = float(np.sum(d * d))
                if not math.isfinite(e):
                    return math.inf
                err += e
        return err / max(self.ref_energy, 1e-30)


def allocate(choices: Mapping[str, Sequence[tuple[float, float]]], budget: float) -> dict[str, int]:
    """One option per key with total cost <= `budget` and the least total error (errors taken as additive).

    `choices[key]` lists (cost, error) options; option 0 is the least compressed. Greedy on the lower convex
    hull: repeatedly take the move (any key, to any cheaper option) that adds the least error per unit of cost
    saved, until the budget is met; then, while the budget still holds, undo compression where that removes the
    most error per unit of cost. When even the cheapest options exceed the budget, those are returned."""
    pick = {k: 0 for k in choices}
    total = sum(opts[0][0] for opts in choices.values())
    while total > budget:
        best = None
        for k, opts in choices.items():
            c0, e0 = opts[pick[k]]
            for j in range(pick[k] + 1, len(opts)):
                c, e = opts[j]
                if c >= c0:
                    continue
                rate = (e - e0) / (c0 - c)
                if best is None or rate < best[0]:
                    best = (rate, k, j)
        if best is None:
            break
        _, k, j = best
        total -= choices[k][pick[k]][0] - choices[k][j][0]
        pick[k] = j
    # the last step may overshoot: give back compression where it buys the most error per unit of cost while
    # the budget still holds
    while total <= budget:
        best = None
        for k, opts in choices.items():
            c0, e0 = opts[pick[k]]
            for j in range(pick[k]):
                c, e = opts[j]
                if c <= c0 or total + (c - c0) > budget or e >= e0:
                    continue
                rate = (e0 - e) / (c - c0)
                if best is None or rate > best[0]:
                    best = (rate, k, j)
        if best is None:
            break
        _, k, j = best
        total += choices[k][j][0] - choices[k][pick[k]][0]
        pick[k] = j
    return pick
