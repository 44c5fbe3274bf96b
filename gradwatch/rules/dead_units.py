"""Dead units: most of a layer's units passed no gradient on any sample of the dead-unit window.

A rectifier's (ReLU's) unit is dead when it gave no non-zero output; a smooth rectifier's (GELU,
SiLU, Mish, ELU, Softplus, ...) when its pre-activation stayed below the flat side's cut-off
(``LayerStats.dead_cutoff``), where its slope is under ``saturation_slope`` of the peak: its output
there is not exactly zero (SiLU(-20) = -4e-8), but no gradient to speak of passes.
Judged only once the window is full: one batch in which a unit stayed off proves little.
"""

from __future__ import annotations

from typing import List

from ..config import Thresholds
from ..report import Finding, FindingKind, LayerStats, StepStats

ADVICE = ("Try LeakyReLU/ELU, a lower learning rate, and check initialisation and biases "
          "(a large negative bias switches units off).")
SMOOTH_ADVICE = ("Check initialisation and biases (a large negative bias pushes units far onto the flat side), "
                 "normalise the pre-activations (BatchNorm or LayerNorm before the activation), try a lower "
                 "learning rate, or LeakyReLU, whose negative slope never fades.")


def dead_units(stats: StepStats, thresholds: Thresholds, dead_window: int = 1) -> List[Finding]:
    """Each call site whose ``dead_fraction`` is over the threshold, with ``dead_window`` batches seen."""
    out = []
    for ls in stats.layers.values():
        frac = ls.dead_fraction
        if frac is not None and ls.dead_window >= dead_window and frac > thresholds.dead_fraction:
            out.append(Finding(FindingKind.DEAD_UNITS, ls.name, stats.step, frac, thresholds.dead_fraction,
                               _message(ls, frac, thresholds), ADVICE if ls.dead_cutoff is None else SMOOTH_ADVICE))
    return out


def _message(ls: LayerStats, frac: float, thresholds: Thresholds) -> str:
    if ls.dead_cutoff is None:
        return (f"{frac:.0%} of {ls.type} units produced no non-zero output on any sample of the last "
                f"{ls.dead_window} logged batch(es); they pass no gradient and no longer learn.")
    return (f"{frac:.0%} of {ls.type} units passed almost no gradient on any sample of the last "
            f"{ls.dead_window} logged batch(es): their pre-activation stayed below {ls.dead_cutoff:.3g} "
            f"(where the slope is under {thresholds.saturation_slope:.0%} of its peak) on every sample; "
            f"they no longer learn.")
