"""``GradWatch``: the one object a user touches -- attach, detach, step, report."""

from __future__ import annotations

import os
import time
import warnings
import weakref
from typing import Any, List, Mapping, Optional, Sequence, Union

import torch
from rich.console import Console
from torch import nn

from .collect import Collector, ranks
from .config import Options, StepMode, Thresholds, check_model
from .exceptions import AlreadyWatchedError, GradWatchWarning
from .layers import Selector, select_layers, select_parameters
from .report import Finding, Report, StepData, StepStats
from .rules import Judge
from .schedule import DEFAULT_HISTOGRAM_EVERY, Schedule
from .sinks import build_sinks
from .sinks.fanout import Fanout

# Every module of every attached watch -> its watch; weak, so gradwatch never keeps a model alive.
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, GradWatch]" = weakref.WeakKeyDictionary()


class GradWatch:
    """Watch a model's activations and gradients, layer by layer, while it trains.

    Use it around an existing training loop::

        with GradWatch(model, log_dir="runs/relu") as watch:
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(); loss.backward(); opt.step()
        print(watch.report())

    Steps: each training-mode forward of ``model`` starts a new step (0, 1, 2, ...); eval
    forwards are ignored unless ``include_eval=True``. ``steps="optimizer"`` counts
    ``optimizer.step()`` calls instead, ``steps="manual"`` your :meth:`step` calls (calling
    :meth:`step` in the default mode switches to manual counting). On *measured* steps
    per-layer hooks reduce activations and gradients on their device, the results move to
    the host in one transfer, the rules run, and the sinks (warnings, terminal, TensorBoard)
    receive them.

    Args:
        model: any ``torch.nn.Module``.
        log_dir: TensorBoard folder; ``None`` for terminal and warnings only.
        writer: an existing ``SummaryWriter`` to write to instead of ``log_dir``.
        every: measure every ``every`` steps. Default: the automatic schedule -- the first
            10 steps, then every 20 steps, widened (at steps 100 and 1,000, then every
            10,000, to at most every 100) where that would cost more than 2 % of the step
            time (see :mod:`gradwatch.schedule`; ``watch.every`` says where it is).
        histogram_every: also write histograms every ``histogram_every`` steps
            (default 200); ``None`` turns histograms off.
        dead_window: a unit is dead when it gave no non-zero output on any sample of
            the last ``dead_window`` measured batches (default 10).
        include: layers by glob over qualified names (``"features.*"``) or by module
            type; default: every leaf module except dropout/identity/flatten, and every
            module with parameters of its own.
        exclude: layers to leave out, in the same forms; wins over ``include``.
        thresholds: a :class:`Thresholds` (or a mapping of its fields) deciding findings.
        include_eval: also measure forwards in eval mode, as steps of their own.
        quiet: no table at the end; warnings still appear.
        console: the rich ``Console`` for the table and warning panels.
        bins: histogram bins.
        samples: the largest number of elements of one tensor used for its spread, zero
            and saturation shares and its histogram (evenly strided, no RNG; default
            32768, which puts a share within about +-0.3% of its exact value). Means,
            NaN/Inf checks, dead units and gradient norms always use every element.
        steps: ``"forward"`` (default), ``"optimizer"`` or ``"manual"``, see above.
        optimizer: your optimizer. gradwatch then also reads the gradients at
            ``optimizer.step()`` -- after accumulation, all-reduce and clipping -- and
            reports them as ``applied_grad_norm`` beside the end-of-backward ``grad_norm``.
        budget: keep gradwatch's own cost under this fraction of the step time (e.g. 0.02)
            by widening the interval at the schedule's adaptation steps. Default: 0.02 when
            ``every`` is not given, else off.
        functional: also measure activations called as functions inside ``forward``
            (``F.relu``, ``torch.sigmoid``, ``x.tanh()``, ...), as layers named
            ``"<module>:<function>"``; costs a little more on measured steps.
        strict: re-raise errors inside gradwatch's hooks instead of warning (tests).
    """

    def __init__(self, model: nn.Module, *, log_dir: Optional[Union[str, os.PathLike]] = None,
                 writer: Any = None, every: Optional[int] = None,
                 histogram_every: Optional[int] = DEFAULT_HISTOGRAM_EVERY, dead_window: int = 10,
                 include: Optional[Union[Selector, Sequence[Selector]]] = None,
                 exclude: Optional[Union[Selector, Sequence[Selector]]] = None,
                 thresholds: Optional[Union[Thresholds, Mapping[str, float]]] = None,
                 include_eval: bool = False, quiet: bool = False, console: Optional[Console] = None,
                 bins: int = 64, samples: int = 1 << 15, steps: Union[StepMode, str] = StepMode.FORWARD,
                 optimizer: Optional[torch.optim.Optimizer] = None, budget: Optional[float] = None,
                 functional: bool = False, strict: bool = False) -> None:
        self.model = check_model(model)
        self.options = o = Options.build(
            every=every, histogram_every=histogram_every, dead_window=dead_window, bins=bins, samples=samples,
            thresholds=thresholds, include=include, exclude=exclude, include_eval=include_eval, quiet=quiet,
            steps=steps, optimizer=optimizer, budget=budget, functional=functional, strict=strict,
            log_dir=log_dir, writer=writer, rank=ranks.rank())
        self.schedule = Schedule(o.every, o.histogram_every, o.budget)
        self.layers = select_layers(model, o.include, o.exclude)
        self.params = select_parameters(model, o.include, o.exclude)
        if o.include and not self.layers and not self.params:
            raise ValueError(f"include={include!r} matches no module of {type(model).__name__}; "
                             f"names look like {[n for n, _ in model.named_modules()][1:6]}")
        _check_not_watched(model, self)
        self.sinks = Fanout(build_sinks(o, console), strict=o.strict)
        self._collector = Collector(model, self.layers, o, self._on_root_forward, say=self._warn)
        self._judge = Judge(o.thresholds, o.dead_window)
        self._attached = False
        self._manual = o.steps in (StepMode.MANUAL, StepMode.OPTIMIZER)
        self._step: Optional[int] = None
        self._steps_seen = 0
        self._started: Optional[float] = None  # when the previous step's work was done
        self._latest: Optional[StepStats] = None
        self._findings: List[Finding] = []
        self._notes: List[str] = []

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> "GradWatch":
        """Register the hooks (what ``with`` does on entry). Returns ``self``."""
        if self._attached:
            return self
        _check_not_watched(self.model, self)
        if ranks.rank() != 0:  # every rank measures and combines; only rank 0 prints and writes
            self.sinks.sinks = []
        for m in self.model.modules():
            _ATTACHED[m] = self
        self._attached = True
        try:
            self.sinks.open()
            self._collector.attach()
            if self.options.optimizer is not None:
                on_step = self._advance if self.options.steps is StepMode.OPTIMIZER else None
                self._collector.attach_optimizer(self.options.optimizer, on_step)
            if self._manual and self._step is None:
                self.step()  # step 0 starts now
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove every hook, finish the pending step, flush and close the outputs.
        Safe to call twice; the model is left exactly as it was found."""
        if not self._attached:
            return
        self._attached = False
        try:
            self._collector.detach()  # hooks first: nothing below may leave them behind
            for m in [m for m, w in list(_ATTACHED.items()) if w is self]:
                _ATTACHED.pop(m, None)
            data = self._close_step()
            if data is not None:
                self._emit(data)
        finally:
            self.sinks.close(self.report())

    def __enter__(self) -> "GradWatch":
        return self.attach()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.detach()

    # ------------------------------------------------------------------ steps
    def step(self) -> None:
        """Mark a step boundary yourself (e.g. once per optimizer step with gradient
        accumulation). From the first call on, forwards no longer count as steps."""
        self._manual = True
        self._advance()

    @property
    def steps(self) -> int:
        """Number of steps counted so far."""
        return self._steps_seen

    @property
    def every(self) -> int:
        """The measuring interval in force (after the schedule's dense start)."""
        return int(self.schedule.every or 0)

    def _on_root_forward(self, module: nn.Module) -> None:
        active = module.training or self.options.include_eval
        self._collector.enabled = active
        if active and not self._manual:
            self._advance()

    def _advance(self) -> None:
        """One step ends and the next begins. The finished step's findings are emitted last,
        so that a finding raised as an error (``-W error``) leaves the count consistent."""
        finished, measured = self._step, self._collector.measuring
        data = self._close_step()
        self._open_step()
        try:
            if data is not None:
                self._emit(data)
        finally:  # a step lasts from here to here: its summary and outputs count to it
            now = time.perf_counter()
            if finished is not None and self._started is not None:
                self.schedule.record(now - self._started, measured, finished)
            self._started = now

    def _open_step(self) -> None:
        step = self._step = 0 if self._step is None else self._step + 1
        self._steps_seen += 1
        self._adapt(step)
        self._collector.enabled = True
        if self.schedule.measures(step):
            self._collector.begin(histograms=self.schedule.histograms(step))
        else:
            self._collector.pause()

    def _close_step(self) -> Optional[StepData]:
        if self._step is None:
            return None
        return self._collector.end(self._step) if self._collector.measuring else None

    def _adapt(self, step: int) -> None:
        measured = max(len(self.schedule.measured_times), 1)
        every = self.schedule.adapt(step, self._collector.spent / measured)
        every = ranks.agree_max(every or self.every) if self.schedule.budget is not None else None
        if every is not None and every != self.schedule.every:
            self.schedule.every = every
            self._note(f"gradwatch: measuring every {every} steps from step {step} (budget "
                       f"{self.schedule.budget:.0%} of the step time).")

    def _note(self, text: str) -> None:
        if text not in self._notes:
            self._notes.append(text)
            self.sinks.on_note(text)

    def _warn(self, text: str) -> None:
        """Something gradwatch cannot see: a warning, and a note in the report, once."""
        if text not in self._notes and ranks.rank() == 0:
            warnings.warn(text, GradWatchWarning, stacklevel=2)
        self._note(text)

    def _emit(self, data: StepData) -> None:
        new = self._judge.new_findings(data.stats)
        self._findings.extend(new)
        self._latest = data.stats
        self.sinks.on_step(data, new)

    # ------------------------------------------------------------------ results
    def report(self) -> Report:
        """The latest measured per-layer stats and every finding so far."""
        step = self._latest.step if self._latest else (self._step if self._step is not None else 0)
        return Report(step=step, stats=self._latest, findings=list(self._findings), steps_seen=self._steps_seen,
                      every=self.every, thresholds=self.options.thresholds, notes=list(self._notes))

    @property
    def findings(self) -> List[Finding]:
        return list(self._findings)

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        return (f"GradWatch({type(self.model).__name__}, {len(self.layers)} layers, {len(self.params)} params, "
                f"every={self.every}, {state}, step={self._step})")


def _check_not_watched(model: nn.Module, me: GradWatch) -> None:
    for name, m in model.named_modules():
        other = _ATTACHED.get(m)
        if other is not None and other is not me:
            where = "the model" if not name else f"its submodule {name!r}"
            raise AlreadyWatchedError(f"{type(model).__name__}: {where} is already watched by {other!r}; "
                                      f"detach that GradWatch first (leave its `with` block or call .detach())")
