"""Where candidates are compressed and checked for accuracy: in this process (default), or on a Ray cluster
(`executor: ray`, optional extra `onnxcomp[ray]`). Latency is never measured here: the search times the
candidates serially on the machine that runs the target, so parallel trials cannot disturb the timings."""
from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

from ..errors import RecipeError
from ..progress import Progress, within
from .candidates import Candidate
from .evaluate import Evaluation, Evaluator, EvaluatorSpec


class LocalExecutor:
    """One Evaluator in this process: candidates in order, sharing pass runs and calibration statistics.
    `progress` is told of the steps inside each candidate (its passes, probes, validation), named after it."""

    def __init__(self, spec: EvaluatorSpec, progress: Optional[Progress] = None):
        self._evaluator = Evaluator(spec)
        self._progress = progress

    def map(self, cands: Sequence[Candidate], deadline: float,
            tick: Optional[Callable[[str], None]] = None) -> list[Evaluation]:
        """Evaluate `cands` in order until `deadline`; `tick(name)` after each one."""
        out = []
        for c in cands:
            if time.monotonic() > deadline:
                break
            self._evaluator.ctx.progress = within(self._progress, c.name)
            out.append(self._evaluator(c))
            if tick is not None:
                tick(c.name)
        return out

    def close(self) -> None:
        pass


class RayExecutor:
    """Ray actors, each holding the model and data once (`ray.init()` locally, or `address` to join a cluster);
    candidates are spread over them and come back in order."""

    def __init__(self, spec: EvaluatorSpec, address: Optional[str] = None, workers: Optional[int] = None):
        try:
            import ray
        except ImportError:
            raise RecipeError("executor 'ray' needs Ray: pip install 'onnxcomp[ray]' (or use executor: local)"
                              ) from None
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            ray.init(address=address, **kwargs) if address else ray.init(**kwargs)
            self._started = True
        _ship_metric_by_value(spec)
        n = workers or max(1, int(ray.available_resources().get("CPU", 1)))
        remote = ray.remote(num_cpus=1)(_RayEvaluator)
        spec_ref = ray.put(spec)
        self._actors = [remote.remote(spec_ref) for _ in range(n)]

    def map(self, cands: Sequence[Candidate], deadline: float,
            tick: Optional[Callable[[str], None]] = None) -> list[Evaluation]:
        from ray.util import ActorPool

        if time.monotonic() > deadline:
            return []
        pool = ActorPool(self._actors)
        out = []
        for ev in pool.map(lambda a, c: a.evaluate.remote(c), list(cands)):
            if tick is not None:
                tick(ev.trial.name)
            out.append(ev)
        return out

    def close(self) -> None:
        for a in self._actors:
            self._ray.kill(a)
        if self._started:
            self._ray.shutdown()


def _ship_metric_by_value(spec: EvaluatorSpec) -> None:
    """A task metric defined in the user's script or test module cannot be imported by the workers: pickle its
    module by value (cloudpickle), so the workers get the function itself."""
    import sys

    from ray import cloudpickle

    metric = spec.budget.metric
    module = sys.modules.get(getattr(metric, "__module__", "") or "")
    if metric is None or module is None or module.__name__ in ("__main__", "builtins"):
        return
    path = getattr(module, "__file__", "") or ""
    if "site-packages" not in path and "dist-packages" not in path:
        cloudpickle.register_pickle_by_value(module)


class _RayEvaluator:
    """The Ray actor: an Evaluator built once per worker from the spec."""

    def __init__(self, spec: EvaluatorSpec):
        self._evaluator = Evaluator(spec)

    def evaluate(self, cand: Candidate) -> Evaluation:
        return self._evaluator(cand)


def make_executor(kind: str, spec: EvaluatorSpec, address: Optional[str] = None,
                  progress: Optional[Progress] = None):
    """The executor `kind` ('local' | 'ray') over `spec`; `progress` sees the steps inside local candidates
    (Ray workers report only each finished candidate)."""
    if kind == "ray":
        return RayExecutor(spec, address)
    return LocalExecutor(spec, progress)
