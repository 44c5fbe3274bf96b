"""Reading parameter gradients when they are final for the step.

On measured steps, gradients are read at the end of every backward pass that wrote a
``.grad`` (the last read of the step wins, so two losses, accumulation inside one step and
``retain_graph`` give the summed gradient the optimizer will see), and once more just before
``optimizer.step()`` when the optimizer is known (after clipping and all-reduce). An
``autograd.grad`` call writes no ``.grad`` and is not read. Parameters are looked up when
they are read, not once at attach: unfrozen layers, ``to_empty()``-materialised models,
``load_state_dict(assign=True)``, re-created heads and lazy modules after their first forward
are all measured as they are now, under the names ``named_parameters()`` gives them now
(``weight_orig`` while a weight is pruned, ``weight`` again after ``prune.remove``).

Two triggers find the end of a backward pass: a hook that runs after a parameter's gradient
is accumulated (any way the model was called), and a tensor hook on the model's outputs (for
FSDP, whose shards get their gradients assigned rather than accumulated). Either queues one
autograd-engine callback per pass; a snapshot of gradient versions taken when the pass
started tells whether it wrote a gradient.

With a ``torch.amp.GradScaler`` (``GradWatch(..., scaler=)``) the gradients at the end of
backward are the scaled ones: they are divided by the scale the scaler holds then (on the
device, no synchronisation). At ``optimizer.step()`` they are already unscaled, and a step
the scaler skips (non-finite gradients) never reaches it.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .. import stats
from ..layers import Selector, select_parameters
from .buffers import GradientRead, Reduction, StepBuffers
from .guard import Guard
from .hooks import WeakHook, untraced
from .outputs import iter_tensors
from .ranks import local_shard, reduce_shards

Current = Callable[[], Optional[StepBuffers]]


def queue_after_backward(callback: Callable[[], None]) -> None:
    """Run ``callback`` once the current backward pass is done, every ``.grad`` accumulated.
    The first callback queues the real one behind everything queued meanwhile (DDP's
    finalisation, which waits for the all-reduce): the engine runs callbacks until none is left."""
    engine = torch.autograd.Variable._execution_engine
    engine.queue_callback(untraced(lambda: engine.queue_callback(untraced(callback))))


def _version(g: Optional[Tensor]) -> Optional[Tuple[int, int]]:
    return None if g is None else (id(g), getattr(g, "_version", 0))


def _device_and_dtype(entry: Tuple[str, str, nn.Parameter]) -> Tuple[str, str]:
    return str(entry[2].device), str(entry[2].dtype)


class GradientReader:
    """Reads the watched parameters' gradients into the step's buffers."""

    def __init__(self, model: nn.Module, include: Sequence[Selector], exclude: Sequence[Selector],
                 how: Reduction, guard: Guard, current: Current) -> None:
        self.model = model
        self.include, self.exclude = include, exclude
        self.how = how
        self.guard = guard
        self.current = current
        self.handles: List[RemovableHandle] = []
        self.scaler: Any = None  # a torch.amp.GradScaler: gradients at the end of backward are scaled
        self.half_precision = False  # the model has returned float16/bfloat16 outputs
        self._queued = False  # a read is queued for the end of the running backward pass
        self._wrote = False  # a parameter's .grad was accumulated in this pass
        self._snapshot: Optional[List[Any]] = None
        self._key: Optional[List[Any]] = None  # what the last look-up depended on (_structure)
        self._modules: List[nn.Module] = []  # the model's modules at the last look-up
        self.generation = 0  # how many times the look-up found the parameters changed
        self._params: List[Tuple[str, str, nn.Parameter]] = []
        self._assigned = False  # some watched parameter is sharded (FSDP)
        self._hooked: Optional[List[Tuple[str, str, nn.Parameter]]] = None  # the list the hooks are on
        self._checked = False  # the parameters were looked up in this measured step
        self._swaps = False  # the model swaps parameters within a step (FSDP): look them up at every read

    def params(self) -> List[Tuple[str, str, nn.Parameter]]:
        """(name, owning layer, parameter) of the watched parameters that train, as they are now:
        looked up again whenever a parameter was replaced, added, frozen or unfrozen."""
        # Checked once per measured step (``register``), and at every read of a model that swaps
        # its parameters within a step (FSDP swaps sharded and unsharded ones around each forward
        # and backward). A check reads each module's own dictionaries (:meth:`_structure`); only a
        # change walks the model by name again.
        if self._checked and not self._swaps:
            return self._params
        self._checked = True
        if self._structure() != self._key:
            self._modules = list(self.model.modules())
            self._key, self._params = self._structure(), select_parameters(self.model, self.include, self.exclude)
            self.generation += 1
            # Sharded parameters get their gradients assigned, not accumulated: only for them
            # must a backward pass compare gradient versions to know whether it wrote one.
            self._assigned = any(type(p).__name__ == "DTensor" for _, _, p in self._params)
            self._swaps = self._assigned or any(type(m).__name__ == "FullyShardedDataParallel"
                                                for m in self.model.modules())
        return self._params

    def _structure(self) -> List[Any]:
        """What the look-up depends on, per module of the last look-up: its parameters (name, since
        ``prune.remove`` renames ``weight_orig`` to ``weight``; identity; whether it trains; type, since
        a lazy parameter is materialised in place, keeping its identity) and its children (a module
        replaced or added anywhere changes its parent's). A few microseconds, where walking
        ``named_parameters()`` costs about 30 inside a training step."""
        key: List[Any] = []
        for m in self._modules:
            for name, p in m._parameters.items():
                key.append((name, id(p), p is not None and p.requires_grad, type(p)))
            key.extend(map(id, m._modules.values()))
        return key

    def look_again(self) -> None:
        """Look the parameters up afresh at the next ``params()`` (they may have changed)."""
        self._checked = False

    # ------------------------------------------------------------------ triggers
    def register(self) -> None:
        """A measured step begins: hook every watched parameter's gradient accumulation (again
        when parameters were replaced, frozen or unfrozen since the hooks were placed)."""
        self._checked = False  # looked up afresh once per measured step
        params = self.params()
        if self.handles and self._hooked is params:
            return
        self.remove()
        self._hooked = params
        for _, _, p in params:
            if hasattr(p, "register_post_accumulate_grad_hook"):
                self.handles.append(p.register_post_accumulate_grad_hook(untraced(WeakHook(self._accumulated))))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def watch_output(self, output: Any) -> None:
        """The model's forward returned: its outputs' gradients mark a backward pass."""
        if self.current() is None or not torch.is_grad_enabled():
            return
        for t in iter_tensors(output):
            if isinstance(t, Tensor) and t.requires_grad:
                t.register_hook(untraced(self._backward_started))
                # Half-precision outputs (autocast, .half()): the loss may be scaled by a GradScaler.
                self.half_precision |= t.dtype in (torch.float16, torch.bfloat16)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        # A step given a closure (L-BFGS, Lightning) computes its gradients inside, after this hook.
        # (args holds the optimizer first, then step()'s own arguments.)
        return optimizer.register_step_pre_hook(untraced(
            lambda opt, args, kwargs: None if kwargs.get("closure", args[1] if len(args) > 1 else None) is not None
            else self.guard("optimizer step", self._before_optimizer_step)))

    def _backward_started(self, grad: Tensor) -> None:
        if not self._queued:
            if self._assigned:
                self._snapshot = [_version(p.grad) for _, _, p in self.params()]
            self._queue()

    def _accumulated(self, param: Tensor) -> None:
        self._wrote = True
        if not self._queued:
            self._queue()

    accumulated = _accumulated  # a gradient was written: read them all at the end of this backward

    def _queue(self) -> None:
        buf = self.current()
        if buf is None:
            return
        self._queued = True
        queue_after_backward(lambda: self.guard("parameter gradients", self._end_of_backward, buf))

    def _end_of_backward(self, buf: StepBuffers) -> None:
        wrote, snapshot = self._wrote, self._snapshot
        self._queued, self._wrote, self._snapshot = False, False, None
        params = self.params()
        if not wrote and snapshot is not None:
            wrote = len(snapshot) != len(params) or any(
                _version(p.grad) != v for (_, _, p), v in zip(params, snapshot))
        if wrote:  # an autograd.grad call (a gradient penalty's inner pass) writes no .grad
            scale = self._scale()
            # Copied: GradScaler.update() changes its scale in place before the step's numbers are read,
            # and the gradients at layer outputs are divided by the scale this backward ran with.
            buf.loss_scale = None if scale is None else scale.detach().clone()
            read = self.read(params, histograms=buf.histograms, buf=buf, scale=scale)
            if read is not None:
                buf.grads = read

    def _before_optimizer_step(self) -> None:
        buf = self.current()
        if buf is None:
            return
        read = self.read(self.params(), histograms=buf.histograms and buf.grads is None, buf=buf)
        if read is not None:
            buf.applied = read
            if buf.grads is None:  # no backward was seen (a model trained through another method)
                buf.grads = read

    def _scale(self) -> Optional[Tensor]:
        """The loss scale the gradients of this backward were multiplied by (a device tensor)."""
        scaler = self.scaler
        if scaler is None or not scaler.is_enabled():
            return None
        return getattr(scaler, "_scale", None)  # None until the scaler has scaled a loss

    # ------------------------------------------------------------------ reading
    def read(self, params: List[Tuple[str, str, nn.Parameter]], *, histograms: bool,
             buf: StepBuffers, scale: Optional[Tensor] = None) -> Optional[GradientRead]:
        """Summarise the gradients present now, on their device; histograms when asked;
        gradient rows divided by ``scale`` (a loss scaler's) when given."""
        names: List[str] = []
        grads: List[Tensor] = []
        weights: List[Tensor] = []
        groups: List[Any] = []
        # Grouped by device and dtype, each group is one run of fused kernels and one slice (sorted
        # only where there are several: the key is a Python call per parameter).
        kinds = {(p.device, p.dtype) for _, _, p in params}
        for pname, _, p in params if len(kinds) < 2 else sorted(params, key=_device_and_dtype):
            g = p.grad
            if g is None:
                continue
            w, group = p, None
            if type(g).__name__ == "DTensor" or type(p).__name__ == "DTensor":  # FSDP's shards (else none)
                g, group = local_shard(g)
                w, _ = local_shard(p)
            names.append(pname)
            grads.append(g.coalesce()._values() if g.is_sparse else g)
            weights.append(w)
            groups.append(group)
        if not grads:
            return None
        summary = reduce_shards(stats.grad_summaries(grads, weights), groups, max_rows=(1,))
        inv = None
        if scale is not None:
            inv = 1.0 / scale.to(device=summary.device, dtype=summary.dtype).reshape(())
            summary = torch.cat([summary[:2] * inv, summary[2:]])
        rows = buf.grad_hist_rows
        if histograms and rows is not None:  # binned with the step's other histograms (buffers.SampleRows)
            with torch.no_grad():
                hist = {}
                for n, g in zip(names, grads):
                    ref = rows.add(g.abs() if g.is_complex() else g, scale=None if inv is None else inv.to(g.device))
                    if ref is not None:
                        hist[n] = ref
                buf.grad_hist = hist
        return GradientRead(names, summary)
