"""Latency of a candidate relative to a reference, measured interleaved in one process.

Both sessions are warmed up, then timed in pairs on the same feed, alternating which model runs first in
each pair, so drift (thermal, other processes, frequency scaling) hits both alike. The medians are compared:
``latency_ratio = median(candidate) / median(reference)``. A time budget bounds the whole measurement, so a
huge model costs at most about one warm-up and one pair past the budget.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from ..errors import CalibrationDataError
from ..progress import Progress
from .session import run_session

__all__ = ["LatencyResult", "measure_latency"]

MAX_AUTO_PAIRS = 200
MIN_AUTO_PAIRS = 5


@dataclass
class LatencyResult:
    reference_ms: float
    candidate_ms: float
    ratio: float  # candidate / reference
    pairs: int  # timed (reference, candidate) pairs
    notes: list[str] = field(default_factory=list)


def _timed_run(sess: ort.InferenceSession, feed: Mapping[str, np.ndarray], name: str) -> float:
    """Wall time of one run, in ms."""
    t0 = time.perf_counter_ns()
    run_session(sess, feed, name=name)
    return (time.perf_counter_ns() - t0) / 1e6


def _warm_up(reference: ort.InferenceSession, candidate: ort.InferenceSession, feeds, cfeeds, warmup: int,
             until: float, time_budget_s: float, notes: list[str]) -> None:
    """`warmup` untimed runs of each session (at least one), cut short once half the time budget is spent."""
    for i in range(max(1, warmup)):
        _timed_run(reference, feeds[i % len(feeds)], "reference")
        _timed_run(candidate, cfeeds[i % len(cfeeds)], "candidate")
        if time.perf_counter() > until and i + 1 < warmup:
            notes.append(f"latency: warm-up cut to {i + 1} of {warmup} run(s) by the {time_budget_s:g}s time budget")
            break


def measure_latency(
    reference: ort.InferenceSession,
    candidate: ort.InferenceSession,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    warmup: int = 3,
    runs: int | None = None,
    time_budget_s: float = 10.0,
    candidate_feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
    progress: Progress | None = None,
    step: str = "latency",
) -> LatencyResult:
    """Median wall time per run of each session (ms) and their ratio.

    ``runs``: timed pairs to take; None takes up to 200 pairs, stopping once ``time_budget_s`` is spent
    (but not before 5 pairs unless the budget is already exceeded). Feeds are cycled.
    ``candidate_feeds``: the candidate's version of each feed when its inputs need other dtypes.
    ``progress`` gets (``step``, done, pairs wanted) after each pair, done counting the time budget spent too
    (whichever ends the timing first), so its ETA holds either way.
    """
    if not feeds:
        raise CalibrationDataError("latency: no feeds to time")
    cfeeds = candidate_feeds if candidate_feeds is not None else feeds
    notes: list[str] = []
    start = time.perf_counter()
    deadline = start + max(0.0, time_budget_s)

    one = _timed_run
    _warm_up(reference, candidate, feeds, cfeeds, warmup, start + time_budget_s / 2, time_budget_s, notes)
    want = runs if runs is not None else MAX_AUTO_PAIRS
    ref_t: list[float] = []
    cand_t: list[float] = []
    for k in range(max(1, want)):
        j = k % len(feeds)
        if k % 2 == 0:
            ref_t.append(one(reference, feeds[j], "reference"))
            cand_t.append(one(candidate, cfeeds[j], "candidate"))
        else:
            cand_t.append(one(candidate, cfeeds[j], "candidate"))
            ref_t.append(one(reference, feeds[j], "reference"))
        now = time.perf_counter()
        if progress is not None:
            spent = (now - start) / time_budget_s if time_budget_s > 0 else 1.0
            progress(step, min(want, max(k + 1, int(want * spent))), want)
        if now > deadline:
            if runs is not None and k + 1 < runs:
                notes.append(f"latency: {k + 1} of {runs} timed pair(s) fit in the {time_budget_s:g}s time budget")
            elif runs is None and k + 1 < MIN_AUTO_PAIRS:
                notes.append(f"latency: only {k + 1} timed pair(s) fit in the {time_budget_s:g}s time budget")
            break
    ref_ms = statistics.median(ref_t)
    cand_ms = statistics.median(cand_t)
    ratio = cand_ms / ref_ms if ref_ms > 0 else float("nan")
    return LatencyResult(ref_ms, cand_ms, ratio, len(ref_t), notes)


def time_session(session: ort.InferenceSession, feeds: Sequence[Mapping[str, np.ndarray]], *, warmup: int = 3,
                 runs: int | None = None, time_budget_s: float = 5.0, name: str = "model") -> tuple[float, int]:
    """(median ms per run, runs timed) of one session alone: for models too big to keep two sessions in memory,
    where the interleaved `measure_latency` cannot be used (one-after-the-other timing is noisier)."""
    if not feeds:
        raise CalibrationDataError("latency: no feeds to time")
    deadline = time.perf_counter() + max(0.0, time_budget_s)
    for i in range(max(1, warmup)):
        run_session(session, feeds[i % len(feeds)], name=name)
    times: list[float] = []
    for k in range(max(1, runs if runs is not None else MAX_AUTO_PAIRS)):
        t0 = time.perf_counter_ns()
        run_session(session, feeds[k % len(feeds)], name=name)
        times.append((time.perf_counter_ns() - t0) / 1e6)
        if time.perf_counter() > deadline:
            break
    return statistics.median(times), len(times)
