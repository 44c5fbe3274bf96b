"""Collecting: hooks that reduce watched tensors on their device, handed over once per step.

The parts, each in its own module, write into the step's :mod:`.buffers` and know nothing of
each other; :class:`Collector` composes them::

    model call --> taps (modules) / functional (F.relu, ..., SDPA: sdpa) --> buffers
    backward   --> gradients (end of each backward pass, optimizer.step)  --> buffers
    step end   --> summary.totals (one host transfer) --> ranks.combine --> summary.finish --> StepData

The root module's hooks count steps (:mod:`.forwards`: which forwards make one step) and see
backward passes; each watched layer has one
permanent hook (:mod:`.taps`), which measures on measured steps only; gradient, attention and
functional hooks are placed for measured steps only. Other steps cost the root's hooks, one
light call per layer and the per-step finiteness check of :mod:`.finite`.
:mod:`.guard` keeps a bug in gradwatch from ever breaking the user's training.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.utils.hooks import RemovableHandle

from ..config import Options, StepMode
from ..layers import Layer
from ..report import StepData
from . import ranks, summary
from .attention import AttentionTaps
from .blind import BlindSpot, scripted
from .buffers import Reduction, SampleLayout, StepBuffers, UnitHistory, graph_task
from .finite import Sentinel, smallest_near_input
from .forwards import ForwardGroup, transformed
from .functional import FunctionalTaps
from .gradients import GradientReader
from .guard import Guard
from .hooks import CleanCopies, WeakHook, eager_forward_hook, eager_forward_pre_hook, untraced
from .noise import NoiseReader
from .sdpa import SdpaTaps
from .taps import LayerTaps
from .updates import RatioWindow, UpdateReader

__all__ = ["Collector"]


class Collector:
    """Attaches gradwatch's hooks to a model and turns measured steps into :class:`StepData`."""

    def __init__(self, model: nn.Module, layers: List[Layer], options: Options,
                 on_root_forward: Callable[[bool], None], say: Callable[[str], None]) -> None:
        self.model = model
        layers, self._scripted = scripted(model, layers)  # TorchScript children take no hooks
        self.layers = layers
        self.say = say
        self.guard = Guard(options.strict)
        self.enabled = False  # a step is open
        self.include_eval = options.include_eval
        self._ignoring = False  # during a forward that is no training step (see _not_a_step)
        self._buf: Optional[StepBuffers] = None
        how = self.how = Reduction(options.thresholds.saturation_margin, options.samples, options.bins,
                                   options.thresholds.saturation_slope)
        self.sample_layout = SampleLayout(len(layers))  # sample buffers sized from earlier steps
        self.taps = LayerTaps(layers, how, options.thresholds.saturation_slope, self.guard, self._current)
        self.taps.on_transform = self._in_transform
        self.taps.off_step = self._off_step
        self.gradients = GradientReader(model, options.include, options.exclude, how, self.guard, self._current)
        self.functional = FunctionalTaps(model, how, self.guard, self._current, activations=options.functional)
        self.taps.apart = self.functional.apart  # a measuring hook's work: outside the function tap
        self.sdpa = SdpaTaps(self.functional, layers, options.include, options.exclude, self.guard, self._current,
                            compiled=lambda: _is_compiled(model))
        self.units = UnitHistory(options.dead_window)
        self.updates = UpdateReader(self.gradients.params, self.guard, self._current)
        self.noise = NoiseReader(model, self.gradients.params, self.guard, self._current,
                                 scale=lambda: self.gradients._scale(),
                                 several=options.steps is not StepMode.FORWARD, world=ranks.world)
        self.update_window = RatioWindow(options.thresholds.update_window)
        self.attention = AttentionTaps(layers, self.guard, self._current)
        self.attention.apart = self.functional.apart
        self.combiner = ranks.RankCombiner()
        self.blind = BlindSpot(model, len(layers), say, layers_seen=lambda: self.taps.seen)
        self._on_root_forward = on_root_forward
        self.forwards = ForwardGroup()  # the running step's forwards
        self._root_handles: List[RemovableHandle] = []
        self._param_handles: List[RemovableHandle] = []  # on one or two parameters, placed again when they change
        self._placed_for = -1  # the parameter look-up those were placed for
        self._lazy = False  # some parameter is not materialised yet (nn.LazyLinear before its first forward)
        self._said_transform = False
        self._said_compiled_functions = False
        self.copies = CleanCopies()
        self._depth = 0  # nesting of the root's forward (a root that calls itself)
        self.sentinel = Sentinel()
        self.checking = False  # the per-step finiteness check (one process only, see attach)
        self.step: Optional[int] = None  # the running step (set by the clock)
        self._step_hooks = False  # a measured step placed hooks that the next unmeasured one removes

    def _current(self) -> Optional[StepBuffers]:
        return self._buf if self.enabled and not self._ignoring else None

    def opened(self, step: int) -> None:
        """Step ``step`` begins (the clock's call): it has no forward yet."""
        self.step = step
        self.enabled = True
        self.forwards.start()

    # ------------------------------------------------------------------ attach / detach
    def attach(self) -> None:
        if self._scripted is not None:
            self.say(self._scripted)
        self.copies.install(self.model)  # copies of the watched model (deepcopy, pickle) carry no hook
        self.taps.attach()
        if not isinstance(self.model, torch.jit.ScriptModule):  # a scripted model takes no hook (said above)
            # The root's hooks are the edges of a compiled model's graph: never traced (see traced).
            self._root_handles.append(eager_forward_pre_hook(self.model, self._root_pre_hook, with_kwargs=True))
            # always_call: the functional tap must be left even when the forward raises.
            self._root_handles.append(eager_forward_hook(self.model, self._root_hook, always_call=True))
        else:
            self.blind.said("unseen")  # its unseen forwards are in the note above
        # Under several processes a step that one rank turned into a measured one would leave the
        # others out of its all-reduce: the check runs in a single process only.
        self.checking = ranks.world() == 1
        self._lazy = any(is_lazy(p) for p in self.model.parameters())
        self._place_param_hooks()

    def _place_param_hooks(self) -> None:
        """The permanent hooks on single parameters (backward passes counted, the finiteness check
        of a gradient near the input), on the parameters as they are now: placed again when they
        were replaced or materialised (lazy modules)."""
        for h in self._param_handles:
            h.remove()
        self._param_handles.clear()
        params = self.gradients.params()
        self._placed_for = self.gradients.generation
        # One hook after the gradient of a small parameter near the input both counts backward passes
        # (the blind spot's) and checks that gradient: one Python call per backward, not two.
        near_input = smallest_near_input(params)
        if near_input is not None and hasattr(near_input, "register_post_accumulate_grad_hook"):
            self._param_handles.append(near_input.register_post_accumulate_grad_hook(untraced(WeakHook(self._after_grad))))

    def attach_optimizer(self, optimizer: torch.optim.Optimizer,
                         on_step: Optional[Callable[[], None]] = None) -> None:
        """Read the gradients as the optimizer is about to apply them; optionally mark a step
        after each ``step()``."""
        self._root_handles.append(self.gradients.attach_optimizer(optimizer))
        self._root_handles += self.updates.attach(optimizer)  # its post-hook before on_step's: same step
        if on_step is not None:
            self._root_handles.append(optimizer.register_step_post_hook(untraced(lambda opt, args, kwargs: on_step())))

    def detach(self) -> None:
        """Remove every hook. Safe to call twice."""
        self._remove_step_hooks()
        self.taps.detach()
        for h in self._root_handles:
            h.remove()
        self._root_handles.clear()
        for h in self._param_handles:
            h.remove()
        self._param_handles.clear()
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
        self._buf = self._new_buffers(histograms)
        self.taps.traced.on = True
        self._step_hooks = True
        self.gradients.register()
        if self.gradients.generation != self._placed_for:
            self._place_param_hooks()
        self.noise.register()
        self.attention.register()
        if self.functional is not None:
            self.functional.register()

    def _new_buffers(self, histograms: bool) -> StepBuffers:
        return StepBuffers(histograms, self.how, self.sample_layout)

    def pause(self) -> None:
        """An unmeasured step begins: the step's hooks go; the layers' hooks only keep outputs."""
        if self._step_hooks:  # (nothing to remove between two unmeasured steps: the usual case)
            self._remove_step_hooks()
        self.taps.traced.on = False

    def _remove_step_hooks(self) -> None:
        self._step_hooks = False
        self.gradients.remove()
        self.noise.remove()
        self.attention.remove()
        if self.functional is not None:
            self.functional.remove()

    def end(self, step: int) -> Optional[StepData]:
        """Finish the measured step (if any): one host transfer, then plain numbers."""
        buf, self._buf = self._buf, None
        if buf is None or not (buf.sites or buf.grads is not None):
            return None
        data = self.guard("summary", self._summarise, step, buf)
        if not buf.late:  # (a step the check began late has no layer outputs by design)
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
                              {n: p.numel() for n, _, p in params}, world,
                              {n: str(p.dtype).replace("torch.", "") for n, _, p in params})
        self.update_window.fold(data.stats, tot.updates)
        self.noise.fold(data.stats, tot.noise, world)
        data.stats.output_nonfinite = buf.output_nonfinite and not any(ls.nonfinite for ls in data.stats.layers.values())
        return data

    def layer_index(self) -> Dict[str, Layer]:
        """Every layer by name, the functional ones discovered so far included."""
        index = {layer.name: layer for layer in self.layers}
        if self.functional is not None:
            index.update(self.functional.layers)
        return index

    # ------------------------------------------------------------------ root hooks
    def _root_pre_hook(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        self._depth += 1
        self.blind.forwards += 1
        if self._depth > 1 or graph_task() != -1:  # a recursive call, or a checkpointed recompute
            return
        self._ignoring = False
        try:
            counted = self.guard("step counting", self._forward_begins, module, args)
        except BaseException:  # a finding raised as an error (-W error): the forward does not run
            self._depth -= 1
            raise
        if not counted:  # no training step: nothing of this forward is recorded
            self._ignoring = True
            self.taps.traced.on = False  # (a compiled eval pass: the graph that measures nothing)
            return
        self.taps.new_forward()
        late = self.guard("finiteness check", self.sentinel.poll) if self.sentinel.pending else None
        if late is not None:
            self._found_late(*late)
        buf = self._current()
        self.taps.keeping = buf is None and self.enabled and self.checking
        if buf is not None:
            self.guard("gradient noise scale", self.noise.forward, buf, args, kwargs)
        # A compiled forward measures in its graph exactly when the eager hooks would record
        # (never in forwards gradwatch ignores, such as eval passes): one graph per grad mode
        # that does not measure, whatever the step, and one per grad mode that does.
        self.taps.traced.on = buf is not None
        if self.functional is not None and buf is not None:
            self.functional.enter()

    def _root_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self._depth = max(self._depth - 1, 0)
        if self._depth or graph_task() != -1:
            return
        if self._ignoring:
            self._ignoring = False
            self.taps.take()
            self.taps.traced.take()  # a compiled forward's reductions, if any: not a step's
            return
        kept = self.taps.take()
        traced = self.taps.traced.take() if self.taps.traced.records else []
        if traced and self._current() is not None:  # a compiled forward: its layers' reductions
            self.taps.replay_traced(self._buf, traced)
        if self._buf is None and self.enabled and self.checking and \
                self.guard("finiteness check", self.sentinel.check, output, self.step, "the model's output") is False:
            self._measure_now(kept)
        if self.functional is not None:
            self.functional.leave(compiled=bool(traced))
            if traced and self.functional.activations and not self._said_compiled_functions:
                self._said_compiled_functions = True
                self.say(f"gradwatch: {type(self.model).__name__} runs compiled (torch.compile): activations called "
                         f"as functions (functional=True) and F.scaled_dot_product_attention inside the compiled "
                         f"graph are not measured, its modules are. Leave the model eager to measure them.")
        buf = self._current()
        if buf is not None:  # a measured step: the layers' samples, reduced together
            self.guard("layer outputs", buf.flush)
            self.guard("parameter gradients", self.gradients.watch_output, output)
        self.guard("step counting", self.forwards.add, output)
        if self._lazy:
            self.guard("lazy parameters", self._materialised)

    def _forward_begins(self, module: nn.Module, args: Any) -> bool:
        """Whether this forward of the model belongs to a step; if it does, the watch learns
        whether it opens a new one (see :mod:`.forwards`)."""
        why = _not_a_step(module, args, self.include_eval)
        if why is not None:
            if why == "transform":
                self._in_transform()
            return False
        self._on_root_forward(self.step is None or self.forwards.complete)
        return True

    def _off_step(self, module: nn.Module, args: Any) -> bool:
        """Whether a layer's call is no training step: called outside the model's own forward (a
        LightningModule whose ``training_step`` and ``validation_step`` call ``self.net(x)``), it is
        judged as a forward of the model would be (eval mode, autograd off, see :func:`_not_a_step`)."""
        return self._depth == 0 and _not_a_step(module, args, self.include_eval) is not None

    def _in_transform(self) -> None:
        if not self._said_transform:
            self._said_transform = True
            self.say(f"gradwatch: {type(self.model).__name__} (or a layer of it) ran inside a torch.func transform "
                     f"(vmap, grad, jacrev, ...), whose tensors are batched or wrapped: what runs inside transforms "
                     f"is not measured and counts no step; the forwards and backward passes outside them are "
                     f"measured as usual. Gradients computed inside a transform and put into .grad are read at "
                     f"optimizer.step() with optimizer=opt.")

    def _materialised(self) -> None:
        """After the first forward of a model with lazy modules, which materialised their
        parameters: they are watched like the others from this step's backward on. (A lazy module
        first called later is picked up at the next measured step, which looks parameters up.)"""
        self._lazy = False
        self.gradients.look_again()
        if self._buf is not None:
            self.gradients.register()
            self.noise.register()
        self.gradients.params()  # looked up afresh
        if self.gradients.generation != self._placed_for:
            self._place_param_hooks()

    # ------------------------------------------------------------------ non-finite values between measured steps
    def _measure_now(self, kept: List[Any]) -> None:
        """The model's output is not finite: this step becomes a measured one now, its layers'
        outputs (kept until here) in forward order, and its gradients at the end of its backward."""
        self.guard("finiteness check", self._start_now)
        if self._buf is not None and not kept and self.layers:  # (the finding says so, at the model's output)
            self._buf.output_nonfinite = True
        self.guard("finiteness check", self.taps.replay, self._buf, kept)

    def _start_now(self) -> None:
        self._buf = self._new_buffers(False)
        self._buf.late = True
        self._step_hooks = True
        self.gradients.register()

    def _after_grad(self, param: torch.Tensor) -> None:
        self.blind._trained(param)
        if self._buf is None and self.enabled and self.checking and param.grad is not None and \
                self.guard("finiteness check", self.sentinel.check, param.grad, self.step,
                           "a gradient near the input") is False:
            self.guard("finiteness check", self._start_now)  # every gradient is read at the end of this backward
            self.guard("finiteness check", self.gradients.accumulated, param)

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


def _not_a_step(module: nn.Module, args: Any, include_eval: bool) -> Optional[str]:
    """Why a forward of the model is no training step, or None when it is one: inside a torch.func
    transform, on the meta device (shapes only), in eval mode (unless ``include_eval``), or with
    autograd off (``torch.no_grad()``, ``inference_mode()``: rollouts, targets; unless
    ``include_eval``). A forward that autograd runs with its inputs requiring gradients (reentrant
    activation checkpointing of the whole model) is one."""
    if transformed():
        return "transform"
    for a in args:  # (the first tensor: a loop, where a generator is a Python call per item)
        if isinstance(a, Tensor):
            if a.is_meta:
                return "meta"
            break
    if include_eval:
        return None
    if not module.training:
        return "eval"
    if not torch.is_grad_enabled() and not any(isinstance(a, Tensor) and a.requires_grad for a in args):
        return "no_grad"
    return None


def _is_compiled(model: nn.Module) -> bool:
    return type(model).__name__ == "OptimizedModule" or getattr(model, "_compiled_call_impl", None) is not None
