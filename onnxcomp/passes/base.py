"""What a pass is: a small frozen dataclass (name + typed options) with `run(model, source, ctx)`.

A pass rewrites the working model it is given (`ir.Model`) through the engine; `source` is the same model as a
ModelProto, for the ONNX Runtime work (calibration, probes). What it did comes back as a PassOutcome: details
for the report and, per compressed layer, a typed LayerChange that an accuracy budget may give back.
The pipeline (`onnxcomp.pipeline`) runs passes, checks and records them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import onnx

from .. import ir
from ..errors import RecipeError
from ..algorithms.select import check_exclude, check_ops
from ..context import LayerChange, PassContext, PassOutcome, Progress

__all__ = ["LayerChange", "Pass", "PassContext", "PassOutcome", "Progress", "WeightPass"]

@dataclass(frozen=True)
class Pass:
    """Base class: subclasses set `name` and declare options as typed dataclass fields."""

    name: ClassVar[str] = ""
    #: what the report suggests when the result ran slower than the input and this pass was in the recipe
    slower_hint: ClassVar[str] = ""

    def run(self, model: ir.Model, source: onnx.ModelProto, ctx: PassContext) -> PassOutcome:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def summarize(cls, details: dict[str, Any]) -> list[str]:
        """A few lines for the terminal report on what the pass did, from its PassOutcome.details."""
        return []

    def finalize(self, proto: onnx.ModelProto, outcome: PassOutcome) -> None:
        """Called in place on the final model once every pass has run (e.g. how weights are stored in the file,
        which later passes must not see); record what was done in `outcome`. Default: nothing."""

    def resolve(self, has_data: bool) -> "Pass":
        """This pass with its data-dependent defaults made concrete (e.g. the best option when calibration data
        is given), so that the report and `result.recipe` say what really ran. Default: unchanged."""
        return self

    def min_opset(self) -> Optional[int]:
        """The default-domain opset the pass needs; the pipeline upgrades older models first (or says why not)."""
        return None

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.name, **self.options()}


@dataclass(frozen=True)
class WeightPass(Pass):
    """A pass that rewrites weight layers (quantize, sparsify, lowrank): the options they share, checked once.

    Subclasses redeclare a field to change its default, and list the op types they handle in `weight_ops`
    (empty: the pass checks `ops` itself)."""

    weight_ops: ClassVar[tuple[str, ...]] = ()
    ops: Optional[tuple[str, ...]] = None  # op types to touch (default: every op the pass handles)
    exclude: tuple[str, ...] = ()  # node or output-tensor names, or regexes, left as they are
    min_weight_elements: int = 0  # smaller weights are left as they are
    calibration_samples: int = 128  # calibration feeds the pass's statistics use

    def __post_init__(self) -> None:
        if self.min_weight_elements < 0:
            raise RecipeError(f"{self.name}.min_weight_elements must be >= 0")
        if self.calibration_samples < 1:
            raise RecipeError(f"{self.name}.calibration_samples must be >= 1")
        if self.weight_ops:
            check_ops(self.ops, self.weight_ops, f"{self.name}.ops")
        check_exclude(self.exclude, f"{self.name}.exclude")

    def soften(self, nodes: list[str]) -> "WeightPass":
        """The pass with these layers (their LayerChange.softer set) compressed less instead of left as they are;
        a pass that reports no `softer` layer never gets this call."""
        raise NotImplementedError(f"{self.name} has no gentler setting for layers")

    def calibration_feeds(self, ctx: PassContext) -> list:
        """The first `calibration_samples` calibration feeds (empty without calibration data)."""
        return list(ctx.calibration_data)[: self.calibration_samples] if ctx.calibration_data else []
