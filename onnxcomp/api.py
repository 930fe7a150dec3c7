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
from .errors import AccuracyBudgetError
from .passes import PassContext, PassManager
from .recipe import Recipe
from .report import Report
from .summary import summarize
from .targets import TARGETS


#: rounds of accuracy-budget back-off (each leaves the most sensitive quarter of quantized layers in float)
MAX_BACKOFF_STEPS = 8

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
    progress: bool = True,
    validate: bool = True,
) -> CompressionResult:
    """Compress `model` with `recipe` (default: the output-preserving cleanup) and report what it cost.

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
    show = progress and sys.stderr.isatty()
    ctx = PassContext(calibration_data=calib, validation_data=valid, providers=provs, target=rec.target,
                      progress=show)
    bad = _nonfinite_weights(proto)
    if bad:
        ctx.warnings.append(f"{len(bad)} initializer(s) contain NaN/inf (e.g. '{bad[0]}'); kept as they are")
    before = summarize(proto)
    passes = list(rec.passes)
    out, records = _run_passes(proto, passes, ctx, show)
    vreport = None
    if validate:
        vreport = _validate(proto, out, inputs=valid, providers=provs, latency=True)
    backoff: list[dict[str, Any]] = []
    if vreport is not None and rec.accuracy_budget is not None:
        # back off: leave the most sensitive compressed layers (by the error each pass says it introduced)
        # untouched until every output meets the budget
        viol = rec.accuracy_budget.violations(vreport.to_dict()["outputs"])
        while viol and len(backoff) < MAX_BACKOFF_STEPS:
            step = _next_backoff(records, passes)
            if not step:
                break
            names = [n for i in sorted(step) for n in step[i]]
            passes = [dataclasses.replace(p, exclude=tuple(p.exclude) + tuple(step[i])) if i in step else p
                      for i, p in enumerate(passes)]
            ctx.warnings = [w for w in ctx.warnings if "produced an invalid model" in w]
            out, records = _run_passes(proto, passes, ctx, show)
            vreport = _validate(proto, out, inputs=valid, providers=provs, latency=False)
            viol = rec.accuracy_budget.violations(vreport.to_dict()["outputs"])
            outs = vreport.to_dict()["outputs"]
            backoff.append({"left_float": names, "violations": len(viol),
                            "worst_cosine": min((o["cosine"] for o in outs.values()), default=None)})
        if backoff:  # the back-off rounds skipped timing: time the model that is returned once
            vreport = _validate(proto, out, inputs=valid, providers=provs, latency=True)
            rec = dataclasses.replace(rec, passes=tuple(passes))  # the recipe that was really applied
    if vreport is not None and vreport.latency_ratio is not None and vreport.latency_ratio > SLOWER_THAN_INPUT:
        kinds = {p.name for p in rec.passes}
        hints = []
        if "quantize" in kinds:
            hints.append("the integer kernels do not pay off for this model/target: try another quantize mode, "
                         "or raise quantize.min_weight_elements")
        if "sparsify" in kinds:
            hints.append("zeros in dense weights do not run faster in ONNX Runtime: sparsify pattern 'channel' "
                         "removes whole channels")
        if "lowrank" in kinds:
            hints.append("keep lowrank.speed_check on, or factorize fewer layers")
        ctx.warnings.append(
            f"the compressed model ran SLOWER than the input: latency ratio {vreport.latency_ratio:.2f} on "
            f"{', '.join(vreport.providers)} (median of interleaved runs)" + (f"; {'; '.join(hints)}" if hints else ""))
    budget = None
    if rec.accuracy_budget is not None:
        if vreport is None:
            ctx.warnings.append("accuracy_budget given but validate=False: the budget was not checked")
        else:
            viol = rec.accuracy_budget.violations(vreport.to_dict()["outputs"])
            budget = {"bounds": rec.accuracy_budget.to_dict(), "met": not viol, "violations": viol,
                      "backoff": backoff}
    report = Report(source=source, recipe=rec.to_dict(), before=before, after=summarize(out), passes=records,
                    validation=vreport, budget=budget, warnings=list(ctx.warnings),
                    seconds=time.perf_counter() - t0)
    result = CompressionResult(out, report)
    if budget is not None and not budget["met"]:
        err = AccuracyBudgetError("accuracy budget not met: " + "; ".join(budget["violations"]))
        err.result = result  # type: ignore[attr-defined]
        raise err
    return result


def _run_passes(proto: onnx.ModelProto, passes: list, ctx: PassContext, show: bool):
    """Run the passes in order (one manager per pass so a progress bar can tick); check the result."""
    bar = None
    if show and passes:
        from tqdm import tqdm

        bar = tqdm(total=len(passes), desc="onnxcomp", unit="pass", file=sys.stderr)
    out, records = proto, []
    for p in passes:
        out, recs = PassManager([p], ctx).run(out)
        records.extend(recs)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    ir.check_proto(out, full=True, what="compressed model")
    return out, records


def _next_backoff(records: list, passes: list) -> dict[int, list[str]]:
    """The next layers to leave uncompressed, by pass index: the most sensitive quarter of the layers the passes
    still compress, ranked by the error each layer introduced (Pass.backoff_candidates)."""
    rows = []
    for i, (p, rec) in enumerate(zip(passes, records)):
        if rec.status != "ok" or not hasattr(p, "exclude"):
            continue
        excluded = set(p.exclude)
        rows += [(err, i, node) for node, err in type(p).backoff_candidates(rec.details) if node not in excluded]
    rows.sort(key=lambda r: -r[0])
    out: dict[int, list[str]] = {}
    for _, i, node in rows[: max(1, len(rows) // 4)] if rows else []:
        out.setdefault(i, []).append(node)
    return out


def validate(reference: Union[onnx.ModelProto, str, os.PathLike], candidate: Union[onnx.ModelProto, str, os.PathLike],
             inputs: Any = None, providers: Optional[Sequence[str]] = None, latency: bool = True):
    """Compare candidate with reference in ONNX Runtime on the same feeds: errors per output, latency, size."""
    from .validation import validate as _validate

    return _validate(reference, candidate, inputs=inputs, providers=providers, latency=latency)
