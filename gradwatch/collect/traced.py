"""Layer hooks that torch.compile traces into the model's graph instead of breaking it.

When ``torch.compile`` traces a watched layer's forward hook, the hook does not run
gradwatch's eager code (which would split the graph at every layer); it adds a measured step's
reductions of the layer's output to the graph (:func:`graph_summary`, and per-unit activity
from :func:`gradwatch.stats.active_units` for dead units, or a smooth rectifier's per-unit maxima
from :func:`gradwatch.stats.unit_max`, taken by a pre-hook where an in-place module overwrites its
input), where the compiler fuses them into one pass over the output, and appends the small
results to :attr:`TracedTaps.records`.
After the forward, the root module's hook (eager, at the graph's edge) hands them to the
step's buffers like any other record.

Whether a forward is measured is one Python flag, :attr:`TracedTaps.on`, set by the root
module's pre-hook for each forward. The compiler guards on its value, so a compiled model gets
one graph that measures and one that does not (per grad mode, as PyTorch compiles anyway), and
switching between them as the step count advances recompiles nothing. Nothing step-dependent
(step numbers, buffers of a step, counters) is read inside the traced hook, and what it reads of
a layer is fixed at attach (:class:`TracedLayer`). It computes no sample stride on the host, so
a graph compiled for dynamic shapes (a last batch of another size) stays one graph.

Not measured inside a compiled region: gradients at layer outputs and the slope-based
saturation of generic activations (both need autograd hooks on intermediate tensors), and
activation histograms; parameter gradients are read as in eager mode, at the end of backward.
"""

from __future__ import annotations

import itertools
import sys
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import stats
from ..layers import ActivationKind, Layer
from .buffers import follows_layout

compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


def inside_compiled_call() -> bool:
    """Whether a callable that torch.compile made (a compiled model, ``model.compile()``, a compiled
    training step) is running below this call. Its layers run in a graph: they measure through
    :class:`TracedTaps`, and a function tap or module hooks placed for one forward would only change
    the graph's guards (a recompile). Walks the stack (a few dozen frames) for Dynamo's wrapper."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "compile_wrapper" and code.co_filename.endswith("eval_frame.py"):
            return True
        frame = frame.f_back
    return False

_HALF = (torch.float16, torch.bfloat16)


def graph_summary(y: Tensor, lower: Optional[float] = None, upper: Optional[float] = None,
                  margin: float = 0.01, peak: bool = False) -> Tensor:
    """:func:`gradwatch.stats.activation_summary` of ``y`` with every element as the sample,
    ``[sum, sample_dev_norm, sample_nonzero(, sample_saturated)]`` (float32 at least), read with
    ``stats.activation_moments(values, n, n)``; ``peak``: one more value last, the largest |value|
    (what ``fp16_overflow`` judges of a float16 output, as ``stats.PEAK_FIELD`` of a sample row).

    For a compiled graph: the mean and spread come from one ``var_mean`` (Welford's update,
    exact also when the mean is large), and with the counts the compiler fuses them into one
    pass over ``y``, which the full sum of the sampled form makes anyway. No stride is computed
    on the host, so nothing specialises on the tensor's size. Few operations, as each costs
    compile time: half precision is reduced in float32 (the accumulator), counts too (exact up
    to 2**24, within 6e-8 of the count above). A NaN/Inf makes the sum non-finite.

    >>> [round(v, 4) for v in graph_summary(torch.tensor([0.0, 0.5, 0.999, 1.0]), 0.0, 1.0).tolist()]
    [2.499, 0.8287, 3.0, 3.0]
    """
    x = y.detach()
    n = x.numel()
    if x.dtype in _HALF:
        x = x.float()
    if n == 0:
        return torch.zeros(3 + (lower is not None or upper is not None) + peak, dtype=x.dtype, device=x.device)
    var, mean = torch.var_mean(x, correction=0)
    parts = [mean * n, (var * n).sqrt(), torch.count_nonzero(x).to(mean.dtype)]
    if lower is not None and upper is not None:  # as stats.activation_summary's _near_bounds
        center, half = (upper + lower) / 2, (upper - lower) / 2
        parts.append(((x - center).abs() > half * (1 - 2 * margin)).sum(dtype=mean.dtype))
    elif upper is not None:
        parts.append((x > upper - margin).sum(dtype=mean.dtype))
    elif lower is not None:
        parts.append((x < lower + margin).sum(dtype=mean.dtype))
    if peak:
        parts.append(x.abs().amax())
    return torch.stack(parts)


class TracedLayer(NamedTuple):
    """What a layer's traced hook reads, fixed at attach (constants of the graph)."""

    layer: Layer
    lower: Optional[float]  # saturation bounds, as ``buffers.summarise`` takes them
    upper: Optional[float]
    margin: float
    units: bool  # tracks dead units (per-unit activity)
    rectifier: bool  # its output cannot be negative
    increasing: Optional[bool]  # a smooth rectifier: whether its output is read (else its input); None otherwise
    own_layout: Optional[bool]  # whether the module's type puts units at dim 1 (``taps.channels_first``)

    @classmethod
    def of(cls, layer: Layer, margin: float, own_layout: Optional[bool]) -> "TracedLayer":
        spec = layer.spec
        rectifier = spec.kind is ActivationKind.RECTIFIER
        bounded = rectifier or spec.kind is ActivationKind.BOUNDED
        return cls(layer, spec.lower if bounded else None, spec.upper if bounded else None, margin,
                   spec.tracks_dead_units, rectifier, spec.flat.increasing if spec.flat is not None else None,
                   own_layout)


