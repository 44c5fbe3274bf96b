"""Collecting: attach hooks, reduce watched tensors on their device, hand over once per step.

Only the root module carries permanent hooks (to count steps and to find the end of
backward). Per-layer hooks are registered at the start of a *measured* step and
removed at its end, so steps that do not log cost one cheap hook call, not one per layer.

Hooks observe and never modify: every hook returns ``None``, reads detached tensors,
and uses no random numbers. Gradients of activations are read with tensor hooks
(``Tensor.register_hook``), not full module backward hooks, which fail on in-place
modules such as ``nn.ReLU(inplace=True)``.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from . import stats
from .config import Thresholds
from .exceptions import GradWatchWarning
from .layers import ActivationKind, Layer, display_name, is_wrapper
from .report import LayerStats, ParamStats, StepStats


def iter_tensors(value: Any) -> Iterator[Tensor]:
    """Every tensor inside a module output (tensors, tuples, lists, dicts, dataclasses, nested).
    gradwatch measures the floating-point ones; integer, boolean and complex ones are skipped
    (their statistics mean nothing here) and named in the layer's note."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from iter_tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from iter_tensors(v)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from iter_tensors(getattr(value, f.name, None))


def _eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Keep torch.compile from tracing into gradwatch's hooks: they run eagerly (one graph
    break each) instead of being compiled, and recompiled, once per layer."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


def _queue_after_backward(callback: Callable[[], None]) -> None:
    # The autograd engine runs queued callbacks once the whole backward pass is done, after
    # every parameter's .grad has been accumulated. This is queued when backward *starts*,
    # before DDP queues its own finalisation (which waits for the gradient all-reduce), so
    # the first callback queues the real one behind everything queued meanwhile: the engine
    # keeps running callbacks until none is left. The gradients read are then the
    # synchronised ones the optimizer will apply.
    engine = torch.autograd.Variable._execution_engine
    engine.queue_callback(lambda: engine.queue_callback(callback))


@dataclass
class _StepBuffers:
    """Device tensors gathered during one measured step. Hooks write into the buffers of
    the step that registered them, so a late backward never pollutes a newer step."""

    histograms: bool
    forward_order: Dict[str, None] = field(default_factory=dict)
    backward_order: Dict[str, None] = field(default_factory=dict)
    calls: Dict[str, int] = field(default_factory=dict)
    skipped: Dict[str, List[str]] = field(default_factory=dict)  # dtypes of outputs not measured
    act: Dict[str, List[Tuple[Tuple[int, int], Tensor]]] = field(default_factory=dict)  # ((n, sample n), summary)
    act_hist: Dict[str, Tensor] = field(default_factory=dict)
    slope: Dict[str, List[Tensor]] = field(default_factory=dict)
    out_grad: Dict[str, List[Tensor]] = field(default_factory=dict)
    alive: Dict[str, Tensor] = field(default_factory=dict)
    inputs: Dict[str, List[Optional[dict]]] = field(default_factory=dict)
    params: Optional[Tensor] = None
    param_names: List[str] = field(default_factory=list)
    applied: Optional[Tensor] = None  # gradient norms at optimizer.step(), after any clipping
    applied_names: List[str] = field(default_factory=list)
    grad_hist: Dict[str, Tensor] = field(default_factory=dict)


@dataclass
class StepData:
    """What a measured step produced, on the host."""

    stats: StepStats
    act_histograms: Dict[str, List[float]]
    grad_histograms: Dict[str, List[float]]


