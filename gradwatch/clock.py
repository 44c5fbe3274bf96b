"""Counting steps: which step is running, whether it is measured, and how long steps take."""

from __future__ import annotations

import time
from typing import Callable, Optional

from .collect import Collector, ranks
from .report import StepData
from .schedule import Schedule, is_adapt_step


class StepClock:
    """Moves from one step to the next: closes the running step (its data is handed to ``emit``
    last, after the next step opened, so that a finding raised as an error by the user's
    warning filters leaves the count consistent), times steps for the schedule's budget, and
    starts or pauses the collector's per-layer hooks."""

    def __init__(self, schedule: Schedule, collector: Collector, note: Callable[[str], None]) -> None:
        self.schedule = schedule
        self.collector = collector
        self.note = note
        self.step: Optional[int] = None  # the running step
        self.seen = 0  # steps opened so far
        self._mark: Optional[float] = None  # when the previous step's work was done
        self._measured = 0  # measured steps closed since the last adaptation
        self._spent = 0.0  # the collector's own time (``spent``) at the last adaptation

    def advance(self, emit: Callable[[StepData], None]) -> None:
        finished, measured = self.step, self.collector.measuring
        self._measured += measured and finished is not None
        data = self.close() if measured else None
        self._open()
        try:
            if data is not None:
                emit(data)
        finally:  # a step lasts from here to here: its summary and outputs count to it
            now = time.perf_counter()
            if finished is not None and self._mark is not None:
                self.schedule.record(now - self._mark, measured, finished)
            self._mark = now

    def counted(self, marked: bool) -> int:
        """Steps so far. A step opened by a forward counts from its first forward; one that
        ``optimizer.step()`` or ``watch.step()`` ends (``marked``) counts once it has ended, so
        that after n optimizer steps the count is n."""
        return self.seen - 1 if marked and self.step is not None else self.seen

    def close(self) -> Optional[StepData]:
        """The running step's numbers, if it was measured (the hooks stay until the next step)."""
        if self.step is None or not self.collector.measuring:
            return None
        return self.collector.end(self.step)

    def _open(self) -> None:
        step = self.step = 0 if self.step is None else self.step + 1
        self.collector.opened(step)
        self.seen += 1
        if self.schedule.budget is not None and is_adapt_step(step):
            self._adapt(step)
        if self.schedule.measures(step):
            self.collector.begin(histograms=self.schedule.histograms(step))
        else:
            self.collector.pause()

    def _adapt(self, step: int) -> None:
        """At a step where the budget may change the interval (``schedule.is_adapt_step``)."""
        # gradwatch's own time per measured step since the last adaptation (used where no unmeasured step
        # was timed to compare with: every=1)
        spent, self._spent = self.collector.spent - self._spent, self.collector.spent
        own = spent / max(self._measured, 1)
        self._measured = 0
        proposal = self.schedule.adapt(step, own)
        # Every rank must measure the same steps: all reach this step together and take the widest.
        every = ranks.agree_max(proposal or self.schedule.every) if ranks.world() > 1 else proposal
        if every is not None and every != self.schedule.every:
            self.schedule.every = every
            self.note(f"gradwatch: measuring every {every} steps from step {step} (budget "
                      f"{self.schedule.budget * 100:.3g}% of the step time).")
        if self.schedule.over_budget is not None:
            self.note(f"gradwatch: a measured step costs {self.schedule.over_budget:.1%} of the step time even at "
                      f"every {self.schedule.every} steps (budget {self.schedule.budget * 100:.3g}%); pass every=N to "
                      f"measure less often, or budget= to allow more.")
