"""One measured step's buffers -> plain numbers: one host transfer, then per-site totals and stats.

The flow is ``totals`` (additive per-site numbers, one device->host transfer) -> optionally
:func:`gradwatch.collect.ranks.combine` (the same totals summed over processes) ->
:func:`finish` (means, spreads, fractions: :class:`~gradwatch.report.LayerStats`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from torch import Tensor

from .. import stats
from ..layers import ActivationKind, Layer
from ..report import LayerStats, ParamStats, StepData, StepStats
from . import attention
from .buffers import Row, SiteBuffer, StepBuffers, UnitHistory


def _sum(default: float = 0.0) -> float:
    return field(default=default, metadata={"reduce": "sum"})  # type: ignore[return-value]


def _max(default: float = 0.0) -> float:
    return field(default=default, metadata={"reduce": "max"})  # type: ignore[return-value]


@dataclass
class SiteTotals:
    """Additive numbers of one call site; each field declares how processes combine it
    (``metadata["reduce"]``), so a new field cannot be forgotten by :mod:`.ranks`."""

    present: float = _sum(1.0)  # processes that saw the site
    calls: float = _max()
    count: float = _sum()  # output elements
    total: float = _sum()  # sum of outputs (count * mean)
    m2: float = _sum()  # sum of squared deviations from the site's own mean
    mean_sq: float = _sum()  # count * mean ** 2: with m2, the spread around the combined mean
    zeros: float = _sum()
    saturated: float = _sum()
    saturation_valid: float = _sum()  # elements the saturation share is taken over
    nonfinite: float = _max()
    out_grad_sq: float = _sum()  # squared L2 norm of the gradient at the output
    out_grad_seen: float = _sum()
    attn_queries: float = _sum()  # attention: (query, head) pairs sampled, and their attention.FIELDS sums
    attn_entropy: float = _sum()
    attn_entropy_normalised: float = _sum()
    attn_normalisable: float = _sum()
    attn_saturated: float = _sum()
    attn_max_logit: float = _max(-math.inf)
    fp16_peak: float = _max(-math.inf)  # largest |value| in the samples of float16 outputs (-inf: none)


REDUCTIONS: Tuple[Tuple[str, str], ...] = tuple((f.name, f.metadata["reduce"]) for f in fields(SiteTotals))


@dataclass
class StepTotals:
    """Everything of one measured step on the host, before any combining across processes."""

    sites: Dict[str, SiteTotals]
    dead: Dict[str, Sequence[float]]  # per site with unit tracking: per-unit dead flags (1.0 dead), an array or a list
    dead_window: Dict[str, int]
    grads: Optional[Tuple[List[str], List[List[float]]]]  # names, rows (norm, max |g|, weight norm)
    applied: Optional[Tuple[List[str], List[float]]]
    act_hist: Dict[str, List[float]]
    grad_hist: Dict[str, List[float]]
    backward_order: List[str]
    skipped: Dict[str, List[str]] = field(default_factory=dict)
    attention: Dict[str, List[List[float]]] = field(default_factory=dict)  # per site, per head (this rank)
    updates: Optional[Tuple[List[str], List[float], List[Optional[float]], List[int]]] = None  # updates.finish
    noise: Optional[List[float]] = None  # noise.NoiseRead.totals: summed over processes by ranks.combine
    dead_cutoff: Dict[str, float] = field(default_factory=dict)  # per smooth-rectifier site: FlatSide.cutoff


class _Gathered:
    """Every small tensor of a step, moved to the host in one transfer, looked up by (kind, site).
    Per-unit tensors that NumPy reads where they are (``stats.host_array``: the CPU) stay arrays,
    so that hundreds of units are never turned into Python floats and back (:meth:`put_units`)."""

    def __init__(self) -> None:
        self.tensors: List[Any] = []  # tensors and numbers for stats.to_host, or arrays read already
        self.index: Dict[Tuple[str, str], List[int]] = {}
        self._position: Dict[int, int] = {}  # id of a tensor -> its place (a tensor is read once)
        self.host: List[Any] = []

    def put(self, key: Tuple[str, str], t: Any, value: Any = None) -> None:
        """``t`` under ``key``; ``value``: what it reads as, when known already (an array)."""
        pos = self._position.get(id(t))
        if pos is None:
            pos = self._position[id(t)] = len(self.tensors)
            self.tensors.append(t if value is None else value)
        self.index.setdefault(key, []).append(pos)

    def put_units(self, key: Tuple[str, str], t: Any) -> None:
        """A per-unit tensor (or a sum, shaped ``(1,) * dim``): an array where NumPy reads it."""
        a = stats.host_array(t) if isinstance(t, Tensor) and id(t) not in self._position else None
        self.put(key, t, None if a is None else a.reshape(-1))

    def put_row(self, ref: Optional[Row]) -> None:
        if ref is not None and ref.chunk is not None and ref.chunk.result is not None:
            self.put(("rows", ""), ref.chunk.result)

    def read(self) -> None:
        todo = [i for i, t in enumerate(self.tensors) if not isinstance(t, np.ndarray)]
        read = stats.to_host([self.tensors[i] for i in todo])
        self.host = list(self.tensors)
        for i, values in zip(todo, read):
            self.host[i] = values

    def get(self, kind: str, name: str) -> List[List[float]]:
        return list(map(self.host.__getitem__, self.index.get((kind, name), ())))

    def row(self, ref: Optional[Row]) -> Optional[List[float]]:
        """The values of one sample's row (``stats.sample_rows`` or ``stats.histogram_rows``), without
        the peak column of a chunk that has one (``peak``)."""
        if ref is None or ref.values is not None:
            return None if ref is None else ref.values
        values = self._values(ref)
        return values[:-1] if values is not None and ref.chunk is not None and ref.chunk.peaks else values

    def peak(self, ref: Optional[Row]) -> Optional[float]:
        """The largest |value| of a float16 tensor's sample (``stats.PEAK_FIELD``), where its row has it."""
        values = None if ref is None or ref.chunk is None or not ref.chunk.peaks else self._values(ref)
        return values[-1] if values else None

    def _values(self, ref: Row) -> Optional[List[float]]:
        result = ref.chunk.result if ref.chunk is not None else None
        if result is None:
            return None
        flat, width = self.host[self._position[id(result)]], result.shape[1]
        return flat[ref.index * width:(ref.index + 1) * width]


