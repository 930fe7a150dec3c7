"""One pipeline: a recipe's passes run in order as one plan, each output checked, `finalize` once at the end.

Per pass: upgrade the opset it needs, import, run, export, `onnx.checker` (full check). A pass whose output
fails the check is rolled back (the previous model is kept) with a warning, so one bad pass never costs the
user the model. (Each pass imports its input and exports its output on purpose: the exported model is what the
checker vets and what a rollback returns to, and what the next pass calibrates in ONNX Runtime.) After the last pass each pass's `finalize` hook runs once, on the final model (how weights are
stored in the file, which later passes must not see). A pass run is memoized by (its options, the digest of
its input model) for the whole compression, so an accuracy-budget round re-runs only the passes whose options
or input changed; statistics are shared through the context's cache.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import onnx

from . import ir
from .errors import InternalError, InvalidModelError, OnnxCompError, UnsupportedModelError
from .passes.base import LayerChange, Pass, PassContext, PassOutcome


@dataclass
class PassRecord:
    """What one pass changed: node/initializer counts by op, bytes, time, its own details and layer changes."""

    name: str
    options: dict[str, Any]
    status: str  # "ok" | "rolled back: <reason>"
    seconds: float
    nodes_before: int
    nodes_after: int
    ops_added: dict[str, int]
    ops_removed: dict[str, int]
    initializers_added: int
    initializers_removed: int
    bytes_before: int
    bytes_after: int
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    layers: list[LayerChange] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)  # the pass's own short account (Pass.summarize)
    #: the initializers the pass removed or replaced (sorted): which weights it changed, for the per-layer table
    initializers_replaced: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class _Ran:
    """A memoized pass run: its output model, record and the warnings it raised."""

    output: onnx.ModelProto
    record: PassRecord
    warnings: list[str]


class Pipeline:
    """Runs passes in order on a ModelProto (never modified), checking the model after each; see module doc."""

    def __init__(self, ctx: Optional[PassContext] = None):
        self.ctx = ctx or PassContext()
        self._memo: dict[tuple[str, str], _Ran] = {}
        self._previous: dict[tuple[str, str], _Ran] = {}
        self.reused = 0  # pass runs answered from the memo (the tests and the report read it)
        self._spills: dict[str, onnx.ModelProto] = {}  # digest -> the model with its weights in the store

    def run(self, proto: onnx.ModelProto, passes: list[Pass]) -> tuple[onnx.ModelProto, list[PassRecord]]:
        records: list[PassRecord] = []
        current = proto
        del proto  # a caller that let go of the input (over 2 GB) gets it freed after the first pass
        passes = [p.resolve(bool(self.ctx.calibration_data)) for p in passes]
        self._previous, self._memo = self._memo, {}  # keep only what this run uses (memory stays one round)
        for i, p in enumerate(passes):
            self._tick(f"pass {i + 1}/{len(passes)}: {p.name}", i, len(passes))
            digest = None
            if ir.store_dir() is not None and ir.is_big(current):
                current, digest = self._spilled(current)
            current, rec = self._run_pass(p, current, digest)
            records.append(rec)
        self._tick("passes", len(passes), len(passes))
        final = self._finalize(current, passes, records)
        for p, rec in zip(passes, records):
            rec.summary = _guarded(p, "summarize", lambda: list(type(p).summarize(rec.details)))
        return final, records

    def _tick(self, step: str, done: int, total: int) -> None:
        if self.ctx.progress is not None:
            self.ctx.progress(step, done, total)

    def _spilled(self, proto: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
        """Over 2 GB (inside an `ir.tensor_store`): `proto` with its weights waiting on disk, and its digest.
        The pass reads each weight when it needs it, and its sessions (a calibration run per chunk of
        statistics, probes, references) load them from the same file: the proto holds none of them beside the
        sessions' copies. What the store holds already stays there (a pass writes only the tensors it made), and
        the same content is written once (back-off rounds run the pipeline on the same input again)."""
        digest = self.ctx.statistics.digest(proto)
        if digest not in self._spills or not ir.has_stored(self._spills[digest]):  # (its store block closed)
            self._spills[digest] = ir.spill(proto)
        return self._spills[digest], digest

    def _run_pass(self, p: Pass, current: onnx.ModelProto, digest: Optional[str] = None
                  ) -> tuple[onnx.ModelProto, PassRecord]:
        digest = digest or self.ctx.statistics.digest(current)
        key = (json.dumps(p.to_dict(), sort_keys=True, default=repr), digest)
        ran = self._memo.get(key) or self._previous.get(key)
        if ran is None:
            warnings_before = len(self.ctx.warnings)
            self.ctx.statistics.pin(current, digest)  # passes read their source, never modify it
            try:
                out, rec = self._execute(p, current)
            finally:
                self.ctx.statistics.unpin(current)
            ran = _Ran(out, copy.deepcopy(rec), self.ctx.warnings[warnings_before:])
            if not ir.is_big(out):  # over 2 GB, holding every pass's output would multiply the memory
                self._memo[key] = ran
        else:
            self.reused += 1
            self._memo[key] = ran
            for w in ran.warnings:
                self.ctx.warn(w)
        return ran.output, copy.deepcopy(ran.record)

    def _execute(self, p: Pass, current: onnx.ModelProto) -> tuple[onnx.ModelProto, PassRecord]:
        t0 = time.perf_counter()
        before_hist, before_inits = _histogram(current), _init_names(current)
        notes: list[str] = []
        try:
            source = _upgrade_opset(current, p.min_opset(), notes)
        except _SignatureChanged as e:  # the pass cannot run on this model as it is: left unchanged, with why
            status, candidate, outcome = f"skipped: {e}", current, PassOutcome(notes=[str(e)])
            self.ctx.warn(f"pass '{p.name}' skipped: {e}")
        else:
            model = ir.Model.from_proto(source)
            outcome = _guarded(p, "run", lambda: p.run(model, source, self.ctx))
            outcome.notes[:0] = notes
            candidate = model.to_proto()
            del model
            if ir.is_big(candidate) or ir.is_big(source):
                ir.release_memory()  # the gs graph is cyclic garbage that holds a copy of every new weight
            status = "ok"
            try:
                ir.check_proto(candidate, full=True, what=f"output of pass '{p.name}'")
            except InvalidModelError as e:
                status = f"rolled back: {e}"
                self.ctx.warn(f"pass '{p.name}' produced an invalid model and was rolled back: {e}")
                candidate, outcome.layers = current, []
        after_hist, after_inits = _histogram(candidate), _init_names(candidate)
        rec = PassRecord(
            name=p.name, options=p.options(), status=status, seconds=time.perf_counter() - t0,
            nodes_before=sum(before_hist.values()), nodes_after=sum(after_hist.values()),
            ops_added=dict(after_hist - before_hist), ops_removed=dict(before_hist - after_hist),
            initializers_added=len(after_inits - before_inits), initializers_removed=len(before_inits - after_inits),
            bytes_before=ir.proto_size(current), bytes_after=ir.proto_size(candidate),
            details=outcome.details, notes=outcome.notes, layers=list(outcome.layers),
            initializers_replaced=sorted(before_inits - after_inits))
        return candidate, rec

    def _finalize(self, current: onnx.ModelProto, passes: list[Pass], records: list[PassRecord]) -> onnx.ModelProto:
        """Each pass's finalize hook, once, in recipe order, on the final model (checked; skipped if it breaks it)."""
        for p, rec in zip(passes, records):
            if type(p).finalize is Pass.finalize or rec.status != "ok":
                continue
            final = onnx.ModelProto()
            final.CopyFrom(current)
            outcome = PassOutcome(details=rec.details, notes=rec.notes)
            _guarded(p, "finalize", lambda: p.finalize(final, outcome))
            try:
                ir.check_proto(final, full=True, what=f"final step of pass '{p.name}'")
            except InvalidModelError as e:
                self.ctx.warn(f"final step of pass '{p.name}' produced an invalid model; skipped: {e}")
                continue
            rec.bytes_after -= ir.proto_size(current) - ir.proto_size(final)  # the final step's saving is its pass's
            current = final
        return current


