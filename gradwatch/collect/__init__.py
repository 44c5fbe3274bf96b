"""Collecting: hooks that reduce watched tensors on their device, handed over once per step.

The parts, each in its own module, write into the step's :mod:`.buffers` and know nothing of
each other; :class:`Collector` composes them::

    model call --> taps (modules) / functional (F.relu, ...) --> buffers
    backward   --> gradients (end of each backward pass, optimizer.step)  --> buffers
    step end   --> summary.totals (one host transfer) --> ranks.combine --> summary.finish --> StepData

The root module's hooks count steps and see backward passes; each watched layer has one
permanent hook (:mod:`.taps`), which measures on measured steps only; gradient, attention and
functional hooks are placed for measured steps only. Other steps cost the root's hooks, one
light call per layer and the per-step finiteness check of :mod:`.finite`.
:mod:`.guard` keeps a bug in gradwatch from ever breaking the user's training.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..config import Options
from ..layers import Layer
from ..report import StepData
from . import ranks, summary
from .attention import AttentionTaps
from .blind import BlindSpot, scripted
from .buffers import Reduction, StepBuffers, UnitHistory, in_backward
from .finite import Sentinel, smallest_near_input
from .functional import FunctionalTaps
from .gradients import GradientReader
from .guard import Guard
from .hooks import CleanCopies, WeakHook, eager_forward_hook, eager_forward_pre_hook
from .taps import LayerTaps
from .updates import RatioWindow, UpdateReader

__all__ = ["Collector"]


class Collector:
    """Attaches gradwatch's hooks to a model and turns measured steps into :class:`StepData`."""

    def __init__(self, model: nn.Module, layers: List[Layer], options: Options,
                 on_root_forward: Callable[[nn.Module], None], say: Callable[[str], None]) -> None:
        self.model = model
        layers, self._scripted = scripted(model, layers)  # TorchScript children take no hooks
        self.layers = layers
        self.say = say
        self.guard = Guard(options.strict)
        self.enabled = False  # False during forwards gradwatch must ignore (eval forwards by default)
        self._buf: Optional[StepBuffers] = None
        how = Reduction(options.thresholds.saturation_margin, options.samples, options.bins)
        self.taps = LayerTaps(layers, how, options.thresholds.saturation_slope, self.guard, self._current)
        self.gradients = GradientReader(model, options.include, options.exclude, how, self.guard, self._current)
        self.functional = FunctionalTaps(model, how, self.guard, self._current) if options.functional else None
        self.units = UnitHistory(options.dead_window)
        self.updates = UpdateReader(self.gradients.params, self.guard, self._current)
        self.update_window = RatioWindow(options.thresholds.update_window)
        self.attention = AttentionTaps(layers, self.guard, self._current)
        self.combiner = ranks.RankCombiner()
        self.blind = BlindSpot(model, len(layers), say, layers_seen=lambda: self.taps.seen)
        self._on_root_forward = on_root_forward
        self._root_handles: List[RemovableHandle] = []
        self.copies = CleanCopies()
        self._depth = 0  # nesting of the root's forward (a root that calls itself)
        self.sentinel = Sentinel()
        self.checking = False  # the per-step finiteness check (one process only, see attach)
        self.step: Optional[int] = None  # the running step (set by the clock)

    def _current(self) -> Optional[StepBuffers]:
        return self._buf if self.enabled else None

    # ------------------------------------------------------------------ attach / detach
    def attach(self) -> None:
        if self._scripted is not None:
            self.say(self._scripted)
        self.copies.install(self.model)  # copies of the watched model (deepcopy, pickle) carry no hook
        self.taps.attach()
        # The root's hooks are the edges of a compiled model's graph: never traced (see traced).
        self._root_handles.append(eager_forward_pre_hook(self.model, self._root_pre_hook))
        # always_call: the functional tap must be left even when the forward raises.
        self._root_handles.append(eager_forward_hook(self.model, self._root_hook, always_call=True))
        params = self.gradients.params()
        self.blind.attach(params[0][2] if params else None)
        # Under several processes a step that one rank turned into a measured one would leave the
        # others out of its all-reduce: the check runs in a single process only.
        self.checking = ranks.world() == 1
        near_input = smallest_near_input(params) if self.checking else None
        if near_input is not None and hasattr(near_input, "register_post_accumulate_grad_hook"):
            self._root_handles.append(near_input.register_post_accumulate_grad_hook(WeakHook(self._check_grad)))

    def attach_optimizer(self, optimizer: torch.optim.Optimizer,
                         on_step: Optional[Callable[[], None]] = None) -> None:
        """Read the gradients as the optimizer is about to apply them; optionally mark a step
        after each ``step()``."""
        self._root_handles.append(self.gradients.attach_optimizer(optimizer))
        self._root_handles += self.updates.attach(optimizer)  # its post-hook before on_step's: same step
        if on_step is not None:
            self._root_handles.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: on_step()))

    def detach(self) -> None:
        """Remove every hook. Safe to call twice."""
        self._remove_step_hooks()
        self.taps.detach()
        for h in self._root_handles:
            h.remove()
        self._root_handles.clear()
        self.copies.remove()
        self.blind.detach()
        self.enabled = False

    @property
    def spent(self) -> float:
        return self.guard.spent

    @property
    def measuring(self) -> bool:
        return self._buf is not None

    # ------------------------------------------------------------------ step boundaries
    def begin(self, *, histograms: bool) -> None:
        """Start a measured step: the layers' hooks measure, gradient and attention hooks are
        placed (kept from the previous step when that one was measured too, as with ``every=1``)."""
        self._buf = StepBuffers(histograms=histograms)
        self.taps.traced.on = True
        self.gradients.register()
        self.attention.register()
        if self.functional is not None:
            self.functional.register()

    def pause(self) -> None:
        """An unmeasured step begins: the step's hooks go; the layers' hooks only keep outputs."""
        self._remove_step_hooks()
        self.taps.traced.on = False

    def _remove_step_hooks(self) -> None:
        self.gradients.remove()
        self.attention.remove()
        if self.functional is not None:
            self.functional.remove()

    def end(self, step: int) -> Optional[StepData]:
        """Finish the measured step (if any): one host transfer, then plain numbers."""
        buf, self._buf = self._buf, None
        if buf is None or not (buf.sites or buf.grads is not None):
            return None
        data = self.guard("summary", self._summarise, step, buf)
        self.blind.check_step(data, _is_compiled(self.model))
        return data

    def _summarise(self, step: int, buf: StepBuffers) -> StepData:
        layer_of = self.layer_index()
        kinds = {}
        for site in buf.sites:
            layer = layer_of.get(site.rsplit("#", 1)[0] if "#" in site else site)
            if layer is not None:
                kinds[site] = layer.spec.kind
        tot = summary.totals(buf, self.units, kinds)
        world = ranks.world()
        if world > 1:
            tot = self.combiner.combine(tot)
        params = self.gradients.params()
        data = summary.finish(step, tot, layer_of, {n: layer for n, layer, _ in params},
                              {n: p.numel() for n, _, p in params}, world)
        self.update_window.fold(data.stats, tot.updates)
        return data

    def layer_index(self) -> Dict[str, Layer]:
        """Every layer by name, the functional ones discovered so far included."""
        index = {layer.name: layer for layer in self.layers}
        if self.functional is not None:
            index.update(self.functional.layers)
        return index

    # ------------------------------------------------------------------ root hooks
    def _root_pre_hook(self, module: nn.Module, args: Any) -> None:
        self._depth += 1
        self.blind.forwards += 1
        if self._depth > 1 or in_backward():  # a recursive call, or a checkpointed recompute
            return
        try:
            self.guard("step counting", self._on_root_forward, module)
        except BaseException:  # a finding raised as an error (-W error): the forward does not run
            self._depth -= 1
            raise
        self.taps.new_forward()
        late = self.guard("finiteness check", self.sentinel.poll) if self.sentinel.pending else None
        if late is not None:
            self._found_late(*late)
        self.taps.keeping = self._buf is None and self.enabled and self.checking
        # A compiled forward measures in its graph exactly when the eager hooks would record
        # (never in forwards gradwatch ignores, such as eval passes): one graph per grad mode
        # that does not measure, whatever the step, and one per grad mode that does.
        self.taps.traced.on = self._current() is not None
        if self.functional is not None and self._current() is not None:
            self.functional.enter()

    def _root_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self._depth = max(self._depth - 1, 0)
        if self._depth or in_backward():
            return
        kept = self.taps.take()
        traced = self.taps.traced.take()
        if traced and self._current() is not None:  # a compiled forward: its layers' reductions
            self.taps.replay_traced(self._buf, traced)
        if self._buf is None and self.enabled and self.checking:
            self.guard("finiteness check", self._check_output, output, kept)
        if self.functional is not None:
            self.functional.leave()
        self.guard("parameter gradients", self.gradients.watch_output, output)

    # ------------------------------------------------------------------ non-finite values between measured steps
    def _check_output(self, output: Any, kept: List[Any]) -> None:
        if self.sentinel.check(output, self.step, "the model's output") is False:
            # This step becomes a measured one now: its layers' outputs (kept until here) in
            # forward order, and its gradients at the end of its backward.
            self._buf = StepBuffers(histograms=False)
            self.gradients.register()
            self.taps.replay(self._buf, kept)

    def _check_grad(self, param: torch.Tensor) -> None:
        if self._buf is None and self.enabled and param.grad is not None:
            self.guard("finiteness check", self._check_grad_now, param)

    def _check_grad_now(self, param: torch.Tensor) -> None:
        if self.sentinel.check(param.grad, self.step, "a gradient near the input") is False:
            self._buf = StepBuffers(histograms=False)  # read every gradient at the end of this backward
            self.gradients.register()
            self.gradients.accumulated(param)

    def _found_late(self, step: int, what: str) -> None:
        """A device flag of an earlier step tripped: said once; the running step is measured."""
        if not self.sentinel.said:
            self.sentinel.said = True
            self.say(f"gradwatch: non-finite values (NaN/Inf) first appeared at step {step}, in {what}. On this "
                     f"device each step's check is read a step later (reading it at once would wait for the "
                     f"device), so the layer could not be named at step {step}; step {self.step} is measured "
                     f"instead, and the layer it names may lie after the one where the values arose. Later steps "
                     f"with non-finite values are measured the same way without a further note.")
        if self._buf is None:
            self.begin(histograms=False)


def _is_compiled(model: nn.Module) -> bool:
    return type(model).__name__ == "OptimizedModule" or getattr(model, "_compiled_call_impl", None) is not None
