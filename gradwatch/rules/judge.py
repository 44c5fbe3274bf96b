"""Findings over a run: the conditions of each measured step (:func:`.step.evaluate`), judged over time.

* **Steps with gradient data.** A measured step without parameter gradients (a forward with
  no backward) judges nothing about gradients: it neither extends nor breaks a streak, does not
  clear a gradient finding, and is not one of "all measured steps" at the end of a run.
* **Persistence.** Vanishing and exploding across depth, and the gradient norm's bound, must hold
  on ``flow_window`` measured steps with gradients in a row (or on every one of a run that ends
  sooner). A jump over the running median is an event: reported at its step.
* **Zero-initialised layers** (a fine-tuning head, LoRA's B, a zero-initialised residual branch)
  are left out of the gradient-flow comparison.
* **Root causes.** Non-finite values and a learning-rate blow-up are reported once; dead units,
  saturation, vanishing and exploding gradients are not reported while the cause lasts (values
  non-finite, weights still growing). What outlasts it is reported, linked to it; the running
  median of the gradient norm starts afresh.
* **Loss scalers.** Non-finite gradients alone are what a GradScaler skips and backs off from:
  where a scaler is given or half precision is in use, they are reported only once they outlast
  its back-off (:data:`SCALER_BACKOFF_STEPS`) or reach the weights; elsewhere at their step.
* **Per module.** Rows are per call site; one module's call sites make one finding.
* **Once per condition.** Each condition is reported once while it lasts, and clears once it has
  been absent on ``flow_window`` measured steps in a row (a spike at once), so a share hovering at
  its threshold is one finding; ``note`` hears when a gradient explosion or spike clears.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable, Deque, Dict, List, Optional, Set, Tuple

from ..config import Thresholds
from ..noise_scale import batch_note
from ..report import Finding, FindingKind, StepStats
from .learning_rate import Snapshot, blowup, update_floor_note, weight_norms
from .registry import KINDS
from .step import evaluate
from .traits import module_of, weighted_layers
from .words import percent_range

SCALER_BACKOFF_STEPS = 32
"""Steps a GradScaler needs to back off from any usual scale (each skipped step halves it:
32 steps take 2**16 down to 2**-16); non-finite gradients alone that last longer are real."""

Key = Tuple[FindingKind, str]
_GRADIENT = {"depth", "size", "jump"}  # conditions judged only on steps with gradient data
_GLOBAL = _GRADIENT | {"updates", "ratio"}  # conditions of the whole model: one finding each
_PERSISTENT = {"depth", "size"}
# What a root cause brings with it: held while it lasts (a blow-up's gradients are huge too).
_FOLLOW_ONS = {FindingKind.DEAD_UNITS, FindingKind.SATURATION, FindingKind.VANISHING, FindingKind.EXPLODING}
_PER_SITE = {FindingKind.DEAD_UNITS, FindingKind.SATURATION, FindingKind.ATTENTION_COLLAPSE}


def finding_key(f: Finding) -> Key:
    """What makes two findings the same condition: the module for per-layer conditions (its call
    sites are one condition); the rule for whole-model ones (their layer moves); one root for
    non-finite values."""
    if f.kind is FindingKind.NON_FINITE:
        return (f.kind, "")
    return (f.kind, f.condition) if f.condition in _GLOBAL else (f.kind, module_of(f.layer))


def group_sites(findings: List[Finding], stats: StepStats) -> List[Finding]:
    """One finding per module and kind: a module called at several places of a forward (an
    unrolled recurrent cell, a shared ReLU) has a row per call site, but one finding, named at the
    module, giving how many of its sites and which range of shares; a single site keeps its name."""
    groups: Dict[Key, List[Finding]] = {}
    order: List[object] = []
    for f in findings:
        if f.kind in _PER_SITE:
            key = (f.kind, module_of(f.layer))
            if key not in groups:
                order.append(key)
            groups.setdefault(key, []).append(f)
        else:
            order.append(f)
    out = []
    for item in order:
        if isinstance(item, Finding):
            out.append(item)
            continue
        sites = groups[item]  # type: ignore[index]
        if len(sites) == 1:
            out.append(sites[0])
            continue
        kind, module = item  # type: ignore[misc]
        worst = max(sites, key=lambda f: f.value)
        calls = sum(1 for name in stats.layers if module_of(name) == module)
        out.append(replace(worst, layer=module, message=(
            f"{len(sites)} of {calls} call sites, {percent_range([f.value for f in sites])} "
            f"{KINDS[kind].share}; the most at {worst.layer}: {worst.message}")))
    return out


@dataclass
class _Onset:
    step: int
    index: int  # the measured step's number in the run (1, 2, ...)


class Judge:
    """Findings over a run (see the module's docstring).

    ``unscaled()`` says whether gradients at the end of backward are known to be unscaled (no
    half-precision outputs, or the scaler was given): otherwise a gradient's size is only judged
    from what ``optimizer=`` applies. ``scaler()`` says whether a loss scaler may be skipping
    steps (one was given, or half precision is in use); ``scaler_given()``, whether one was given.
    """

    def __init__(self, thresholds: Thresholds, dead_window: int,
                 note: Callable[[str], None] = lambda text: None,
                 unscaled: Callable[[], object] = lambda: True,
                 scaler: Callable[[], object] = lambda: False,
                 scaler_given: Callable[[], object] = lambda: False) -> None:
        self.thresholds = thresholds
        self.dead_window = dead_window
        self.note = note
        self.unscaled = unscaled
        self.scaler = scaler
        self.scaler_given = scaler_given
        self.history: Deque[float] = deque(maxlen=5)  # global gradient norms, for the running median
        self.zero_init: Set[str] = set()
        self._seen: Set[str] = set()
        self._measured = 0
        self._gradient_steps = 0  # measured steps with gradient data
        self._streak: Dict[Key, int] = {}
        self._pending: Dict[Key, Finding] = {}  # persistent conditions at the last step with gradients
        self._active: Dict[Key, Finding] = {}
        self._absent: Dict[Key, int] = {}  # measured steps in a row an active condition has not held
        self._onset: Dict[Key, _Onset] = {}  # when each condition began to hold, reported or not
        self._weights: Deque[Snapshot] = deque()
        self._unapplied: Optional[Finding] = None  # non-finite gradients alone, first seen
        self._unapplied_streak = 0
        self._cause: Optional[Finding] = None  # non-finite values or a learning-rate blow-up, while it lasts
        self._ended: List[Tuple[Finding, int]] = []  # earlier causes, and the measured step they ended at
        self._said_after_blowup = False
        self._slow_said = False  # the note on too small updates is said once a run
        self._batch_said = False  # and the one on a batch far below the gradient noise scale

    def new_findings(self, stats: StepStats, final: bool = False) -> List[Finding]:
        """The findings that are new at this measured step (``final``: the run's last)."""
        self._measured += 1
        grads = bool(stats.params)
        self._gradient_steps += grads
        slow = None if self._slow_said else update_floor_note(stats, self.thresholds)
        if slow is not None:  # updates too small to learn: a note, not a warning
            self._slow_said = True
            self.note(slow)
        small = None if self._batch_said else batch_note(stats)
        if small is not None:
            self._batch_said = True
            self.note(small)
        weighted = weighted_layers(stats)
        for w in weighted:
            if w.name not in self._seen and w.zero:
                self.zero_init.add(w.name)
            self._seen.add(w.name)
        conditions = evaluate(stats, self.thresholds, list(self.history), self.dead_window, self.zero_init,
                              weighted=weighted, scaler=bool(self.scaler_given()))
        if stats.total_applied_grad_norm is None and not self.unscaled():
            # Half precision, and only the gradient at the end of backward is known: a GradScaler may
            # have multiplied it. Its size is no evidence; the blow-up rule watches the updates.
            conditions = [c for c in conditions if c.condition not in ("size", "jump")]
        blow = self._blowup(stats)
        conditions = group_sites(self._causes(stats.step, (blow or []) + conditions, blow), stats)
        unjudged = self._unjudged(stats, grads, blow)
        self._track_onsets(stats.step, conditions, unjudged)
        total = stats.total_applied_grad_norm or stats.total_grad_norm
        if total is not None and not any(c.condition in ("size", "jump") for c in conditions):
            self.history.append(total)  # a spike or a sustained explosion must not become the new normal
        conditions = self._persisting(conditions, final, grads)
        held = {k for k in self._active if k in unjudged}
        if self._cause is not None:  # what follows from it is neither reported nor cleared while it lasts
            held |= {k for k in list(self._active) + [finding_key(c) for c in conditions] if k[0] in _FOLLOW_ONS}
            conditions = [c for c in conditions if c.kind not in _FOLLOW_ONS]
        return self._debounce(stats.step, conditions, held)

    def at_end(self) -> List[Finding]:
        """The run ended after its last measured step (the step running at the end was not
        measured): a persistent condition that held on every measured step with gradients, too few
        of them to make ``flow_window``, is judged on them all, as a final measured step judges it."""
        due = [c for k, c in self._pending.items() if self._streak.get(k) == self._gradient_steps]
        if not due:
            return []
        return self._debounce(max(c.step for c in due), due, set(self._active))

    # ------------------------------------------------------------ root causes
    def _blowup(self, stats: StepStats) -> Optional[List[Finding]]:
        """The blow-up condition at this step; None where it cannot be judged (no gradient data,
        or non-finite weights: the non-finite rule names where they came from)."""
        if not stats.params:
            return None
        now = (stats.step, weight_norms(stats, self.zero_init))
        if not all(math.isfinite(v) for v in now[1].values()):
            return None
        while self._weights and now[0] - self._weights[0][0] > self.thresholds.blowup_steps:
            self._weights.popleft()
        found = blowup(list(self._weights), now, self.thresholds)
        self._weights.append(now)
        return found

    def _causes(self, step: int, conditions: List[Finding], blow: Optional[List[Finding]]) -> List[Finding]:
        """Start and end root causes; non-finite values that follow a blow-up, or that a loss scaler
        skips, are not findings."""
        bad = [c for c in conditions if c.kind is FindingKind.NON_FINITE]
        rest = [c for c in conditions if c.kind is not FindingKind.NON_FINITE]
        cause = self._cause
        if cause is not None and not bad and (cause.kind is FindingKind.NON_FINITE or blow == []):
            self._end_cause()  # values finite again, or the weights stopped growing
        if self._cause is None and blow:
            self._cause = blow[0]
        if self._cause is not None and self._cause.condition == "updates":
            if bad and not self._said_after_blowup:
                self._said_after_blowup = True
                self.note(f"gradwatch: values turned non-finite at step {step} ({bad[0].layer}), after the "
                          f"learning-rate blow-up reported at step {self._cause.step}.")
            return rest
        rest = [c for c in rest if c.condition != "updates"]  # growth of non-finite weights says nothing
        if not bad:
            if self._unapplied is not None:
                self.note(f"gradwatch: non-finite gradients at step {self._unapplied.step} were not "
                          f"applied (a loss scaler skipped the step) and did not recur.")
            self._unapplied, self._unapplied_streak = None, 0
            return rest
        f = bad[0]
        if f.condition == "backward" and self._cause is None and self.scaler():
            # Gradients alone, the forward and the weights finite: a GradScaler skips such a step
            # and halves its scale. Only what outlasts its whole back-off is a finding.
            self._unapplied = self._unapplied or f
            self._unapplied_streak += 1
            if (self._unapplied_streak < self.thresholds.flow_window
                    or step - self._unapplied.step < SCALER_BACKOFF_STEPS):
                return rest
            f = self._unapplied
        elif self._unapplied is not None:
            f = self._unapplied  # the gradients that went bad first were applied after all: the root
        self._unapplied, self._unapplied_streak = None, 0
        if self._cause is None:
            self._cause = f
        return [self._cause] + rest

    def _end_cause(self) -> None:
        self._ended.append((self._cause, self._measured))  # type: ignore[arg-type]
        self._cause, self._said_after_blowup = None, False
        self.history.clear()  # the gradient's running median starts afresh from the run as it is now

    def _linked(self, key: Key, f: Finding) -> Finding:
        """A consequence that outlasted its cause, named with it: it began during the cause (or
        within a dead-unit window after it, the time the verdict takes)."""
        onset = self._onset.get(key)
        if f.kind not in _FOLLOW_ONS or onset is None:
            return f
        for cause, ended in reversed(self._ended):
            slack = self.thresholds.blowup_steps if cause.condition == "updates" else 0
            if cause.step - slack <= onset.step and onset.index <= ended + self.dead_window + self.thresholds.flow_window:
                what = ("the learning-rate blow-up" if cause.condition == "updates"
                        else "the non-finite values")
                return replace(f, message=f"{f.message} This holds since step {onset.step}, after {what} at "
                                          f"step {cause.step} ({cause.layer}): lasting damage from it.")
        return f

    # ------------------------------------------------------------ over time
    def _unjudged(self, stats: StepStats, grads: bool, blow: Optional[List[Finding]]) -> Set[Key]:
        """Conditions this step says nothing about: gradient ones on a step without gradient data,
        a layer's when the layer was not called."""
        modules = {module_of(n) for n in stats.layers}
        attention = {module_of(n) for n, ls in stats.layers.items() if ls.attention_saturated_fraction is not None}
        ratios = any(ps.update_ratio is not None for ps in stats.params.values())
        out = set()
        for key in set(self._active) | set(self._onset):
            kind, what = key
            if kind is FindingKind.NON_FINITE:
                judged = True
            elif what in _GRADIENT:
                judged = grads
            elif what == "updates":
                judged = blow is not None
            elif what == "ratio":
                judged = ratios
            elif kind is FindingKind.ATTENTION_COLLAPSE:
                judged = what in attention
            else:
                judged = what in modules
            if not judged:
                out.add(key)
        return out

    def _track_onsets(self, step: int, conditions: List[Finding], unjudged: Set[Key]) -> None:
        holding = {finding_key(c) for c in conditions}
        for key in holding:
            self._onset.setdefault(key, _Onset(step, self._measured))
        for key in [k for k in self._onset if k not in holding and k not in unjudged]:
            del self._onset[key]

    def _persisting(self, conditions: List[Finding], final: bool, grads: bool) -> List[Finding]:
        """Persistent conditions once they held on ``flow_window`` steps with gradients in a row."""
        if not grads:  # streaks neither grow nor break; at the end, what held on every gradient step is due
            due = [c for k, c in self._pending.items() if final and self._streak.get(k) == self._gradient_steps]
            return [c for c in conditions if c.condition not in _PERSISTENT] + due
        out, holding = [], {}
        for c in conditions:
            if c.condition not in _PERSISTENT:
                out.append(c)
                continue
            key = finding_key(c)
            holding[key] = c
            n = self._streak[key] = self._streak.get(key, 0) + 1
            if n >= self.thresholds.flow_window or (final and n == self._gradient_steps) or key in self._active:
                out.append(c)
        self._streak = {k: n for k, n in self._streak.items() if k in holding}
        self._pending = holding
        return out

    def _debounce(self, step: int, findings: List[Finding], held: Set[Key]) -> List[Finding]:
        keys: Dict[Key, Finding] = {}
        for f in findings:
            keys.setdefault(finding_key(f), f)
        for key, old in list(self._active.items()):
            if key in keys or key in held:
                self._absent.pop(key, None)
                continue
            # A condition clears once it has been absent on flow_window measured steps in a row (a spike
            # at once): a share hovering at its threshold is one finding, not one per crossing.
            n = self._absent[key] = self._absent.get(key, 0) + 1
            if old.condition != "jump" and n < self.thresholds.flow_window:
                continue
            del self._active[key], self._absent[key]
            if old.kind is FindingKind.EXPLODING and old.condition == "jump":
                self.note(f"gradwatch: the gradient spike at step {old.step} ({old.layer}, {old.value:.3g} x its "
                          f"running median) cleared at step {step}.")
            elif old.kind is FindingKind.EXPLODING:
                self.note(f"gradwatch: exploding gradients ({old.layer}, since step {old.step}) "
                          f"cleared at step {step}.")
        fresh = []
        for key, f in keys.items():
            if key not in self._active:
                f = self._linked(key, f)
                fresh.append(f)
                self._active[key] = f
        return fresh