def _guarded(p: Pass, step: str, call):
    """Run one step of a pass; an exception that is not one of onnxcomp's typed errors is a bug of ours."""
    try:
        return call()
    except OnnxCompError:
        raise
    except Exception as e:
        raise InternalError(f"bug in onnxcomp: pass '{p.name}' ({step}) raised {type(e).__name__}: {e}") from e


def _upgrade_opset(proto: onnx.ModelProto, need: Optional[int], notes: list[str]) -> onnx.ModelProto:
    """Convert to the opset a pass needs with onnx.version_converter (outputs unchanged), or raise why not."""
    have = {o.domain: o.version for o in proto.opset_import}.get("", None)
    if need is None or have is None or have >= need:
        return proto
    from onnx import version_converter

    try:
        out = version_converter.convert_version(proto, need)
        # the converter keeps the IR version, so an IR-3 model gets initializers (Pad's pads) that IR 3 would
        # have to list as graph inputs: the IR version the new opset needs anyway (7 for opset 13) allows them
        # unlisted, and the model's inputs stay as they were
        out.ir_version = max(out.ir_version, onnx.helper.find_min_ir_version_for(list(out.opset_import)))
        ir.check_proto(out, full=True, what=f"model converted to opset {need}")
    except Exception as e:  # the converter raises several types; all mean "cannot convert"
        raise UnsupportedModelError(f"the pass needs opset >= {need} and the model has opset {have}; "
                                    f"onnx.version_converter could not convert it: {str(e).splitlines()[0][:200]}"
                                    ) from None
    changed = _signature_change(proto, out)
    if changed:
        raise _SignatureChanged(f"it needs opset >= {need} and converting this opset-{have} model with "
                                f"onnx.version_converter would change its interface ({changed})")
    notes.append(f"model converted from opset {have} to {need} with onnx.version_converter "
                 "(needed for per-channel quantization axes)")
    return out


