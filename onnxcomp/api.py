"""compress(): load safely, run the recipe's passes, validate in ONNX Runtime, report."""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import onnx

from . import ir
from .budget import back_off
from .errors import AccuracyBudgetError, InternalError, InvalidModelError
from .passes import PassContext
from .pipeline import Pipeline
from . import progress as _progress
from .progress import Progress
from .recipe import Recipe
from .report import Report
from .layer_table import layer_rows
from .summary import initializer_storage, summarize, weight_layers
from .targets import TARGETS


#: latency ratio above which the report warns that the result is slower than the input (timing noise ~3-5%)
SLOWER_THAN_INPUT = 1.05


@dataclass
class CompressionResult:
    """The compressed model (a new ModelProto; the input is never mutated), its report, and the concrete recipe
    that made it (`compress(model, result.recipe, same data)` gives the same bytes)."""

    model: onnx.ModelProto
    report: Report
    recipe: Optional[Recipe] = None

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
    input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
) -> CompressionResult:
    """Compress `model` with `recipe` (default: cleanup + dynamic int8; a preset name such as "fast" or a recipe
    with `preset: auto` searches by measurement) and report what it cost.

    Without `validation_data`, every 5th calibration sample is held back: calibration never sees the samples the
    accuracy is measured on. `progress`: True shows bars on a terminal; a callable gets (step, done, total).
    Raises typed onnxcomp errors for bad input (InvalidModelError, RecipeError, CalibrationDataError, ...)
    and AccuracyBudgetError (with `.result` attached) when the recipe's accuracy_budget is not met.
    `input_shapes` ({"input_ids": [1, 128]}): with no data, the generated validation inputs take these shapes, so
    latency is timed at the lengths the model will see (the report names the shapes it timed, data or not).
    """
    t0 = time.perf_counter()
    job = _Job.prepare(model, recipe, calibration_data, validation_data, providers, progress, input_shapes)
    try:
        with ir.tensor_store():  # over 2 GB the passes keep the weights on disk; the result gets them back
            out, records, vreport, rounds = job.run(validate)
            out = ir.materialize(out)
    finally:
        _progress.close(job.ctx.progress)
    _warn_if_slower(vreport, job.recipe, job.ctx)
    budget = job.budget_summary(vreport, rounds)
    before = job.before if job.before is not None else summarize(job.proto)
    report = Report(source=job.source, recipe=job.recipe.to_dict(), before=before,
                    after=summarize(out), passes=records, validation=vreport, budget=budget,
                    layers=layer_rows(job.before_layers, initializer_storage(out), records),
                    warnings=list(job.ctx.warnings), seconds=time.perf_counter() - t0,
                    search=None if job.searched is None else job.searched.to_dict(), data=job.data_note,
                    suggestions=_suggestions(job, records))
    result = CompressionResult(out, report, job.recipe)
    if budget is not None and not budget["met"]:
        err = AccuracyBudgetError("accuracy budget not met: " + "; ".join(budget["violations"]))
        err.result = result  # type: ignore[attr-defined]
        raise err
    return result


