"""Dead units: most of a layer's units gave no non-zero output on any sample of the dead-unit window.

Judged only once the window is full: one batch in which a unit stayed at zero proves little.
"""

from __future__ import annotations

from typing import List

from ..config import Thresholds
from ..report import Finding, FindingKind, StepStats

ADVICE = ("Try LeakyReLU/ELU, a lower learning rate, and check initialisation and biases "
          "(a large negative bias switches units off).")


def dead_units(stats: StepStats, thresholds: Thresholds, dead_window: int = 1) -> List[Finding]:
    """Each call site whose ``dead_fraction`` is over the threshold, with ``dead_window`` batches seen."""
    out = []
    for ls in stats.layers.values():
        frac = ls.dead_fraction
        if frac is not None and ls.dead_window >= dead_window and frac > thresholds.dead_fraction:
            out.append(Finding(
                FindingKind.DEAD_UNITS, ls.name, stats.step, frac, thresholds.dead_fraction,
                f"{frac:.0%} of {ls.type} units produced no non-zero output on any sample of the last "
                f"{ls.dead_window} logged batch(es); they pass no gradient and no longer learn.", ADVICE))
    return out
