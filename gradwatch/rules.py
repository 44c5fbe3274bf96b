"""Rules: plain numbers + thresholds -> findings. Pure; no tensors, hooks or output.

Each rule names the layer, the measured value and the threshold, says in one line
what it means, and suggests what to try next.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Deque, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from .config import Thresholds
from .report import Finding, FindingKind, ParamStats, StepStats

_SATURATING_ADVICE = ("Try a ReLU-family activation (ReLU, LeakyReLU, ELU), normalise the pre-activations "
                      "(BatchNorm/LayerNorm), or scale the inputs and initial weights down.")


def evaluate(stats: StepStats, thresholds: Thresholds, history: Sequence[float] = (),
             dead_window: int = 1) -> List[Finding]:
    """All findings for one logging step. ``history``: global gradient norms of earlier logging
    steps; ``dead_window``: logged batches a dead-unit verdict must cover before it is reported."""
    findings: List[Finding] = []
    findings += non_finite(stats)
    findings += saturation(stats, thresholds)
    findings += dead_units(stats, thresholds, dead_window)
    findings += gradient_flow(stats, thresholds)
    findings += gradient_size(stats, thresholds, history)
    findings += learning_rate(stats, thresholds)
    findings += attention_collapse(stats, thresholds)
    return findings


def non_finite(stats: StepStats) -> List[Finding]:
    """The first place a NaN/Inf appeared: activations in forward order, then activation
    gradients in the order backward produced them, then parameter gradients."""
    step = stats.step
    advice = ("Look at what feeds this layer: log/sqrt/division of non-positive values, a learning rate "
              "that is too high, or fp16 overflow; torch.autograd.detect_anomaly() can then name the op.")
    for ls in stats.layers.values():
        if ls.nonfinite:
            return [Finding(FindingKind.NON_FINITE, ls.name, step, math.nan, 0.0,
                            "Non-finite activation values (NaN/Inf) first appear in this layer's output, "
                            "in forward order.", advice)]
    for name in stats.backward_order:
        ls = stats.layers.get(name)
        if ls is not None and ls.output_grad_nonfinite:
            return [Finding(FindingKind.NON_FINITE, name, step, math.nan, 0.0,
                            "Non-finite gradient (NaN/Inf) first appears at this layer's output during backward.",
                            advice)]
    for ps in stats.params.values():
        if ps.nonfinite:
            return [Finding(FindingKind.NON_FINITE, ps.layer, step, ps.grad_norm, 0.0,
                            f"Gradient of {ps.name} is non-finite (norm {ps.grad_norm}).", advice)]
    return []


def saturation(stats: StepStats, thresholds: Thresholds) -> List[Finding]:
    out = []
    for ls in stats.layers.values():
        frac = ls.saturated_fraction
        if frac is not None and frac > thresholds.saturated_fraction:
            how = ("within {:.1%} of its output bounds".format(thresholds.saturation_margin)
                   if ls.saturation_method == "bounds"
                   else "where the local slope is below {:.0%} of its peak".format(thresholds.saturation_slope))
            out.append(Finding(FindingKind.SATURATION, ls.name, stats.step, frac, thresholds.saturated_fraction,
                               f"{frac:.0%} of {ls.type} outputs are saturated ({how}); little gradient passes "
                               f"through them.", _SATURATING_ADVICE))
    return out


def dead_units(stats: StepStats, thresholds: Thresholds, dead_window: int = 1) -> List[Finding]:
    """Only once the window is full: one batch in which a unit stayed at zero proves little."""
    out = []
    for ls in stats.layers.values():
        frac = ls.dead_fraction
        if frac is not None and ls.dead_window >= dead_window and frac > thresholds.dead_fraction:
            out.append(Finding(
                FindingKind.DEAD_UNITS, ls.name, stats.step, frac, thresholds.dead_fraction,
                f"{frac:.0%} of {ls.type} units produced no non-zero output on any sample of the last "
                f"{ls.dead_window} logged batch(es); they pass no gradient and no longer learn.",
                "Try LeakyReLU/ELU, a lower learning rate, and check initialisation and biases "
                "(a large negative bias switches units off)."))
    return out


def _weighted_layers(stats: StepStats) -> List[Tuple[str, float]]:
    """(layer, parameter-gradient norm) for layers with trainable parameters, in forward order."""
    norms: Dict[str, float] = {}
    for ps in stats.params.values():
        norms[ps.layer] = norms.get(ps.layer, 0.0) + ps.grad_norm ** 2
    ordered = [n for n in stats.layers if n in norms] + [n for n in norms if n not in stats.layers]
    return [(n, math.sqrt(norms[n])) for n in ordered]


def gradient_flow(stats: StepStats, thresholds: Thresholds) -> List[Finding]:
    """Vanishing / exploding across depth: first weighted layer's gradient norm over the last's."""
    layers = [(n, g) for n, g in _weighted_layers(stats) if math.isfinite(g)]
    if len(layers) < 2:
        return []
    (first, g_first), (last, g_last) = layers[0], layers[-1]
    if g_last <= 0:
        return []
    ratio = g_first / g_last
    if ratio < thresholds.vanishing_ratio:
        weak = [n for n, g in layers[:-1] if g < thresholds.vanishing_ratio * g_last]
        what = ("No gradient at all reaches the first layer (a layer in between passes none, e.g. dead units)"
                if ratio == 0 else f"Gradient norm of the first layer is {ratio:.1e} x that of the last layer")
        return [Finding(FindingKind.VANISHING, first, stats.step, ratio, thresholds.vanishing_ratio,
                        f"{what} ({last}); layers below the threshold: {', '.join(weak)}. Early layers barely learn.",
                        "Use a ReLU-family activation instead of sigmoid/tanh, add normalisation or residual "
                        "connections, and use a matching initialisation (Kaiming for ReLU, Xavier for tanh).")]
    if ratio > thresholds.exploding_ratio:
        return [Finding(FindingKind.EXPLODING, first, stats.step, ratio, thresholds.exploding_ratio,
                        f"Gradient norm grows {ratio:.1e} x from the last layer ({last}) back to the first: "
                        f"each layer amplifies the gradient.",
                        "Scale the initialisation down (Kaiming/Xavier), add normalisation, and clip gradients "
                        "with torch.nn.utils.clip_grad_norm_.")]
    return []


def gradient_size(stats: StepStats, thresholds: Thresholds, history: Sequence[float]) -> List[Finding]:
    """Exploding in size: the global norm passes a bound, or jumps over its recent median."""
    total = stats.total_grad_norm
    if total is None or not math.isfinite(total):
        return []
    largest = max(stats.params.values(), key=lambda p: p.grad_norm if math.isfinite(p.grad_norm) else -1.0)
    advice = ("Clip gradients (torch.nn.utils.clip_grad_norm_), lower the learning rate, or add normalisation; "
              "check the loss scale.")
    if total > thresholds.exploding_norm:
        return [Finding(FindingKind.EXPLODING, largest.layer, stats.step, total, thresholds.exploding_norm,
                        f"Global gradient norm is {total:.3g} (bound {thresholds.exploding_norm:.3g}); the largest "
                        f"is {largest.name} at {largest.grad_norm:.3g}.", advice)]
    recent = [h for h in history if math.isfinite(h) and h > 0]
    if recent:
        base = statistics.median(recent)
        if total > thresholds.jump_factor * base:
            return [Finding(FindingKind.EXPLODING, largest.layer, stats.step, total / base, thresholds.jump_factor,
                            f"Global gradient norm jumped {total / base:.3g} x over its recent median "
                            f"({base:.3g} -> {total:.3g}).", advice)]
    return []


class Judge:
    """Findings over a run: :func:`evaluate` per measured step, with the recent gradient norms
    it needs, and only the findings that are new (see :class:`Debouncer`)."""

    def __init__(self, thresholds: Thresholds, dead_window: int) -> None:
        self.thresholds = thresholds
        self.dead_window = dead_window
        self.history: Deque[float] = deque(maxlen=5)
        self.debouncer = Debouncer()

    def new_findings(self, stats: StepStats) -> List[Finding]:
        findings = evaluate(stats, self.thresholds, list(self.history), self.dead_window)
        if stats.total_grad_norm is not None:
            self.history.append(stats.total_grad_norm)
        return self.debouncer.new(findings)


class Debouncer:
    """One warning per (kind, layer) until the condition clears at a later logging step."""

    def __init__(self) -> None:
        self._active: Set[Tuple[FindingKind, str]] = set()

    def new(self, findings: Iterable[Finding]) -> List[Finding]:
        findings = list(findings)
        keys = {(f.kind, f.layer) for f in findings}
        fresh = [f for f in findings if (f.kind, f.layer) not in self._active]
        # A (kind, layer) that did not fire this time has cleared and may warn again later.
        self._active = keys
        return fresh


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
    (param group), on the first layer concerned, naming the weights and their ratios."""
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
            FindingKind.LEARNING_RATE, found[0][0].layer, stats.step, value, high,
            f"Optimizer steps change weights by a large share of their size (‖Δw‖/‖w‖ of {worst.name} "
            f"{how}; around 1e-3 is typical): {shown}{more}. The weights are rewritten rather than refined.",
            f"The {_lr_text([e[0] for e in found])} is too high for these layers: lower it (about "
            f"{value / 1e-3:.0f}x would bring the ratio near 1e-3), add learning-rate warm-up, or give these "
            f"layers a smaller rate in their own param group."))
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


