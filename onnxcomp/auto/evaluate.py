"""One candidate's measurement: compress it, check its accuracy on the validation samples, and back off the
layers that cost the most (the budget machinery) until it meets the budget or gives up. No timing here."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import onnx

from .. import ir
from ..budget import back_off
from ..context import PassContext
from ..errors import MetricError, OnnxCompError
from ..pipeline import PassRecord, Pipeline
from ..recipe import AccuracyBudget
from ..passes import Pass
from .candidates import Candidate

#: back-off rounds per candidate in a search (each leaves the worst quarter of its compressed layers as they were)
AUTO_BACKOFF_ROUNDS = 3


@dataclass
class Trial:
    """What the search measured for one candidate (the report's row)."""

    name: str
    passes: tuple[Pass, ...]  # as really applied (after back-off)
    lossless: bool = False
    met: bool = False
    accuracy: Optional[float] = None  # the task metric when the budget has one, else the worst output cosine
    worst_cosine: Optional[float] = None
    violations: list[str] = field(default_factory=list)
    size_bytes: int = 0
    size_ratio: float = math.nan
    latency_ratio: Optional[float] = None
    seconds: float = 0.0
    backoff_rounds: int = 0
    left_float: int = 0  # layers back-off left uncompressed
    error: Optional[str] = None  # the typed error that stopped it
    verdict: str = ""  # chosen, or why not

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passes": [p.to_dict() for p in self.passes], "met": self.met,
                "accuracy": self.accuracy, "worst_cosine": self.worst_cosine, "violations": list(self.violations),
                "size_bytes": self.size_bytes, "size_ratio": self.size_ratio, "latency_ratio": self.latency_ratio,
                "seconds": self.seconds, "backoff_rounds": self.backoff_rounds, "left_float": self.left_float,
                "error": self.error, "verdict": self.verdict}


@dataclass
class Evaluation:
    """A trial with the model it produced, the pass records and the warnings of its run."""

    trial: Trial
    model: Optional[onnx.ModelProto]
    records: list[PassRecord]
    warnings: list[str]
    failure: Optional[Exception] = None  # the typed error that stopped the candidate


@dataclass
class EvaluatorSpec:
    """Everything an evaluator needs, picklable (a Ray actor gets it once)."""

    proto: onnx.ModelProto
    calibration: Optional[list]
    validation: list
    providers: list[str]
    target: str
    budget: AccuracyBudget
    max_rounds: int = AUTO_BACKOFF_ROUNDS
    input_shapes: Optional[dict[str, list[int]]] = None  # shapes of generated validation inputs (no data)


class Evaluator:
    """Measures candidates on one model and data; one Pipeline, so pass runs and statistics are shared."""

    def __init__(self, spec: EvaluatorSpec):
        self.spec = spec
        self.ctx = PassContext(calibration_data=spec.calibration, validation_data=spec.validation,
                               providers=spec.providers, target=spec.target)
        self.pipeline = Pipeline(self.ctx)
        self._input_bytes = ir.proto_size(spec.proto)

    def check(self, model: onnx.ModelProto):
        from ..validation import validate

        return validate(self.spec.proto, model, inputs=self.spec.validation, providers=self.spec.providers,
                        latency=False, metric=self.spec.budget.metric, input_shapes=self.spec.input_shapes,
                        progress=self.ctx.progress)

    def __call__(self, cand: Candidate) -> Evaluation:
        t0 = time.perf_counter()
        warned = len(self.ctx.warnings)
        passes = [p.resolve(bool(self.spec.calibration)) for p in cand.passes]
        trial = Trial(cand.name, tuple(passes), lossless=cand.kind == "lossless")
        try:
            model, records = self.pipeline.run(self.spec.proto, passes)
            vrep = self.check(model)
            budget = self.spec.budget
            if cand.backoff and budget.violations(vrep.outputs, vrep.metric):
                done = back_off(budget, passes, model, records, vrep,
                                run=lambda ps: self.pipeline.run(self.spec.proto, ps), check=self.check,
                                max_rounds=self.spec.max_rounds, only=set(cand.backoff))
                model, records, vrep = done.model, done.records, done.validation
                trial.passes = tuple(done.passes)
                trial.backoff_rounds = len(done.rounds)
                trial.left_float = sum(len(r.left_float) for r in done.rounds)
        except MetricError:
            raise  # the user's metric failed: every candidate would fail the same way
        except OnnxCompError as e:
            trial.error = f"{type(e).__name__}: {e}"
            trial.verdict = "failed"
            trial.seconds = time.perf_counter() - t0
            return Evaluation(trial, None, [], self.ctx.warnings[warned:], e)
        _fill(trial, vrep, self.spec.budget, model, self._input_bytes)
        trial.seconds = time.perf_counter() - t0
        return Evaluation(trial, model, records, self.ctx.warnings[warned:])


def _fill(trial: Trial, vrep, budget: AccuracyBudget, model: onnx.ModelProto, input_bytes: int) -> None:
    """Accuracy, budget verdict and size of a measured candidate."""
    trial.violations = budget.violations(vrep.outputs, vrep.metric)
    trial.met = not trial.violations
    cos = [o.cosine for o in vrep.outputs.values()]
    trial.worst_cosine = min(cos, key=lambda c: -math.inf if math.isnan(c) else c) if cos else None
    trial.accuracy = vrep.metric if budget.metric is not None else trial.worst_cosine
    trial.size_bytes = ir.proto_size(model)
    trial.size_ratio = trial.size_bytes / max(1, input_bytes)
