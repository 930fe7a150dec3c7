"""The auto search: stage 0 candidates, timing of those that met the budget, then stages of follow-ups built on
what met it (see `candidates.followups`) until none is left or `max_seconds` ran out, then the choice on the
objective (see `pareto`). Accuracy is measured by the executor
(in-process or Ray); latency here, serially, interleaved with the input model."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import onnx

from ..progress import Progress, within
from ..errors import InternalError
from ..pipeline import PassRecord
from ..recipe import AccuracyBudget, AutoSearch
from .candidates import Candidate, ModelFacts, Outcome, candidates, followups, model_facts
from .evaluate import Evaluation, EvaluatorSpec, Trial
from .executor import make_executor
from .pareto import FASTER_THAN_INPUT, choose, dominates, pareto_front

#: seconds of interleaved timing per candidate during the search (the returned model is timed again in full)
AUTO_TIMING_S = 4.0
#: candidates within this fraction of the fastest are timed a second time before the choice
RETIME_WITHIN = 0.15


@dataclass
class SearchResult:
    """The winner (its model, pass records and warnings), every trial with its verdict, and why."""

    winner: Trial
    model: onnx.ModelProto
    records: list[PassRecord]
    warnings: list[str]
    trials: list[Trial]
    reason: str
    objective: str
    facts: ModelFacts
    executor: str
    seconds: float = 0.0
    not_run: list[str] = field(default_factory=list)  # candidates max_seconds left out

    @property
    def front(self) -> list[Trial]:
        return pareto_front(self.trials)

    def to_dict(self) -> dict[str, Any]:
        return {"objective": self.objective, "executor": self.executor, "winner": self.winner.name,
                "reason": self.reason, "seconds": self.seconds, "facts": self.facts.to_dict(),
                "front": [t.name for t in self.front], "not_run": list(self.not_run),
                "noise_floor": next((t.latency_ratio for t in self.trials if t.lossless), None),
                "trials": [t.to_dict() for t in self.trials]}


def search(proto: onnx.ModelProto, auto: AutoSearch, budget: AccuracyBudget, calibration: Optional[list],
           validation: list, providers: list[str], target: str, progress: Optional[Progress] = None,
           input_shapes: Optional[dict[str, list[int]]] = None) -> SearchResult:
    """Find the best model on `auto.objective` that meets `budget` (see the module doc). `input_shapes`: the
    shapes of generated validation inputs when there is no data (candidates are checked and timed on them)."""
    t0 = time.perf_counter()
    deadline = time.monotonic() + auto.max_seconds
    facts = model_facts(proto)
    spec = EvaluatorSpec(proto, calibration, validation, providers, target, budget, input_shapes=input_shapes)
    stage0 = candidates(facts, auto.objective, bool(calibration))
    state = _State(proto, validation, providers, progress, planned=len(stage0), input_shapes=input_shapes)
    executor = make_executor(auto.executor, spec, auto.ray_address, progress)
    try:
        pending = stage0
        while pending:
            state.add(executor.map(pending, deadline, state.tick), pending)
            state.time_met()
            best_q = _best_quantize(state, stage0, auto.objective)
            pending = [c for c in followups(state.done(), best_q)
                       if c.name not in state.by_name and c.name not in state.not_run]
            state.planned += len(pending)
    finally:
        executor.close()
    if auto.objective == "latency":
        state.retime_close()
    trials = [e.trial for e in state.evaluations]
    winner, reason = choose(trials, auto.objective)
    if winner is None:  # nothing met the budget: return the lossless model (the caller reports the failure)
        winner = next((t for t in trials if t.lossless), trials[0])
    _verdicts(trials, winner, reason, auto.objective)
    ev = state.by_name[winner.name]
    if ev.model is None:  # even the lossless candidate failed: that error is the input's problem
        raise ev.failure if ev.failure is not None else InternalError("bug in onnxcomp: auto search has no model")
    return SearchResult(winner, ev.model, ev.records, ev.warnings, trials, reason, auto.objective, facts,
                        auto.executor, time.perf_counter() - t0, state.not_run)


class _State:
    """Evaluations so far (in order, by name), the candidates the deadline left out, timing and progress."""

    def __init__(self, proto, validation, providers, progress, planned: int, input_shapes=None):
        self.proto, self.validation, self.providers, self.progress = proto, validation, providers, progress
        self.input_shapes = input_shapes
        self.evaluations: list[Evaluation] = []
        self.by_name: dict[str, Evaluation] = {}
        self.not_run: list[str] = []
        self.asked: list[Candidate] = []
        self.planned = planned
        self.finished = 0  # candidates evaluated (ticked by the executor after each one)

    def tick(self, name: str) -> None:
        """One bar for the whole search (its rate gives the ETA); the total grows as follow-ups are planned."""
        self.finished += 1
        if self.progress is not None:
            self.progress("auto search", self.finished, self.planned)

    def done(self) -> list[Outcome]:
        out = []
        for c in self.asked:
            if c.name in self.by_name:
                t = self.by_name[c.name].trial
                out.append(Outcome(c, t.passes, t.met, t.backoff_rounds > 0, t.size_ratio))
        return out

    def add(self, evs: list[Evaluation], asked: list[Candidate]) -> None:
        self.asked += list(asked)
        for ev in evs:
            self.evaluations.append(ev)
            self.by_name[ev.trial.name] = ev
        self.not_run += [c.name for c in asked if c.name not in self.by_name]

    def time_met(self) -> None:
        """Latency of every candidate that met the budget and has no timing yet, interleaved with the input."""
        from ..validation import validate

        for ev in self.evaluations:
            t = ev.trial
            if t.met and t.latency_ratio is None and ev.model is not None:
                rep = validate(self.proto, ev.model, inputs=self.validation, providers=self.providers,
                               latency=True, time_budget_s=AUTO_TIMING_S, max_samples=16,
                               input_shapes=self.input_shapes, progress=within(self.progress, t.name))
                t.latency_ratio = rep.latency_ratio

    def retime_close(self) -> None:
        """Time again every candidate within RETIME_WITHIN of the fastest (and the lossless one) and keep the
        mean of both runs: the choice among close candidates rests on twice the timing."""
        timed = [e.trial for e in self.evaluations if e.trial.met and e.trial.latency_ratio is not None]
        if len(timed) < 2:
            return
        best = min(t.latency_ratio for t in timed)
        close = {t.name for t in timed if t.lossless or t.latency_ratio <= best * (1 + RETIME_WITHIN)}
        first = {t.name: t.latency_ratio for t in timed}
        for ev in self.evaluations:
            if ev.trial.name in close:
                ev.trial.latency_ratio = None
        self.time_met()
        for ev in self.evaluations:
            t = ev.trial
            if t.name in close and t.latency_ratio is not None:
                t.latency_ratio = (first[t.name] + t.latency_ratio) / 2


def _best_quantize(state: _State, stage0: list[Candidate], objective: str) -> Optional[Candidate]:
    """The quantize candidate of stage 0 that met the budget, beat the input on the objective and is best on it
    (the compositions use it); None when no quantization helped."""
    trial = {c.name: state.by_name[c.name].trial for c in stage0 if c.name in state.by_name}
    met = [c for c in stage0 if c.kind == "quantize" and c.name in trial and trial[c.name].met
           and trial[c.name].size_ratio < 0.99]  # a quantization that changed nothing is no help
    if objective == "size":
        best = min(met, key=lambda c: trial[c.name].size_bytes, default=None)
        return best if best is not None and trial[best.name].size_ratio < 1.0 else None
    best = min(met, key=lambda c: trial[c.name].latency_ratio or math.inf, default=None)
    lat = None if best is None else trial[best.name].latency_ratio
    return best if lat is not None and lat < FASTER_THAN_INPUT else None


def _verdicts(trials: list[Trial], winner: Trial, reason: str, objective: str) -> None:
    """Why each trial was or was not chosen, in a few words."""
    for t in trials:
        if t is winner:
            t.verdict = f"chosen: {reason}"
        elif t.error:
            t.verdict = f"failed: {t.error[:160]}"
        elif not t.met:
            t.verdict = "missed the budget: " + (t.violations[0] if t.violations else "?")
        else:
            by = next((o.name for o in trials if o is not t and o.met and dominates(o, t)), None)
            if by:
                t.verdict = f"dominated by {by}"
            elif objective == "size":
                t.verdict = f"larger than {winner.name} ({t.size_bytes:,} vs {winner.size_bytes:,} bytes)"
            else:
                lat = "-" if t.latency_ratio is None else f"{t.latency_ratio:.3f}"
                wl = "-" if winner.latency_ratio is None else f"{winner.latency_ratio:.3f}"
                t.verdict = f"on the front; latency {lat}x vs {winner.name} {wl}x"
