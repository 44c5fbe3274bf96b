"""Vanishing gradients: the first layers get orders of magnitude less gradient per weight than the last.

With ``optimizer=``, not reported while the optimizer's steps keep up (:func:`updates_keep_up`).
Judged by the best-fed layer of the first quarter of the depth (see :func:`.traits.depth`), named
at the first layer, whose own ratio is the finding's value. Must hold on ``flow_window``
measured steps in a row (the judge's persistence).
"""

from __future__ import annotations

import math
from typing import Iterable, List, Optional

from ..config import Thresholds
from ..report import Finding, FindingKind, StepStats
from .traits import Traits, Weighted, depth, traits
from .words import listed, names, sentence


def advice(t: Traits) -> str:
    """What the model lacks: a ReLU-family activation (if it has sigmoid/tanh layers),
    normalisation of the kind that fits (if it has none), residual connections (not for
    transformers), an initialisation that matches the activation."""
    tips = []
    if t.squashing:
        tips.append(f"replace the sigmoid/tanh activations ({names(t.squashing)}) with a ReLU-family one "
                    f"(ReLU, LeakyReLU, GELU)")
    if not t.normalised:
        tips.append(f"add normalisation ({t.norm_layer})")
    if not t.attention:
        tips.append("add residual connections")
    tips.append("use an initialisation that matches the activation (Kaiming for ReLU-family"
                + (", Xavier for sigmoid/tanh)" if t.squashing else ")"))
    return sentence(tips)


def vanishing(stats: StepStats, thresholds: Thresholds, t: Optional[Traits] = None,
              zero_init: Iterable[str] = (), *, weighted: Optional[List[Weighted]] = None) -> List[Finding]:
    """The first layers' gradient per weight (RMS) over the last layer's is below ``vanishing_ratio``.
    A zero gradient blocked by a layer that is still zero, or by dead units (their own finding), is not."""
    d = depth(stats, zero_init, weighted=weighted)
    if d is None or d.last.rms <= 0:
        return []
    judged = d.early.rms / d.last.rms
    if not judged < thresholds.vanishing_ratio:
        return []
    if updates_keep_up(stats, d.early.name, d.last.name, thresholds):
        return []  # an adaptive optimizer's steps: the early layers learn as fast, whatever their gradient
    if judged == 0 and (any(w.zero or w.name in d.skipped for w in d.every) or any(
            ls.zero_fraction == 1.0 and ls.dead_fraction is not None for ls in stats.layers.values())):
        return []
    value = d.first.rms / d.last.rms  # the named layer's own ratio
    weak = [w.name for w in d.layers[:-1] if w.rms < thresholds.vanishing_ratio * d.last.rms]
    if judged == 0:
        what = "No gradient at all reaches the first layer (a layer in between passes none, e.g. dead units)"
    else:
        what = f"The gradient per weight of the first layer is {value:.1e} x that of the last layer ({d.last.name})"
        if d.early is not d.first:
            what += f"; the best-fed of the first layers, {d.early.name}, gets {judged:.1e} x"
    return [Finding(FindingKind.VANISHING, d.first.name, stats.step, value, thresholds.vanishing_ratio,
                    f"{what}; below the threshold: {listed(weak, stats)}. Early layers barely learn.",
                    advice(t or traits(stats)), "depth")]


def updates_keep_up(stats: StepStats, early: str, last: str, thresholds: Thresholds) -> bool:
    """With ``optimizer=``: the early layer's update-to-weight ratio is at least ``vanishing_ratio``
    times the last layer's. Adam and its kin scale each weight's step by its own gradient history,
    so early layers with a small gradient per weight may learn as fast as the last one (a tiny BERT
    from a config: gradients per weight 1e-4 of the classifier's, update ratios alike). Under SGD
    the update ratios fall with the gradients, and the finding stands."""
    a, b = (stats.layers[n].update_ratio if n in stats.layers else None for n in (early, last))
    return a is not None and b is not None and math.isfinite(a) and b > 0 and a >= thresholds.vanishing_ratio * b
