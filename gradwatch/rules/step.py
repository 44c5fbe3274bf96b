"""One measured step: which conditions hold, from that step's numbers alone.

Within a step, a non-finite forward is the root and nothing else is judged; non-finite gradients
alone leave the forward's findings standing; saturated activations that explain a vanishing
gradient are one saturation finding, which mentions it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable, List, Optional, Sequence

from ..config import Thresholds
from ..report import Finding, FindingKind, StepStats
from .attention_collapse import attention_collapse
from .dead_units import dead_units
from .exploding import across_depth, jump, size
from .fp16_overflow import fp16_overflow
from .learning_rate import learning_rate
from .non_finite import non_finite
from .saturation import saturation
from .traits import Weighted, traits, weighted_layers
from .vanishing import vanishing


def evaluate(stats: StepStats, thresholds: Thresholds, history: Sequence[float] = (),
             dead_window: int = 1, zero_init: Iterable[str] = (), *,
             weighted: Optional[List[Weighted]] = None, scaler: bool = False) -> List[Finding]:
    """The conditions that hold at one measured step. ``history``: global gradient norms of
    earlier measured steps; ``dead_window``: measured batches a dead-unit verdict must cover;
    ``zero_init``: layers that started at zero (not compared for gradient flow); ``weighted``:
    ``weighted_layers(stats)``, when the caller has it already; ``scaler``: a loss scaler was given."""
    t = traits(stats)
    weighted = weighted_layers(stats) if weighted is None else weighted
    root = non_finite(stats)
    if root and root[0].condition != "backward":  # everything below is only its consequence
        return root
    sat = saturation(stats, thresholds, t)
    findings = sat + dead_units(stats, thresholds, dead_window) + fp16_overflow(stats, thresholds, scaler)
    if root:  # gradients alone are non-finite: the forward's findings stand, the gradients' do not
        return root + findings
    flow = (vanishing(stats, thresholds, t, zero_init, weighted=weighted)
            + across_depth(stats, thresholds, t, zero_init, weighted=weighted))
    if sat and flow and flow[0].kind is FindingKind.VANISHING:
        # Saturated activations are why the gradient vanishes: one finding, at the cause.
        v = flow[0]
        findings = [replace(f, message=f"{f.message} Gradients reaching {v.layer} are {v.value:.1e} x the "
                                       f"last layer's.") for f in sat] + findings[len(sat):]
        flow = []
    return (findings + flow + size(stats, thresholds, weighted=weighted)
            + jump(stats, thresholds, history, weighted=weighted)
            + learning_rate(stats, thresholds) + attention_collapse(stats, thresholds))