@dataclass
class _Job:
    """One compression: the parsed recipe, the loaded input, its checked feeds and the context of its passes."""

    recipe: Recipe
    source: str
    proto: onnx.ModelProto
    validation_data: Any
    ctx: PassContext
    data_note: dict[str, Any]
    given_recipe: Any = None
    searched: Any = None  # the auto search's SearchResult
    before: Optional[dict[str, Any]] = None  # summarize(input), kept when the input proto is let go
    input_shapes: Optional[dict[str, list[int]]] = None  # shapes of generated validation inputs
    before_layers: dict[str, Any] = dataclasses.field(default_factory=dict)  # summary.weight_layers(input)

    @classmethod
    def prepare(cls, model, recipe, calibration_data, validation_data, providers, progress,
                input_shapes=None) -> "_Job":
        """Parse and load everything (typed errors for bad input) before any work starts."""
        from .data import check_input_shapes, input_specs, load_feeds

        rec = Recipe.parse(recipe)
        source = str(model) if isinstance(model, (str, os.PathLike)) else "<ModelProto>"
        proto = ir.load_proto(model)
        ir.check_proto(proto, full=False, what=f"input model {source}")
        specs = input_specs(proto)
        shapes = check_input_shapes(specs, input_shapes) if input_shapes else None
        calib = None if calibration_data is None else load_feeds(calibration_data, specs, what="calibration data")
        valid = load_feeds(validation_data, specs, what="validation data") if validation_data is not None else None
        calib, valid, data_note = _split_data(calib, valid)
        rec = rec.resolved(bool(calib))
        ctx = PassContext(calibration_data=calib, validation_data=valid,
                          providers=list(providers) if providers else _default_providers(rec.target),
                          target=rec.target, accuracy_budget=rec.accuracy_budget is not None,
                          progress=_progress.resolve(progress))
        bad = _nonfinite_weights(proto)
        if bad:
            ctx.warn(f"{len(bad)} initializer(s) contain NaN/inf (e.g. '{bad[0]}'); kept as they are")
        if data_note.get("warning"):
            ctx.warn(data_note["warning"])
        _note_nonfinite(ctx, calib, "calibration data")
        if valid is not calib:
            _note_nonfinite(ctx, valid, "validation data")
        if shapes and valid is not None:
            ctx.warn("input_shapes ignored: validation runs on the data given, at its own shapes")
        return cls(rec, source, proto, valid, ctx, data_note, recipe, input_shapes=shapes,
                   before_layers=weight_layers(proto))

    def _validate(self, candidate: onnx.ModelProto, latency: bool):
        from .validation import validate as _validate

        budget = self.recipe.accuracy_budget
        # over 2 GB, ORT reads the input from its file (the validator does not load its weights again)
        ref = self.source if self.proto is None or (self._on_disk() and ir.is_big(self.proto)) else self.proto
        try:
            return _validate(ref, candidate, inputs=self.validation_data, providers=self.ctx.providers,
                             latency=latency, metric=None if budget is None else budget.metric,
                             input_shapes=self.input_shapes, progress=self.ctx.progress)
        except InvalidModelError as e:
            # the validator names the model at fault first: the reference is the user's, the candidate ours
            if not str(e).startswith("candidate model"):
                raise
            raise InternalError(f"bug in onnxcomp: the compressed model passes onnx.checker but {e} (the input "
                                "runs there). Please report it with the model and the recipe.") from None

    def run(self, validate: bool):
        """The pipeline, validation, and back-off while the budget is not met (the recipe really applied is kept
        in `self.recipe`), or the auto search. Returns (model, records, validation report or None, back-off
        rounds)."""
        if self.recipe.auto is not None:
            return self._search(validate)
        pipeline = Pipeline(self.ctx)
        passes = list(self.recipe.passes)
        if self.recipe.accuracy_budget is None and self._on_disk() and ir.is_big(self.proto):
            out, records = pipeline.run(self._let_go_of_input(), passes)
            if ir.store_dir() is not None:  # validation holds the input's session: the result waits on disk
                out = ir.spill(out)
            ir.release_memory()  # pass graphs are cyclic garbage that would keep the input's weights alive
        else:
            out, records = pipeline.run(self.proto, passes)
        vreport = self._validate(out, latency=True) if validate else None
        if vreport is None or self.recipe.accuracy_budget is None:
            return out, records, vreport, []
        done = back_off(self.recipe.accuracy_budget, passes, out, records, vreport,
                        run=lambda ps: pipeline.run(self.proto, ps), check=lambda m: self._validate(m, False))
        if done.rounds:  # the back-off rounds skipped timing: time the model that is returned once
            self.recipe = dataclasses.replace(self.recipe, passes=tuple(done.passes))
            return done.model, done.records, self._validate(done.model, latency=True), done.rounds
        return done.model, done.records, done.validation, done.rounds

    def _let_go_of_input(self) -> onnx.ModelProto:
        """Over 2 GB with no budget, the pipeline becomes the input's only holder (freed after the first pass;
        validation reads the input from its file): summarize it first, return it, keep no reference."""
        self.before = summarize(self.proto)
        proto, self.proto = self.proto, None
        return proto

    def _on_disk(self) -> bool:
        return self.source != "<ModelProto>"

    def _search(self, validate: bool):
        """`preset: auto`: search, then keep the winner's concrete recipe (validated again, timed in full)."""
        from .auto import search

        auto, budget = self.recipe.auto, self.recipe.accuracy_budget
        found = search(self.proto, auto, budget, self.ctx.calibration_data, self.validation_data,
                       self.ctx.providers, self.recipe.target, progress=self.ctx.progress,
                       input_shapes=self.input_shapes)
        self.searched = found
        for w in found.warnings:
            self.ctx.warn(w)
        self.recipe = dataclasses.replace(self.recipe, passes=found.winner.passes, auto=None)
        vreport = self._validate(found.model, latency=True) if validate else None
        return found.model, found.records, vreport, []

    def budget_summary(self, vreport, rounds) -> Optional[dict[str, Any]]:
        """The report's budget section (None without a budget; a warning when it could not be checked)."""
        if self.recipe.accuracy_budget is None:
            return None
        if vreport is None:
            self.ctx.warn("accuracy_budget given but validate=False: the budget was not checked")
            return None
        viol = self.recipe.accuracy_budget.violations(vreport.outputs, vreport.metric)
        return {"bounds": self.recipe.accuracy_budget.to_dict(), "met": not viol, "violations": viol,
                "backoff": [r.to_dict() for r in rounds]}


