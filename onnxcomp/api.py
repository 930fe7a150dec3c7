"""compress(): load safely, run the recipe's passes, validate in ONNX Runtime, report."""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import onnx

from . import ir
from .budget import back_off
from .errors import AccuracyBudgetError
from .passes import PassContext
from .passes.base import Progress
from .pipeline import Pipeline
from .recipe import Recipe
from .report import Report
from .summary import summarize
from .targets import TARGETS


#: latency ratio above which the report warns that the result is slower than the input (timing noise ~3-5%)
SLOWER_THAN_INPUT = 1.05


@dataclass
class CompressionResult:
    """The compressed model (a new ModelProto; the input is never mutated) and its report."""

    model: onnx.ModelProto
    report: Report

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write atomically; models over 2 GB get their weights in `<name>.data` next to the file."""
        return ir.save_proto(self.model, path)


def _default_providers(target: str) -> list[str]:
    import onnxruntime as ort

    avail = set(ort.get_available_providers())
    chosen = [p for p in TARGETS[target].providers if p in avail]
    return chosen or ["CPUExecutionProvider"]


def _nonfinite_weights(model: onnx.ModelProto) -> list[str]:
    bad = []
    for g in ir.iter_graph_protos(model.graph):
        for t in g.initializer:
            if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                               onnx.TensorProto.BFLOAT16):
                v = onnx.numpy_helper.to_array(t)
                if v.size and not np.isfinite(v.astype(np.float32, copy=False)).all():
                    bad.append(t.name)
    return bad


def compress(
    model: Union[onnx.ModelProto, str, os.PathLike],
    recipe: Union[Recipe, dict, list, str, os.PathLike, None] = None,
    calibration_data: Any = None,
    validation_data: Any = None,
    providers: Optional[Sequence[str]] = None,
    progress: Union[bool, Progress] = True,
    validate: bool = True,
) -> CompressionResult:
    """Compress `model` with `recipe` (default: cleanup + dynamic int8) and report what it cost.

    `progress`: True shows bars on a terminal (per pass and per long step); a callable gets (step, done, total).
    Raises typed onnxcomp errors for bad input (InvalidModelError, RecipeError, CalibrationDataError, ...)
    and AccuracyBudgetError (with `.result` attached) when the recipe's accuracy_budget is not met.
    """
    from .data import input_specs, load_feeds
    from .validation import validate as _validate

    t0 = time.perf_counter()
    rec = Recipe.parse(recipe)
    source = str(model) if isinstance(model, (str, os.PathLike)) else "<ModelProto>"
    proto = ir.load_proto(model)
    ir.check_proto(proto, full=False, what=f"input model {source}")
    specs = input_specs(proto)
    calib = None if calibration_data is None else load_feeds(calibration_data, specs, what="calibration data")
    valid = (load_feeds(validation_data, specs, what="validation data") if validation_data is not None else calib)
    provs = list(providers) if providers else _default_providers(rec.target)
    bars = _TerminalProgress() if progress is True and sys.stderr.isatty() else None
    ctx = PassContext(calibration_data=calib, validation_data=valid, providers=provs, target=rec.target,
                      progress=bars if bars is not None else (progress if callable(progress) else None))
    bad = _nonfinite_weights(proto)
    if bad:
        ctx.warn(f"{len(bad)} initializer(s) contain NaN/inf (e.g. '{bad[0]}'); kept as they are")
    before = summarize(proto)
    pipeline = Pipeline(ctx)
    passes = list(rec.passes)
    try:
        out, records = pipeline.run(proto, passes)
        vreport, rounds = None, []
        if validate:
            vreport = _validate(proto, out, inputs=valid, providers=provs, latency=True)
        if vreport is not None and rec.accuracy_budget is not None:
            done = back_off(rec.accuracy_budget, passes, out, records, vreport,
                            run=lambda ps: pipeline.run(proto, ps),
                            check=lambda m: _validate(proto, m, inputs=valid, providers=provs, latency=False))
            out, records, vreport, rounds = done.model, done.records, done.validation, done.rounds
            if rounds:  # the back-off rounds skipped timing: time the model that is returned once
                vreport = _validate(proto, out, inputs=valid, providers=provs, latency=True)
                rec = dataclasses.replace(rec, passes=tuple(done.passes))  # the recipe that was really applied
    finally:
        if bars is not None:
            bars.close()
    _warn_if_slower(vreport, rec, ctx)
    budget = None
    if rec.accuracy_budget is not None:
        if vreport is None:
            ctx.warn("accuracy_budget given but validate=False: the budget was not checked")
        else:
            viol = rec.accuracy_budget.violations(vreport.outputs)
            budget = {"bounds": rec.accuracy_budget.to_dict(), "met": not viol, "violations": viol,
                      "backoff": [r.to_dict() for r in rounds]}
    report = Report(source=source, recipe=rec.to_dict(), before=before, after=summarize(out), passes=records,
                    validation=vreport, budget=budget, warnings=list(ctx.warnings),
                    seconds=time.perf_counter() - t0)
    result = CompressionResult(out, report)
    if budget is not None and not budget["met"]:
        err = AccuracyBudgetError("accuracy budget not met: " + "; ".join(budget["violations"]))
        err.result = result  # type: ignore[attr-defined]
        raise err
    return result


def _warn_if_slower(vreport, rec: Recipe, ctx: PassContext) -> None:
    """A result slower than its input gets a warning with each pass's hint on what to change."""
    if vreport is None or vreport.latency_ratio is None or vreport.latency_ratio <= SLOWER_THAN_INPUT:
        return
    hints = list(dict.fromkeys(p.slower_hint for p in rec.passes if p.slower_hint))
    ctx.warn(f"the compressed model ran SLOWER than the input: latency ratio {vreport.latency_ratio:.2f} on "
             f"{', '.join(vreport.providers)} (median of interleaved runs)" + (f"; {'; '.join(hints)}" if hints else ""))


class _TerminalProgress:
    """Progress on a terminal: one tqdm bar per step (a pass, calibration, sensitivity probes, ...)."""

    def __init__(self) -> None:
        self._bar = None
        self._step = None

    def __call__(self, step: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if step != self._step:
            self.close()
            self._step = step
            self._bar = tqdm(total=total, desc=step, file=sys.stderr, leave=False)
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar = self._step = None


def validate(reference: Union[onnx.ModelProto, str, os.PathLike], candidate: Union[onnx.ModelProto, str, os.PathLike],
             inputs: Any = None, providers: Optional[Sequence[str]] = None, latency: bool = True):
    """Compare candidate with reference in ONNX Runtime on the same feeds: errors per output, latency, size."""
    from .validation import validate as _validate

    return _validate(reference, candidate, inputs=inputs, providers=providers, latency=latency)
