"""Forward and backward hooks on watched modules: one record per call site, written into buffers.

Each watched layer carries one permanent forward hook (:meth:`LayerTaps.attach`), which
reduces the layer's output on measured steps and does almost nothing on the others.
Hooks observe and never modify: every hook returns ``None``, reads detached tensors, and
uses no random numbers. Gradients at outputs are read with tensor hooks
(``Tensor.register_hook``), not full module backward hooks, which fail on in-place modules
such as ``nn.ReLU(inplace=True)``.

Between measured steps, the same hook keeps a reference to the layer's output until the
model's forward returns (the per-step finiteness check, :mod:`.finite`), so that when the
model's output turns out non-finite, that step's outputs can still be measured in forward order
(:meth:`LayerTaps.replay`) and the first non-finite layer named at the step it appeared. An
output that only gradwatch still holds and that a known activation consumed is let go as it
would be freed without gradwatch (:func:`_let_go`); the activation's output answers for it.

A module object called at several places of one forward (one ``nn.ReLU()`` reused through a
block) gets one record per call site: ``relu#1``, ``relu#2``, ... counted afresh at each forward
of the model, so the sites of two forwards in one step (siamese pairs) merge site by site.
Forwards that autograd re-runs during backward (activation checkpointing) are not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from sys import getrefcount
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .. import stats
from ..stats import EXPORTING, dynamo_compiling
from ..layers import ActivationKind, Layer
from .buffers import Reduction, StepBuffers, follows_layout, in_backward, site_name
from .forwards import transformed
from .guard import Guard
from .hooks import eager, forward_hook, forward_pre_hook, untraced
from .traced import LIVE, TracedLayer, TracedRecord, TracedTaps, compiling

# The innermost saved-tensor hooks in force (activation checkpointing, offloading), or None.
_saved_tensor_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", lambda tracing: None)
# Holders of a storage (None where this PyTorch cannot tell: nothing is let go there).
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None) if hasattr(Tensor, "_use_count") else None


class _LetGo:
    """In place of an output let go (:func:`_let_go`): what a replay still knows of it."""

    __slots__ = ("id", "numel")

    def __init__(self, t: Tensor) -> None:
        self.id, self.numel = id(t), t.numel()


Kept = Tuple[Layer, Any, int]
"""A layer, its output (or a :class:`_LetGo`) and the ``id`` of its first input, between measured steps."""


def _let_go(kept: List[Kept], safe: Set[str]) -> None:
    """Let go of the output kept two layer calls ago where keeping it costs memory and letting it go
    costs no naming: nothing but this list holds it any more (no Python reference: the forward's
    variables, a module's arguments; no other tensor object on its memory: autograd saves a
    function's result as one, ReLU's; no saved input: ``addmm`` saves its input as the tensor
    itself), and the layer called next took it as input and is a known activation without
    parameters (``safe``: :func:`_finite_in_finite_out`). Such an output (a Linear's output that a
    ReLU consumed) would already be freed without gradwatch; keeping it until the forward returns
    raises the step's peak memory (by 11 % on the seed MLP and CNN with SGD, whose peak is the
    forward's end, with nothing let go). Where it turns non-finite, so does the activation's
    output, which is kept (:func:`_fed_nonfinite`). Any other output is kept (a residual branch's:
    the sum it fed is no layer, and naming a later layer would blame the wrong one). Checked at two
    calls' distance: one call later, a ``nn.Sequential`` still holds it as the next module's input."""
    entry, after = kept[-2], kept[-1]
    t = entry[1]
    # Held by the list alone: as many references as such an object has here (_ALONE), and 2
    # holders of the memory (the tensor and the storage object untyped_storage() gives).
    if after[2] == id(t) and after[0].name in safe and type(t) is Tensor and getrefcount(t) == _ALONE and \
            t._use_count() == 1 and _storage_use_count(t.untyped_storage()._cdata) == 2:
        kept[-2] = (entry[0], _LetGo(t), entry[2])


def _alone() -> int:
    """``getrefcount`` of an object only the kept list holds, read as :func:`_let_go` reads it (the
    tuple's reference, the local's and the argument's: 3 on CPython 3.8-3.13; a Python that
    borrows references may count fewer, so it is measured here, not assumed)."""
    kept: List[Any] = [(None, object(), 0), None]
    entry = kept[-2]
    t = entry[1]
    return getrefcount(t)


_ALONE = _alone()


def _finite_in_finite_out(layer: Layer) -> bool:
    """A known activation without parameters (ReLU, tanh, GELU, ...): it turns no finite value into
    a NaN or Inf, so a non-finite output of it means a non-finite input."""
    return layer.spec.kind in (ActivationKind.RECTIFIER, ActivationKind.BOUNDED, ActivationKind.SMOOTH) and \
        next(layer.module.parameters(), None) is None


def _fed_nonfinite(gone: _LetGo, after: Optional[Kept]) -> bool:
    """Whether the output let go fed the next kept layer (``after``, the known activation that
    :func:`_let_go` found it fed) and that layer's output is non-finite: then it was non-finite
    itself. (While it lived, no other object had its ``id``.)"""
    if after is None or after[2] != gone.id or type(after[1]) is not Tensor:
        return False
    return not math.isfinite(float(after[1].detach().sum()))


Current = Callable[[], Optional[StepBuffers]]
"""Returns the buffers of the step being measured, or None when nothing is to be recorded."""

_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm,
                   nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                   nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                   nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_CHANNELS_LAST = (nn.Linear, nn.Bilinear, nn.LayerNorm, nn.Embedding, nn.EmbeddingBag, nn.RNNBase,
                  nn.MultiheadAttention) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


_FIRST_IS_OUTPUT = (nn.RNNBase, nn.MultiheadAttention)
"""Modules that return their output first and state beside it (a recurrent layer's final hidden and
cell states, duplicating or unlike its output; attention weights): only the output is measured."""


def channels_first(module: nn.Module) -> Optional[bool]:
    """Whether ``module``'s output has its units at dim 1 (convolutions, batch/instance/group
    norms, pooling), at the last dim (Linear, LayerNorm, embeddings, recurrent layers), or
    None when its type does not say. The activations that follow count dead units on that axis."""
    if isinstance(module, _CHANNELS_FIRST):
        return True
    if isinstance(module, _CHANNELS_LAST):
        return False
    return None


def _unit_max(x: Tensor, channels_first: Optional[bool]) -> Optional[Tensor]:
    with torch.no_grad():
        return stats.unit_max(x, channels_first, keepdim=True)


@dataclass
class _SlopeProbe:
    """A generic module's input gradient, paired with its output and the gradient at it."""

    x_shape: torch.Size
    site: str = ""
    buf: Optional[StepBuffers] = None
    y: Optional[Tensor] = None
    g_out: Optional[Tensor] = None


