"""Saturation: a large share of a layer's outputs sit where the activation is flat.

The model's output activation is left out: its loss compensates the flat ends (a sigmoid
head with BCE, a softmax with cross-entropy).
"""

from __future__ import annotations

from typing import List, Optional

from ..config import Thresholds
from ..report import Finding, FindingKind, StepStats
from .traits import Traits, output_activations, traits
from .words import sentence


def advice(t: Traits) -> str:
    tips = ["scale the inputs and initial weights down so the pre-activations stay in the active range"]
    if not t.normalised:
        tips.append(f"normalise the pre-activations ({t.norm_layer})")
    tips.append("use a ReLU-family activation (ReLU, LeakyReLU, GELU)")
    return sentence(tips)


def saturation(stats: StepStats, thresholds: Thresholds, t: Optional[Traits] = None) -> List[Finding]:
    """Each call site whose ``saturated_fraction`` is over the threshold, but the output activation."""
    heads = output_activations(stats)
    tips = advice(t or traits(stats))
    out = []
    for ls in stats.layers.values():
        frac = ls.saturated_fraction
        if frac is not None and frac > thresholds.saturated_fraction and ls.name not in heads:
            how = ("within {:.1%} of its output bounds".format(thresholds.saturation_margin)
                   if ls.saturation_method == "bounds"
                   else "where the local slope is below {:.0%} of its peak".format(thresholds.saturation_slope))
            out.append(Finding(FindingKind.SATURATION, ls.name, stats.step, frac, thresholds.saturated_fraction,
                               f"{frac:.0%} of {ls.type} outputs are saturated ({how}); little gradient passes "
                               f"through them.", tips))
    return out
