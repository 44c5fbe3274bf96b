"""Per-step accumulation on the device: named fields, filled by the taps, read by the summary.

A measured step gets a fresh :class:`StepBuffers`; every hook writes into the buffers of the
step that registered it, so a late backward never pollutes a newer step. Nothing here is
kept between steps except what :class:`UnitHistory` holds on purpose (per-unit counters).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import stats
from ..layers import ActivationKind, ActivationSpec
from .outputs import iter_tensors


def in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. a checkpointed forward being recomputed)."""
    return torch._C._current_graph_task_id() != -1


def site_name(name: str, call: int) -> str:
    """The record name of a module's ``call``-th call in one forward: the first keeps the
    module's name (renamed ``#1`` in the summary once a second site exists)."""
    return name if call == 1 else f"{name}#{call}"


@dataclass(frozen=True)
class Reduction:
    """How outputs are reduced: saturation margin, sample size, histogram bins."""

    margin: float
    samples: int
    bins: int

    @property
    def histogram_samples(self) -> int:
        return min(self.samples, stats.HISTOGRAM_SAMPLES)


def summarise(t: Tensor, spec: ActivationSpec, how: Reduction, total: Optional[Tensor] = None) -> Tensor:
    """``stats.activation_summary`` of one output tensor, with the bounds its kind has (a
    rectifier's are its upper one, if any; its output cannot be negative)."""
    rectifier = spec.kind is ActivationKind.RECTIFIER
    bounded = rectifier or spec.kind is ActivationKind.BOUNDED
    return stats.activation_summary(t, spec.lower if bounded else None, spec.upper if bounded else None,
                                    how.margin, how.samples, nonnegative=rectifier, total=total)


def summarise_with_units(t: Tensor, spec: ActivationSpec, how: Reduction,
                         layout: Optional[Tuple[torch.Size, bool]]) -> Tuple[Tensor, Optional[Tensor]]:
    """``summarise`` and, for an activation that tracks dead units, its per-unit activity
    (``stats.active_units``). A rectifier's output cannot be negative, so one pass of per-unit
    sums gives both its activity and its total (``stats.unit_sums``): a pass less."""
    if not spec.tracks_dead_units:
        return summarise(t, spec, how), None
    channels_first = follows_layout(layout, t.shape)
    if spec.kind is ActivationKind.RECTIFIER:
        sums = stats.unit_sums(t, channels_first)
        if sums is not None:
            return summarise(t, spec, how, total=sums.sum()), sums > 0
    return summarise(t, spec, how), stats.active_units(t, channels_first)


def follows_layout(layout: Optional[Tuple[torch.Size, bool]], shape: torch.Size) -> Optional[bool]:
    """Whether an activation of ``shape`` is channels-first, from ``layout`` (the shape of the
    last output whose module type tells, and what it told); None when the shapes differ."""
    return layout[1] if layout is not None and layout[0] == shape else None


@dataclass
class ActivationPart:
    """One output tensor of one call: ``stats.activation_summary`` over ``numel`` elements,
    its spread and shares from a sample of ``sampled`` elements."""

    numel: int
    sampled: int
    summary: Tensor


@dataclass
class SiteBuffer:
    """What one call site (a module, or one of its call sites) produced in the step."""

    calls: int = 0
    parts: List[ActivationPart] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)  # dtypes of outputs that are not measured
    histogram: Optional[Tensor] = None
    slope: List[Tensor] = field(default_factory=list)  # stats.slope_saturation rows
    out_grad: List[Tensor] = field(default_factory=list)  # L2 norms of the gradient at the output
    alive: Optional[Tensor] = None  # per unit: any non-zero output in this step
    attention: List[Tensor] = field(default_factory=list)  # stats.attention_summary per call (attention.py)

    def add_output(self, output: Any, spec: ActivationSpec, how: Reduction, histograms: bool,
                   layout: Optional[Tuple[torch.Size, bool]] = None) -> List[Tensor]:
        """Reduce one call's output on its device; returns its floating-point tensors.
        ``layout``: the shape of the last output whose layout is known, and whether it was
        channels-first: the units of an activation of that shape follow it (``stats.unit_dim``)."""
        self.calls += 1
        if type(output) is Tensor and output.is_floating_point():  # the usual case: one walk less
            tensors = [output]
        else:
            tensors, others = [], []
            for t in iter_tensors(output):  # one walk over the output
                (tensors if t.is_floating_point() else others).append(t)
            for t in others:
                dtype = str(t.dtype).replace("torch.", "")
                if dtype not in self.skipped:
                    self.skipped = sorted(self.skipped + [dtype])
        if len(tensors) == 1:  # per-unit activity is tracked for single-tensor outputs
            summary, alive = summarise_with_units(tensors[0], spec, how, layout)
            self.parts.append(ActivationPart(tensors[0].numel(), stats.sample_size(tensors[0], how.samples), summary))
            self.merge_alive(alive)
        else:
            for t in tensors:
                self.parts.append(ActivationPart(t.numel(), stats.sample_size(t, how.samples), summarise(t, spec, how)))
        if tensors and histograms and self.histogram is None:
            self.histogram = stats.histogram(tensors[0], how.bins, how.histogram_samples)
        return tensors

    def add_summary(self, numel: int, sampled: int, summary: Tensor, alive: Optional[Tensor]) -> None:
        """One call reduced elsewhere (inside a compiled graph, see ``traced``)."""
        self.calls += 1
        self.parts.append(ActivationPart(numel, sampled, summary))
        self.merge_alive(alive)

    def merge_alive(self, alive: Optional[Tensor]) -> None:
        """A unit is alive in the step when any of its calls gave it a non-zero output."""
        if alive is not None:
            if self.alive is None:
                self.alive = alive
            elif self.alive.shape == alive.shape:
                self.alive = self.alive | alive