class TracedRecord(NamedTuple):
    """One compiled layer call: the output's size and its summaries (every element sampled)."""

    layer: Layer
    numel: int
    summary: Tensor
    alive: Optional[Tensor]
    half: bool  # a float16 output: ``summary`` ends with its peak (see graph_summary)


class LIVE:
    """The :class:`TracedTaps` of every attached watch, each an attribute named by its ``key``.

    The layers' traced hooks reach their watch's taps through this one global, never through
    their closures: the compiler guards every path by which it reaches an object, and the same
    object reached from the closure of each layer's hook adds a relational guard per layer
    (``DUPLICATE_INPUT``), which costs more compile time than the rest of the hook. A key that
    has gone (the watch detached) fails the guard, and the graph is traced again without it."""


_keys = itertools.count()


class TracedTaps:
    """The reductions of compiled layers, in the order the layers ran."""

    def __init__(self) -> None:
        self.key = f"watch{next(_keys)}"
        self.on = False  # this forward is measured (a guard of the compiled graph)
        self.records: List[Tuple[Any, ...]] = []  # emptied (never replaced) before every forward of the model
        self.layout: Optional[Tuple[torch.Size, bool]] = None  # as StepBuffers.layout, within one forward
        self.maxima: Dict[str, Tensor] = {}  # an in-place smooth rectifier's input maxima, until its forward hook

    def attach(self) -> None:
        setattr(LIVE, self.key, self)

    def detach(self) -> None:
        self.on = False
        if getattr(LIVE, self.key, None) is self:
            delattr(LIVE, self.key)

    def before(self, plan: TracedLayer, args: Any) -> None:
        """Traced pre-hook of an in-place smooth rectifier read from its input: its per-unit maxima."""
        x = args[0] if args else None
        if self.on and isinstance(x, Tensor) and x.is_floating_point():
            high = stats.unit_max(x, follows_layout(self.layout, x.shape))
            if high is not None:
                self.maxima[plan.layer.name] = high

    def record(self, plan: TracedLayer, output: Any, args: Any = ()) -> None:
        """Traced by torch.compile: reduce ``output`` into the graph when the forward is measured.
        ``args``: the module's inputs, where a smooth rectifier's dead units are read from its input."""
        if not self.on or not isinstance(output, Tensor) or not output.is_floating_point():
            return
        if plan.own_layout is not None:
            self.layout = (output.shape, plan.own_layout)
        alive = None
        if plan.units:
            units_first = follows_layout(self.layout, output.shape)
            if plan.increasing is None:
                alive = stats.active_units(output, units_first, plan.rectifier)
            else:  # a smooth rectifier: per-unit maxima of its output, or of its input
                pre = args[0] if args and isinstance(args[0], Tensor) and args[0] is not output else None
                source = output if plan.increasing else pre
                if source is not None and source.shape == output.shape:
                    alive = stats.unit_max(source, units_first)
                alive = self.maxima.pop(plan.layer.name, alive)
        # A plain tuple: a NamedTuple built inside the graph costs the compiler a traced call per layer.
        half = output.dtype == torch.float16
        self.records.append((plan.layer, output.numel(),
                             graph_summary(output, plan.lower, plan.upper, plan.margin, peak=half), alive, half))

    def take(self) -> List[TracedRecord]:
        """The records of the forward that just ended; the next forward starts afresh."""
        records = [TracedRecord(*r) for r in self.records]
        self.records.clear()
        self.maxima.clear()
        self.layout = None
        return records
