"""When to measure: a pure, reproducible schedule of measured steps.

Defaults (``every`` not given): every step of the first :data:`DENSE_STEPS` steps is
measured (dead-at-initialisation and NaN-at-step-1 problems show at once), then every
:data:`DEFAULT_EVERY` steps. The same run therefore measures the same steps every time.
A time budget (default 0.5 % of the step time) may widen the interval, but only at the
documented steps :data:`ADAPT_AT` (then every :data:`ADAPT_PERIOD` steps), only to one
of a few round intervals, and never beyond :data:`CEILING`: no problem waits longer
than that to be seen. Histograms follow their own fixed interval.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Optional, Tuple

DEFAULT_EVERY = 20
"""Measuring interval in steps after the dense start, when ``every`` is not given."""
DENSE_STEPS = 10
"""Steps measured one after another at the start of a run with the default schedule."""
DEFAULT_BUDGET = 0.005
"""Share of the step time measured steps may cost when ``every`` is not given. The steps in
between cost gradwatch's light per-step work too (the finiteness check, one call per layer):
about 0.2 ms on a 2-core CPU, 4 % of the seed MLP's 5 ms step (``benchmarks/breakdown.py
--between``), which leaves the measured steps little of the 3 % the defaults aim at there: at
0.5 % the seed MLP settles on every 80 or 100 steps (docs/performance.md)."""
DEFAULT_HISTOGRAM_EVERY = 200
"""Histogram interval in steps."""
CEILING = 100
"""The widest automatic interval: a problem is seen within this many steps."""
ADAPT_AT = (100, 1000)
"""Steps at which a budget may change the interval (then every ``ADAPT_PERIOD`` steps)."""
ADAPT_PERIOD = 10_000


def intervals(smallest: int, ceiling: int = CEILING) -> Tuple[int, ...]:
    """The intervals a budget may choose from: ``smallest`` doubled until the ceiling.

    >>> intervals(20)
    (20, 40, 80, 100)
    >>> intervals(1)
    (1, 2, 4, 8, 16, 32, 64, 100)
    >>> intervals(150)
    (150,)
    """
    out, k = [], smallest
    while k < ceiling:
        out.append(k)
        k *= 2
    out.append(max(ceiling, smallest))
    return tuple(out)


def choose_interval(choices: Tuple[int, ...], extra_per_measured: float, plain_step: float,
                    budget: float) -> int:
    """The smallest interval whose share of the step time stays within ``budget``, else the
    largest: a measured step costs ``extra_per_measured`` seconds over a plain one.

    >>> choose_interval((20, 40, 80, 100), extra_per_measured=2e-3, plain_step=5e-3, budget=0.02)
    20
    >>> choose_interval((20, 40, 80, 100), extra_per_measured=6e-3, plain_step=5e-3, budget=0.02)
    80
    >>> choose_interval((20, 40, 80, 100), extra_per_measured=1.0, plain_step=5e-3, budget=0.02)
    100
    """
    for k in choices:
        if extra_per_measured / k <= budget * plain_step:
            return k
    return choices[-1]


def is_adapt_step(step: int) -> bool:
    """Whether a budget may change the interval as ``step`` begins.

    >>> [s for s in range(0, 30_001) if is_adapt_step(s)]
    [100, 1000, 10000, 20000, 30000]
    """
    return step in ADAPT_AT or (step >= ADAPT_PERIOD and step % ADAPT_PERIOD == 0)


@dataclass
class Schedule:
    """Which steps are measured, and the budget's bookkeeping. ``every=None``: the defaults."""

    every: Optional[int] = None
    histogram_every: Optional[int] = DEFAULT_HISTOGRAM_EVERY
    budget: Optional[float] = None
    dense: int = field(init=False)
    choices: Tuple[int, ...] = field(init=False)
    plain: Deque[float] = field(init=False, default_factory=lambda: deque(maxlen=256))
    measured_times: Deque[float] = field(init=False, default_factory=lambda: deque(maxlen=64))
    over_budget: Optional[float] = field(init=False, default=None)  # share of step time at the ceiling

    def __post_init__(self) -> None:
        if self.every is None:
            self.every, self.dense = DEFAULT_EVERY, DENSE_STEPS
            self.budget = DEFAULT_BUDGET if self.budget is None else self.budget
        else:
            self.dense = 0
        self.choices = intervals(self.every)

    def measures(self, step: int) -> bool:
        return step < self.dense or step % self.every == 0 or (
            self.histogram_every is not None and step % self.histogram_every == 0)  # (histograms, inline)

    def histograms(self, step: int) -> bool:
        return self.histogram_every is not None and step % self.histogram_every == 0

    def record(self, seconds: float, measured: bool, step: int) -> None:
        """The duration of a finished step (step 0 carries one-time costs and is left out)."""
        if step > 0:
            (self.measured_times if measured else self.plain).append(seconds)

    def adapt(self, step: int, own_seconds: float = 0.0) -> Optional[int]:
        """At an adaptation step, the interval the budget asks for (None: no change to make).
        ``own_seconds``: gradwatch's own timed work per measured step, used when no plain step
        was timed (``every=1``)."""
        if self.budget is None or not is_adapt_step(step) or len(self.measured_times) < 2:
            return None
        measured = statistics.median(self.measured_times)
        if len(self.plain) >= 3:
            plain = statistics.median(self.plain)
            extra = max(measured - plain, 0.0)
        else:  # (gradwatch's own time is part of the measured step: at most most of it)
            extra = min(own_seconds, 0.9 * measured)
            plain = measured - extra
        every = choose_interval(self.choices, extra, plain, self.budget)
        share = extra / every / max(plain, 1e-9)
        self.over_budget = share if share > self.budget else None
        return every if every != self.every else None
