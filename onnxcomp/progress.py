"""Progress of long steps: the callback type every layer reports through, a counter for loops whose length is
known, and the terminal view (two tqdm bars: the pipeline's step, and the step running inside it, with its ETA).
The lowest layer: calibration, validation, algorithms and passes all report here without importing each other."""
from __future__ import annotations

import sys
from typing import Callable, Optional, TextIO

#: progress callback: (step name, done, total), e.g. ("calibration: ranges", 3, 32)
Progress = Callable[[str, int, int], None]

#: steps of the pipeline itself (one per pass, the auto search): the outer bar; every other step runs inside one
OUTER_STEPS = ("pass ", "passes", "auto search")


class Counter:
    """Counts one loop of `total` items for a progress callback (no-op without one): `tick()` after each item."""

    def __init__(self, progress: Optional[Progress], step: str, total: int):
        self.progress, self.step, self.total, self.done = progress, step, max(0, int(total)), 0
        if progress is not None and self.total:
            progress(step, 0, self.total)

    def tick(self, n: int = 1) -> None:
        self.done += n
        if self.progress is not None and self.total:
            self.progress(self.step, min(self.done, self.total), self.total)


def within(progress: Optional[Progress], what: str) -> Optional[Progress]:
    """`progress` for the steps of one part of a step (an auto-search candidate): each step named after it,
    so a terminal shows them on the inner line (a candidate's "pass 1/2" is not the pipeline's)."""
    if progress is None:
        return None
    return lambda step, done, total: progress(f"{what} · {step}", done, total)


def is_outer(step: str) -> bool:
    """A step of the pipeline itself (the top bar), not one running inside it."""
    return step.startswith(OUTER_STEPS)


class TerminalProgress:
    """Progress on a terminal: the current pipeline step on the first line and the step inside it (calibration
    batches, sensitivity probes, speed checks, validation) on the second, each with its rate and ETA."""

    def __init__(self, file: Optional[TextIO] = None) -> None:
        self.file = file if file is not None else sys.stderr
        self._bars: dict[bool, tuple[str, object]] = {}  # outer? -> (step, tqdm bar)

    def __call__(self, step: str, done: int, total: int) -> None:
        from tqdm import tqdm

        outer = is_outer(step)
        current = self._bars.get(outer)
        if current is None or current[0] != step:
            if outer:
                self.close()
            else:
                self._close(False)
            bar = tqdm(total=total, desc=step, file=self.file, leave=False, position=0 if outer else 1,
                       dynamic_ncols=True, mininterval=0.2)
            current = self._bars[outer] = (step, bar)
        bar = current[1]
        bar.total = total
        if done > bar.n:
            bar.update(done - bar.n)  # update(), not n=: tqdm's rate, hence the ETA, follows the increments
        else:
            bar.n = done
            bar.refresh()

    def _close(self, outer: bool) -> None:
        step_bar = self._bars.pop(outer, None)
        if step_bar is not None:
            step_bar[1].close()

    def close(self) -> None:
        """Close both bars (inner first, so the terminal is left clean)."""
        self._close(False)
        self._close(True)


def resolve(progress: "bool | Progress | None") -> Optional[Progress]:
    """The callback for a public `progress=` argument: True -> bars when stderr is a terminal (quiet otherwise,
    e.g. in CI logs), a callable as given, False/None -> none."""
    if progress is True:
        return TerminalProgress() if sys.stderr.isatty() else None
    return progress if callable(progress) else None


def close(progress: Optional[Progress]) -> None:
    """Close the terminal bars `resolve` made (a caller's own callback is left alone)."""
    if isinstance(progress, TerminalProgress):
        progress.close()
