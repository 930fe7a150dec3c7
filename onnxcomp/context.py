"""What a pass (and the shared algorithms it calls) runs in and returns: the context of one compression, and
the outcome of one pass. Below the passes, so that algorithms and passes share these types without importing
each other."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import onnx

from .calibration import ProbeErrors, StatisticsCache
from .progress import Counter, Progress


@dataclass
class PassContext:
    """Facts shared by every pass of one compression (data, providers, target), the statistics they collected
    (reused across passes and back-off rounds), the warnings they raised, and the progress callback."""

    calibration_data: Any = None
    validation_data: Any = None  # feeds the result is validated on (sensitivity may use them)
    providers: Optional[list[str]] = None
    target: str = "ort-cpu"
    #: the recipe has an accuracy budget: weight passes rank their layers by end-to-end effect for its back-off
    accuracy_budget: bool = False
    progress: Optional[Progress] = None
    warnings: list[str] = field(default_factory=list)
    statistics: StatisticsCache = field(default_factory=StatisticsCache)
    #: sensitivity probe errors, reused by back-off rounds (algorithms.sensitivity.WeightProbe)
    probe_errors: ProbeErrors = field(default_factory=ProbeErrors)

    def warn(self, text: str) -> None:
        """Add a warning once (the same text from a later back-off round is not repeated)."""
        if text not in self.warnings:
            self.warnings.append(text)

    def counter(self, step: str, total: int) -> Counter:
        """A progress counter for a loop of `total` items inside a pass (sensitivity probes, speed checks)."""
        return Counter(self.progress, step, total)

    def probe_args(self, model: onnx.ModelProto, step: str, probes: int) -> dict[str, Any]:
        """What a WeightProbe on `model` takes from this compression: providers, a progress counter sized to
        `probes`, and the errors measured before (back-off rounds ask for the same candidates again)."""
        return {"providers": self.providers, "counter": self.counter(step, probes), "errors": self.probe_errors,
                "digest": self.statistics.digest(model)}

    def collect(self, model: onnx.ModelProto, tensor_names, feeds, **kwargs):
        """`calibration.collect_statistics` through this compression's cache (same model, request and samples:
        collected once)."""
        return self.statistics.collect(model, tensor_names, feeds, providers=self.providers,
                                       progress=self.progress, **kwargs)

    def second_moments(self, model: onnx.ModelProto, feeds, axes: dict[str, int]) -> dict:
        """E[x x^T] / rows of each named tensor with its channel axis (`axes`: name -> axis), from one run;
        tensors never observed are left out."""
        return {n: h for n, (h, _) in self.moments(model, feeds, axes).items()}

    def moments(self, model: onnx.ModelProto, feeds, axes: dict[str, int]) -> dict:
        """(E[x x^T], E[x]) of each named tensor's vectors along its axis (`axes`: name -> axis), from one run;
        tensors never observed are left out."""
        if not axes:
            return {}
        stats = self.collect(model, [], feeds, histogram=False, gram_axes=axes)
        return {n: (st.second_moment, st.gram_sum / st.gram_rows) for n, st in stats.items()
                if st.second_moment is not None}


@dataclass(frozen=True)
class LayerChange:
    """One layer a weight pass compressed: the node an accuracy budget may leave uncompressed (via the pass's
    `exclude`), the relative output error it introduced, and what it saved where the pass knows."""

    node: str
    error: float
    bytes_saved: Optional[int] = None
    seconds_saved: Optional[float] = None
    #: what the pass can do for this layer short of leaving it uncompressed (e.g. "int8" for a 4-bit weight):
    #: an accuracy budget's back-off asks for that first (`WeightPass.soften`); None: only leaving it as it was
    softer: Optional[str] = None


@dataclass
class PassOutcome:
    """What a pass says about its own work: details and notes for the report, the layers it compressed."""

    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    layers: list[LayerChange] = field(default_factory=list)