def _gather(buf: StepBuffers) -> _Gathered:
    buf.flush()
    g = _Gathered()
    for name, site in buf.sites.items():
        for part in site.parts:
            if part.summary is not None:
                g.put(("act", name), part.summary)
            elif part.total is not None:
                if isinstance(part.total, Tensor):
                    g.put_units(("total", name), part.total)
                g.put_row(part.row)
        for row in site.slope:
            g.put(("slope", name), row)
        for t in site.out_grad:
            g.put(("grad", name), t)
        for t in site.alive:
            g.put_units(("alive", name), t)
        g.put_row(site.histogram)
        for row in site.attention:
            g.put(("attn", name), row)
    if buf.loss_scale is not None:
        g.put(("scale", ""), buf.loss_scale)
    for ref in buf.grad_hist.values():
        g.put_row(ref)
    if buf.grads is not None:
        g.put(("params", ""), buf.grads.summary)
    if buf.applied is not None:
        g.put(("applied", ""), buf.applied.summary)
    if buf.updates is not None:
        g.put(("updates", ""), buf.updates.summary)
    for t in buf.noise.tensors() if buf.noise is not None else []:
        g.put(("noise", ""), t)
    g.read()
    return g


def _total(values: Any) -> float:
    """The sum of a sum's or per-unit sums' values (an array, or a list read from a device)."""
    return float(np.add.reduce(values, dtype=np.float64)) if isinstance(values, np.ndarray) else sum(values)


def _dead(g: _Gathered, name: str, site: SiteBuffer, units: UnitHistory) -> Optional[Tuple[int, np.ndarray]]:
    """The site's per-unit activity in this step (any call active), folded into its history."""
    alive: Optional[np.ndarray] = None
    for values in g.get("alive", name):
        # A NaN sum, norm or maximum says nothing of activity: it counts as alive, never as dead evidence
        # (the non-finite values are the finding).
        active = ~(np.asarray(values) <= site.alive_above)
        if alive is None:
            alive = active
        elif alive.shape == active.shape:
            alive |= active
    return None if alive is None else units.update(name, alive)