class _SignatureChanged(Exception):
    """The opset conversion a pass needs would change the model's inputs or outputs (e.g. Scan-8 -> Scan-9 drops
    the batch dim of its state): the pass is skipped, the model kept as it is."""


def _signature_change(before: onnx.ModelProto, after: onnx.ModelProto) -> str:
    """The first graph input/output whose name, element type, rank or a fixed dim differs after conversion ('' when
    none; a fixed dim that became symbolic is less information, not another interface)."""
    for kind in ("input", "output"):
        a, b = list(getattr(before.graph, kind)), list(getattr(after.graph, kind))
        if [v.name for v in a] != [v.name for v in b]:
            return f"{kind}s {[v.name for v in a]} -> {[v.name for v in b]}"
        for va, vb in zip(a, b):
            if not _same_interface(va.type, vb.type):
                return f"{kind} '{va.name}': {_shape_text(va)} -> {_shape_text(vb)}"
    return ""


def _same_interface(a: onnx.TypeProto, b: onnx.TypeProto) -> bool:
    if not (a.HasField("tensor_type") and b.HasField("tensor_type")):
        return a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)
    ta, tb = a.tensor_type, b.tensor_type
    if ta.elem_type != tb.elem_type or ta.HasField("shape") != tb.HasField("shape"):
        return False
    if not ta.HasField("shape"):
        return True
    da, db = ta.shape.dim, tb.shape.dim
    return len(da) == len(db) and all(not (x.HasField("dim_value") and y.HasField("dim_value")) or
                                      x.dim_value == y.dim_value for x, y in zip(da, db))


def _shape_text(v) -> str:
    if v is None:
        return "absent"
    if not v.type.HasField("tensor_type"):
        return "non-tensor"
    return "[" + ", ".join(d.dim_param or str(d.dim_value) for d in v.type.tensor_type.shape.dim) + "]"


def _histogram(m: onnx.ModelProto) -> Counter:
    return Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for g in ir.iter_graph_protos(m.graph)
                   for n in g.node)


def _init_names(m: onnx.ModelProto) -> set[str]:
    return {t.name for g in ir.iter_graph_protos(m.graph) for t in g.initializer}
