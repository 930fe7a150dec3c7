"""Pass framework: a pass is a small frozen dataclass (name + typed options); one manager runs them.

The manager imports the model, runs a pass, exports, runs onnx.checker (full check) and records what the
pass changed. A pass whose output fails the check is rolled back (the previous model is kept) and the
failure is recorded with the checker's message, so one bad pass never costs the user the model.
"""
from __future__ import annotations

import dataclasses
import time
import typing
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import onnx

from .. import ir
from ..errors import InvalidModelError, RecipeError


@dataclass
class PassContext:
    """Shared, read-mostly facts a pass may use (calibration data, providers, target, progress)."""

    calibration_data: Any = None
    validation_data: Any = None  # feeds the result is validated on (sensitivity may use them)
    providers: Optional[list[str]] = None
    target: str = "ort-cpu"
    progress: bool = False
    warnings: list[str] = field(default_factory=list)
    proto: Optional[onnx.ModelProto] = None  # the model the running pass was imported from (read-only)


@dataclass
class PassOutcome:
    """What a pass says about its own work (shown in the report)."""

    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Pass:
    """Base class: subclasses set `name` and declare options as typed dataclass fields."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def run(self, model: ir.Model, ctx: PassContext) -> PassOutcome:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def summarize(cls, details: dict[str, Any]) -> list[str]:
        """A few lines for the terminal report on what the pass did, from its PassOutcome.details."""
        return []

    @classmethod
    def backoff_candidates(cls, details: dict[str, Any]) -> list[tuple[str, float]]:
        """(node name, error it introduced) of each layer the pass compressed: what an accuracy budget may leave
        uncompressed first (by adding the node to the pass's `exclude`). Default: none."""
        return []

    def finalize(self, proto: onnx.ModelProto, outcome: "PassOutcome") -> None:
        """Called in place on the final model once every pass has run (e.g. how weights are stored in the file,
        which later passes must not see); record what was done in `outcome`. Default: nothing."""

    def min_opset(self) -> Optional[int]:
        """The default-domain opset the pass needs; the manager upgrades older models first (or says why not)."""
        return None

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.name, **self.options()}

    @classmethod
    def from_options(cls, opts: dict[str, Any], where: str) -> "Pass":
        """Build from a recipe dict; unknown keys and ill-typed values are RecipeErrors naming the key."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(opts) - set(fields))
        if unknown:
            raise RecipeError(f"{where}: unknown key(s) {unknown} for pass '{cls.name}'; valid keys: "
                              f"{sorted(fields) or '(none)'}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for k, v in opts.items():
            kwargs[k] = _coerce(v, hints.get(k, Any), f"{where}.{k}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise RecipeError(f"{where}: {e}") from None


def _coerce(v: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return v
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if v is None and type(None) in args:
            return None
        errs = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(v, a, where)
            except RecipeError as e:
                errs.append(str(e))
        raise RecipeError(errs[0] if errs else f"{where}: invalid value {v!r}")
    if origin is typing.Literal:
        if v not in args:
            raise RecipeError(f"{where}: invalid value {v!r}; valid values: {list(args)}")
        return v
    if origin in (list, tuple):
        if not isinstance(v, (list, tuple)):
            raise RecipeError(f"{where}: expected a list, got {v!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(x, inner, where) for x in v)
    if hint is bool:
        if not isinstance(v, bool):
            raise RecipeError(f"{where}: expected true/false, got {v!r}")
        return v
    if hint is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise RecipeError(f"{where}: expected an integer, got {v!r}")
        return v
    if hint is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {v!r}")
        return float(v)
    if hint is str:
        if not isinstance(v, str):
            raise RecipeError(f"{where}: expected a string, got {v!r}")
        return v
    return v


@dataclass
class PassRecord:
    """What one pass changed: node/initializer counts by op, bytes, time, and its own details."""

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _upgrade_opset(proto: onnx.ModelProto, need: Optional[int], notes: list[str]) -> onnx.ModelProto:
    """Convert to the opset a pass needs with onnx.version_converter (outputs unchanged), or raise why not."""
    have = {o.domain: o.version for o in proto.opset_import}.get("", None)
    if need is None or have is None or have >= need:
        return proto
    from onnx import version_converter

    from ..errors import UnsupportedModelError

    try:
        out = version_converter.convert_version(proto, need)
        ir.check_proto(out, full=True, what=f"model converted to opset {need}")
    except Exception as e:  # the converter raises several types; all mean "cannot convert"
        raise UnsupportedModelError(f"the pass needs opset >= {need} and the model has opset {have}; "
                                    f"onnx.version_converter could not convert it: {str(e).splitlines()[0][:200]}"
                                    ) from None
    notes.append(f"model converted from opset {have} to {need} with onnx.version_converter "
                 "(needed for per-channel quantization axes)")
    return out


def _histogram(m: onnx.ModelProto) -> Counter:
    return Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for g in ir.iter_graph_protos(m.graph)
                   for n in g.node)


def _init_names(m: onnx.ModelProto) -> set[str]:
    return {t.name for g in ir.iter_graph_protos(m.graph) for t in g.initializer}


class PassManager:
    """Runs passes in order on a ModelProto, checking the model after each and recording the changes."""

    def __init__(self, passes: list[Pass], ctx: Optional[PassContext] = None):
        self.passes = passes
        self.ctx = ctx or PassContext()

    def run(self, proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[PassRecord]]:
        records = []
        current = proto
        for p in self.passes:
            t0 = time.perf_counter()
            before_hist, before_inits = _histogram(current), _init_names(current)
            notes: list[str] = []
            source = _upgrade_opset(current, p.min_opset(), notes)
            model = ir.Model.from_proto(source)
            self.ctx.proto = source
            try:
                outcome = p.run(model, self.ctx)
            finally:
                self.ctx.proto = None
            outcome.notes[:0] = notes
            candidate = model.to_proto()
            status = "ok"
            try:
                ir.check_proto(candidate, full=True, what=f"output of pass '{p.name}'")
            except InvalidModelError as e:
                status = f"rolled back: {e}"
                self.ctx.warnings.append(f"pass '{p.name}' produced an invalid model and was rolled back: {e}")
                candidate = current
            after_hist, after_inits = _histogram(candidate), _init_names(candidate)
            added = after_hist - before_hist
            removed = before_hist - after_hist
            records.append(PassRecord(
                name=p.name, options=p.options(), status=status, seconds=time.perf_counter() - t0,
                nodes_before=sum(before_hist.values()), nodes_after=sum(after_hist.values()),
                ops_added=dict(added), ops_removed=dict(removed),
                initializers_added=len(after_inits - before_inits),
                initializers_removed=len(before_inits - after_inits),
                bytes_before=ir.proto_size(current), bytes_after=ir.proto_size(candidate),
                details=outcome.details, notes=outcome.notes))
            current = candidate
        for p, rec in zip(self.passes, records):
            if type(p).finalize is Pass.finalize or rec.status != "ok":
                continue
            final = onnx.ModelProto()
            final.CopyFrom(current)
            outcome = PassOutcome(details=rec.details, notes=rec.notes)
            p.finalize(final, outcome)
            try:
                ir.check_proto(final, full=True, what=f"final step of pass '{p.name}'")
            except InvalidModelError as e:
                self.ctx.warnings.append(f"final step of pass '{p.name}' produced an invalid model; skipped: {e}")
                continue
            rec.bytes_after = ir.proto_size(final)
            current = final
        return current, records