def totals(buf: StepBuffers, units: UnitHistory, kinds: Dict[str, ActivationKind]) -> StepTotals:
    """The step's additive totals per site, from one host transfer. ``kinds``: the activation
    kind of each site's module (slope saturation is for generic ones)."""
    g = _gather(buf)
    sites, dead, windows = {}, {}, {}
    for name, site in buf.sites.items():
        sites[name] = _site_totals(g, name, site, kinds.get(name) is ActivationKind.GENERIC)
        folded = _dead(g, name, site, units)
        if folded is not None:
            windows[name], dead[name] = folded
    scale = g.get("scale", "")
    if scale and scale[0] and scale[0][0] > 0:  # a loss scaler's: the gradients at outputs, unscaled
        for t in sites.values():
            t.out_grad_sq /= scale[0][0] ** 2
    grads = None
    if buf.grads is not None:
        flat, k = g.get("params", "")[0], len(buf.grads.names)
        grads = (buf.grads.names, [[flat[i], flat[k + i], flat[2 * k + i]] for i in range(k)])
    applied = None
    if buf.applied is not None:
        flat = g.get("applied", "")[0]
        applied = (buf.applied.names, flat[:len(buf.applied.names)])
    heads = {n: attention.fold(g.get("attn", n)) for n, s in buf.sites.items() if s.attention}
    for name, per_head in heads.items():
        attention.add_totals(sites[name], per_head)
    updates = None if buf.updates is None else (buf.updates.names, g.get("updates", "")[0], buf.updates.lrs,
                                                buf.updates.ndims)
    act_hist = {n: g.row(s.histogram) for n, s in buf.sites.items()}
    grad_hist = {n: g.row(ref) for n, ref in buf.grad_hist.items()}
    return StepTotals(sites=sites, dead=dead, dead_window=windows, grads=grads, applied=applied,
                      act_hist={n: stats.histogram_fields(h) for n, h in act_hist.items() if h is not None},
                      grad_hist={n: stats.histogram_fields(h) for n, h in grad_hist.items() if h is not None},
                      backward_order=list(buf.backward_order),
                      skipped={n: s.skipped for n, s in buf.sites.items() if s.skipped},
                      attention=heads, updates=updates,
                      noise=None if buf.noise is None else buf.noise.totals(g.get("noise", "")),
                      dead_cutoff={n: s.cutoff for n, s in buf.sites.items() if s.cutoff is not None and n in dead})


def _site_totals(g: _Gathered, name: str, site: SiteBuffer, generic: bool) -> SiteTotals:
    """One site's additive numbers: its parts' moments (``stats.row_moments`` of a sample row and the
    exact sum, or ``stats.activation_moments`` of a compiled graph's summary) merged, the largest
    |value| of its float16 parts, slope saturation (``generic``: a generic activation's), and the
    squared norm of the gradients at its outputs; one walk over its parts."""
    t = SiteTotals(calls=float(site.calls))
    totals, summaries = iter(g.get("total", name)), iter(g.get("act", name))
    parts: List[Tuple[int, dict]] = []
    peaks: List[float] = []
    for part in site.parts:
        if part.summary is not None:
            values = next(summaries)
            if part.half:
                values, peak = values[:-1], values[-1]
                peaks.append(peak)
            parts.append((part.numel, stats.activation_moments(values, part.numel, part.sampled)))
        elif part.total is not None:
            total = _total(next(totals)) if isinstance(part.total, Tensor) else part.total
            row = g.row(part.row)
            parts.append((part.numel, stats.row_moments(total, part.numel, row if row is not None else [],
                                                         part.sampled)))
            peak = g.peak(part.row) if part.half else None
            if peak is not None:
                peaks.append(peak)
    if peaks:
        t.fp16_peak = max(peaks)
    if parts:
        if len(parts) == 1 and parts[0][0]:  # one call: nothing to merge (the usual case)
            n, mean, var = parts[0][0], parts[0][1]["mean"], parts[0][1]["var"]
        else:
            n, mean, var = stats.merge_moments([(c, m["mean"], m["var"]) for c, m in parts])
        t.count, t.total = float(n), n * mean if n else 0.0
        t.m2, t.mean_sq = (n * var if n else 0.0), (n * mean * mean if n else 0.0)
        zeros = saturated = 0  # (one loop, no generators: each is a Python call per element)
        nonfinite = False
        for _, m in parts:
            zeros += m["zeros"]
            saturated += m["saturated"]
            nonfinite = nonfinite or bool(m["nonfinite"])
        t.zeros, t.saturated = zeros, saturated
        t.saturation_valid = float(n)
        t.nonfinite = float(nonfinite)
    slope = g.get("slope", name) if generic else []
    if slope:
        t.saturated, t.saturation_valid = sum(s[1] for s in slope), sum(s[0] for s in slope)
    grads = g.get("grad", name)
    if grads:
        t.out_grad_sq, t.out_grad_seen = sum([v * v for g_ in grads for v in g_]), 1.0
    return t