class Collector:
    """Attaches gradwatch's hooks to a model and turns measured steps into ``StepData``."""

    def __init__(self, model: nn.Module, layers: List[Layer], params: List[Tuple[str, str, nn.Parameter]],
                 *, thresholds: Thresholds, bins: int, samples: int, dead_window: int,
                 on_root_forward: Callable[[nn.Module], None], strict: bool = False,
                 functional: bool = False) -> None:
        self.model = model
        self.layers = layers
        self.params = params
        self.thresholds = thresholds
        self.bins = bins
        self.samples = samples
        self.dead_window = dead_window
        self.strict = strict
        self.functional = functional
        wrapped = is_wrapper(model)
        self._module_names = {m: display_name(n, wrapped) for n, m in model.named_modules()} if functional else {}
        self._module_stack: List[str] = []
        self._tap: Optional[Any] = None
        self._functional_layers: Dict[str, Layer] = {}
        self._on_root_forward = on_root_forward
        self._root_handles: List[RemovableHandle] = []
        self._step_handles: List[RemovableHandle] = []
        self._buf: Optional[_StepBuffers] = None
        self.enabled = False  # False during forwards gradwatch must ignore (eval forwards by default)
        self.spent = 0.0  # seconds of gradwatch's own host work, for the overhead budget
        self._broken: set = set()
        # The only state kept across steps: small per-layer tensors.
        self._peak: Dict[str, Tensor] = {}
        # Per unit: consecutive measured batches without a non-zero output, and batches seen.
        self._idle: Dict[str, Tensor] = {}
        self._seen: Dict[str, int] = {}
        self._units: Dict[str, int] = {}  # unit count per layer, agreed across ranks

    # ----------------------------------------------------------------- attach / detach
    def attach(self) -> None:
        self._root_handles.append(self.model.register_forward_pre_hook(self._root_pre_hook))
        # always_call: the functional tap must be left even when the forward raises.
        self._root_handles.append(self.model.register_forward_hook(self._root_hook, always_call=True))

    def detach(self) -> None:
        """Remove every hook. Safe to call twice."""
        self._leave_tap()
        for h in self._root_handles + self._step_handles:
            h.remove()
        self._root_handles.clear()
        self._step_handles.clear()
        self.enabled = False

    @property
    def measuring(self) -> bool:
        return self._buf is not None

    # ----------------------------------------------------------------- step boundaries
    def begin(self, *, histograms: bool) -> None:
        """Start a measured step: register the per-layer hooks (kept from the previous step
        when that one was measured too, as with ``every=1``)."""
        self._buf = _StepBuffers(histograms=histograms)
        if self._step_handles:
            return
        for layer in self.layers:
            if layer.spec.kind is ActivationKind.GENERIC:
                self._step_handles.append(layer.module.register_forward_pre_hook(self._make_pre_hook(layer)))
            self._step_handles.append(layer.module.register_forward_hook(self._make_hook(layer)))
        if self.functional:  # track which module's forward is running, to attribute function calls
            for module, name in self._module_names.items():
                self._step_handles.append(module.register_forward_pre_hook(self._make_push(name)))
                self._step_handles.append(module.register_forward_hook(self._pop, always_call=True))

    def end(self, step: int) -> Optional[StepData]:
        """Finish the measured step (if any): one host transfer, then plain numbers.
        The per-layer hooks stay until :meth:`pause` (they do nothing between steps)."""
        buf, self._buf = self._buf, None
        if buf is None or not (buf.forward_order or buf.params is not None):
            return None
        return self._summarise(step, buf)

    def pause(self) -> None:
        """An unmeasured step begins: take the per-layer hooks off, so it costs nothing."""
        self._remove_step_hooks()

    def _remove_step_hooks(self) -> None:
        for h in self._step_handles:
            h.remove()
        self._step_handles.clear()

    # ----------------------------------------------------------------- root hooks
    def _root_pre_hook(self, module: nn.Module, args: Any) -> None:
        self._guarded("step counting", self._on_root_forward, module)
        if self.functional and self._buf is not None and self.enabled and self._tap is None:
            from .functional import FunctionalTap

            self._module_stack.clear()
            self._tap = FunctionalTap(self._on_function)
            self._tap.__enter__()

    def _make_push(self, name: str) -> Callable[..., None]:
        def push(module: nn.Module, args: Any) -> None:  # must return None: a value would replace the input
            self._module_stack.append(name)
        return push

    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:  # None: a value would replace the output
        if self._module_stack:
            self._module_stack.pop()

    def _leave_tap(self) -> None:
        if self._tap is not None:
            tap, self._tap = self._tap, None
            tap.__exit__(None, None, None)

    def _on_function(self, fn_name: str, spec: Any, out: Tensor) -> None:
        buf = self._buf
        if buf is None or not self.enabled:
            return
        owner = self._module_stack[-1] if self._module_stack else display_name("")
        name = f"{owner}:{fn_name}"
        layer = self._functional_layers.get(name)
        if layer is None:
            module = next((m for m, n in self._module_names.items() if n == owner), self.model)
            layer = self._functional_layers[name] = Layer(name, module, spec, function=fn_name)
        if name not in self._broken:
            self._guarded(name, self._on_forward, layer, buf, out)

    def _root_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self._leave_tap()
        buf = self._buf
        if buf is None or not self.enabled or not torch.is_grad_enabled():
            return
        # One flag per forward: each backward through this forward reads the gradients once
        # at its end, so with gradient accumulation the last read sees the summed gradient.
        queued = [False]
        for t in iter_tensors(output):
            if t.requires_grad:
                t.register_hook(self._make_backward_starter(buf, queued))

    def _make_backward_starter(self, buf: _StepBuffers, queued: List[bool]) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            if not queued[0]:
                queued[0] = True
                _queue_after_backward(lambda: self._guarded("parameter gradients", self._after_backward, buf))
        return hook

    def attach_optimizer(self, optimizer: Any, on_step: Optional[Callable[[], None]] = None) -> None:
        """Read the gradients once more as the optimizer is about to apply them (after
        accumulation, all-reduce and clipping); optionally mark a step after each ``step()``."""
        self._root_handles.append(optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: self._guarded("optimizer step", self._before_optimizer_step)))
        if on_step is not None:
            self._root_handles.append(optimizer.register_step_post_hook(
                lambda opt, args, kwargs: self._guarded("step counting", on_step)))

    def _gradients(self) -> Tuple[List[str], List[Tensor], List[Tensor], List[Any]]:
        """(names, gradients, parameters, shard groups) of watched parameters that have a
        gradient now. A sparse gradient (``nn.Embedding(sparse=True)``) counts by its
        coalesced values; a sharded one (FSDP's DTensor) by this rank's shard, with the
        process group its shards live in (None when not sharded)."""
        names, grads, weights, groups = [], [], [], []
        for pname, _, p in self.params:
            g = p.grad
            if g is not None:
                g, group = _local_shard(g)
                w, _ = _local_shard(p)
                names.append(pname)
                grads.append(g.coalesce()._values() if g.is_sparse else g)
                weights.append(w)
                groups.append(group)
        return names, grads, weights, groups

    def _before_optimizer_step(self) -> None:
        buf = self._buf
        if buf is None:
            return
        names, grads, _, groups = self._gradients()
        if grads:
            buf.applied_names = names
            norms = torch.stack(torch._foreach_norm([g.detach() for g in grads], dtype=torch.float32))
            buf.applied = _reduce_shards(norms.unsqueeze(0), groups, max_rows=())[0]

    def _after_backward(self, buf: _StepBuffers) -> None:
        names, grads, weights, groups = self._gradients()
        if not grads:
            return
        buf.param_names = names
        buf.params = _reduce_shards(stats.grad_summaries(grads, weights), groups, max_rows=(1,))
        if buf.histograms:
            buf.grad_hist = {n: stats.histogram(g, self.bins, self.samples) for n, g in zip(names, grads)}

    # ----------------------------------------------------------------- layer hooks
    def _make_pre_hook(self, layer: Layer) -> Callable[..., None]:
        name = layer.name

        def pre_hook(module: nn.Module, args: Any) -> None:
            buf = self._buf
            if buf is None or not self.enabled or name in self._broken:
                return
            cell = None
            x = args[0] if args else None
            if isinstance(x, Tensor) and x.is_floating_point() and x.requires_grad and torch.is_grad_enabled():
                # Registered before the module runs, so that an in-place module still gives
                # the gradient with respect to its *input* (autograd keeps hooks with the
                # tensor version they were registered on).
                cell = {"x_shape": x.shape}
                x.register_hook(self._make_input_grad_hook(layer, buf, cell))
            buf.inputs.setdefault(name, []).append(cell)
        return _eager(pre_hook)

    def _make_hook(self, layer: Layer) -> Callable[..., None]:
        name = layer.name

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            buf = self._buf
            if buf is None or not self.enabled or name in self._broken:
                return
            self._guarded(name, self._on_forward, layer, buf, output)
        return _eager(hook)

    def _on_forward(self, layer: Layer, buf: _StepBuffers, output: Any) -> None:
        name, spec = layer.name, layer.spec
        buf.forward_order.setdefault(name, None)
        buf.calls[name] = buf.calls.get(name, 0) + 1
        cell = buf.inputs[name].pop() if buf.inputs.get(name) else None
        tensors, others = [], []
        for t in iter_tensors(output):  # one walk over the output
            (tensors if t.is_floating_point() else others).append(t)
        if others and name not in buf.skipped:
            buf.skipped[name] = sorted({str(t.dtype).replace("torch.", "") for t in others})
        margin = self.thresholds.saturation_margin
        bounded = spec.kind in (ActivationKind.BOUNDED, ActivationKind.RECTIFIER)
        lower, upper = (spec.lower, spec.upper) if bounded else (None, None)
        for t in tensors:
            buf.act.setdefault(name, []).append(
                ((t.numel(), stats.sample_size(t, self.samples)),
                 stats.activation_summary(t, lower, upper, margin, self.samples)))
        if not tensors:
            return
        first = tensors[0]
        if buf.histograms and name not in buf.act_hist:
            buf.act_hist[name] = stats.histogram(first, self.bins, self.samples)
        if spec.tracks_dead_units and len(tensors) == 1:
            alive = stats.active_units(first)
            if alive is not None:
                prev = buf.alive.get(name)
                if prev is None:
                    buf.alive[name] = alive
                elif prev.shape == alive.shape:
                    buf.alive[name] = prev | alive
        if not torch.is_grad_enabled():
            return
        for t in tensors:
            if t.requires_grad:
                t.register_hook(self._make_output_grad_hook(name, buf))
        if cell is not None and len(tensors) == 1 and first.shape == cell["x_shape"] and first.requires_grad:
            cell["y"] = first.detach()
            first.register_hook(lambda g: cell.__setitem__("g_out", g))

    def _make_output_grad_hook(self, name: str, buf: _StepBuffers) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            if name in self._broken:
                return
            t0 = time.perf_counter()
            buf.backward_order.setdefault(name, None)
            buf.out_grad.setdefault(name, []).append(stats.l2_norm(grad))
            self.spent += time.perf_counter() - t0
        return hook

    def _make_input_grad_hook(self, layer: Layer, buf: _StepBuffers, cell: dict) -> Callable[[Tensor], None]:
        name = layer.name

        def hook(grad_in: Tensor) -> None:
            g_out, y = cell.pop("g_out", None), cell.pop("y", None)
            if g_out is None or y is None or name in self._broken or grad_in.shape != y.shape:
                return
            summary = stats.slope_saturation(y, grad_in, g_out, self.thresholds.saturation_slope,
                                             self._peak.get(name))
            self._peak[name] = summary[2] if name not in self._peak else torch.maximum(self._peak[name], summary[2])
            buf.slope.setdefault(name, []).append(summary)
        return hook

    # ----------------------------------------------------------------- summarise
    def _summarise(self, step: int, buf: _StepBuffers) -> StepData:
        # Update the dead-unit windows (device tensors), then gather every small tensor
        # of this step into one list for a single host transfer.
        dead_layers = []
        for name, alive in buf.alive.items():
            idle = self._idle.get(name)
            if idle is None or idle.shape != alive.shape:
                idle, self._seen[name] = torch.zeros(alive.shape, dtype=torch.int32, device=alive.device), 0
            # A unit is dead when it was idle in each of the last `dead_window` measured batches:
            # a counter of consecutive idle batches gives that sliding window in two small ops.
            idle = (idle + 1).masked_fill_(alive, 0)
            self._idle[name] = idle
            self._seen[name] = min(self._seen[name] + 1, self.dead_window)
            dead = idle >= self._seen[name]
            # Under several processes the per-unit verdicts travel (a unit is dead only if it
            # is dead on every rank); alone, their count is enough.
            dead_layers.append((name, self._seen[name], dead.float() if self._world else dead.sum()))

        tensors: List[Tensor] = []
        index: Dict[Tuple[str, str], List[int]] = {}

        def put(key: Tuple[str, str], t: Tensor) -> None:
            index.setdefault(key, []).append(len(tensors))
            tensors.append(t)

        for name, parts in buf.act.items():
            for _, t in parts:
                put(("act", name), t)
        for name, parts in buf.slope.items():
            for t in parts:
                put(("slope", name), t)
        for name, parts in buf.out_grad.items():
            for t in parts:
                put(("grad", name), t)
        for name, _, dead in dead_layers:
            put(("dead", name), dead)
        for name, t in buf.act_hist.items():
            put(("act_hist", name), t)
        for name, t in buf.grad_hist.items():
            put(("grad_hist", name), t)
        if buf.params is not None:
            put(("params", ""), buf.params)
        if buf.applied is not None:
            put(("applied", ""), buf.applied)
        host = stats.to_host(tensors)

        def get(kind: str, name: str) -> List[List[float]]:
            return [host[i] for i in index.get((kind, name), [])]

        by_name = {layer.name: layer for layer in self.layers}
        by_name.update(self._functional_layers)
        windows = {name: n for name, n, _ in dead_layers}
        layers: Dict[str, LayerStats] = {}
        for name in buf.forward_order:
            layer = by_name[name]
            ls = LayerStats(name=name, type=layer.type_name, calls=buf.calls.get(name, 0))
            if name in buf.skipped:
                ls.note = f"not measured: outputs of dtype {', '.join(buf.skipped[name])}"
            _fill_activation(ls, [n for n, _ in buf.act.get(name, [])], get("act", name), layer)
            slope = get("slope", name)
            if slope and layer.spec.kind is ActivationKind.GENERIC:
                valid = sum(s[0] for s in slope)
                if valid > 0:
                    ls.saturated_fraction = sum(s[1] for s in slope) / valid
                    ls.saturation_method = "slope"
            dead = get("dead", name)
            if dead:
                units = buf.alive[name].numel()
                ls.dead_fraction, ls.dead_window = sum(dead[0]) / units if units else 0.0, windows[name]
            grads = get("grad", name)
            if grads:
                ls.output_grad_norm = math.sqrt(sum(g[0] ** 2 for g in grads))
                ls.output_grad_nonfinite = not math.isfinite(ls.output_grad_norm)
            layers[name] = ls

        if self._world:
            layers = self._combine_ranks(layers, {name: get("dead", name)[0] for name, _, _ in dead_layers})

        params: Dict[str, ParamStats] = {}
        if buf.params is not None:
            flat = get("params", "")[0]
            k = len(buf.param_names)
            owner = {pname: (lname, p) for pname, lname, p in self.params}
            for i, pname in enumerate(buf.param_names):
                lname, p = owner[pname]
                params[pname] = ParamStats(pname, lname, p.numel(), flat[i], flat[k + i], flat[2 * k + i])
            if buf.applied is not None:
                for pname, value in zip(buf.applied_names, get("applied", "")[0]):
                    if pname in params:
                        params[pname].applied_grad_norm = value
            per_layer: Dict[str, float] = {}
            for ps in params.values():
                per_layer[ps.layer] = per_layer.get(ps.layer, 0.0) + ps.grad_norm ** 2
            for lname, sq in per_layer.items():
                if lname in layers:
                    layers[lname].grad_norm = math.sqrt(sq)
        step_stats = StepStats(step=step, layers=layers, params=params, backward_order=list(buf.backward_order))
        return StepData(step_stats,
                        {n: get("act_hist", n)[0] for n in buf.act_hist},
                        {n: get("grad_hist", n)[0] for n in buf.grad_hist})

    # ----------------------------------------------------------------- several processes
    @property
    def _world(self) -> int:
        """World size when running under torch.distributed with more than one process, else 0."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.get_world_size()
        return 0

    def _combine_ranks(self, local: Dict[str, LayerStats], dead: Dict[str, List[float]]) -> Dict[str, LayerStats]:
        """Activation statistics over the samples of every rank, with one all-reduce of one small
        flat tensor. Sums, counts and flags add up; a unit is dead only if every rank saw it dead.
        Parameter gradients need nothing: after DDP's all-reduce they are the same everywhere."""
        world = self._world
        names = [layer.name for layer in self.layers]
        if not self._units:  # once: agree on each layer's unit count (the only extra collective)
            sizes = torch.tensor([float(len(dead.get(n, []))) for n in names], dtype=torch.float64,
                                 device=_comm_device())
            dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
            self._units = {n: int(v) for n, v in zip(names, sizes.tolist())}
        vec: List[float] = []
        for n in names:
            ls = local.get(n)
            if ls is None or not ls.count:
                vec += [0.0] * _SLOTS if ls is None else [1.0] + [0.0] * (_SLOTS - 1)
            else:
                var = ls.std ** 2
                sat_num, sat_den = _saturation_parts(ls)
                og = ls.output_grad_norm
                vec += [1.0, ls.count, ls.count * ls.mean, ls.count * (var + ls.mean ** 2),
                        ls.count * ls.zero_fraction, sat_num, sat_den, float(ls.nonfinite),
                        (og ** 2 if og is not None else 0.0), 1.0 if og is not None else 0.0]
        for n in names:
            size = self._units[n]
            mine = (dead.get(n) or [])[:size]
            vec += mine + [0.0] * (size - len(mine))
        t = torch.tensor(vec, dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        total = t.tolist()
        out: Dict[str, LayerStats] = {}
        by_name = {layer.name: layer for layer in self.layers}
        order = list(local) + [n for n in names if n not in local]
        pos_of = {n: i * _SLOTS for i, n in enumerate(names)}
        dead_pos, p = {}, len(names) * _SLOTS
        for n in names:
            dead_pos[n] = p
            p += self._units[n]
        for n in order:
            v = total[pos_of[n]:pos_of[n] + _SLOTS]
            if v[0] == 0:
                continue
            layer = by_name[n]
            ls = local.get(n) or LayerStats(name=n, type=layer.type_name)
            count, s1, s2, zeros, sat_num, sat_den, nonfinite, og2, og_n = v[1:]
            if count:
                mean = s1 / count
                ls.count, ls.mean, ls.std = int(count), mean, math.sqrt(max(s2 / count - mean * mean, 0.0))
                ls.zero_fraction = zeros / count
                ls.nonfinite = nonfinite > 0
                if sat_den > 0:
                    ls.saturated_fraction = sat_num / sat_den
                    ls.saturation_method = ls.saturation_method or (
                        "slope" if layer.spec.kind is ActivationKind.GENERIC else "bounds")
            if og_n > 0:
                # Each rank's loss is a mean over its own samples and DDP averages, so the
                # whole batch's gradient at this output is every rank's divided by the world size.
                ls.output_grad_norm = math.sqrt(og2) / world
                ls.output_grad_nonfinite = not math.isfinite(ls.output_grad_norm)
            units = self._units[n]
            if units and ls.dead_fraction is not None:
                verdicts = total[dead_pos[n]:dead_pos[n] + units]
                ls.dead_fraction = sum(1 for x in verdicts if x >= world) / units
            out[n] = ls
        return out

    # ----------------------------------------------------------------- failure isolation
    def _guarded(self, where: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run gradwatch's own code so that a bug in it never breaks the user's training:
        report it once as a GradWatchWarning and switch that layer off (``strict`` re-raises)."""
        t0 = time.perf_counter()
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - isolation is the point
            if self.strict:
                raise
            if where not in self._broken:
                self._broken.add(where)
                warnings.warn(f"gradwatch: internal error in {where} ({type(exc).__name__}: {exc}); "
                              f"gradwatch stops measuring it, training continues unaffected.",
                              GradWatchWarning, stacklevel=2)
            return None
        finally:
            self.spent += time.perf_counter() - t0


def _local_shard(t: Tensor) -> Tuple[Tensor, Any]:
    """This rank's part of a sharded DTensor (FSDP) and the group to reduce over, or ``(t, None)``."""
    if type(t).__name__ != "DTensor":
        return t, None
    sharded = any(p.is_shard() for p in t.placements)
    return t.to_local(), (t.device_mesh.get_group() if sharded else None)


def _reduce_shards(summary: Tensor, groups: List[Any], max_rows: Tuple[int, ...]) -> Tensor:
    """Per-parameter rows computed on shards -> the whole parameters': L2 norms combine as the
    root of summed squares, maxima as the maximum -- at most two collectives, on logging steps."""
    sharded = [i for i, g in enumerate(groups) if g is not None]
    if not sharded:
        return summary
    group = groups[sharded[0]]
    out = summary.clone()
    idx = torch.tensor(sharded, device=summary.device)
    for row in range(summary.shape[0]):
        part = summary[row, idx]
        if row in max_rows:
            dist.all_reduce(part, op=dist.ReduceOp.MAX, group=group)
        else:
            part = part.square()
            dist.all_reduce(part, group=group)
            part = part.sqrt()
        out[row, idx] = part
    return out


_SLOTS = 10  # per layer in the cross-rank vector: present, n, sum, sum of squares, zeros, saturated (2),
#              nonfinite, output-gradient sum of squares, output gradient present


def _saturation_parts(ls: LayerStats) -> Tuple[float, float]:
    """(saturated, out of) as additive counts, whichever way saturation was measured."""
    if ls.saturated_fraction is None:
        return 0.0, 0.0
    return ls.saturated_fraction * ls.count, float(ls.count)


def _comm_device() -> torch.device:
    # NCCL moves only CUDA tensors; gloo only CPU ones.
    backend = str(dist.get_backend())
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _fill_activation(ls: LayerStats, counts: List[Tuple[int, int]], parts: List[List[float]], layer: Layer) -> None:
    if not parts:
        return
    moments = [stats.activation_moments(p, n, m) for (n, m), p in zip(counts, parts)]
    n, mean, var = stats.merge_moments([(c, m["mean"], m["var"]) for (c, _), m in zip(counts, moments)])
    ls.count, ls.mean, ls.std = n, mean, math.sqrt(var) if var >= 0 else math.nan
    ls.nonfinite = any(m["nonfinite"] for m in moments)
    if n:
        ls.zero_fraction = sum(m["zeros"] for m in moments) / n
        spec = layer.spec
        bounded = spec.kind is ActivationKind.BOUNDED or (spec.kind is ActivationKind.RECTIFIER
                                                          and spec.upper is not None)
        if bounded:
            ls.saturated_fraction = sum(m["saturated"] for m in moments) / n
            ls.saturation_method = "bounds"