#: fewer held-back rows than this get a warning that the measured accuracy is a rough estimate
FEW_VALIDATION_ROWS = 64


def _rows(feed: dict) -> int:
    """Rows in one feed: the leading dim of its first array (1 for scalars)."""
    first = next(iter(feed.values()), None)
    return int(first.shape[0]) if getattr(first, "ndim", 0) else 1


def _split_data(calib, valid) -> tuple[Any, Any, dict[str, Any]]:
    """(calibration, validation, what the report says about them): without validation data, a part of the
    calibration data is held back (`data.split_holdout`); with neither, validation uses generated feeds."""
    from .data import HOLDOUT_EVERY, split_holdout

    note: dict[str, Any] = {"calibration_samples": len(calib or []), "validation": "given"}
    if valid is None and calib:
        if len(calib) < 2:
            note.update(validation="calibration sample",
                        warning="one calibration sample and no validation_data: accuracy is measured on the "
                                "sample calibration used (pass validation_data, or more samples)")
            return calib, calib, note | {"validation_samples": 1}
        calib, valid = split_holdout(calib)
        note.update(validation=f"held back from calibration_data (every {HOLDOUT_EVERY}th sample)",
                    calibration_samples=len(calib))
        rows = sum(_rows(f) for f in valid)
        if rows < FEW_VALIDATION_ROWS:
            note["warning"] = (f"accuracy is measured on {rows} held-back row(s) only: a budget met on so few may not "
                               "hold on new data; pass validation_data (a few hundred samples) for a firmer check")
    elif valid is None:
        note["validation"] = "generated feeds (no data given)"
    note["validation_samples"] = len(valid) if valid is not None else 0
    return calib, valid, note


def _note_nonfinite(ctx: PassContext, feeds, what: str) -> None:
    from .data.feeds import nonfinite_values

    counts = nonfinite_values(feeds or [])
    if counts:
        ctx.warn(f"{what} holds NaN/inf ({', '.join(f'{k}: {n}' for k, n in counts.items())}): kept as inputs; "
                 "calibration ranges skip them, validation compares their positions")


def _suggestions(job: "_Job", records) -> list[str]:
    """What more the user could get, and how (the report's last lines)."""
    from .runtime.cpu import u8s8_saturates

    out = []
    if job.recipe.target == "ort-cpu" and any(r.details.get("weight_range") in ("pairs", "reduced") for r in records) \
            and u8s8_saturates() is False:
        out.append("this CPU's integer kernels do not saturate (VNNI or ARM64): target 'ort-cpu-vnni' keeps full "
                   "8-bit weights (bounded in pairs here, for x86 CPUs without VNNI); MiniLM-L3 static int8 cosine "
                   "0.99951 -> 0.99954. Deploy it only on such CPUs")
    searched = job.searched is not None
    if job.ctx.calibration_data is None:
        out.append("pass calibration_data (e.g. onnxcomp.data.from_texts / from_images, or an .npz) for static int8 "
                   "(Convs as QLinearConv), sensitivity-allocated pruning, and accuracy measured on real inputs")
    if not searched and job.given_recipe is None:
        out.append("the 'fast' preset (compress(model, \"fast\", calibration_data=...)) searches quantization, "
                   "pruning and their compositions for the fastest model within cosine 0.99")
    return out


def _warn_if_slower(vreport, rec: Recipe, ctx: PassContext) -> None:
    """A result slower than its input gets a warning with each pass's hint on what to change."""
    if vreport is None or vreport.latency_ratio is None or vreport.latency_ratio <= SLOWER_THAN_INPUT:
        return
    hints = list(dict.fromkeys(p.slower_hint for p in rec.passes if p.slower_hint))
    ctx.warn(f"the compressed model ran SLOWER than the input: latency ratio {vreport.latency_ratio:.2f} on "
             f"{', '.join(vreport.providers)} (median of interleaved runs)" + (f"; {'; '.join(hints)}" if hints else ""))


def validate(reference: Union[onnx.ModelProto, str, os.PathLike], candidate: Union[onnx.ModelProto, str, os.PathLike],
             inputs: Any = None, providers: Optional[Sequence[str]] = None, latency: bool = True,
             metric: Optional[Any] = None, input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
             progress: Union[bool, Progress] = True):
    """Compare candidate with reference in ONNX Runtime on the same feeds: errors per output, latency, size, and
    the task metric `metric(ref_outputs, cand_outputs) -> float` when given. `input_shapes`: shapes of the
    generated inputs when `inputs` is None (the report names the shapes it ran on). `progress` as in compress."""
    from .validation import validate as _validate

    bars = _progress.resolve(progress)
    try:
        return _validate(reference, candidate, inputs=inputs, providers=providers, latency=latency, metric=metric,
                         input_shapes=input_shapes, progress=bars)
    finally:
        _progress.close(bars)
