"""Layer hooks that torch.compile traces into the model's graph instead of breaking it.

When ``torch.compile`` traces a watched layer's forward hook, the hook does not run
gradwatch's eager code (which would split the graph at every layer); it adds the same
device reductions as a measured step's (:func:`gradwatch.stats.activation_summary` and the
per-unit activity of :func:`gradwatch.stats.active_units`, or of a smooth rectifier's
:func:`gradwatch.stats.unit_max`, taken by a pre-hook where an in-place module overwrites its input)
to the graph, where the compiler
fuses them with the layer, and appends the small results to :attr:`TracedTaps.records`.
After the forward, the root module's hook (eager, at the graph's edge) hands them to the
step's buffers like any other record.

Whether a step is measured is one Python flag, :attr:`TracedTaps.on`. The compiler guards on
its value, so a compiled model gets two graphs, one that measures and one that does not, and
switching between them as the step count advances recompiles nothing. Nothing step-dependent
(step numbers, buffers of a step, counters) is read inside the traced hook.

Not measured inside a compiled region: gradients at layer outputs and the slope-based
saturation of generic activations (both need autograd hooks on intermediate tensors), and
activation histograms; parameter gradients are read as in eager mode, at the end of backward.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import stats
from ..layers import Layer
from .buffers import Reduction, follows_layout, summarise_with_units

compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


class TracedRecord(NamedTuple):
    """One compiled layer call: the output's size, its sample's size and its summaries."""

    layer: Layer
    numel: int
    sampled: int
    summary: Tensor
    alive: Optional[Tensor]


class TracedTaps:
    """The reductions of compiled layers, in the order the layers ran."""

    def __init__(self, how: Reduction) -> None:
        self.how = how
        self.on = False  # the running step is measured (a guard of the compiled graph)
        self.records: List[TracedRecord] = []  # emptied (never replaced) before every forward of the model
        self.layout: Optional[Tuple[torch.Size, bool]] = None  # as StepBuffers.layout, within one forward
        self.maxima: Dict[str, Tensor] = {}  # an in-place smooth rectifier's input maxima, until its forward hook

    def before(self, layer: Layer, args: Any) -> None:
        """Traced pre-hook of an in-place smooth rectifier read from its input: its per-unit maxima."""
        x = args[0] if args else None
        if self.on and isinstance(x, Tensor) and x.is_floating_point():
            high = stats.unit_max(x, follows_layout(self.layout, x.shape))
            if high is not None:
                self.maxima[layer.name] = high

    def record(self, layer: Layer, output: Any, own_layout: Optional[bool], args: Any = ()) -> None:
        """Traced by torch.compile: reduce ``output`` into the graph when the step is measured.
        ``own_layout``: whether the module's type puts units at dim 1 (see ``taps.channels_first``).
        ``args``: the module's inputs, where a smooth rectifier's dead units are read from its input."""
        if not self.on or not isinstance(output, Tensor) or not output.is_floating_point():
            return
        if own_layout is not None:
            self.layout = (output.shape, own_layout)
        pre = args[0] if args and isinstance(args[0], Tensor) and args[0] is not output else None
        summary, alive = summarise_with_units(output, layer.spec, self.how, self.layout, pre)
        alive = self.maxima.pop(layer.name, alive)
        self.records.append(TracedRecord(layer, output.numel(), stats.sample_size(output, self.how.samples),
                                         summary, alive))

    def take(self) -> List[TracedRecord]:
        """The records of the forward that just ended; the next forward starts afresh."""
        records = list(self.records)
        self.records.clear()
        self.maxima.clear()
        self.layout = None
        return records