class LayerTaps:
    """Hooks on the watched modules; each call's output is reduced into its site's buffer."""

    def __init__(self, layers: List[Layer], how: Reduction, saturation_slope: float, guard: Guard,
                 current: Current) -> None:
        self.layers = layers
        self.how = how
        self.saturation_slope = saturation_slope
        self.guard = guard
        self.current = current
        self.handles: List[RemovableHandle] = []
        self.seen = 0  # layer outputs recorded since attach
        self.keeping = False  # True during a root forward of an unmeasured step (finiteness check)
        self.kept: List[Kept] = []
        # Layers after which an output may be let go (none where PyTorch cannot count its holders).
        self._safe: Set[str] = {layer.name for layer in layers if _finite_in_finite_out(layer)} \
            if _storage_use_count is not None else set()
        self._calls: Dict[str, int] = {}  # per module, calls in the current forward of the model
        self._calls_of: Optional[StepBuffers] = None  # the step those calls were counted in
        self._layout = {layer.name: channels_first(layer.module) for layer in layers}
        self._probes: Dict[str, List[Optional[_SlopeProbe]]] = {}
        self._peak: Dict[str, Tensor] = {}  # per site, the largest slope seen (kept across steps)
        # Per in-place smooth rectifier read from its input (nn.SiLU(inplace=True)): its per-unit maxima,
        # taken by a pre-hook before the module overwrites its input, until its forward hook runs.
        self._before: Dict[str, Tensor] = {}
        self.traced = TracedTaps()  # what the hooks record when torch.compile traces them
        self.on_transform: Callable[[], None] = lambda: None  # a layer ran inside a torch.func transform
        # Runs a measuring hook's work (``apart(fn, *args)``): outside the function tap while one is
        # entered (``FunctionalTaps.apart``).
        self.apart: Callable[..., Any] = lambda fn, *args: fn(*args)
        # Whether a layer's call is no training step though a step is measured (the collector's: a
        # layer called outside the model's own forward, in eval mode or with autograd off).
        self.off_step: Callable[[nn.Module, Any], bool] = lambda module, args: False

    def attach(self) -> None:
        """One permanent forward hook per layer (and a pre-hook per generic activation and per
        in-place smooth rectifier read from its input). On a measured step it reduces the output;
        on an unmeasured one it keeps the output until the forward returns (see :meth:`take`);
        traced by torch.compile, it adds the reductions to the graph (see ``traced``). The hooks
        never change between steps, so a compiled graph traced with them stays valid whatever the
        compiler's hook guards."""
        if self.handles:
            return
        self.traced.attach()
        for layer in self.layers:
            if layer.spec.kind is ActivationKind.GENERIC:
                self.handles.append(forward_pre_hook(layer.module, self._pre_hook(layer)))
            elif layer.spec.reads_input and getattr(layer.module, "inplace", False):
                self.handles.append(forward_pre_hook(layer.module, self._before_hook(layer)))
            self.handles.append(forward_hook(layer.module, self._hook(layer)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.kept.clear()
        self.traced.detach()

    def take(self) -> List[Kept]:
        """The outputs kept during the forward that just ended (and stop keeping)."""
        self.keeping = False
        kept, self.kept = self.kept, []
        return kept

    def replay(self, buf: StepBuffers, kept: List[Kept]) -> None:
        """Measure the kept outputs of a forward as a measured step would have, in forward order. An
        output let go (:func:`_let_go`) is not measured; where the activation it fed gave a
        non-finite output, it is recorded as non-finite (its element count, nothing else known):
        such an activation makes no NaN or Inf of finite values, so they arose in that output."""
        for i, (layer, output, _) in enumerate(kept):
            if layer.name in self.guard.broken:
                continue
            if type(output) is not _LetGo:
                self.guard(layer.name, self._on_output, layer, buf, output)
            elif _fed_nonfinite(output, kept[i + 1] if i + 1 < len(kept) else None):
                self.guard(layer.name, self._on_nonfinite, layer, buf, output.numel)

    def _on_nonfinite(self, layer: Layer, buf: StepBuffers, numel: int) -> None:
        self.seen += 1
        buf.site(self._site(layer, buf)).add_nonfinite(numel)

    def new_forward(self) -> None:
        """The model's forward begins: call sites are counted from 1 again."""
        if self._calls or self._probes or self._before:  # (empty after an unmeasured forward)
            self._calls.clear()
            self._probes.clear()
            self._before.clear()
        if self.traced.records:
            self.traced.take()

    def replay_traced(self, buf: StepBuffers, records: List[TracedRecord]) -> None:
        """The reductions a compiled forward computed in its graph, recorded as eager calls are."""
        for r in records:
            if r.layer.name not in self.guard.broken:
                self.seen += 1
                site = self._site(r.layer, buf)
                # every element is the sample
                buf.site(site).add_summary(r.numel, r.numel, r.summary, r.alive, r.layer.spec, self.how, half=r.half)

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, layer: Layer) -> Callable[..., None]:
        name = layer.name

        def measure(module: nn.Module, args: Any) -> None:  # must return None: a value replaces the input
            buf = self.current()
            if buf is None or name in self.guard.broken or in_backward() or transformed() or \
                    self.off_step(module, args):
                return
            probe = None
            x = args[0] if args else None
            if isinstance(x, Tensor) and x.is_floating_point() and x.requires_grad and torch.is_grad_enabled():
                # Registered before the module runs, so that an in-place module still gives
                # the gradient with respect to its *input* (autograd keeps hooks with the
                # tensor version they were registered on).
                probe = _SlopeProbe(x.shape)
                x.register_hook(untraced(self._input_grad_hook(name, probe)))
            self._probes.setdefault(name, []).append(probe)
        measure = eager(measure)

        def pre_hook(module: nn.Module, args: Any) -> None:
            if not compiling() and self.current() is not None:  # compiled: no slope probes (see traced)
                self.apart(measure, module, args)
        return pre_hook

    def _before_hook(self, layer: Layer) -> Callable[..., None]:
        """An in-place smooth rectifier read from its input: its per-unit maxima, before it runs."""
        name, key = layer.name, self.traced.key
        traced = TracedLayer.of(layer, self.how.margin, self._layout.get(layer.name))

        def measure(module: nn.Module, args: Any) -> None:  # must return None: a value replaces the input
            buf = self.current()
            x = args[0] if args else None
            if buf is None or name in self.guard.broken or in_backward() or transformed() or \
                    not isinstance(x, Tensor) or not x.is_floating_point() or self.off_step(module, args):
                return
            high = self.apart(_unit_max, x, follows_layout(buf.layout, x.shape))
            if high is not None:
                self._before[name] = high
        measure = eager(measure)

        def pre_hook(module: nn.Module, args: Any) -> None:
            if compiling():
                taps = getattr(LIVE, key)  # as in _hook
                if taps.on:
                    taps.before(traced, args)
            elif self.current() is not None:
                measure(module, args)
        return pre_hook

    def _hook(self, layer: Layer) -> Callable[..., None]:
        name, key = layer.name, self.traced.key
        traced = TracedLayer.of(layer, self.how.margin, self._layout.get(layer.name))
        reads_input = layer.spec.reads_input

        def measure(module: nn.Module, args: Any, output: Any) -> None:  # None: a value replaces the output
            buf = self.current()
            if buf is None or name in self.guard.broken or in_backward():
                return
            if transformed():  # batched or wrapped tensors (vmap inside the model's forward): not measured
                self.on_transform()
                return
            if self.off_step(module, args):
                return
            self.apart(self.guard, name, self._on_output, layer, buf, output, args if reads_input else ())
        measure = eager(measure)

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if dynamo_compiling() or getattr(torch.compiler, EXPORTING, False):  # traced into the compiled graph
                taps = getattr(LIVE, key)  # one path to the taps for every layer (see traced.LIVE)
                if taps.on:  # (read here: an unmeasured graph traces one call less per layer)
                    taps.record(traced, output, args if reads_input else ())
            elif self.keeping:  # an unmeasured step: the usual case, first
                # Kept only with autograd on and nothing packing saved tensors: its graph holds
                # most outputs anyway. Under no_grad, checkpointing (reentrant: no_grad;
                # non-reentrant: it drops saved tensors) or offloading, keeping would undo the
                # memory they save. Those that nothing but gradwatch holds once a known activation
                # has consumed them are let go as they would be freed without it (see _let_go).
                if torch.is_grad_enabled() and _saved_tensor_hooks(False) is None:
                    kept = self.kept
                    if len(kept) > 1 and self._safe:
                        _let_go(kept, self._safe)
                    kept.append((layer, output, id(args[0]) if args else 0))
            elif self.current() is not None:
                measure(module, args, output)
        return hook

    def _site(self, layer: Layer, buf: StepBuffers) -> str:
        if buf is not self._calls_of:  # a new step (a model trained through other methods
            self._calls_of = buf  # than forward has no root forward to count sites from)
            self._calls.clear()
        call = self._calls[layer.name] = self._calls.get(layer.name, 0) + 1
        return site_name(layer.name, call)

    def _on_output(self, layer: Layer, buf: StepBuffers, output: Any, args: Any = ()) -> None:
        self.seen += 1
        site = self._site(layer, buf)
        probes = self._probes.get(layer.name)
        probe = probes.pop() if probes else None
        # A smooth rectifier read from its input: the input as it was (an in-place module overwrote
        # it: the maxima its pre-hook took instead).
        pre = args[0] if args and isinstance(args[0], Tensor) and args[0] is not output else None
        before = self._before.pop(layer.name, None)
        if isinstance(layer.module, _FIRST_IS_OUTPUT) and isinstance(output, tuple) and output:
            output = output[0]  # the sequence out, not the final states or the attention weights beside it
        tensors = buf.record(site, output, layer.spec, self.how, self._layout.get(layer.name), pre)
        if before is not None and pre is None and len(tensors) == 1 and tensors[0].dim() == before.dim():
            buf.site(site).add_alive(before, layer.spec, self.how)
        if not tensors or not torch.is_grad_enabled():
            return
        first = tensors[0]
        if probe is not None and len(tensors) == 1 and first.shape == probe.x_shape and first.requires_grad:
            probe.y, probe.site, probe.buf = first.detach(), site, buf
            first.register_hook(untraced(lambda g: setattr(probe, "g_out", g)))

    def _input_grad_hook(self, name: str, probe: _SlopeProbe) -> Callable[[Tensor], None]:
        def hook(grad_in: Tensor) -> None:
            y, g_out = probe.y, probe.g_out
            probe.y = probe.g_out = None
            site, buf = probe.site, probe.buf
            if y is None or g_out is None or buf is None or name in self.guard.broken or grad_in.shape != y.shape:
                return
            row = stats.slope_saturation(y, grad_in, g_out, self.saturation_slope, self._peak.get(site))
            peak = self._peak.get(site)
            self._peak[site] = row[2] if peak is None else torch.maximum(peak, row[2])
            buf.site(site).slope.append(row)
        return hook
