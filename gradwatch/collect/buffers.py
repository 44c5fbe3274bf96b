"""Per-step accumulation on the device: named fields, filled by the taps, read by the summary.

A measured step gets a fresh :class:`StepBuffers`; every hook writes into the buffers of the
step that registered it, so a late backward never pollutes a newer step. Nothing here is
kept between steps except what :class:`SampleLayout` (row sizes, small constant tensors) and
:class:`UnitHistory` (per-unit counters, on the host) hold on purpose.

The work per layer is kept to the few kernels that must see the whole tensor while it exists:
the sum of the output (per unit where dead units are tracked) in the forward hook, and the norm
of the gradient at the output in its tensor hook (held until the end of backward, gradients
would stay alive). Everything measured on a strided sample is done for all layers at once: each
hook copies its output's sample into a row of a NaN-filled buffer (:class:`SampleRows`), and
the rows are reduced together when the model's forward returns (``stats.sample_rows``,
``stats.histogram_rows``). Only copies are kept, never the layer's tensor, so activation
checkpointing, in-place modules and freeing work as without gradwatch, and the buffers are
bounded (:data:`CHUNK_ELEMENTS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import stats
from ..layers import ActivationKind, ActivationSpec
from .hooks import untraced
from .outputs import iter_tensors

CHUNK_ELEMENTS = 1 << 22
"""The most elements one buffer of sample rows holds (16 MiB in float32); a full buffer is reduced at
once and the next rows go into a new one, so the memory a step's samples take stays bounded however
many layers a model has."""


def in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. a checkpointed forward being recomputed)."""
    return torch._C._current_graph_task_id() != -1


graph_task = torch._C._current_graph_task_id
"""What :func:`in_backward` reads (-1 outside a backward pass), for the hooks of every step: no Python call."""


def site_name(name: str, call: int) -> str:
    """The record name of a module's ``call``-th call in one forward: the first keeps the
    module's name (renamed ``#1`` in the summary once a second site exists)."""
    return name if call == 1 else f"{name}#{call}"


@dataclass(frozen=True)
class Reduction:
    """How outputs are reduced: saturation margin, sample size, histogram bins, and the share of its
    peak slope below which an activation counts as flat (``Thresholds.saturation_slope``: a smooth
    rectifier's dead-unit cut-off, ``layers.FlatSide.cutoff``)."""

    margin: float
    samples: int
    bins: int
    slope: float = 0.04

    @property
    def histogram_samples(self) -> int:
        return min(self.samples, stats.HISTOGRAM_SAMPLES)


Limits = Optional[Tuple[float, float]]


def limits_of(spec: ActivationSpec, margin: float) -> Limits:
    """The saturation limits of an activation's output (``stats.saturation_limits``), None when
    its kind has no bounds (a rectifier's are its upper one, if any)."""
    if spec.kind not in (ActivationKind.BOUNDED, ActivationKind.RECTIFIER):
        return None
    if spec.lower is None and spec.upper is None:
        return None
    return stats.saturation_limits(spec.lower, spec.upper, margin)


