"""One measured step's buffers -> plain numbers: one host transfer, then per-site totals and stats.

The flow is ``totals`` (additive per-site numbers, one device->host transfer) -> optionally
:func:`gradwatch.collect.ranks.combine` (the same totals summed over processes) ->
:func:`finish` (means, spreads, fractions: :class:`~gradwatch.report.LayerStats`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Callable, Dict, List, Optional, Tuple

from torch import Tensor

from .. import stats
from ..layers import ActivationKind, Layer
from ..report import LayerStats, ParamStats, StepData, StepStats
from . import attention
from .buffers import StepBuffers, UnitHistory


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


REDUCTIONS: Tuple[Tuple[str, str], ...] = tuple((f.name, f.metadata["reduce"]) for f in fields(SiteTotals))


@dataclass
class StepTotals:
    """Everything of one measured step on the host, before any combining across processes."""

    sites: Dict[str, SiteTotals]
    dead: Dict[str, List[float]]  # per site with unit tracking: per-unit dead flags (1.0 dead)
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


def _gather(buf: StepBuffers, units: UnitHistory) -> Tuple[Callable[[str, str], List[List[float]]], Dict[str, int]]:
    """Every small tensor of the step, moved to the host in one transfer: returns a look-up by
    (kind, site) and the dead-unit window of each site that tracks units."""
    tensors: List[Tensor] = []
    index: Dict[Tuple[str, str], List[int]] = {}

    def put(key: Tuple[str, str], t: Tensor) -> None:
        index.setdefault(key, []).append(len(tensors))
        tensors.append(t)

    windows: Dict[str, int] = {}
    for name, site in buf.sites.items():
        for part in site.parts:
            put(("act", name), part.summary)
        for row in site.slope:
            put(("slope", name), row)
        for g in site.out_grad:
            put(("grad", name), g)
        if site.alive is not None:
            windows[name], dead = units.update(name, site.alive)
            put(("dead", name), dead)
        if site.histogram is not None:
            put(("act_hist", name), site.histogram)
        for row in site.attention:
            put(("attn", name), row)
    for name, t in buf.grad_hist.items():
        put(("grad_hist", name), t)
    if buf.grads is not None:
        put(("params", ""), buf.grads.summary)
    if buf.applied is not None:
        put(("applied", ""), buf.applied.summary)
    if buf.updates is not None:
        put(("updates", ""), buf.updates.summary)
    for t in buf.noise.tensors() if buf.noise is not None else []:
        put(("noise", ""), t)
    host = stats.to_host(tensors)

    def get(kind: str, name: str) -> List[List[float]]:
        return [host[i] for i in index.get((kind, name), [])]
    return get, windows


def totals(buf: StepBuffers, units: UnitHistory, kinds: Dict[str, ActivationKind]) -> StepTotals:
    """The step's additive totals per site, from one host transfer. ``kinds``: the activation
    kind of each site's module (slope saturation is for generic ones)."""
    get, windows = _gather(buf, units)
    sites = {name: _site_totals(site.calls, [(p.numel, p.sampled) for p in site.parts], get("act", name),
                                get("slope", name) if kinds.get(name) is ActivationKind.GENERIC else [],
                                get("grad", name))
             for name, site in buf.sites.items()}
    grads = None
    if buf.grads is not None:
        flat, k = get("params", "")[0], len(buf.grads.names)
        grads = (buf.grads.names, [[flat[i], flat[k + i], flat[2 * k + i]] for i in range(k)])
    applied = None
    if buf.applied is not None:
        flat = get("applied", "")[0]
        applied = (buf.applied.names, flat[:len(buf.applied.names)])
    heads = {n: attention.fold(get("attn", n)) for n, s in buf.sites.items() if s.attention}
    for name, per_head in heads.items():
        attention.add_totals(sites[name], per_head)
    updates = None if buf.updates is None else (buf.updates.names, get("updates", "")[0], buf.updates.lrs,
                                                buf.updates.ndims)
    return StepTotals(sites=sites, dead={n: get("dead", n)[0] for n in windows}, dead_window=windows,
                      grads=grads, applied=applied,
                      act_hist={n: get("act_hist", n)[0] for n, s in buf.sites.items() if s.histogram is not None},
                      grad_hist={n: get("grad_hist", n)[0] for n in buf.grad_hist},
                      backward_order=list(buf.backward_order),
                      skipped={n: s.skipped for n, s in buf.sites.items() if s.skipped},
                      attention=heads, updates=updates,
                      noise=None if buf.noise is None else buf.noise.totals(get("noise", "")))


def _site_totals(calls: int, sizes: List[Tuple[int, int]], parts: List[List[float]], slope: List[List[float]],
                 grads: List[List[float]]) -> SiteTotals:
    t = SiteTotals(calls=float(calls))
    if parts:
        moments = [stats.activation_moments(p, n, m) for (n, m), p in zip(sizes, parts)]
        n, mean, var = stats.merge_moments([(c, m["mean"], m["var"]) for (c, _), m in zip(sizes, moments)])
        t.count, t.total = float(n), n * mean if n else 0.0
        t.m2, t.mean_sq = (n * var if n else 0.0), (n * mean * mean if n else 0.0)
        t.zeros = sum(m["zeros"] for m in moments)
        t.saturated = sum(m["saturated"] for m in moments)
        t.saturation_valid = float(n)
        t.nonfinite = float(any(m["nonfinite"] for m in moments))
    if slope:
        t.saturated, t.saturation_valid = sum(s[1] for s in slope), sum(s[0] for s in slope)
    if grads:
        t.out_grad_sq, t.out_grad_seen = sum(g[0] ** 2 for g in grads), 1.0
    return t


def finish(step: int, tot: StepTotals, layer_of: Dict[str, Layer], owner: Dict[str, str], numel: Dict[str, int],
           world: int = 1) -> StepData:
    """Totals (combined over ``world`` processes) -> the step's plain records."""
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
        if flags:
            # (flags are 1.0/0.0 in one process; summed over processes, dead on all where they reach world)
            dead = sum(flags) if world == 1 else sum(1 for v in flags if v >= world)
            ls.dead_fraction = dead / len(flags)
            ls.dead_window = tot.dead_window[site]
        if t.out_grad_seen:
            # Under several processes each rank's loss is a mean over its own samples and DDP
            # averages, so the whole batch's gradient at an output is the ranks' sum / world.
            ls.output_grad_norm = math.sqrt(t.out_grad_sq) / world
            ls.output_grad_nonfinite = not math.isfinite(ls.output_grad_norm)
        attention.finish_layer(ls, t, tot.attention.get(site))
        layers[ls.name] = ls
    params: Dict[str, ParamStats] = {}
    if tot.grads is not None:
        for pname, (norm, maxabs, wnorm) in zip(*tot.grads):
            params[pname] = ParamStats(pname, owner.get(pname, ""), numel.get(pname, 0), norm, maxabs, wnorm)
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
