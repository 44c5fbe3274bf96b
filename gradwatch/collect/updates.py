"""Update-to-weight ratios: how much one ``optimizer.step()`` changes each parameter, relative to its size.

``‖Δw‖ / ‖w‖`` per parameter tensor is the usual check of a learning rate (around 1e-3 is
typical; 1e-1 means each step rewrites a tenth of the weights; below 1e-5 a layer barely
moves). Gradient norms cannot show it for adaptive optimizers, which normalise gradients away,
so it is measured around the step itself, which needs ``GradWatch(..., optimizer=opt)``:

- a step pre-hook, on measured steps only, keeps a copy of a fixed-size strided sample of each
  watched parameter the optimizer holds (at most :data:`UPDATE_SAMPLE` elements
  per tensor: the memory this costs is bounded by ``UPDATE_SAMPLE`` x the number of parameter
  tensors, whatever the model's size; a smaller tensor is copied whole and measured exactly);
- a step post-hook takes the same elements again and reduces both samples on the device (in
  NumPy on the CPU) to ``sqrt(n/m)·‖Δw_sample‖`` and ``sqrt(n/m)·‖w_sample‖``
  (:func:`gradwatch.stats.update_norms`), into the step's buffers, so they reach the host in the
  step's one transfer. Parameters that
  have no gradient after the step (the optimizer skipped them) are left out.

Any optimizer works (SGD, Adam/AdamW, closures such as L-BFGS'), since only the weights before and
after are compared. Under DDP the parameters are the same on every rank (nothing to combine);
FSDP shards combine as the root of summed squares (:func:`.ranks.reduce_shards`). A step that
is skipped (AMP's ``GradScaler`` on overflow) runs neither hook and leaves nothing behind.

:class:`RatioWindow` keeps the last few measured ratios per parameter on the host, so a rule can
tell a ratio that *stays* high from one high step.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .. import stats
from ..report import LayerStats, ParamStats, StepStats
from .buffers import StepBuffers
from .guard import Guard
from .hooks import untraced
from .ranks import local_shard, reduce_shards

UPDATE_SAMPLE = 4096
"""The most elements per parameter tensor kept before a step (a strided sample, the same after)."""

Current = Callable[[], Optional[StepBuffers]]
Params = Callable[[], List[Tuple[str, str, nn.Parameter]]]


@dataclass
class UpdateRead:
    """One measured step's update norms: names, a (2, k) device tensor (``‖Δw‖``, ``‖w‖`` before
    the step), each parameter's learning rate and number of dimensions (host values)."""

    names: List[str]
    summary: Tensor
    lrs: List[Optional[float]]
    ndims: List[int]


@dataclass
class _Snapshot:
    name: str
    param: nn.Parameter
    before: Any  # a tensor, or a NumPy array (stats.host_array)
    scale: float
    group: Any
    lr: Optional[float]


