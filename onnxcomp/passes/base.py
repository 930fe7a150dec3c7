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
from ..context import LayerChange, PassContext, PassOutcome, Progress

__all__ = ["LayerChange", "Pass", "PassContext", "PassOutcome", "Progress"]

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

    def min_opset(self) -> Optional[int]:
        """The default-domain opset the pass needs; the pipeline upgrades older models first (or says why not)."""
        return None

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.name, **self.options()}