def finish(step: int, tot: StepTotals, layer_of: Dict[str, Layer], owner: Dict[str, str], numel: Dict[str, int],
           world: int = 1, dtypes: Optional[Dict[str, str]] = None) -> StepData:
    """Totals (combined over ``world`` processes) -> the step's plain records. ``dtypes``: each
    parameter's (``"float16"``)."""
    layers: Dict[str, LayerStats] = {}
    names = _site_labels(list(tot.sites))
    for site, t in tot.sites.items():
        if not t.present:
            continue
        layer = layer_of[_module_of(site)]
        ls = LayerStats(name=names[site], type=layer.type_name, calls=int(t.calls))
        if site in tot.skipped:
            ls.note = f"not measured: outputs of dtype {', '.join(tot.skipped[site])}"
        if t.count:
            mean = t.total / t.count
            var = (t.m2 + t.mean_sq - t.count * mean * mean) / t.count
            ls.count, ls.mean = int(t.count), mean
            ls.std = math.sqrt(max(var, 0.0)) if math.isfinite(var) else math.nan
            ls.zero_fraction = t.zeros / t.count
            ls.nonfinite = t.nonfinite > 0
        spec = layer.spec
        if spec.kind is ActivationKind.GENERIC and t.saturation_valid > 0:
            ls.saturated_fraction, ls.saturation_method = t.saturated / t.saturation_valid, "slope"
        elif t.count and (spec.kind is ActivationKind.BOUNDED or
                          (spec.kind is ActivationKind.RECTIFIER and spec.upper is not None)):
            ls.saturated_fraction, ls.saturation_method = t.saturated / t.count, "bounds"
        flags = tot.dead.get(site)
        if flags is not None and len(flags) and not ls.nonfinite:  # (non-finite outputs: not known)
            # (flags are 1.0/0.0 in one process; summed over processes, dead on all where they reach world)
            flags = np.asarray(flags)
            dead = float(np.add.reduce(flags)) if world == 1 else int(np.count_nonzero(flags >= world))
            ls.dead_fraction = dead / flags.size
            ls.dead_window = tot.dead_window[site]
            ls.dead_cutoff = tot.dead_cutoff.get(site)
        if t.out_grad_seen:
            # Under several processes each rank's loss is a mean over its own samples and DDP
            # averages, so the whole batch's gradient at an output is the ranks' sum / world.
            ls.output_grad_norm = math.sqrt(t.out_grad_sq) / world
            ls.output_grad_nonfinite = not math.isfinite(ls.output_grad_norm)
        if t.fp16_peak > -math.inf:
            ls.fp16_peak = t.fp16_peak
        attention.finish_layer(ls, t, tot.attention.get(site))
        layers[ls.name] = ls
    params: Dict[str, ParamStats] = {}
    if tot.grads is not None:
        for pname, (norm, maxabs, wnorm) in zip(*tot.grads):
            params[pname] = ParamStats(pname, owner.get(pname, ""), numel.get(pname, 0), norm, maxabs, wnorm,
                                       dtype=(dtypes or {}).get(pname, ""))
    if tot.applied is not None:
        for pname, value in zip(*tot.applied):
            if pname in params:
                params[pname].applied_grad_norm = value
    per_layer: Dict[str, float] = {}
    for ps in params.values():
        per_layer[ps.layer] = per_layer.get(ps.layer, 0.0) + ps.grad_norm ** 2
    for site in tot.sites:  # a layer's own parameters belong to its first call site
        if site in per_layer and names[site] in layers:
            layers[names[site]].grad_norm = math.sqrt(per_layer[site])
    order = [names.get(s, s) for s in tot.backward_order]
    return StepData(StepStats(step=step, layers=layers, params=params, backward_order=order),
                    {names.get(n, n): h for n, h in tot.act_hist.items()}, tot.grad_hist)


def _module_of(site: str) -> str:
    """``layer4.0.relu#2`` -> ``layer4.0.relu``."""
    return site.rsplit("#", 1)[0] if "#" in site else site


def _site_labels(sites: List[str]) -> Dict[str, str]:
    """A module's first site is called ``name#1`` once a second site of it exists."""
    several = {_module_of(s) for s in sites if "#" in s}
    return {s: (f"{s}#1" if s in several else s) for s in sites}