_ATTENTION_ADVICE = ("Bound the logits: normalise queries and keys (QK-norm) or scale the logits down; use "
                     "learning-rate warm-up, and a lower learning rate (or weight decay) for the attention's "
                     "query/key projections.")


def attention_collapse(stats: StepStats, thresholds: Thresholds) -> List[Finding]:
    """Entropy collapse: more than ``attention_saturated_fraction`` of an attention layer's sampled
    queries put over 0.99 of their weight on one key; the heads doing so are named."""
    limit = thresholds.attention_saturated_fraction
    out = []
    for ls in stats.layers.values():
        frac = ls.attention_saturated_fraction
        if frac is None or not frac > limit:
            continue
        heads = [i for i, h in enumerate(ls.attention_heads or [])
                 if h.get("saturated_fraction") is not None and h["saturated_fraction"] > limit]
        which = (f"heads {', '.join(map(str, heads))} of {len(ls.attention_heads or [])}" if heads
                 else "its heads together")
        entropy = ("" if ls.attention_entropy_normalised is None
                   else f", entropy {ls.attention_entropy_normalised:.2f} of the uniform")
        logit = "" if ls.attention_max_logit is None else f", largest logit {ls.attention_max_logit:.3g}"
        out.append(Finding(
            FindingKind.ATTENTION_COLLAPSE, ls.name, stats.step, frac, limit,
            f"{frac:.0%} of the sampled queries attend to a single key (weight > 0.99) in {which}"
            f"{entropy}{logit}: the softmax is saturated and passes almost no gradient to queries and keys.",
            _ATTENTION_ADVICE))
    return out
