"""A learning rate that is too high, two ways:

* ``ratio`` (with ``optimizer=``): a weight's update-to-weight ratio ``‖Δw‖/‖w‖`` stays at or above
  ``update_ratio_high`` over ``update_window`` measured steps, or reaches ten times that in one step;
* ``updates`` (the blow-up): a weighted layer's weight norm grows ``blowup_growth`` times or more
  within ``blowup_steps`` steps. Each layer is judged by its own growth, so that one large layer
  (an embedding at PyTorch's std-1 init) cannot hide the others. A root cause: what follows from
  it is not reported while it lasts (the judge).

Too small updates are a note, not a warning (:func:`update_floor_note`).
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..config import Thresholds
from ..report import Finding, FindingKind, ParamStats, StepStats
from .words import names

Snapshot = Tuple[int, Dict[str, float]]  # a measured step and its layers' weight norms

BLOWUP_ADVICE = ("Lower the learning rate (try 10x lower), add a warm-up, or clip gradients "
                 "(torch.nn.utils.clip_grad_norm_); findings that follow from it are not reported while it lasts.")


def _judged_updates(stats: StepStats, thresholds: Thresholds) -> List[ParamStats]:
    """Weight matrices and kernels (ndim >= 2) with a full window of update ratios, in a group with a
    non-zero learning rate. Biases and norm scales are left out: starting at zero or one, their
    ratios say little about the learning rate (a zero-initialised bias has a large ratio at first)."""
    return [ps for ps in stats.params.values()
            if ps.ndim >= 2 and ps.update_window >= thresholds.update_window and ps.learning_rate != 0
            and ps.update_ratio_min is not None and ps.update_ratio_max is not None]


def _lr_text(params: Sequence[ParamStats]) -> str:
    lrs = sorted({ps.learning_rate for ps in params if ps.learning_rate is not None})
    return "learning rate " + ", ".join(f"{lr:g}" for lr in lrs) if lrs else "the learning rate"


def learning_rate(stats: StepStats, thresholds: Thresholds) -> List[Finding]:
    """Updates as large as the weights: a weight's update-to-weight ratio ``‖Δw‖/‖w‖`` stayed at or
    above ``update_ratio_high`` over the last ``update_window`` measured steps, or reached ten times
    that in one step (by default 1: one step moved the weight by more than its own size -- a blow-up
    that saturates or breaks the network before any window fills). One finding per learning rate
    (param group), named at the layer of the weight with the largest ratio (the value), listing the others."""
    high = thresholds.update_ratio_high
    by_lr: Dict[Optional[float], List[Tuple[ParamStats, float, bool]]] = {}
    for ps in stats.params.values():
        if ps.ndim < 2 or ps.learning_rate == 0 or ps.update_ratio_min is None or ps.update_ratio is None:
            continue  # not judged (see _judged_updates); update_ratio_min is None for zero-initialised weights
        if ps.update_window >= thresholds.update_window and ps.update_ratio_min >= high:
            by_lr.setdefault(ps.learning_rate, []).append((ps, ps.update_ratio_min, True))
        elif math.isfinite(ps.update_ratio) and ps.update_ratio >= 10 * high:
            by_lr.setdefault(ps.learning_rate, []).append((ps, ps.update_ratio, False))
    out = []
    for found in by_lr.values():
        ranked = sorted(found, key=lambda e: -e[1])
        worst, value, held = ranked[0]
        how = (f"at least {value:.2g} over the last {worst.update_window} measured steps" if held
               else f"{value:.2g} in one step, over 10x the threshold")
        shown = ", ".join(f"{ps.name} {v:.2g}" for ps, v, _ in ranked[:5])
        more = f" and {len(ranked) - 5} more" if len(ranked) > 5 else ""
        out.append(Finding(
            FindingKind.LEARNING_RATE, worst.layer, stats.step, value, high,
            f"Optimizer steps change weights by a large share of their size (‖Δw‖/‖w‖ of {worst.name} "
            f"{how}; around 1e-3 is typical): {shown}{more}. The weights are rewritten rather than refined.",
            f"The {_lr_text([e[0] for e in found])} is too high for these layers: lower it (about "
            f"{value / 1e-3:.0f}x would bring the ratio near 1e-3), add learning-rate warm-up, or give these "
            f"layers a smaller rate in their own param group.", "ratio"))
    return out


def update_floor_note(stats: StepStats, thresholds: Thresholds) -> Optional[str]:
    """A note, not a warning: most weights' update ratios stayed at or below ``update_ratio_low``
    over the last ``update_window`` measured steps -- the layers barely learn (a learning rate too
    low, or training that has stalled)."""
    judged = _judged_updates(stats, thresholds)
    low = [ps for ps in judged if ps.update_ratio_max <= thresholds.update_ratio_low]  # type: ignore[operator]
    if not judged or 2 * len(low) <= len(judged):
        return None
    top = max(low, key=lambda p: p.update_ratio_max)  # type: ignore[arg-type, return-value]
    layers = sorted({ps.layer for ps in low})
    shown = ", ".join(layers[:5]) + (f" and {len(layers) - 5} more" if len(layers) > 5 else "")
    return (f"gradwatch: from step {stats.step} on, optimizer steps change {len(low)} of {len(judged)} weight "
            f"tensors by at most {thresholds.update_ratio_low:g} of their size over {thresholds.update_window} "
            f"measured steps (largest: {top.name}, {top.update_ratio_max:.2g}) in {shown}: with the "
            f"{_lr_text(low)} these layers barely learn; raise it, or check the optimizer holds them.")


def weight_norms(stats: StepStats, skip: Iterable[str] = ()) -> Dict[str, float]:
    """Per layer, the L2 norm of its trainable parameters (``skip``: zero-initialised layers)."""
    skip = set(skip)
    sq: Dict[str, float] = {}
    for ps in stats.params.values():
        if ps.layer not in skip:
            sq[ps.layer] = sq.get(ps.layer, 0.0) + ps.weight_norm ** 2
    return {n: math.sqrt(v) for n, v in sq.items()}


def blowup(earlier: Sequence[Snapshot], now: Snapshot, thresholds: Thresholds) -> List[Finding]:
    """A learning-rate blow-up: some layer's weight norm is ``blowup_growth`` times or more its
    smallest value at the ``earlier`` measured steps at most ``blowup_steps`` before ``now`` --
    the updates outgrow the weights they update. Named at the layer that grew fastest.

    >>> t = Thresholds()
    >>> [f.layer for f in blowup([(0, {"emb": 50.0, "a": 1.0, "b": 1.0})], (3, {"emb": 50.0, "a": 1.2, "b": 3.0}), t)]
    ['b']
    """
    s1, w1 = now
    growth: Dict[str, Tuple[float, int, float]] = {}  # layer -> (growth, from step, from norm)
    for name, value in w1.items():
        base = [(w[name], s) for s, w in earlier
                if 0 < s1 - s <= thresholds.blowup_steps and w.get(name, 0.0) > 0]
        if base and math.isfinite(value):
            w0, s0 = min(base)
            growth[name] = (value / w0, s0, w0)
    grown = sorted((n for n, g in growth.items() if g[0] >= thresholds.blowup_growth), key=lambda n: -growth[n][0])
    if not grown:
        return []
    fastest = grown[0]
    g, s0, w0 = growth[fastest]
    others = ""
    if len(grown) > 1:
        low = min(growth[n][0] for n in grown)
        others = f"; {len(grown)} layers grew {low:.1f} x or more: {names(grown)}"
    return [Finding(FindingKind.LEARNING_RATE, fastest, s1, g, thresholds.blowup_growth,
                    f"The weights of {fastest} grew {g:.1f} x in {s1 - s0} step(s) ({w0:.3g} -> {w1[fastest]:.3g})"
                    f"{others}: the updates outgrow the weights they change, which is a learning rate that is "
                    f"too high, not the model's layers.", BLOWUP_ADVICE, "updates")]