class SampleLayout:
    """What sample buffers of earlier steps looked like, so the next ones are allocated at their
    final size (rows, row length), and small constant tensors (row sizes, saturation limits) made
    once on their device: creating a tensor from host values would cost a copy per step."""

    def __init__(self, rows: int) -> None:
        self.rows: Dict[Any, int] = {}
        self.length: Dict[Any, int] = {}
        self.default_rows = max(rows, 1)
        self._constants: Dict[Any, Tensor] = {}

    def constant(self, values: Tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (values, dtype, device)
        t = self._constants.get(key)
        if t is None:
            if len(self._constants) > 256:  # shapes that keep changing: no unbounded cache
                self._constants.clear()
            t = self._constants[key] = torch.tensor(values, dtype=dtype, device=device).view(-1, 1)
        return t


class Chunk:
    """One buffer of sample rows, NaN after each sample's end, then the result of reducing it."""

    def __init__(self, rows: int, length: int, dtype: torch.dtype, device: torch.device) -> None:
        self.capacity, self.length = rows, length
        self.buf: Optional[Tensor] = torch.full((rows, length), math.nan, dtype=dtype, device=device)
        self.counts: List[int] = []  # per row, the sample's number of elements
        self.limits: List[Limits] = []
        self.half = False  # some row is a float16 tensor's
        self.peaks = False  # the result has a last column of peaks (stats.PEAK_FIELD): for float16 rows
        self.result: Optional[Tensor] = None

    def fits(self, m: int) -> bool:
        return self.buf is not None and len(self.counts) < self.capacity and m <= self.length

    def add(self, view: Tensor, limits: Limits, scale: Optional[Tensor] = None) -> int:
        row = len(self.counts)
        assert self.buf is not None
        dest = torch.as_strided(self.buf, (view.numel(),), (1,), row * self.length)
        if scale is None:
            dest.copy_(view)
        else:
            torch.mul(view, scale, out=dest)
        self.counts.append(view.numel())
        self.limits.append(limits)
        self.half |= view.dtype == torch.float16
        return row


class Row:
    """Where one sample's statistics are: a row of a reduced :class:`Chunk`, or its values computed
    on the host at once (``stats.sample_rows_host``, ``stats.histogram_host``)."""

    __slots__ = ("chunk", "index", "count", "values")

    def __init__(self, count: int, chunk: Optional[Chunk] = None, index: int = 0,
                 values: Optional[List[float]] = None) -> None:
        self.count, self.chunk, self.index, self.values = count, chunk, index, values


class SampleRows:
    """Strided samples (``stats.sample_view``) of a step's tensors, and their statistics: on the CPU
    computed in NumPy as each tensor is seen (``stats.HOST_ARRAYS``); elsewhere copied into rows of
    NaN-filled buffers (:class:`Chunk`) and reduced together by ``reduce`` (``stats.sample_rows``,
    or ``stats.histogram_rows`` when ``bins``): a fixed number of kernels for all layers instead of a
    few per layer. ``kind`` names the layout hints kept between steps."""

    def __init__(self, kind: str, max_elements: int, layout: SampleLayout, bins: int = 0, within: int = 0) -> None:
        self.kind, self.max_elements, self.layout, self.bins = kind, max_elements, layout, bins
        self.within = within  # samples nested in those of at most this many elements (stats.sample_view)
        self.open: Dict[Any, Chunk] = {}
        self._used: Dict[Any, int] = {}  # rows used since the last reduce per (device, dtype): the next hint

    def add(self, t: Tensor, limits: Limits = None, scale: Optional[Tensor] = None,
            a: Optional[np.ndarray] = None) -> Optional[Row]:
        """Take ``t``'s sample (``t`` detached or under no_grad), multiplied by ``scale`` (a 0-dim
        tensor) when given; None when empty. ``a``: ``stats.host_array(t)``, when the caller has it."""
        a = stats.host_array(t) if a is None else a
        if a is not None:
            m = stats.sample_size(t, self.max_elements, self.within)
            if m == 0:
                return None
            factor = None if scale is None else float(scale)
            if self.bins:
                return Row(m, values=stats.histogram_host(t, a, self.bins, self.max_elements, factor, self.within))
            return Row(m, values=stats.sample_rows_host(t, a, self.max_elements, limits, factor)[0])
        view = stats.sample_view(t, self.max_elements, self.within)
        m = view.numel()
        if m == 0:
            return None
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        key = (t.device, dtype)
        chunk = self.open.get(key)
        if chunk is None or not chunk.fits(m):
            if chunk is not None:
                self._reduce(chunk)
            hint = (self.kind, key)
            length = self.layout.length[hint] = max(m, self.layout.length.get(hint, 0))
            rows = self.layout.rows.get(hint, self.layout.default_rows) - self._used.get(key, 0)
            rows = max(1, min(rows, CHUNK_ELEMENTS // length))
            chunk = self.open[key] = Chunk(rows, length, dtype, t.device)
        self._used[key] = self._used.get(key, 0) + 1
        return Row(m, chunk, chunk.add(view, limits, scale))

    def add_with_histogram(self, t: Tensor, limits: Limits, histograms: "SampleRows",
                           a: Optional[np.ndarray] = None) -> Tuple[Optional[Row], Optional[Row]]:
        """:meth:`add`, and ``histograms.add`` of the same tensor, whose sample is nested in this one's
        (``histograms.within``): on the CPU both from one copy of the sample
        (``stats.sample_rows_host``), elsewhere as two samples of the same elements."""
        a = stats.host_array(t) if a is None else a
        if a is None or self.bins or histograms.within != self.max_elements:
            return self.add(t, limits, a=a), histograms.add(t, a=a)
        m = stats.sample_size(t, self.max_elements)
        if m == 0:
            return None, None
        row, hist = stats.sample_rows_host(t, a, self.max_elements, limits, bins=histograms.bins,
                                           histogram_elements=histograms.max_elements)
        return Row(m, values=row), Row(stats.sample_size(t, histograms.max_elements, self.max_elements), values=hist)

    def reduce(self) -> None:
        """Reduce every buffer that still holds rows (the model's forward returned, or the step ends)."""
        for chunk in list(self.open.values()):
            self._reduce(chunk)
        for key, used in self._used.items():  # the next forward's buffers get as many rows
            self.layout.rows[(self.kind, key)] = used
        self._used.clear()

    def _reduce(self, chunk: Chunk) -> None:
        self.open = {k: c for k, c in self.open.items() if c is not chunk}
        buf, chunk.buf = chunk.buf, None
        k = len(chunk.counts)
        if buf is None or not k:
            return
        x = buf if k == chunk.capacity else buf.as_strided((k, chunk.length), (chunk.length, 1), 0)
        if self.bins:
            chunk.result = stats.histogram_rows(x, self.bins)
            return
        counts = self.layout.constant(tuple(float(c) for c in chunk.counts), x.dtype, x.device)
        low = high = None
        if any(lim is not None for lim in chunk.limits):
            bounds = [lim if lim is not None else (-math.inf, math.inf) for lim in chunk.limits]
            low = self.layout.constant(tuple(b[0] for b in bounds), x.dtype, x.device)
            high = self.layout.constant(tuple(b[1] for b in bounds), x.dtype, x.device)
        chunk.peaks = chunk.half
        chunk.result = stats.sample_rows(x, counts, low, high, peak=chunk.peaks)


@dataclass
class ActivationPart:
    """One output tensor of one call, over ``numel`` elements, its spread and shares from a sample of
    ``sampled`` elements: either ``total`` (its sum, or its per-unit sums, with kept dimensions) and
    ``row`` (its sample's ``stats.sample_rows`` row), or ``summary`` (``stats.activation_summary``,
    from a compiled graph)."""

    numel: int
    sampled: int
    total: Any = None  # a device tensor, or the sum read on the host already (a float)
    row: Optional[Row] = None
    summary: Optional[Tensor] = None
    half: bool = False  # a float16 tensor: its row's peak (the sample's largest |value|) is read too


def alive_threshold(spec: ActivationSpec, how: Reduction) -> float:
    """What a smooth rectifier's per-unit maxima must exceed for a unit to be alive: the cut-off
    (``layers.FlatSide.cutoff``) for maxima of its input; for those of its output, where it increases
    strictly (``FlatSide.increasing``), the output at the cut-off."""
    assert spec.flat is not None
    return spec.flat.output_cutoff(how.slope) if spec.flat.increasing else spec.flat.cutoff(how.slope)


def reduce_output(t: Tensor, spec: ActivationSpec, how: Reduction, samples: SampleRows,
                  channels_first: Optional[bool], units: bool, pre: Optional[Tensor] = None,
                  histograms: Optional[SampleRows] = None) -> Tuple[ActivationPart, Optional[Tensor], Optional[Row]]:
    """The per-layer work on one output tensor (under no_grad): its sum, or its per-unit sums when
    ``units`` (an activation that tracks dead units: a rectifier's sums also say which units were
    active, a unit of a non-negative output is active exactly where its sum is positive; a smooth
    rectifier adds per-unit maxima, of its output or of ``pre``, its input, see :func:`alive_threshold`;
    other activations add per-unit L2 norms), and its sample copied into a row of ``samples``
    (and its histogram's into one of ``histograms``, when given). Returns the part, the per-unit
    tensor whose entries above the site's ``alive_above`` are the active units (or None), and the
    histogram's row (or None)."""
    alive = None
    total = None
    a = stats.host_array(t)
    small = a is not None and a.size <= stats.HOST_SUM_ELEMENTS  # a small CPU tensor: NumPy's sums, read at once
    if units and t.numel() and spec.flat is not None:
        source = t if spec.flat.increasing else pre
        if source is not None and source.shape == t.shape:
            alive = stats.unit_max(source, channels_first, keepdim=True)
    elif units and t.numel():
        d = stats.unit_dim(t.dim(), channels_first)
        if small and d is not None and spec.kind is ActivationKind.RECTIFIER:
            alive = stats.host_unit_sums(a, d)
            total = stats.host_sum(alive)
        else:
            total = stats.unit_sums(t, channels_first, keepdim=True)
            if total is not None:
                alive = total if spec.kind is ActivationKind.RECTIFIER else torch.linalg.vector_norm(
                    t, dim=tuple(i for i in range(t.dim()) if i != d), keepdim=True, dtype=total.dtype)
    if total is None:
        total = stats.host_sum(a) if small else stats.full_sum(t)
    if histograms is None:
        row, hist = samples.add(t, limits_of(spec, how.margin), a=a), None
    else:
        row, hist = samples.add_with_histogram(t, limits_of(spec, how.margin), histograms, a=a)
    return ActivationPart(t.numel(), row.count if row is not None else 0, total, row,
                          half=t.dtype == torch.float16), alive, hist


def follows_layout(layout: Optional[Tuple[torch.Size, bool]], shape: torch.Size) -> Optional[bool]:
    """Whether an activation of ``shape`` is channels-first, from ``layout`` (the shape of the
    last output whose module type tells, and what it told); None when the shapes differ."""
    return layout[1] if layout is not None and layout[0] == shape else None


@dataclass
class SiteBuffer:
    """What one call site (a module, or one of its call sites) produced in the step."""

    calls: int = 0
    parts: List[ActivationPart] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)  # dtypes of outputs that are not measured
    histogram: Optional[Row] = None
    slope: List[Tensor] = field(default_factory=list)  # stats.slope_saturation rows
    out_grad: List[Any] = field(default_factory=list)  # L2 norms of the gradient at the output (or their values)
    alive: List[Tensor] = field(default_factory=list)  # per call, per unit: above alive_above where the unit was active
    alive_above: float = 0.0  # a smooth rectifier's cut-off (alive_threshold); 0 for the others
    cutoff: Optional[float] = None  # a smooth rectifier's pre-activation cut-off (FlatSide.cutoff)
    attention: List[Tensor] = field(default_factory=list)  # stats.attention_summary per call (attention.py)

    def add_output(self, output: Any, spec: ActivationSpec, how: Reduction, samples: SampleRows,
                   histograms: Optional[SampleRows], layout: Optional[Tuple[torch.Size, bool]] = None,
                   pre: Optional[Tensor] = None) -> List[Tensor]:
        """Reduce one call's output (under no_grad); returns its floating-point tensors.
        ``layout``: the shape of the last output whose layout is known, and whether it was
        channels-first: the units of an activation of that shape follow it (``stats.unit_dim``).
        ``pre``: the module's input, where a smooth rectifier's dead units are read from it."""
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
        units = len(tensors) == 1 and spec.tracks_dead_units  # per-unit activity of single-tensor outputs
        wanted = histograms if self.histogram is None else None  # the site's first tensor's histogram
        for t in tensors:
            part, alive, hist = reduce_output(t, spec, how, samples, follows_layout(layout, t.shape) if units else None,
                                              units, pre, wanted)
            self.parts.append(part)
            if alive is not None:
                self.add_alive(alive, spec, how)
            if wanted is not None:
                self.histogram, wanted = hist, None
        return tensors

    def add_summary(self, numel: int, sampled: int, summary: Tensor, alive: Optional[Tensor],
                    spec: Optional[ActivationSpec] = None, how: Optional[Reduction] = None,
                    half: bool = False) -> None:
        """One call reduced elsewhere (inside a compiled graph, see ``traced``); ``half``: a float16
        output, whose ``summary`` ends with its peak."""
        self.calls += 1
        self.parts.append(ActivationPart(numel, sampled, summary=summary, half=half))
        if alive is not None:
            self.add_alive(alive, spec, how)

    def add_nonfinite(self, numel: int) -> None:
        """One call whose output is known non-finite, and nothing else of it (``taps.replay``)."""
        self.calls += 1
        self.parts.append(ActivationPart(numel, 0, math.nan))

    def add_alive(self, alive: Tensor, spec: Optional[ActivationSpec], how: Optional[Reduction]) -> None:
        """One call's per-unit activity (a smooth rectifier's per-unit maxima, compared with its cut-off)."""
        self.alive.append(alive)
        if spec is not None and spec.flat is not None and how is not None:
            self.alive_above = alive_threshold(spec, how)
            self.cutoff = spec.flat.cutoff(how.slope)


@dataclass
class GradientRead:
    """Parameter gradients read at one moment: names and a (3, k) ``stats.grad_summaries`` tensor."""

    names: List[str]
    summary: Tensor


class StepBuffers:
    """Device tensors gathered during one measured step."""

    def __init__(self, histograms: bool, how: Optional[Reduction] = None, layout: Optional[SampleLayout] = None) -> None:
        how = how or Reduction(0.01, 1 << 15, 64)
        layout = layout or SampleLayout(8)
        self.histograms = histograms
        self.sites: Dict[str, SiteBuffer] = {}  # insertion order = forward order
        self.backward_order: Dict[str, None] = {}
        self.grads: Optional[GradientRead] = None  # the last read at the end of a backward that wrote .grad
        self.applied: Optional[GradientRead] = None  # read at optimizer.step(), after clipping
        self.grad_hist: Dict[str, Row] = {}
        self.notes: List[str] = []
        self.layout: Optional[Tuple[torch.Size, bool]] = None  # the last output of a module with a known layout
        self.updates: Any = None  # an updates.UpdateRead: update norms across optimizer.step()
        self.noise: Any = None  # a noise.NoiseRead: the step's micro-batches (gradient noise scale)
        # Begun by the finiteness check when the step was under way: its layers' outputs are those
        # kept until then (none once backward began, nor inside a compiled graph).
        self.late = False
        self.output_nonfinite = False  # the late step's cause: the model's output held NaN/Inf
        self.loss_scale: Any = None  # a GradScaler's scale the backward's gradients were multiplied by
        self.samples = SampleRows("samples", how.samples, layout)
        # An activation's histogram sample is nested in its statistics' (see SampleRows.add_with_histogram).
        self.act_hist = SampleRows("act_hist", how.histogram_samples, layout, how.bins, how.samples) \
            if histograms else None
        self.grad_hist_rows = SampleRows("grad_hist", how.histogram_samples, layout, how.bins) if histograms else None

    def record(self, site: str, output: Any, spec: ActivationSpec, how: Reduction,
               channels_first: Optional[bool] = None, pre: Optional[Tensor] = None) -> List[Tensor]:
        """Reduce one call's output into ``site`` and watch the gradient that reaches it.
        ``channels_first``: the layout of the recording module's output, when its type tells
        (convolutions and batch norms: True; Linear, LayerNorm, embeddings: False). ``pre``: the
        module's input (a smooth rectifier's dead units are read from it, see ``alive_threshold``)."""
        grad = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # what torch.no_grad() does, without its five Python calls
        try:
            tensors = self.site(site).add_output(output, spec, how, self.samples, self.act_hist, self.layout, pre)
        finally:
            torch._C._set_grad_enabled(grad)
        if channels_first is not None and tensors:
            self.layout = (tensors[0].shape, channels_first)
        if grad:
            for t in tensors:
                if t.requires_grad:
                    t.register_hook(untraced(self._output_grad_hook(site)))
        return tensors

    def _output_grad_hook(self, site: str) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:  # None: the gradient is left as it is
            self.backward_order.setdefault(site, None)
            self.site(site).out_grad.append(stats.l2_norm_now(grad))
        return hook

    def site(self, name: str) -> SiteBuffer:
        buf = self.sites.get(name)
        if buf is None:
            buf = self.sites[name] = SiteBuffer()
        return buf

    def flush(self) -> None:
        """Reduce the samples copied so far (the model's forward returned, or the step ends)."""
        for rows in (self.samples, self.act_hist, self.grad_hist_rows):
            if rows is not None:
                rows.reduce()


@dataclass
class UnitHistory:
    """Per unit of a call site: consecutive measured batches in which it was not active (no non-zero
    output; a smooth rectifier's: no pre-activation above the cut-off), on the host. A unit is dead
    when that count covers the whole window seen so far (at most ``window``)."""

    window: int
    idle: Dict[str, np.ndarray] = field(default_factory=dict)
    seen: Dict[str, int] = field(default_factory=dict)

    def update(self, name: str, alive: np.ndarray) -> Tuple[int, np.ndarray]:
        """Fold in one measured batch (``alive``: per unit, whether it was active); returns (batches
        covered, per-unit dead flags as 1.0/0.0, float64)."""
        idle = self.idle.get(name)
        if idle is None or idle.shape != alive.shape:
            idle, self.seen[name] = np.zeros(alive.shape, dtype=np.int64), 0
        seen = self.seen[name] = min(self.seen[name] + 1, self.window)
        # A counter of consecutive idle batches gives the sliding window in two small steps.
        idle += 1
        idle[alive] = 0
        self.idle[name] = idle
        return seen, (idle >= seen).astype(np.float64)
