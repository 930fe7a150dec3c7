"""The Pareto front of measured candidates (accuracy up, latency down, size down) and the choice on an objective.

Latencies within LATENCY_TIE of the fastest are one tie (timing noise on a shared CPU is ~3%): among them the
smallest, then the most accurate wins. On size, equal size and accuracy go to the earlier candidate (input order:
the simpler recipe), never to the timing, so every executor chooses alike. A latency objective never returns a
candidate that did not run faster than the input beyond the noise: it returns the lossless one instead, and says
why.
"""
from __future__ import annotations

import math
from typing import Optional, Protocol, Sequence

#: relative latency difference treated as timing noise when choosing on latency
LATENCY_TIE = 0.03
#: a latency ratio at or above this is "not faster than the input" (the noise floor)
FASTER_THAN_INPUT = 0.97


class Measured(Protocol):
    name: str
    met: bool
    accuracy: Optional[float]
    latency_ratio: Optional[float]
    size_bytes: int
    lossless: bool


def _acc(t: Measured) -> float:
    return -math.inf if t.accuracy is None or math.isnan(t.accuracy) else t.accuracy


def _lat(t: Measured) -> float:
    return math.inf if t.latency_ratio is None else t.latency_ratio


def dominates(a: Measured, b: Measured) -> bool:
    """a is at least as good as b on accuracy, latency and size, and better on one."""
    ge = _acc(a) >= _acc(b) and _lat(a) <= _lat(b) and a.size_bytes <= b.size_bytes
    gt = _acc(a) > _acc(b) or _lat(a) < _lat(b) or a.size_bytes < b.size_bytes
    return ge and gt


def pareto_front(trials: Sequence[Measured]) -> list[Measured]:
    """The candidates that met the budget and that no other such candidate dominates (input order kept)."""
    met = [t for t in trials if t.met]
    return [t for t in met if not any(dominates(o, t) for o in met if o is not t)]


def choose(trials: Sequence[Measured], objective: str) -> tuple[Optional[Measured], str]:
    """(winner, why) on `objective` among the candidates that met the budget; (None, why) when none did."""
    front = pareto_front(trials)
    if not front:
        return None, "no candidate met the accuracy budget"
    if objective == "size":  # equal size and accuracy (in practice the same model): the earlier one, not the timing
        _, win = min(enumerate(t for t in trials if t.met), key=lambda it: (it[1].size_bytes, -_acc(it[1]), it[0]))
        return win, f"smallest model that met the budget ({win.size_bytes:,} bytes)"
    timed = [t for t in front if t.latency_ratio is not None]
    if not timed:
        return None, "no candidate that met the budget could be timed"
    best = min(_lat(t) for t in timed)
    ties = [t for t in timed if _lat(t) <= best * (1 + LATENCY_TIE)]
    win = min(ties, key=lambda t: (t.size_bytes, -_acc(t), _lat(t)))
    why = (f"fastest that met the budget (latency {win.latency_ratio:.3f}x"
           + (f"; {len(ties) - 1} other(s) within the {LATENCY_TIE:.0%} timing noise, this one the smallest)"
              if len(ties) > 1 else ")"))
    if win.lossless or _lat(win) < FASTER_THAN_INPUT:
        return win, why
    lossless = next((t for t in trials if t.lossless and t.met), None)
    if lossless is None:
        return win, why
    return lossless, (f"no candidate ran faster than the input beyond the timing noise (best: {win.name} at "
                      f"{win.latency_ratio:.3f}x, needs < {FASTER_THAN_INPUT}): the input, cleaned, is returned")
