"""``GradWatch``: the one object a user touches. Wires collecting, rules and sinks together."""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
import warnings
import weakref
from collections import deque
from pathlib import Path
from typing import Any, Deque, List, Mapping, Optional, Sequence, Union

from rich.console import Console
import torch
from torch import nn

from . import rules
from .config import StepMode, Thresholds, positive_int, step_mode
from .exceptions import AlreadyWatchedError, GradWatchWarning, LogDirError
from .hooks import Collector, StepData
from .layers import Selector, check_selectors, select_layers, select_parameters
from .report import Finding, Report, StepStats
from .sinks import ConsoleSink, JsonlSink, LoggingSink, Sink, TensorBoardSink, WarningSink

DEFAULT_EVERY = 20
"""Logging interval in steps for scalars and findings when none is given: the starting point
(and the smallest value) of the automatic interval."""
DEFAULT_BUDGET = 0.02
"""Share of step time gradwatch keeps itself under when ``every`` is not given."""
DEFAULT_HISTOGRAM_EVERY = 200
"""Logging interval in steps for histograms."""

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

    Steps: each training-mode forward of ``model`` starts a new step (0, 1, 2, ...);
    forwards in eval mode are ignored unless ``include_eval=True``. With
    ``steps="manual"`` (e.g. for gradient accumulation) step 0 starts on entry and
    each :meth:`step` call starts the next; calling :meth:`step` in the default mode
    switches to manual counting from then on.
    Every ``every``-th step is *measured*: per-layer hooks reduce activations and
    gradients on their device, the results move to the host in one transfer, the
    rules run, and the sinks (warnings, terminal, TensorBoard) receive them.

    Args:
        model: any ``torch.nn.Module``.
        log_dir: TensorBoard folder; ``None`` for terminal and warnings only.
        writer: an existing ``SummaryWriter`` to write to instead of ``log_dir``.
        every: measure every ``every`` steps. Default: automatic -- every 20 steps, or
            less often where that would cost more than 2 % of the training step time
            (``watch.every`` says where it settled).
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
        steps: ``"forward"`` (default), ``"optimizer"`` (each ``optimizer.step()`` ends a
            step: right for gradient accumulation) or ``"manual"``, see above.
        optimizer: your optimizer. gradwatch then also reads the gradients at
            ``optimizer.step()`` -- after accumulation, all-reduce and clipping -- and
            reports them as ``applied_grad_norm`` beside the end-of-backward ``grad_norm``.
        budget: keep gradwatch's own work under this fraction of the step time (e.g.
            0.02): it times itself and widens the logging interval while over budget,
            narrows it again when well under (down to ``every``, or to 1 when ``every`` is
            given); ``watch.every`` is the interval it settled on. Default: 0.02 when
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
        if not isinstance(model, nn.Module):
            raise TypeError(f"GradWatch(model): model must be a torch.nn.Module, got {type(model).__name__} "
                            f"({model!r:.80})")
        self.model = model
        if every is None:
            # Automatic: every 20 steps, sparser where a measured step is costly relative to a
            # training step (deep, narrow models), so that defaults stay cheap at any size.
            self.every, self._every_asked = DEFAULT_EVERY, DEFAULT_EVERY
            budget = DEFAULT_BUDGET if budget is None else budget
        else:
            self.every = positive_int("every", every)
            self._every_asked = 1 if budget is not None else self.every  # with a budget, `every` is where it starts
        self.histogram_every = None if histogram_every is None else positive_int("histogram_every", histogram_every)
        self._histogram_every_asked = self.histogram_every
        self.dead_window = positive_int("dead_window", dead_window)
        self.bins = positive_int("bins", bins)
        self.samples = positive_int("samples", samples)
        self.thresholds = _thresholds(thresholds)
        self.include_eval = bool(include_eval)
        self.step_mode = step_mode(steps)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self.step_mode is StepMode.OPTIMIZER and optimizer is None:
            raise ValueError('steps="optimizer" needs the optimizer: GradWatch(model, optimizer=opt, '
                             'steps="optimizer")')
        self.optimizer = optimizer
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not 0 < budget < 1):
            raise ValueError(f"budget must be a fraction of step time between 0 and 1 (e.g. 0.02), got {budget!r}")
        self.budget = budget
        include_sel = check_selectors("include", include)
        exclude_sel = check_selectors("exclude", exclude)
        self.layers = select_layers(model, include_sel, exclude_sel)
        self.params = select_parameters(model, include_sel, exclude_sel)
        if include_sel and not self.layers and not self.params:
            raise ValueError(f"include={include!r} matches no module of {type(model).__name__}; "
                             f"names look like {[n for n, _ in model.named_modules()][1:6]}")
        if log_dir is not None and writer is not None:
            raise ValueError("pass either log_dir= or writer=, not both (writer= writes where the writer writes)")
        if log_dir is not None and _rank() == 0:  # other ranks write nothing
            log_dir = _check_log_dir(log_dir)
        self.log_dir = log_dir
        _check_not_watched(model, self)

        self.sinks: List[Sink] = [WarningSink(console), LoggingSink()]
        if log_dir is not None or writer is not None:
            tb = TensorBoardSink(log_dir=None if log_dir is None else os.fspath(log_dir), writer=writer)
            self.sinks.append(tb)
            folder = log_dir if log_dir is not None else getattr(writer, "log_dir", None)
            if folder is not None:
                self.sinks.append(JsonlSink(os.fspath(folder)))
        if not quiet:
            self.sinks.append(ConsoleSink(console, self.thresholds))
        self._collector = Collector(model, self.layers, self.params, thresholds=self.thresholds, bins=self.bins,
                                    samples=self.samples, dead_window=self.dead_window,
                                    on_root_forward=self._on_root_forward, strict=strict,
                                    functional=bool(functional))
        self._strict = strict
        self._attached = False
        self._manual = self.step_mode in (StepMode.MANUAL, StepMode.OPTIMIZER)
        self._step: Optional[int] = None
        self._steps_seen = 0
        self._latest: Optional[StepStats] = None
        self._findings: List[Finding] = []
        self._debouncer = rules.Debouncer()
        self._norm_history: Deque[float] = deque(maxlen=5)
        self._step_started: Optional[float] = None
        self._step_times: Deque[float] = deque(maxlen=64)  # durations of steps that were not measured
        self._measured_times: Deque[float] = deque(maxlen=8)  # ... and of measured ones
        self._prev_measured = False
        self._steps_since_adapt = 0
        self._blind_noted = False

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> "GradWatch":
        """Register the hooks (what ``with`` does on entry). Returns ``self``."""
        if self._attached:
            return self
        _check_not_watched(self.model, self)
        if _rank() != 0:
            # Under torch.distributed only rank 0 prints and writes; every rank still measures,
            # takes part in combining the statistics, and holds the same findings.
            self.sinks = []
        for m in self.model.modules():
            _ATTACHED[m] = self
        self._attached = True
        try:
            for sink in self.sinks:
                sink.open()
            self._collector.attach()
            if self.optimizer is not None:
                on_step = self._on_optimizer_step if self.step_mode is StepMode.OPTIMIZER else None
                self._collector.attach_optimizer(self.optimizer, on_step)
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
            for m in list(_ATTACHED.keys()):
                if _ATTACHED.get(m) is self:
                    del _ATTACHED[m]
            self._finish_step()
        finally:
            report = self.report()
            for sink in self.sinks:
                self._call_sink(sink, "close", report)

    def __enter__(self) -> "GradWatch":
        return self.attach()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.detach()

    # ------------------------------------------------------------------ steps
    def step(self) -> None:
        """Mark a step boundary yourself (e.g. once per optimizer step with gradient
        accumulation). From the first call on, forwards no longer count as steps."""
        self._manual = True
        self._finish_step()
        self._step = 0 if self._step is None else self._step + 1
        self._begin_step()

    @property
    def steps(self) -> int:
        """Number of steps counted so far."""
        return self._steps_seen

    def _on_optimizer_step(self) -> None:
        self._finish_step()
        self._step = 0 if self._step is None else self._step + 1
        self._begin_step()

    def _on_root_forward(self, module: nn.Module) -> None:
        active = module.training or self.include_eval
        if self._manual:
            self._collector.enabled = active
            return
        if not active:
            self._collector.enabled = False
            return
        self._finish_step()
        self._step = 0 if self._step is None else self._step + 1
        self._begin_step()

    def _begin_step(self) -> None:
        s = self._step
        assert s is not None
        self._steps_seen += 1
        now = time.perf_counter()
        if self._step_started is not None and self._steps_seen > 2:  # step 0 carries one-time costs
            (self._measured_times if self._prev_measured else self._step_times).append(now - self._step_started)
        self._step_started = now
        self._steps_since_adapt += 1
        self._collector.enabled = True
        histograms = self.histogram_every is not None and s % self.histogram_every == 0
        self._prev_measured = s % self.every == 0 or histograms
        if self._prev_measured:
            self._collector.begin(histograms=histograms)
        else:
            self._collector.pause()

    def _finish_step(self) -> None:
        if self._step is None or not self._collector.measuring:
            return
        data = self._collector.end(self._step)
        if data is not None:
            self._emit(data)
        if self.budget is not None:
            self._adapt_interval()

    def _adapt_interval(self) -> None:
        """Keep gradwatch's own work under ``budget`` of the step time: double the logging
        interval while over it, halve it (down to the ``every`` asked for) while well under."""
        if not self._steps_since_adapt:
            return
        if len(self._step_times) >= 3 and len(self._measured_times) >= 2:
            # The whole cost of a measured step -- hook dispatch and autograd included, which
            # timing gradwatch's own functions misses -- is its extra duration over a plain step.
            plain = statistics.median(self._step_times)
            per_step = max(statistics.median(self._measured_times) - plain, 0.0) / self.every
        elif len(self._step_times) + len(self._measured_times) >= 3:  # e.g. every=1: no plain steps
            per_step = self._collector.spent / self._steps_since_adapt
            plain = statistics.median(list(self._step_times) + list(self._measured_times)) - per_step
        else:
            return
        self._collector.spent, self._steps_since_adapt = 0.0, 0
        every = _agree(next_interval(self.every, self._every_asked, per_step, plain + per_step, self.budget))
        if every != self.every and self.histogram_every is not None:
            # Histogram steps cost most: their interval moves with the logging interval.
            self.histogram_every = max(self._histogram_every_asked,
                                       self._histogram_every_asked * every // self._every_asked)
        self.every = every

    def _emit(self, data: StepData) -> None:
        findings = rules.evaluate(data.stats, self.thresholds, list(self._norm_history), self.dead_window)
        total = data.stats.total_grad_norm
        if total is not None:
            self._norm_history.append(total)
        new = self._debouncer.new(findings)
        self._findings.extend(new)
        self._latest = data.stats
        if self.layers and not data.stats.layers and not self._blind_noted and self._rank0():
            self._blind_noted = True
            compiled = "compiled with torch.compile" if _is_compiled(self.model) else "calling no watched module"
            warnings.warn(f"gradwatch: a training step of {type(self.model).__name__} ran without any of its "
                          f"{len(self.layers)} watched layers being called ({compiled}): activation statistics, "
                          f"saturation and dead units cannot be seen, only parameter gradients are measured. "
                          f"Attach GradWatch before compiling, or watch the uncompiled model while diagnosing.",
                          GradWatchWarning, stacklevel=2)
        for sink in list(self.sinks):
            self._call_sink(sink, "on_step", data, new)

    @staticmethod
    def _rank0() -> bool:
        return _rank() == 0

    def _call_sink(self, sink: Sink, method: str, *args: Any) -> None:
        # A failing output (disk full, deleted folder) must not stop training: warn once, drop it.
        # The warnings sink is exempt: `-W error` turning a finding into an exception is the user's wish.
        if isinstance(sink, WarningSink) or self._strict:
            getattr(sink, method)(*args)
            return
        try:
            getattr(sink, method)(*args)
        except Exception as exc:  # noqa: BLE001
            if sink in self.sinks:
                self.sinks.remove(sink)
            warnings.warn(f"gradwatch: {type(sink).__name__} failed ({type(exc).__name__}: {exc}); it is "
                          f"switched off, training continues.", GradWatchWarning, stacklevel=2)

    # ------------------------------------------------------------------ results
    def report(self) -> Report:
        """The latest measured per-layer stats and every finding so far."""
        step = self._latest.step if self._latest else (self._step if self._step is not None else 0)
        return Report(step=step, stats=self._latest, findings=list(self._findings), steps_seen=self._steps_seen,
                      every=self.every)

    @property
    def findings(self) -> List[Finding]:
        return list(self._findings)

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        return (f"GradWatch({type(self.model).__name__}, {len(self.layers)} layers, {len(self.params)} params, "
                f"every={self.every}, {state}, step={self._step})")


def next_interval(every: int, smallest: int, cost_per_step: float, step_time: float, budget: float) -> int:
    """The overhead budget's policy. Over budget: jump to the power-of-two interval that
    brings gradwatch's share of the training step time under ``budget`` (at least double,
    at most 8x at once, so one noisy measurement cannot overshoot far);
    under a third of it: halve (not below ``smallest``); otherwise keep.

    >>> next_interval(4, 1, cost_per_step=0.5e-3, step_time=10.5e-3, budget=0.02)
    16
    >>> next_interval(4, 1, cost_per_step=0.01e-3, step_time=10e-3, budget=0.02)
    2
    """
    fraction = cost_per_step / max(step_time - cost_per_step, 1e-9)
    if fraction > budget and every < 1 << 16:
        needed = every * fraction / budget
        return min(1 << 16, every * 8, max(every * 2, 1 << math.ceil(math.log2(needed))))
    if fraction < budget / 3 and every > smallest:
        return max(smallest, every // 2)
    return every


def _agree(every: int) -> int:
    """Under several processes every rank must measure the same steps (they combine statistics
    with a collective), so the ranks adopt the largest interval any of them proposes. Called at
    the end of a measured step, which every rank reaches together."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return every
    from .hooks import _comm_device

    proposal = torch.tensor([float(every)], device=_comm_device())
    dist.all_reduce(proposal, op=dist.ReduceOp.MAX)
    return int(proposal.item())


def _is_compiled(model: nn.Module) -> bool:
    return type(model).__name__ == "OptimizedModule" or getattr(model, "_compiled_call_impl", None) is not None


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _thresholds(value: Optional[Union[Thresholds, Mapping[str, float]]]) -> Thresholds:
    if value is None:
        return Thresholds()
    if isinstance(value, Thresholds):
        return value
    if isinstance(value, Mapping):
        try:
            return Thresholds(**value)
        except TypeError:
            unknown = sorted(set(value) - set(Thresholds.__dataclass_fields__))
            raise ValueError(f"thresholds: unknown field(s) {unknown}; known: "
                             f"{sorted(Thresholds.__dataclass_fields__)}") from None
    raise TypeError(f"thresholds must be a gradwatch.Thresholds or a mapping, got {value!r}")


def _check_log_dir(path: Union[str, os.PathLike]) -> Path:
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".gradwatch-write-test-"):
            pass
    except OSError as exc:
        raise LogDirError(f"log_dir {os.fspath(path)!r} cannot be created or written "
                          f"({exc.strerror or exc}); pass a writable folder, or log_dir=None for terminal "
                          f"output only") from None
    return p


def _check_not_watched(model: nn.Module, me: GradWatch) -> None:
    for name, m in model.named_modules():
        other = _ATTACHED.get(m)
        if other is not None and other is not me:
            where = "the model" if not name else f"its submodule {name!r}"
            raise AlreadyWatchedError(f"{type(model).__name__}: {where} is already watched by {other!r}; "
                                      f"detach that GradWatch first (leave its `with` block or call .detach())")
