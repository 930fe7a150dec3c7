"""Accuracy budget back-off: compress less, or leave uncompressed, the layers that introduced the most error
until the budget holds.

Each round takes the typed LayerChange records the weight passes returned, ranks the layers they still
compress by the error each one is charged with (quantize, knowing a budget is set: how much the model's output
error drops when that layer alone stays float; the other passes: the output error each introduced), adds the
worst quarter to their pass's `exclude`, and runs the recipe again through the same Pipeline (which re-runs
only the passes whose options or input changed). MiniLM-L3 static int8 under cosine 0.9995: 5 layers left
float, size 0.364, where ranking by each layer's own output error left 11 (the embedding tables first), size
0.867.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

import onnx

from .passes.base import Pass, WeightPass
from .pipeline import PassRecord
from .recipe import AccuracyBudget

#: rounds of back-off (each leaves the most sensitive quarter of the compressed layers uncompressed)
MAX_ROUNDS = 8


@dataclass(frozen=True)
class BackoffRound:
    """One round: the layers it left uncompressed and how far the result then was from the budget."""

    left_float: tuple[str, ...]
    violations: int
    worst_cosine: Optional[float]
    softened: tuple[str, ...] = ()  # layers compressed less instead (e.g. 4-bit weights made 8-bit)

    def to_dict(self) -> dict:
        return {"left_float": list(self.left_float), "softened": list(self.softened), "violations": self.violations,
                "worst_cosine": self.worst_cosine}


@dataclass
class BackoffResult:
    """Where back-off ended: the passes really applied, their output, records, validation, and the rounds."""

    passes: list[Pass]
    model: onnx.ModelProto
    records: list[PassRecord]
    validation: object  # onnxcomp.validation.ValidationReport
    rounds: list[BackoffRound] = field(default_factory=list)


@dataclass
class BackoffStep:
    """What one round changes in one pass: layers left uncompressed, and layers compressed less."""

    exclude: list[str] = field(default_factory=list)
    soften: list[str] = field(default_factory=list)


def next_backoff(passes: list[Pass], records: list[PassRecord], only: Optional[set[int]] = None
                 ) -> dict[int, BackoffStep]:
    """The next step, by pass index, for the most sensitive quarter (at least one) of the layers the passes
    (those at the indices in `only`, when given) still compress, ranked by the error each introduced: a layer
    the pass can compress less (LayerChange.softer, e.g. 4-bit weights -> 8-bit) is softened, the others are
    left uncompressed."""
    rows = []
    for i, (p, rec) in enumerate(zip(passes, records)):
        if rec.status != "ok" or not isinstance(p, WeightPass) or (only is not None and i not in only):
            continue
        excluded = set(p.exclude)
        rows += [(lay.error, i, lay.node, lay.softer) for lay in rec.layers if lay.node not in excluded]
    rows.sort(key=lambda r: -r[0])
    out: dict[int, BackoffStep] = {}
    for _, i, node, softer in rows[: max(1, len(rows) // 4)]:
        step = out.setdefault(i, BackoffStep())
        (step.soften if softer else step.exclude).append(node)
    return out


def _stepped(p: Pass, step: Optional[BackoffStep]) -> Pass:
    if step is None:
        return p
    if step.soften:
        p = p.soften(step.soften)  # type: ignore[attr-defined]
    if step.exclude:
        p = dataclasses.replace(p, exclude=tuple(p.exclude) + tuple(step.exclude))  # type: ignore[attr-defined]
    return p


def back_off(budget: AccuracyBudget, passes: list[Pass], model: onnx.ModelProto, records: list[PassRecord],
             validation, run: Callable[[list[Pass]], tuple[onnx.ModelProto, list[PassRecord]]],
             check: Callable[[onnx.ModelProto], object], max_rounds: int = MAX_ROUNDS,
             only: Optional[set[int]] = None) -> BackoffResult:
    """Back off from (`passes`, their `model`/`records`/`validation`) until `budget` holds, nothing is left to
    give back, or `max_rounds` rounds ran. `run(passes)` compresses again; `check(model)` validates; `only`
    limits the back-off to the passes at those indices."""
    result = BackoffResult(list(passes), model, records, validation)
    viol = budget.violations(validation.outputs, getattr(validation, "metric", None))
    while viol and len(result.rounds) < max_rounds:
        step = next_backoff(result.passes, result.records, only)
        if not step:
            break
        result.passes = [_stepped(p, step.get(i)) for i, p in enumerate(result.passes)]
        result.model, result.records = run(result.passes)
        result.validation = check(result.model)
        viol = budget.violations(result.validation.outputs, getattr(result.validation, "metric", None))
        worst = min((o.cosine for o in result.validation.outputs.values()), default=None)
        result.rounds.append(BackoffRound(tuple(n for i in sorted(step) for n in step[i].exclude), len(viol), worst,
                                          tuple(n for i in sorted(step) for n in step[i].soften)))
    return result