class UpdateReader:
    """Step pre- and post-hooks on an optimizer that measure the watched parameters' updates."""

    def __init__(self, params: Params, guard: Guard, current: Current, samples: int = UPDATE_SAMPLE) -> None:
        self.params = params
        self.guard = guard
        self.current = current
        self.samples = samples
        self._pending: Optional[Tuple[StepBuffers, List[_Snapshot]]] = None

    def attach(self, optimizer: torch.optim.Optimizer) -> List[RemovableHandle]:
        """Register the two hooks. The post-hook must run before any other post-hook that ends the
        step (``steps="optimizer"``), so the caller registers this first."""
        pre = optimizer.register_step_pre_hook(
            untraced(lambda opt, args, kwargs: self.guard("update ratios", self._before, opt)))
        post = optimizer.register_step_post_hook(
            untraced(lambda opt, args, kwargs: self.guard("update ratios", self._after)))
        return [pre, post]

    def _before(self, optimizer: torch.optim.Optimizer) -> None:
        self._pending = None
        buf = self.current()
        if buf is None:
            return
        lr_of: Dict[int, Optional[float]] = {}
        for group in optimizer.param_groups:
            lr = _as_float(group.get("lr"))
            for p in group["params"]:
                lr_of[id(p)] = lr
        shots: List[_Snapshot] = []
        # Sorted by device and dtype, as the gradients are: each group is one run of fused kernels.
        for name, _, p in sorted(self.params(), key=lambda e: (str(e[2].device), str(e[2].dtype))):
            if id(p) not in lr_of or p.layout is not torch.strided:
                continue  # not held by this optimizer
            w, group = local_shard(p)
            if w.numel() == 0 and group is None:
                continue
            a = stats.host_array(w)
            if a is not None:  # a CPU tensor NumPy reads: its sample copied, and reduced after the step, in NumPy
                before = _host_sample(a, self.samples).copy()
                m = before.size
            else:
                with torch.no_grad():
                    sample = _sample(w, self.samples)
                    dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
                    before, m = sample.to(dtype, copy=True), sample.numel()
            scale = math.sqrt(w.numel() / m) if m else 0.0
            shots.append(_Snapshot(name, p, before, scale, group, lr_of[id(p)]))
        if shots:
            self._pending = (buf, shots)

    def _after(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        buf, shots = pending
        # A parameter without a gradient is not updated (checked now: a closure makes them inside step()).
        shots = [s for s in shots if s.param.grad is not None]
        if not shots:
            return
        if self.current() is not buf:  # the step ended inside step() (a closure's forward began a new one)
            buf = self.current()
            if buf is None:
                return
        after = []
        with torch.no_grad():
            for s in shots:
                w, _ = local_shard(s.param)
                if isinstance(s.before, np.ndarray):
                    a = stats.host_array(w)
                    if a is not None:
                        after.append(_host_sample(a, self.samples))
                        continue
                    s.before = torch.from_numpy(s.before)  # no longer read in NumPy: both samples in PyTorch
                sample = _sample(w, self.samples)
                after.append(sample if sample.dtype == s.before.dtype else sample.to(s.before.dtype))
        summary = stats.update_norms([s.before for s in shots], after, [s.scale for s in shots])
        summary = reduce_shards(summary, [s.group for s in shots], max_rows=())
        buf.updates = UpdateRead([s.name for s in shots], summary, [s.lr for s in shots],
                                 [s.param.dim() for s in shots])


def _stride(n: int, last: int, most: int) -> int:
    """The smallest stride at or above ``n / most`` that is coprime with the last dimension's size
    ``last``, so the sample visits every column, and its size never exceeds the cap."""
    stride = 1
    if n > most:
        stride = -(-n // most)
        while math.gcd(stride, last) != 1:
            stride += 1
    return stride


def _sample(w: Tensor, most: int) -> Tensor:
    """At most ``most`` evenly strided elements of ``w`` (a view where ``w`` is contiguous), in its
    logical order (see :func:`_stride`)."""
    n = w.numel()
    stride = _stride(n, w.shape[-1] if w.dim() else 1, most)
    if w.is_contiguous():  # one view, no copy
        return w.as_strided((-(-n // stride),), (stride,), w.storage_offset())
    flat = w.reshape(-1)
    return flat if stride == 1 else flat[::stride]


def _host_sample(a: np.ndarray, most: int) -> np.ndarray:
    """:func:`_sample`'s elements of a tensor NumPy reads as ``a`` (``stats.host_array``)."""
    stride = _stride(a.size, a.shape[-1] if a.ndim else 1, most)
    flat = a.reshape(-1)  # a view where the memory is contiguous, else a copy in logical order
    return flat[::stride] if stride > 1 else flat


def _as_float(lr: Any) -> Optional[float]:
    """A learning rate as a Python number; a tensor one only when reading it costs no device sync."""
    if isinstance(lr, Tensor):
        return float(lr) if lr.device.type == "cpu" and lr.numel() == 1 else None
    return float(lr) if isinstance(lr, (int, float)) else None


def finish(params: Dict[str, ParamStats], read: Optional[Tuple[List[str], List[float], List[Optional[float]],
                                                                List[int]]],
           layers: Optional[Dict[str, LayerStats]] = None) -> None:
    """Host side: the update ratio, learning rate and dimensions onto each parameter's stats, and
    onto each layer's stats the ratio the learning-rate rule judges there: the largest over the
    layer's weight matrices and kernels (ndim >= 2; its biases and norm scales are not judged)."""
    if read is None:
        return
    layers = layers if layers is not None else {}
    names, flat, lrs, ndims = read
    k = len(names)
    for i, name in enumerate(names):
        ps = params.get(name)
        if ps is None:
            continue
        ps.update_ratio = _ratio(flat[i], flat[k + i])
        ps.learning_rate, ps.ndim = lrs[i], ndims[i]
        ls = layers.get(ps.layer)
        if ls is not None and ps.ndim >= 2:
            known = [r for r in (ls.update_ratio, ps.update_ratio) if r is not None and not math.isnan(r)]
            ls.update_ratio = max(known) if known else ps.update_ratio


def _ratio(delta: float, weight: float) -> float:
    return delta / weight if weight > 0 else (math.inf if delta > 0 else math.nan)


class RatioWindow:
    """Per parameter, the update ratios of the last ``size`` measured steps that had one; writes
    their smallest and largest, and how many steps they cover, onto the step's stats (not for a
    weight first seen all zeros, whose large early ratios say nothing about the learning rate)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.ratios: Dict[str, Deque[float]] = {}
        self.from_zero: Set[str] = set()

    def fold(self, stats_: StepStats, read: Optional[Tuple[List[str], List[float], List[Optional[float]],
                                                         List[int]]]) -> None:
        """The step's update norms (``StepTotals.updates``, on the host) onto its parameters' stats."""
        finish(stats_.params, read, stats_.layers)
        for name, ps in stats_.params.items():
            if ps.update_ratio is None:
                continue
            if ps.update_ratio == math.inf:  # the weight was all zeros before the step
                self.from_zero.add(name)
            window = self.ratios.setdefault(name, deque(maxlen=self.size))
            window.append(ps.update_ratio)
            finite = [r for r in window if not math.isnan(r)]
            # A weight that grew from zeros (LoRA's B, zero-initialised output layers) has ratios near
            # 1/t after t steps whatever the learning rate: no window is given for it to judge.
            if finite and name not in self.from_zero:
                ps.update_ratio_min, ps.update_ratio_max = min(finite), max(finite)
                ps.update_window = len(finite)
