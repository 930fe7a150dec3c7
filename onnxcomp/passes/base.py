"""What a pass is: a small frozen dataclass (name + typed options) with `run(model, source, ctx)`.

A pass rewrites the working model it is given (`ir.Model`) through the engine; `source` is the same model as a
ModelProto, for the ONNX Runtime work (calibration, probes). What it did comes back as a PassOutcome: details
for the report and, per compressed layer, a typed LayerChange that an accuracy budget may give back.
The pipeline (`onnxcomp.pipeline`) runs passes, checks and records them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import onnx

from .. import ir
from ..calibration import StatisticsCache

#: progress callback: (step name, done, total), e.g. ("calibration: ranges", 3, 32)
Progress = Callable[[str, int, int], None]


@dataclass
class PassContext:
    """Facts shared by every pass of one compression (data, providers, target), the statistics they collected
    (reused across passes and back-off rounds), the warnings they raised, and the progress callback."""

    calibration_data: Any = None
    validation_data: Any = None  # feeds the result is validated on (sensitivity may use them)
    providers: Optional[list[str]] = None
    target: str = "ort-cpu"
    progress: Optional[Progress] = None
    warnings: list[str] = field(default_factory=list)
    statistics: StatisticsCache = field(default_factory=StatisticsCache)

    def warn(self, text: str) -> None:
        """Add a warning once (the same text from a later back-off round is not repeated)."""
        if text not in self.warnings:
            self.warnings.append(text)

    def collect(self, model: onnx.ModelProto, tensor_names, feeds, **kwargs):
        """`calibration.collect_statistics` through this compression's cache (same model, request and samples:
        collected once)."""
        return self.statistics.collect(model, tensor_names, feeds, providers=self.providers,
                                       progress=self.progress, **kwargs)


@dataclass(frozen=True)
class LayerChange:
    """One layer a weight pass compressed: the node an accuracy budget may leave uncompressed (via the pass's
    `exclude`), the relative output error it introduced, and what it saved where the pass knows."""

    node: str
    error: float
    bytes_saved: Optional[int] = None
    seconds_saved: Optional[float] = None


@dataclass
class PassOutcome:
    """What a pass says about its own work: details and notes for the report, the layers it compressed."""

    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    layers: list[LayerChange] = field(default_factory=list)


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
