"""``GradWatch``: the one object a user touches -- attach, detach, step, report."""

from __future__ import annotations

import os
import warnings
from typing import Any, List, Mapping, Optional, Sequence, Union

import torch
from rich.console import Console
from torch import nn

from . import registry
from .clock import StepClock
from .collect import Collector, ranks
from .config import Options, StepMode, Thresholds, check_model
from .exceptions import GradWatchWarning
from .layers import Selector, select_layers, select_parameters
from .report import Finding, Report, StepData, StepStats
from .rules import Judge
from .schedule import DEFAULT_HISTOGRAM_EVERY, Schedule
from .sinks import build_sinks, shown
from .sinks.fanout import Fanout

class GradWatch:
    """Watch a model's activations and gradients, layer by layer, while it trains.

    Use it around an existing training loop::

        with GradWatch(model, log_dir="runs/relu") as watch:
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(); loss.backward(); opt.step()
        print(watch.report())

    Steps: a step is the training-mode forwards of ``model`` with autograd on before the
    backward pass that follows them -- one forward usually, two for a siamese pair or a GAN
    discriminator's real and fake batches. Forwards in eval mode (unless ``include_eval=True``),
    under ``torch.no_grad()``/``inference_mode()`` (rollouts, targets) or inside ``torch.func``
    transforms are no steps. ``steps="optimizer"`` makes each ``optimizer.step()`` end a step,
    ``steps="manual"`` each :meth:`step` call. On *measured* steps per-layer hooks reduce
    activations and gradients on their device, one host transfer follows, the rules run and
    the sinks (warnings, terminal, TensorBoard) receive the results.

    Args:
        model: any ``torch.nn.Module``.
        log_dir: TensorBoard folder (``None``: terminal and warnings only); or ``writer``:
            an existing ``SummaryWriter`` to write to.
        every: measure every ``every`` steps. Default: the first 10 steps, then every 20,
            widened to at most every 100 at steps 100, 1,000, 10,000, ... where measuring
            would cost more than ``budget`` (see :mod:`gradwatch.schedule`).
        histogram_every: histograms every ``histogram_every`` steps (200; ``None``: off).
        dead_window: a unit is dead when it gave no non-zero output (a smooth rectifier's: no
            pre-activation above its flat side's cut-off) on any sample of the last
            ``dead_window`` measured batches (default 10).
        include: layers by glob over qualified names (``"features.*"``) or by module type;
            default: every leaf but dropout/identity/flatten, and modules with own parameters.
        exclude: layers to leave out, in the same forms; wins over ``include``.
        thresholds: a :class:`Thresholds` (or a mapping of its fields) deciding findings.
        include_eval: also measure forwards in eval mode or with autograd off (``torch.no_grad()``).
        quiet: no table at the end; warnings still appear. ``console``: the rich Console.
        bins: histogram bins.
        samples: the size of a tensor's strided sample for its spread and shares (about 32768:
            a share within +-0.3%; the stride is rounded to one coprime with the innermost
            dimension, so a sample may hold more; histograms take about 8192); means, NaN/Inf,
            dead units, norms: every element.
        steps: ``"forward"`` (default), ``"optimizer"`` or ``"manual"``, see above.
        optimizer: your optimizer: gradients are then also read at ``optimizer.step()``
            (after accumulation, all-reduce and clipping) as ``applied_grad_norm``, and each
            step's update-to-weight ratio ``‖Δw‖/‖w‖`` is measured as ``update_ratio``
            (a strided sample of at most 4,096 elements per tensor is kept across the step).
        budget: the share of step time measuring may cost (0.005 when ``every`` is not given).
        functional: also measure activations called as functions (``F.relu``,
            ``torch.sigmoid``, ``x.tanh()``) as layers ``"<module>:<function>"``.
        strict: re-raise errors inside gradwatch's hooks instead of warning (tests).
        scaler: the ``torch.amp.GradScaler`` scaling your loss: gradients are read unscaled.
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
                 functional: bool = False, strict: bool = False, scaler: Any = None) -> None:
        self.model = check_model(model)
        if console is not None and not isinstance(console, Console):
            raise TypeError(f"console must be a rich.console.Console, got {type(console).__name__} ({console!r:.60}); "
                            f"for a file or stream: console=Console(file=stream)")
        self.options = o = Options.build(
            every=every, histogram_every=histogram_every, dead_window=dead_window, bins=bins, samples=samples,
            thresholds=thresholds, include=include, exclude=exclude, include_eval=include_eval, quiet=quiet,
            steps=steps, optimizer=optimizer, budget=budget, functional=functional, strict=strict,
            log_dir=log_dir, writer=writer, rank=ranks.rank(), scaler=scaler)
        self.schedule = Schedule(o.every, o.histogram_every, o.budget)
        self.layers = select_layers(model, o.include, o.exclude)
        self.params = select_parameters(model, o.include, o.exclude)
        if (o.include or o.exclude) and not self.layers and not self.params:
            names = [n for n, _ in model.named_modules()][1:6]
            if select_layers(model, o.include, ()) or select_parameters(model, o.include, ()):
                raise ValueError(f"exclude={exclude!r} leaves no module of {type(model).__name__} to watch"
                                 + (f" of those include={include!r} matches" if o.include else "")
                                 + f"; names look like {names}")
            if o.include:
                raise ValueError(f"include={include!r} matches no module of {type(model).__name__}; "
                                 f"names look like {names}")
        registry.check_free(model, self)
        self.sinks = Fanout(build_sinks(o, console, note=self._note), strict=o.strict)
        self._collector = Collector(model, self.layers, o, self._on_root_forward, say=self._warn)
        self._collector.gradients.scaler = o.scaler
        half = lambda: self._collector.gradients.half_precision  # noqa: E731
        self._judge = Judge(o.thresholds, o.dead_window, self._note,
                            unscaled=lambda: o.scaler is not None or not half(),
                            scaler=lambda: o.scaler is not None or half(),
                            scaler_given=lambda: o.scaler is not None)
        self._attached = False
        self._manual = o.steps in (StepMode.MANUAL, StepMode.OPTIMIZER)
        self._clock = StepClock(self.schedule, self._collector, self._note)
        self._latest: Optional[StepStats] = None
        self._findings: List[Finding] = []
        self._notes: List[str] = []  # said once: what cannot be measured, interval changes
        self._held: Optional[List[str]] = None  # warnings said while a step closes (see _advance)

    def attach(self) -> "GradWatch":
        """Register the hooks (what ``with`` does on entry). Returns ``self``."""
        if self._attached:
            return self
        registry.check_free(self.model, self)
        if ranks.rank() != 0:  # every rank measures and combines; only rank 0 prints and writes
            self.sinks.sinks = []
        registry.hold(self.model, self)
        self._attached = True
        try:
            self.sinks.open()
            self._collector.attach()
            if self.options.optimizer is not None:
                on_step = self._advance if self.options.steps is StepMode.OPTIMIZER else None
                self._collector.attach_optimizer(self.options.optimizer, on_step)
            if self._manual and self._clock.step is None:
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
        self._held = []
        try:
            self._collector.detach()  # hooks first: nothing below may leave them behind
            registry.release(self)
            data = self._clock.close()
            if data is not None:
                self._emit(data, final=True)
            elif self._latest is not None:  # the last step was not measured: the last measured one was final
                new = self._judge.at_end()
                if new:
                    self._findings.extend(new)
                    self.sinks.on_step(StepData(StepStats(step=max(f.step for f in new))), new)
        finally:
            held, self._held = self._held, None
            self.sinks.close(self.report())
        for text in held:
            warnings.warn(text, GradWatchWarning, stacklevel=2)

    def __enter__(self) -> "GradWatch":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:  # the user's exception, if any, goes on
        self.detach()

    def step(self) -> None:
        """End the running step yourself (e.g. once per optimizer step with gradient
        accumulation): after n calls, :attr:`steps` is n. From the first call on, forwards no
        longer open steps. On a watch that is not attached it does nothing (and says so once): it
        would place hooks that nothing removes."""
        if not self._attached:
            text = ("gradwatch: watch.step() was called on a watch that is not attached (before attach() or "
                    "after the with block): ignored. Call it while the watch is attached.")
            if text not in self._notes:
                self._notes.append(text)
                warnings.warn(text, GradWatchWarning, stacklevel=2)
            return
        self._manual = True
        self._collector.noise.several = True  # a step may now hold several micro-batches
        self._advance()

    steps = property(lambda self: self._clock.counted(self._manual),
                     doc="Steps so far: with steps=\"forward\" each counts from its first forward; with "
                         "\"optimizer\" or \"manual\" once it has ended (n after n optimizer.step() calls).")
    every = property(lambda self: int(self.schedule.every or 0),
                     doc="The measuring interval in force (after the schedule's dense start).")

    def _on_root_forward(self, opens: bool) -> None:
        """A forward of a step runs; ``opens``: the running step is complete (see collect.forwards)."""
        if opens and not self._manual:
            self._advance()

    def _advance(self) -> None:  # also the optimizer's step hook with steps="optimizer"
        """Close the running step and open the next. What gradwatch warns of meanwhile (a blind spot
        the closing step showed) is recorded at once and raised as a warning only once the step's data
        is handed on: a warning turned into an error (``-W error``) then loses no record."""
        self._held = []
        try:
            self._clock.advance(self._emit)
        finally:
            held, self._held = self._held, None
        for text in held:
            warnings.warn(text, GradWatchWarning, stacklevel=2)

    def _note(self, text: str) -> None:
        if text not in self._notes:
            self._notes.append(text)
            self.sinks.on_note(text)

    def _warn(self, text: str) -> None:
        """Something gradwatch cannot see: a note in the report and a warning, once (the note first:
        a warning the user's filters raise as an error must not lose it)."""
        if text in self._notes:
            return
        self._note(text)
        if ranks.rank() != 0:
            return
        if self._held is not None:  # a step is being closed: warned once it has been handed on
            self._held.append(text)
        else:
            warnings.warn(text, GradWatchWarning, stacklevel=2)

    def _emit(self, data: StepData, final: bool = False) -> None:
        new = self._judge.new_findings(data.stats, final)
        self._findings.extend(new)
        self._latest = data.stats
        self.sinks.on_step(data, new)

    def report(self) -> Report:
        """The latest measured per-layer stats and every finding so far."""
        step = self._latest.step if self._latest else (self._clock.step or 0)
        return Report(step=step, stats=self._latest, findings=list(self._findings), steps_seen=self.steps,
                      every=self.every, thresholds=self.options.thresholds, notes=list(self._notes),
                      shown=shown(self.sinks))

    findings = property(lambda self: list(self._findings), doc="Every finding so far, oldest first.")

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        return (f"GradWatch({type(self.model).__name__}, {len(self.layers)} layers, {len(self.params)} params, "
                f"every={self.every}, {state}, step={self._clock.step})")