@dataclass
class GradientRead:
    """Parameter gradients read at one moment: names and a (3, k) ``stats.grad_summaries`` tensor."""

    names: List[str]
    summary: Tensor


@dataclass
class StepBuffers:
    """Device tensors gathered during one measured step."""

    histograms: bool
    sites: Dict[str, SiteBuffer] = field(default_factory=dict)  # insertion order = forward order
    backward_order: Dict[str, None] = field(default_factory=dict)
    grads: Optional[GradientRead] = None  # the last read at the end of a backward that wrote .grad
    applied: Optional[GradientRead] = None  # read at optimizer.step(), after clipping
    grad_hist: Dict[str, Tensor] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    layout: Optional[Tuple[torch.Size, bool]] = None  # the last output of a module with a known layout
    updates: Any = None  # an updates.UpdateRead: update norms across optimizer.step()
    noise: Any = None  # a noise.NoiseRead: the step's micro-batches (gradient noise scale)

    def record(self, site: str, output: Any, spec: ActivationSpec, how: Reduction,
               channels_first: Optional[bool] = None) -> List[Tensor]:
        """Reduce one call's output into ``site`` and watch the gradient that reaches it.
        ``channels_first``: the layout of the recording module's output, when its type tells
        (convolutions and batch norms: True; Linear, LayerNorm, embeddings: False)."""
        tensors = self.site(site).add_output(output, spec, how, self.histograms, self.layout)
        if channels_first is not None and tensors:
            self.layout = (tensors[0].shape, channels_first)
        if torch.is_grad_enabled():
            for t in tensors:
                if t.requires_grad:
                    t.register_hook(self._output_grad_hook(site))
        return tensors

    def _output_grad_hook(self, site: str) -> Any:
        def hook(grad: Tensor) -> None:  # None: the gradient is left as it is
            self.backward_order.setdefault(site, None)
            self.site(site).out_grad.append(stats.l2_norm(grad))
        return hook

    def site(self, name: str) -> SiteBuffer:
        buf = self.sites.get(name)
        if buf is None:
            buf = self.sites[name] = SiteBuffer()
        return buf


@dataclass
class UnitHistory:
    """Per unit of a call site: consecutive measured batches without a non-zero output.
    A unit is dead when that count covers the whole window seen so far (at most ``window``)."""

    window: int
    idle: Dict[str, Tensor] = field(default_factory=dict)
    seen: Dict[str, int] = field(default_factory=dict)

    def update(self, name: str, alive: Tensor) -> "tuple[int, Tensor]":
        """Fold in one measured batch; returns (batches covered, per-unit dead flags as 1.0/0.0,
        float32) on the device."""
        idle = self.idle.get(name)
        if idle is None or idle.shape != alive.shape or idle.device != alive.device:
            idle, self.seen[name] = torch.zeros(alive.shape, dtype=torch.int32, device=alive.device), 0
        seen = self.seen[name] = min(self.seen[name] + 1, self.window)
        # A counter of consecutive idle batches gives the sliding window in two small ops.
        if alive.is_cpu and type(alive) is Tensor:  # in place, in NumPy: a third of the three PyTorch ops' cost
            counter = idle.numpy()
            counter += 1
            np.putmask(counter, alive.numpy(), 0)
            self.idle[name] = idle
            return seen, torch.from_numpy((counter >= seen).astype(np.float32))
        idle = (idle + 1).masked_fill_(alive, 0)
        self.idle[name] = idle
        return seen, (idle >= seen).float()
