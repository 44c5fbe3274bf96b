"""Exploding gradients, three ways:

* ``depth``: the gradient per weight grows from the last layer back to the first by more than
  ``exploding_ratio`` -- each layer amplifies it. Named at the early layer the value is from.
* ``size``: the global gradient norm is over ``exploding_norm``. Named at the first layer (the
  value is the whole model's); the message names the layer with the largest gradient norm.
* ``jump``: the global norm is ``jump_factor`` times its running median (a corrupt batch, a
  loss spike). An event: reported at its step, once, and said when it clears. Named as ``size``.

``depth`` and ``size`` must hold on ``flow_window`` measured steps in a row (the judge's
persistence). The gradient the optimizer applied is judged when known (after a loss scaler's
unscaling and clipping), else the gradient at the end of backward.
"""

from __future__ import annotations

import math
import statistics
from typing import Iterable, List, Optional, Sequence, Tuple

from ..config import Thresholds
from ..report import Finding, FindingKind, StepStats
from .traits import Traits, Weighted, depth, traits, weighted_layers
from .words import sentence

JUMP_HISTORY = 3
"""Earlier measured steps a running median needs before a jump over it is judged."""

_SIZE_ADVICE = ("Clip gradients (torch.nn.utils.clip_grad_norm_) or lower the learning rate; with a GradScaler "
                "pass it as GradWatch(..., scaler=scaler) so that gradients are read unscaled.")
_JUMP_ADVICE = ("Look at the batch of this step (corrupt or unnormalised inputs, extreme labels or loss values); "
                "gradient clipping (torch.nn.utils.clip_grad_norm_) keeps one such batch from throwing the "
                "weights off.")


def advice(t: Traits) -> str:
    """A smaller initialisation, normalisation if the model has none, gradient clipping."""
    tips = ["scale the initialisation down (Kaiming for ReLU-family, Xavier for sigmoid/tanh)" if t.squashing
            else "scale the initialisation down (Kaiming)"]
    if not t.normalised:
        tips.append(f"add normalisation ({t.norm_layer})")
    tips.append("clip gradients with torch.nn.utils.clip_grad_norm_")
    return sentence(tips)


def across_depth(stats: StepStats, thresholds: Thresholds, t: Optional[Traits] = None,
                 zero_init: Iterable[str] = (), *, weighted: Optional[List[Weighted]] = None) -> List[Finding]:
    """The early layers' gradient per weight over the last layer's is above ``exploding_ratio``."""
    d = depth(stats, zero_init, weighted=weighted)
    if d is None or d.last.rms <= 0:
        return []
    ratio = d.early.rms / d.last.rms
    if not ratio > thresholds.exploding_ratio:
        return []
    where = "the first layer" if d.early is d.first else d.early.name
    return [Finding(FindingKind.EXPLODING, d.early.name, stats.step, ratio, thresholds.exploding_ratio,
                    f"The gradient per weight grows {ratio:.1e} x from the last layer ({d.last.name}) back to "
                    f"{where}: each layer amplifies the gradient.", advice(t or traits(stats)), "depth")]


def _total(stats: StepStats) -> Tuple[Optional[float], str]:
    applied = stats.total_applied_grad_norm
    if applied is not None:
        return applied, "applied gradient"
    return stats.total_grad_norm, "gradient"


def _where(stats: StepStats, weighted: Optional[List[Weighted]]) -> Tuple[str, str]:
    """The first weighted layer, where the finding is named, and a clause saying so, which layer
    has the largest gradient norm, and where the forward's activations leave unit scale when they
    do (the gradient grows with the activations feeding it)."""
    layers = [w for w in (weighted_layers(stats) if weighted is None else weighted) if math.isfinite(w.norm)]
    if not layers:
        return "", ""
    top = max(layers, key=lambda w: w.norm)
    total = math.sqrt(sum(w.norm ** 2 for w in layers))
    clause = (f"named at the first layer; the largest gradient is {top.name}'s (norm {top.norm:.3g} of "
              f"{total:.3g})")
    grown = [w.name for w in layers if w.name in stats.layers and stats.layers[w.name].std > 10]
    if grown:
        clause += (f"; the activations exceed unit scale from {grown[0]} on "
                   f"(output std {stats.layers[grown[0]].std:.3g})")
    return layers[0].name, clause


def size(stats: StepStats, thresholds: Thresholds, *, weighted: Optional[List[Weighted]] = None) -> List[Finding]:
    """The global gradient norm is over ``exploding_norm``."""
    total, what = _total(stats)
    if total is None or not math.isfinite(total) or not total > thresholds.exploding_norm:
        return []
    layer, clause = _where(stats, weighted)
    return [Finding(FindingKind.EXPLODING, layer, stats.step, total, thresholds.exploding_norm,
                    f"Global {what} norm is {total:.3g} (bound {thresholds.exploding_norm:.3g}); {clause}.",
                    _SIZE_ADVICE, "size")]


def jump(stats: StepStats, thresholds: Thresholds, history: Sequence[float], *,
         weighted: Optional[List[Weighted]] = None) -> List[Finding]:
    """The global gradient norm is over ``jump_factor`` times the median of the earlier measured
    steps in ``history`` (at least :data:`JUMP_HISTORY` of them)."""
    total, what = _total(stats)
    recent = [h for h in history if math.isfinite(h) and h > 0]
    if total is None or not math.isfinite(total) or len(recent) < JUMP_HISTORY:
        return []
    base = statistics.median(recent)
    if not total > thresholds.jump_factor * base:
        return []
    layer, clause = _where(stats, weighted)
    return [Finding(FindingKind.EXPLODING, layer, stats.step, total / base, thresholds.jump_factor,
                    f"Global {what} norm jumped {total / base:.3g} x over its running median ({base:.3g} -> "
                    f"{total:.3g}) at this step; {clause}.", _JUMP_ADVICE, "jump")]
