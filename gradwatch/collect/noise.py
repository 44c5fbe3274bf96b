"""What the gradient noise scale (:mod:`gradwatch.noise_scale`) needs from a measured step.

A step of several micro-batches (gradient accumulation with ``steps="optimizer"`` or
``"manual"``) or of several processes (DDP) has gradients at two batch sizes: each micro-batch's
own gradient, over its samples in one process, and ``.grad`` at the end of the step, over every
micro-batch of every process, which :mod:`.gradients` reads anyway. The first is what a
parameter's tensor hook receives in a backward pass before autograd adds it to ``.grad``, and
before DDP's own hook copies ``.grad`` into its all-reduce buckets (DDP's reduction is left as
it is: no communication hook). Each such gradient is reduced to its norm at once, kept only when
autograd did add it to ``.grad`` (a post-accumulate hook: ``autograd.grad`` calls do not), and
the step's norms reach the host squared and summed, two numbers in its one transfer.

Micro-batches are told apart by the model's forwards: the gradients that follow one or more
forwards, up to the next forward, are one micro-batch, of the samples of those forwards -- the
first dimension of the first tensor among the forward's arguments. A step gives no estimate
where micro-batches differ in size, a parameter gets two gradients within one (two losses with
their own backward passes), or ``.grad`` is not the sum of the step's micro-batches (it held
gradients before them, or was cleared between them).

Hooks are placed on measured steps only, and only where a step can have two batch sizes: with
``steps="optimizer"``/``"manual"`` (or after ``watch.step()``) or under DDP. In a single process
with ``steps="forward"`` a step is one backward pass: nothing is placed; with steps ended by hand,
no more after :data:`GIVE_UP` measured steps of one micro-batch each.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .. import stats
from ..noise_scale import NoiseScale, estimate, observations
from ..report import StepStats
from .buffers import StepBuffers
from .guard import Guard
from .hooks import Unhooked, WeakHook, untraced
from .outputs import iter_tensors

Params = Callable[[], List[Tuple[str, str, nn.Parameter]]]
FIELDS = 4  # what a process contributes to the step's totals: see NoiseRead.totals
GIVE_UP = 3
"""In one process, measured steps of a single micro-batch in a row after which no more hooks are
placed: ``steps="optimizer"`` without gradient accumulation (the Lightning and Hugging Face
callbacks' default) would otherwise pay them on every measured step for nothing."""


@dataclass
class NoiseRead:
    """One measured step's micro-batches: their samples, and the norms of their gradients on the device."""

    samples: List[int] = field(default_factory=list)  # per micro-batch with gradients
    pending: int = 0  # samples of the forwards since the last micro-batch's gradients
    current: Set[int] = field(default_factory=set)  # parameters with a gradient in the running micro-batch
    seen: Set[int] = field(default_factory=set)  # parameters with a gradient in the step
    norms: List[Tensor] = field(default_factory=list)  # one per parameter and micro-batch
    stale: List[Tensor] = field(default_factory=list)  # .grad present before the step's first micro-batch
    inverse_scale: Optional[Tensor] = None  # 1 / a GradScaler's scale, taken at the step's first gradient
    why_not: Optional[str] = None  # why the step gives no estimate

    def forward(self, samples: Optional[int]) -> None:
        if self.current:  # gradients came since the last forward: that micro-batch is complete
            self._close()
        if samples is None:
            self.why_not = "a forward's batch size is unknown"
        else:
            self.pending += samples

    def _close(self) -> None:
        if self.current:
            self.samples.append(self.pending)
            self.pending = 0
            self.current = set()

    def tensors(self) -> List[Tensor]:
        """[sum of squared micro-batch gradient norms, sum of squared stale norms] per device, for the
        step's one transfer."""
        self._close()
        by_device: Dict[torch.device, Tuple[List[Tensor], List[Tensor]]] = {}
        for i, part in enumerate((self.norms, self.stale)):
            for t in part:
                by_device.setdefault(t.device, ([], []))[i].append(t)
        out = []
        for norms, stale in by_device.values():
            # (stats.l2_norm keeps the tensor's dimensions: one element each, of several shapes)
            row = [torch.stack([n.reshape(()) for n in p]).double().square().sum() if p else torch.zeros((), dtype=torch.float64,
                                                                                 device=(norms or stale)[0].device)
                   for p in (norms, stale)]
            if self.inverse_scale is not None:
                row[0] = row[0] * self.inverse_scale.to(row[0].device, torch.float64).square()
            out.append(torch.stack(row))
        return out

    def totals(self, rows: List[List[float]]) -> List[float]:
        """This process's part of the step, to be summed over processes: the sum of its micro-batches'
        squared gradient norms, their number, their samples, and 1.0 where the step gives an estimate."""
        micro_sq = sum(r[0] for r in rows)
        valid = (self.why_not is None and bool(self.samples) and min(self.samples) > 0
                 and len(set(self.samples)) == 1 and not any(r[1] for r in rows))
        return [micro_sq, float(len(self.samples)), float(sum(self.samples)), float(valid)]


def batch_size(args: Any, kwargs: Any) -> Optional[int]:
    """The first dimension of the first tensor among a forward's arguments (positional first), or None."""
    t = next(iter_tensors((args, kwargs or {})), None)
    return int(t.shape[0]) if t is not None and t.dim() > 0 else None


class _Incoming:
    """A parameter's tensor hook: the gradient a backward pass brings it, before it is accumulated.
    Holds the reader and the parameter weakly (a parameter's hooks are invisible to the garbage
    collector); a copy or pickle of it is a no-op."""

    __slots__ = ("reader", "param")

    def __init__(self, reader: "NoiseReader", param: nn.Parameter) -> None:
        self.reader = weakref.ref(reader)
        self.param = weakref.ref(param)

    def __call__(self, grad: Tensor) -> None:  # None: the gradient is left as it is
        reader, param = self.reader(), self.param()
        if reader is not None and param is not None:
            reader.guard("gradient noise scale", reader.incoming, param, grad)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (Unhooked, ())


class NoiseReader:
    """Places the hooks of a measured step, records its micro-batches into ``StepBuffers.noise``,
    and folds each step's estimate into the run's moving averages (:class:`NoiseScale`)."""

    def __init__(self, model: nn.Module, params: Params, guard: Guard,
                 current: Callable[[], Optional[StepBuffers]], scale: Callable[[], Optional[Tensor]],
                 several: bool, world: Callable[[], int]) -> None:
        self.model = model
        self.params = params
        self.guard = guard
        self.current = current
        self.scale = scale  # the loss scale of a GradScaler, if any (a device tensor)
        self.several = several  # a step may hold several forwards and backward passes (steps ended by hand)
        self.world = world  # processes (ranks.world)
        self.average = NoiseScale()
        self.handles: List[RemovableHandle] = []
        self._hooked: Optional[List[Tuple[str, str, nn.Parameter]]] = None
        self._pending: Dict[int, Tensor] = {}  # per parameter: the norm of the gradient being accumulated
        self._single = 0  # measured steps of one micro-batch in a row, in one process

    def active(self) -> bool:
        """Whether a step can have two batch sizes: several processes under DDP (the watched model
        is the ``DistributedDataParallel``), or steps that may hold several micro-batches."""
        if self.world() > 1:  # (a compiled DDP model holds it as _orig_mod)
            return isinstance(getattr(self.model, "_orig_mod", self.model), nn.parallel.DistributedDataParallel)
        return self.several and self._single < GIVE_UP

    def register(self) -> None:
        """A measured step begins: hook the watched parameters (again when they changed)."""
        params = self.params() if self.active() else []
        if any(type(p).__name__ == "DTensor" for _, _, p in params):
            params = []  # FSDP: gradients are reduced as they are computed
        if self.handles and self._hooked is params:
            return
        self.remove()
        self._hooked = params
        for _, _, p in params:
            self.handles.append(p.register_hook(untraced(_Incoming(self, p))))
            if hasattr(p, "register_post_accumulate_grad_hook"):
                self.handles.append(p.register_post_accumulate_grad_hook(untraced(WeakHook(self._on_accumulated))))

    def remove(self) -> None:
        if self.handles or self._pending:  # (called as each step that is not measured begins)
            for h in self.handles:
                h.remove()
            self.handles.clear()
            self._pending.clear()
        self._hooked = None

    def forward(self, buf: StepBuffers, args: Any, kwargs: Any) -> None:
        """A training forward of the measured step ``buf``: its samples."""
        if self.handles:
            self._record(buf).forward(batch_size(args, kwargs))

    @staticmethod
    def _record(buf: StepBuffers) -> NoiseRead:
        if buf.noise is None:
            buf.noise = NoiseRead()
        return buf.noise

    def incoming(self, param: nn.Parameter, grad: Tensor) -> None:
        buf = self.current()
        if buf is None:
            return
        rec = self._record(buf)
        key = id(param)
        if param.grad is not None and not rec.samples and key not in rec.seen:
            rec.stale.append(stats.l2_norm(param.grad))  # .grad before the step's first micro-batch: zeros only
        elif param.grad is None and key in rec.seen:
            rec.why_not = ".grad was cleared within the step"
        if rec.inverse_scale is None:
            scale = self.scale()
            if scale is not None:
                rec.inverse_scale = 1.0 / scale.detach().double()
        self._pending[key] = stats.l2_norm(grad.coalesce()._values() if grad.is_sparse else grad)

    def _on_accumulated(self, param: Tensor) -> None:
        self.guard("gradient noise scale", self._accumulated, param)

    def _accumulated(self, param: Tensor) -> None:
        norm = self._pending.pop(id(param), None)
        buf = self.current()
        if norm is None or buf is None:
            return
        rec = self._record(buf)
        key = id(param)
        if key in rec.current:
            rec.why_not = "a parameter got two gradients from one micro-batch"
        rec.current.add(key)
        rec.seen.add(key)
        rec.norms.append(norm)

    def fold(self, st: StepStats, noise: Optional[List[float]], world: int) -> None:
        """Fold the step's estimate, if it has one, into the moving averages, and give ``st`` their
        B_simple. ``noise``: :meth:`NoiseRead.totals`, summed over the ``world`` processes."""
        if world == 1 and noise is not None:
            self._single = self._single + 1 if noise[1] == 1 else 0
        total = st.total_grad_norm
        if noise is not None and total is not None and noise[3] == world:
            seen = observations(noise[0], noise[1], noise[2], total * total, world)
            if seen is not None:
                self.average.add(*estimate(*seen))
                st.batch_size = int(seen[3])
        st.noise_scale, st.noise_scale_steps = self.average.value, self.average.steps
