"""Rules: plain numbers + thresholds -> findings. Pure; no tensors, hooks or output.

Two stages. :func:`evaluate` says which conditions hold at one measured step, from that
step's numbers alone; :class:`Judge` turns them into findings over a run: a gradient-flow
condition must persist, a layer that started at zero is not a vanishing gradient, a root
cause (non-finite values, a learning-rate blow-up) is reported once and what only follows
from it is not, and each condition is reported once while it lasts.

Each finding names the layer, the measured value and the threshold, says in one line what
it means, and suggests what to try next -- advice that fits the model's own layers.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable, Deque, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from .config import Thresholds
from .report import Finding, FindingKind, ParamStats, StepStats

# Conditions of the whole model: one finding each, whichever layer it names at the moment.
_GLOBAL = {"depth", "size", "jump", "updates"}
_PERSISTENT = {"depth", "size", "jump"}  # must hold on `flow_window` measured steps in a row
_FOLLOW_ONS = {FindingKind.DEAD_UNITS, FindingKind.SATURATION, FindingKind.VANISHING}
SCALER_BACKOFF_STEPS = 32
"""Steps a GradScaler needs to back off from any usual scale (each skipped step halves it:
32 steps take 2**16 down to 2**-16); non-finite gradients alone that last longer are real."""


# ---------------------------------------------------------------- what the model is made of
@dataclass(frozen=True)
class Traits:
    """The layer types of a model, as far as advice needs them (from ``LayerStats.type``)."""

    squashing: Tuple[str, ...] = ()  # sigmoid/tanh-like activations, by layer name
    normalised: bool = False
    attention: bool = False
    convolutional: bool = False
    recurrent: bool = False

    @property
    def norm_layer(self) -> str:
        if self.attention or self.recurrent:
            return "LayerNorm"
        return "BatchNorm" if self.convolutional else "BatchNorm or LayerNorm"


def traits(stats: StepStats) -> Traits:
    # The same layers come back at every measured step: worked out once per set of layers.
    return _traits(tuple((name, ls.type) for name, ls in stats.layers.items()))


@functools.lru_cache(maxsize=16)
def _traits(layers: Tuple[Tuple[str, str], ...]) -> Traits:
    types = {name: type_name.lower() for name, type_name in layers}
    return Traits(
        squashing=tuple(n for n, t in types.items()
                        if any(k in t for k in ("sigmoid", "tanh", "softsign")) and "shrink" not in t),
        normalised=any("norm" in t for t in types.values()),
        attention=any(any(k in text for k in ("attention", "attn", "transformer"))
                      for text in list(types.values()) + [n.lower() for n in types]),
        convolutional=any("conv" in t for t in types.values()),
        recurrent=any(t in ("lstm", "gru", "rnn") or "lstm" in t or "gru" in t for t in types.values()))


def names(items: Sequence[str], limit: int = 3) -> str:
    """``conv1, layer1.0.conv1, layer1.0.conv2 and 14 more``."""
    items = list(items)
    if len(items) <= limit + 1:
        return ", ".join(items)
    return f"{', '.join(items[:limit])} and {len(items) - limit} more"


def count(n: int, what: str) -> str:
    """``8 layers (Linear)``."""
    return f"{n} layer{'s' if n != 1 else ''} ({what})"


def _listed(layers: Sequence[str], stats: StepStats) -> str:
    """``fc1`` or ``3 layers (Linear): fc1, fc2, fc3`` -- long lists shortened."""
    if len(layers) == 1:
        return layers[0]
    types = sorted({stats.layers[n].type for n in layers if n in stats.layers})
    return f"{count(len(layers), ', '.join(types) or 'parameters')}: {names(layers)}"


def _flow_advice(t: Traits, exploding: bool) -> str:
    tips = []
    if exploding:
        tips.append("scale the initialisation down (Kaiming for ReLU-family, Xavier for sigmoid/tanh)"
                    if t.squashing else "scale the initialisation down (Kaiming)")
    elif t.squashing:
        tips.append(f"replace the sigmoid/tanh activations ({names(t.squashing)}) with a ReLU-family one "
                    f"(ReLU, LeakyReLU, GELU)")
    if not t.normalised:
        tips.append(f"add normalisation ({t.norm_layer})")
    if not exploding and not t.attention:
        tips.append("add residual connections")
    if exploding:
        tips.append("clip gradients with torch.nn.utils.clip_grad_norm_")
    else:
        tips.append("use an initialisation that matches the activation (Kaiming for ReLU-family"
                    + (", Xavier for sigmoid/tanh)" if t.squashing else ")"))
    return _sentence(tips)


def _sentence(tips: List[str]) -> str:
    text = tips[0] if len(tips) == 1 else ", ".join(tips[:-1]) + " and " + tips[-1]
    return text[0].upper() + text[1:] + "."


# ---------------------------------------------------------------- one step
def evaluate(stats: StepStats, thresholds: Thresholds, history: Sequence[float] = (),
             dead_window: int = 1, zero_init: Iterable[str] = (), *,
             weighted: Optional[List[_Weighted]] = None) -> List[Finding]:
    """The conditions that hold at one logging step. ``history``: global gradient norms of
    earlier logging steps; ``dead_window``: logged batches a dead-unit verdict must cover;
    ``zero_init``: layers that started at zero (not compared for gradient flow); ``weighted``:
    ``weighted_layers(stats)``, when the caller has it already."""
    t = traits(stats)
    weighted = weighted_layers(stats) if weighted is None else weighted
    root = non_finite(stats)
    if root and root[0].condition != "backward":  # everything below is only its consequence
        return root
    sat = saturation(stats, thresholds, t)
    findings = sat + dead_units(stats, thresholds, dead_window)
    if root:  # gradients alone are non-finite: the forward's findings stand, the gradients' do not
        return root + findings
    flow = gradient_flow(stats, thresholds, t, zero_init, weighted=weighted)
    if sat and flow and flow[0].kind is FindingKind.VANISHING:
        # Saturated activations are why the gradient vanishes: one finding, at the cause.
        v = flow[0]
        findings = [replace(f, message=f"{f.message} Gradients reaching {v.layer} are {v.value:.1e} x the "
                                       f"last layer's.") for f in sat] + findings[len(sat):]
        flow = []
    return (findings + flow + gradient_size(stats, thresholds, history, weighted=weighted)
            + learning_rate(stats, thresholds)
            + attention_collapse(stats, thresholds))


def non_finite(stats: StepStats) -> List[Finding]:
    """The first place a NaN/Inf appeared: activations in forward order, then activation
    gradients in the order backward produced them, then parameter gradients. Condition
    ``forward`` (or ``weights`` when the layer's own weights are already non-finite: a bad
    update was applied at an earlier step) or ``backward`` (gradients only; a loss scaler
    skips such a step and recovers)."""
    step = stats.step
    advice = ("Look at what feeds this layer: log/sqrt/division of non-positive values, a learning rate "
              "that is too high, or fp16 overflow; torch.autograd.detect_anomaly() can then name the op.")
    bad_weights = {ps.layer for ps in stats.params.values() if not math.isfinite(ps.weight_norm)}
    for ls in stats.layers.values():
        if ls.nonfinite:
            if ls.name in bad_weights:
                return [Finding(FindingKind.NON_FINITE, ls.name, step, math.nan, 0.0,
                                "Non-finite values (NaN/Inf) first appear in this layer's output, in forward "
                                "order: its weights are already non-finite, so a non-finite update was applied "
                                "at an earlier, unmeasured step.", advice + " Measure every step (every=1) to "
                                "see where it starts.", "weights")]
            return [Finding(FindingKind.NON_FINITE, ls.name, step, math.nan, 0.0,
                            "Non-finite activation values (NaN/Inf) first appear in this layer's output, "
                            "in forward order.", advice, "forward")]
    for name in stats.backward_order:
        ls = stats.layers.get(name)
        if ls is not None and ls.output_grad_nonfinite:
            return [Finding(FindingKind.NON_FINITE, name, step, math.nan, 0.0,
                            "Non-finite gradient (NaN/Inf) first appears at this layer's output during backward.",
                            advice, "backward")]
    for ps in stats.params.values():
        if ps.nonfinite:
            return [Finding(FindingKind.NON_FINITE, ps.layer, step, ps.grad_norm, 0.0,
                            f"Gradient of {ps.name} is non-finite (norm {ps.grad_norm}).", advice, "backward")]
    return []


def output_activations(stats: StepStats) -> Set[str]:
    """Layers after the last layer with parameters, in forward order: the model's output
    activation (a sigmoid head with BCE, a softmax with cross-entropy), compensated by its loss."""
    owners = {ps.layer for ps in stats.params.values()}
    order = list(stats.layers)
    last = max((i for i, n in enumerate(order) if n in owners), default=-1)
    return set(order[last + 1:]) if last >= 0 else set()


def saturation(stats: StepStats, thresholds: Thresholds, t: Optional[Traits] = None) -> List[Finding]:
    t = t or traits(stats)
    heads = output_activations(stats)
    tips = ["scale the inputs and initial weights down so the pre-activations stay in the active range"]
    if not t.normalised:
        tips.append(f"normalise the pre-activations ({t.norm_layer})")
    tips.append("use a ReLU-family activation (ReLU, LeakyReLU, GELU)")
    out = []
    for ls in stats.layers.values():
        frac = ls.saturated_fraction
        if frac is not None and frac > thresholds.saturated_fraction and ls.name not in heads:
            how = ("within {:.1%} of its output bounds".format(thresholds.saturation_margin)
                   if ls.saturation_method == "bounds"
                   else "where the local slope is below {:.0%} of its peak".format(thresholds.saturation_slope))
            out.append(Finding(FindingKind.SATURATION, ls.name, stats.step, frac, thresholds.saturated_fraction,
                               f"{frac:.0%} of {ls.type} outputs are saturated ({how}); little gradient passes "
                               f"through them.", _sentence(tips)))
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


@dataclass(frozen=True)
class _Weighted:
    name: str
    rms: float  # gradient RMS per parameter element
    zero: bool  # its largest parameter is all zeros now (a zero-initialised head or adapter)


def weighted_layers(stats: StepStats) -> List[_Weighted]:
    """Layers with trainable parameters, in forward order, with their per-element gradient
    scale: sqrt(sum of squared gradient norms / number of elements)."""
    sq: Dict[str, float] = {}
    numel: Dict[str, int] = {}
    largest: Dict[str, Tuple[int, float]] = {}
    for ps in stats.params.values():
        sq[ps.layer] = sq.get(ps.layer, 0.0) + ps.grad_norm ** 2
        numel[ps.layer] = numel.get(ps.layer, 0) + max(ps.numel, 1)
        if ps.numel > largest.get(ps.layer, (-1, 0.0))[0]:
            largest[ps.layer] = (ps.numel, ps.weight_norm)
    ordered = [n for n in stats.layers if n in sq] + [n for n in sq if n not in stats.layers]
    return [_Weighted(n, math.sqrt(sq[n] / numel[n]), largest[n][1] == 0) for n in ordered]


def _compared(stats: StepStats) -> Set[str]:
    """Layers whose per-element gradient scale says something about depth: not embeddings
    (only the rows of the tokens seen get a gradient) and not normalisation layers."""
    return {n for n, ls in stats.layers.items()
            if "embedding" not in ls.type.lower() and "norm" not in ls.type.lower()}


def gradient_flow(stats: StepStats, thresholds: Thresholds, t: Optional[Traits] = None,
                  zero_init: Iterable[str] = (), *, weighted: Optional[List[_Weighted]] = None) -> List[Finding]:
    """Vanishing / exploding across depth: the first weighted layer's per-element gradient
    scale over the last's. Zero-initialised layers are left out: everything below one has a
    zero gradient at first, by design."""
    t = t or traits(stats)
    skip = set(zero_init)
    compared = _compared(stats)
    every = [w for w in (weighted_layers(stats) if weighted is None else weighted) if math.isfinite(w.rms)]
    layers = [w for w in every if w.name not in skip and not w.zero and (w.name in compared
                                                                        or w.name not in stats.layers)]
    if len(layers) < 2:
        return []
    # The early layers: the first quarter of the depth, by their best-fed layer -- one layer
    # whose gradient is small by design (an attention query or key at initialisation, behind a
    # softmax that is still flat) is not the network failing to pass gradient down.
    early = layers[:max(1, (len(layers) - 1) // 4)]
    best, first, last = max(early, key=lambda w: w.rms), layers[0], layers[-1]
    if last.rms <= 0:
        return []
    ratio = best.rms / last.rms
    if ratio < thresholds.vanishing_ratio and _updates_keep_up(stats, best.name, last.name, thresholds):
        return []  # an adaptive optimizer's steps: the early layers learn as fast, whatever their gradient
    if ratio < thresholds.vanishing_ratio:
        if ratio == 0 and (any(w.zero or w.name in skip for w in every) or any(
                ls.zero_fraction == 1.0 and ls.dead_fraction is not None for ls in stats.layers.values())):
            return []  # blocked by a layer that is still zero, or by dead units (their own finding)
        weak = [w.name for w in layers[:-1] if w.rms < thresholds.vanishing_ratio * last.rms]
        what = ("No gradient at all reaches the first layer (a layer in between passes none, e.g. dead units)"
                if ratio == 0 else
                f"The gradient per weight of the first layer is {ratio:.1e} x that of the last layer"
                if best is first else
                f"The gradient per weight of the first layers (at most in {best.name}) is {ratio:.1e} x that "
                f"of the last layer")
        return [Finding(FindingKind.VANISHING, first.name, stats.step, ratio, thresholds.vanishing_ratio,
                        f"{what} ({last.name}); below the threshold: {_listed(weak, stats)}. Early layers "
                        f"barely learn.",
                        _flow_advice(t, exploding=False), "depth")]
    if ratio > thresholds.exploding_ratio:
        return [Finding(FindingKind.EXPLODING, first.name, stats.step, ratio, thresholds.exploding_ratio,
                        f"The gradient per weight grows {ratio:.1e} x from the last layer ({last.name}) back to "
                        f"the first: each layer amplifies the gradient.", _flow_advice(t, exploding=True), "depth")]
    return []


def _updates_keep_up(stats: StepStats, early: str, last: str, thresholds: Thresholds) -> bool:
    """With ``optimizer=``: the early layer's update-to-weight ratio is at least ``vanishing_ratio``
    times the last layer's. Adam and its kin scale each weight's step by its own gradient history,
    so early layers with a small gradient per weight may learn as fast as the last one (the tiny
    BERT from a config: gradients per weight 1e-4 of the classifier's, update ratios the same)."""
    a, b = (stats.layers[n].update_ratio if n in stats.layers else None for n in (early, last))
    return a is not None and b is not None and math.isfinite(a) and b > 0 and a >= thresholds.vanishing_ratio * b


def gradient_size(stats: StepStats, thresholds: Thresholds, history: Sequence[float], *,
                  weighted: Optional[List[_Weighted]] = None) -> List[Finding]:
    """Exploding in size: the global norm passes a bound, or jumps over its recent median. The
    gradient the optimizer applied is used when known (after a loss scaler's unscaling and
    clipping); otherwise the gradient at the end of backward."""
    applied = stats.total_applied_grad_norm
    total = applied if applied is not None else stats.total_grad_norm
    if total is None or not math.isfinite(total):
        return []
    layers = [w for w in (weighted_layers(stats) if weighted is None else weighted) if math.isfinite(w.rms)]
    top = max((w.rms for w in layers), default=0.0)
    # Named: where the forward activations leave unit scale, when the gradient is largest at the
    # output end (it grows with the activations feeding it); else the first layer, in forward
    # order, whose gradient per weight is near the largest.
    grown = [w.name for w in layers if w.name in stats.layers and stats.layers[w.name].std > 10]
    if layers and layers[-1].rms == top and grown:
        largest = grown[0]
        where = f"the activations exceed unit scale from {largest} on (output std {stats.layers[largest].std:.3g})"
    else:
        largest = next((w.name for w in layers if w.rms >= 0.1 * top), "")
        where = f"from {largest} on the gradient per weight is within 10x of its largest"
    what = "applied gradient" if applied is not None else "gradient"
    advice = ("Clip gradients (torch.nn.utils.clip_grad_norm_) or lower the learning rate; with a GradScaler "
              "pass it as GradWatch(..., scaler=scaler) so that gradients are read unscaled.")
    if total > thresholds.exploding_norm:
        return [Finding(FindingKind.EXPLODING, largest, stats.step, total, thresholds.exploding_norm,
                        f"Global {what} norm is {total:.3g} (bound {thresholds.exploding_norm:.3g}); {where}.",
                        advice, "size")]
    recent = [h for h in history if math.isfinite(h) and h > 0]
    if recent:
        base = statistics.median(recent)
        if total > thresholds.jump_factor * base:
            return [Finding(FindingKind.EXPLODING, largest, stats.step, total / base, thresholds.jump_factor,
                            f"Global {what} norm jumped {total / base:.3g} x over its recent median "
                            f"({base:.3g} -> {total:.3g}).", advice, "jump")]
    return []


def weight_norms(stats: StepStats, skip: Iterable[str] = ()) -> Dict[str, float]:
    """Per layer, the L2 norm of its trainable parameters (``skip``: zero-initialised layers)."""
    skip = set(skip)
    sq: Dict[str, float] = {}
    for ps in stats.params.values():
        if ps.layer not in skip:
            sq[ps.layer] = sq.get(ps.layer, 0.0) + ps.weight_norm ** 2
    return {n: math.sqrt(v) for n, v in sq.items()}


def blowup(before: Tuple[int, Dict[str, float]], now: Tuple[int, Dict[str, float]],
           thresholds: Thresholds) -> List[Finding]:
    """A learning-rate blow-up: the weights grew by ``blowup_growth`` or more between two
    measured steps at most ``blowup_steps`` apart (or turned non-finite after growing) --
    the updates outgrow the weights they update.

    >>> t = Thresholds()
    >>> [f.layer for f in blowup((0, {"a": 1.0, "b": 1.0}), (5, {"a": 1.2, "b": 9.0}), t)]
    ['b']
    """
    (s0, w0), (s1, w1) = before, now
    common = [n for n in w1 if n in w0 and w0[n] > 0]
    if not common or s1 <= s0 or s1 - s0 > thresholds.blowup_steps:
        return []
    total0 = math.sqrt(sum(w0[n] ** 2 for n in common))
    total1 = math.sqrt(sum(w1[n] ** 2 for n in common))
    growth = total1 / total0 if math.isfinite(total1) else math.inf
    if growth < thresholds.blowup_growth:
        return []
    fastest = max(common, key=lambda n: w1[n] / w0[n] if math.isfinite(w1[n]) else math.inf)
    grew = ("turned non-finite" if not math.isfinite(growth) else
            f"grew {growth:.1f} x ({total0:.3g} -> {total1:.3g}; fastest {fastest}, {w1[fastest] / w0[fastest]:.1f} x)")
    return [Finding(FindingKind.LEARNING_RATE, fastest, s1, growth, thresholds.blowup_growth,
                    f"The weights {grew} in {s1 - s0} step(s): the updates outgrow the weights they change, "
                    f"which is a learning rate that is too high, not the model's layers.",
                    "Lower the learning rate (try 10x lower), add a warm-up, or clip gradients "
                    "(torch.nn.utils.clip_grad_norm_); findings that follow from it are not reported.",
                    "updates")]


# ---------------------------------------------------------------- over a run
def finding_key(f: Finding) -> Tuple[FindingKind, str]:
    """What makes two findings the same condition: the layer for per-layer conditions; the
    rule for whole-model ones (their layer moves); one root for non-finite values."""
    if f.kind is FindingKind.NON_FINITE:
        return (f.kind, "")
    return (f.kind, f.condition) if f.condition in _GLOBAL else (f.kind, f.layer)


class Judge:
    """Findings over a run: :func:`evaluate` per measured step, then

    * vanishing/exploding only once they held on ``flow_window`` measured steps in a row (or
      on every measured step of a run that ends sooner);
    * layers whose largest parameter was all zeros when first seen (a fine-tuning head,
      LoRA's B, a zero-initialised residual branch) are left out of the gradient-flow
      comparison;
    * non-finite gradients alone (the forward and the weights are finite) are what a loss
      scaler skips and recovers from: reported once they outlast its back-off
      (:data:`SCALER_BACKOFF_STEPS`), or reach the weights;
    * a root cause -- non-finite values, a learning-rate blow-up -- is reported once, and
      dead units, saturation and vanishing gradients that only follow from it are not;
    * each condition is reported once while it lasts; ``note`` hears when one clears;
    * a global gradient norm over the bound counts when it is the gradient the optimizer
      applied, or ``unscaled()`` says no loss scaler multiplied it (no half-precision outputs,
      or the scaler was given); otherwise only the blow-up rule judges sizes, by the updates.
    """

    def __init__(self, thresholds: Thresholds, dead_window: int,
                 note: Callable[[str], None] = lambda text: None,
                 unscaled: Callable[[], object] = lambda: True) -> None:
        self.thresholds = thresholds
        self.unscaled = unscaled  # whether gradients at the end of backward are known to be unscaled
        self.dead_window = dead_window
        self.history: Deque[float] = deque(maxlen=5)
        self.note = note
        self.zero_init: Set[str] = set()
        self._seen: Set[str] = set()
        self._measured = 0
        self._streak: Dict[Tuple[FindingKind, str], int] = {}
        self._active: Dict[Tuple[FindingKind, str], Finding] = {}
        self._weights: Deque[Tuple[int, Dict[str, float]]] = deque()
        self._unapplied: Optional[Finding] = None  # non-finite gradients alone, first seen
        self._unapplied_streak = 0
        self._root: Optional[Finding] = None  # non-finite values or a learning-rate blow-up
        self._said_after_blowup = False
        self._slow_said = False  # the note on too small updates is said once a run

    def new_findings(self, stats: StepStats, final: bool = False) -> List[Finding]:
        """The findings that are new at this measured step (``final``: the run's last)."""
        self._measured += 1
        slow = None if self._slow_said else update_floor_note(stats, self.thresholds)
        if slow is not None:  # updates too small to learn: a note, not a warning
            self._slow_said = True
            self.note(slow)
        weighted = weighted_layers(stats)
        for w in weighted:
            if w.name not in self._seen and w.zero:
                self.zero_init.add(w.name)
            self._seen.add(w.name)
        conditions = evaluate(stats, self.thresholds, list(self.history), self.dead_window, self.zero_init,
                              weighted=weighted)
        conditions = self._learning_rate(stats) + conditions
        conditions = self._non_finite(stats, conditions)
        if self._root is not None:
            conditions = [c for c in conditions if c.kind not in _FOLLOW_ONS]
        size = any(c.condition in ("size", "jump") for c in conditions)
        total = stats.total_applied_grad_norm or stats.total_grad_norm
        if total is not None and not size:  # a sustained explosion must not become the new normal
            self.history.append(total)
        return self._debounce(stats.step, self._persisting(conditions, final, stats))

    def _learning_rate(self, stats: StepStats) -> List[Finding]:
        now = (stats.step, weight_norms(stats, self.zero_init))
        if not all(math.isfinite(v) for v in now[1].values()):
            return []  # non-finite weights: the non-finite rule names where they came from
        while self._weights and now[0] - self._weights[0][0] > self.thresholds.blowup_steps:
            self._weights.popleft()
        found: List[Finding] = []
        if self._weights and self._root is None:
            smallest = min(self._weights, key=lambda e: sum(v * v for v in e[1].values()))
            found = blowup(smallest, now, self.thresholds)
        self._weights.append(now)
        if found:
            self._root = found[0]
        return found

    def _non_finite(self, stats: StepStats, conditions: List[Finding]) -> List[Finding]:
        bad = [c for c in conditions if c.kind is FindingKind.NON_FINITE]
        rest = [c for c in conditions if c.kind is not FindingKind.NON_FINITE]
        blown = self._root is not None and self._root.condition == "updates"  # a learning-rate blow-up
        if not bad:
            if self._unapplied is not None:
                self.note(f"gradwatch: non-finite gradients at step {self._unapplied.step} were not "
                          f"applied (a loss scaler skipped the step) and did not recur.")
            self._unapplied, self._unapplied_streak = None, 0
            if not blown:
                self._root = None  # values are finite again: what follows is judged on its own
            return rest
        f = bad[0]
        if blown:
            if not self._said_after_blowup:
                self._said_after_blowup = True
                self.note(f"gradwatch: values turned non-finite at step {stats.step} ({f.layer}), after "
                          f"the learning-rate blow-up reported at step {self._root.step}.")  # type: ignore
            return rest
        if f.condition == "backward":
            # Gradients alone, the forward and the weights finite: a GradScaler skips such a step
            # and halves its scale. Only what outlasts its whole back-off is a finding.
            self._unapplied = self._unapplied or f
            self._unapplied_streak += 1
            if (self._unapplied_streak < self.thresholds.flow_window
                    or stats.step - self._unapplied.step < SCALER_BACKOFF_STEPS):
                return rest
            f = self._unapplied
        elif self._unapplied is not None:
            f = self._unapplied  # the gradients that went bad first were applied after all: the root
        self._unapplied, self._unapplied_streak = None, 0
        self._root = f
        return [f] + rest

    def _persisting(self, conditions: List[Finding], final: bool, stats: StepStats) -> List[Finding]:
        applied = stats.total_applied_grad_norm
        out = []
        holding = set()
        for c in conditions:
            if c.condition not in _PERSISTENT:
                out.append(c)
                continue
            key = finding_key(c)
            holding.add(key)
            n = self._streak[key] = self._streak.get(key, 0) + 1
            if c.condition == "size" and applied is None and not self.unscaled():
                # Half precision, and only the gradient at the end of backward is known: a GradScaler
                # may have multiplied it. Its size is not evidence; the blow-up rule watches the updates.
                continue
            if n >= self.thresholds.flow_window or (final and n == self._measured) or key in self._active:
                out.append(c)
        for key in [k for k in self._streak if k not in holding]:
            del self._streak[key]
        return out

    def _debounce(self, step: int, findings: List[Finding]) -> List[Finding]:
        keys = {finding_key(f): f for f in findings}
        for key, old in list(self._active.items()):
            if key not in keys:
                del self._active[key]
                if old.kind is FindingKind.EXPLODING and old.condition != "updates":
                    self.note(f"gradwatch: exploding gradients ({old.layer}, since step {old.step}) "
                              f"cleared at step {step}.")
        fresh = []
        for key, f in keys.items():
            if key not in self._active:
                fresh.append(f)
                self._active[key] = f
        return fresh


class Debouncer:
    """One warning per condition (see :func:`finding_key`) until it clears at a later logging step."""

    def __init__(self) -> None:
        self._active: Set[Tuple[FindingKind, str]] = set()

    def new(self, findings: Iterable[Finding]) -> List[Finding]:
        findings = list(findings)
        keys = {finding_key(f) for f in findings}
        fresh = [f for f in findings if finding_key(f) not in self._active]
        # A condition that did not fire this time has cleared and may warn again later.
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
