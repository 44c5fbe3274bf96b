"""Attention through ``F.scaled_dot_product_attention``: per head entropy, one-hot share and largest logit.

nanoGPT, timm, torchtitan and the Hugging Face models (``attn_implementation="sdpa"``, their
default) call SDPA from their own modules; its fused kernels return no weights. On measured
forwards the function tap of :mod:`.functional` sees each call and, after SDPA has returned,
this module recomputes the logits of a bounded sample from the ``query`` and ``key`` it received,
under ``torch.no_grad()``, in float32 with autocast off (:func:`sdpa_logits`):

- at most :data:`~.attention.BATCH_SAMPLE` sequences (the leading dimensions flattened) and
  :data:`~.attention.QUERY_SAMPLE` query positions of each, evenly strided, against every key,
  fewer where the logits would pass :data:`LOGIT_BUDGET` elements (long contexts);
- ``scale`` (default ``1/sqrt(E)``), ``is_causal`` (top-left aligned, as SDPA), a boolean
  ``attn_mask`` (True: may attend) or an additive one (values at or below
  :data:`~.attention.MASKED` count as masked keys), and grouped-query attention (fewer key heads
  than query heads, ``enable_gqa=True``, or one key head broadcast) are applied as SDPA does;
  ``dropout_p`` is left out (the weights are measured before dropout), and SDPA is never called
  again: no random number is drawn, the user's dropout stream is untouched;
- :func:`gradwatch.stats.attention_summary` reduces them per head, into the row of the module
  whose ``forward`` made the call (``transformer.h.3.attn``); a module's second call in one
  forward of the model is ``...attn#2``. Calls made inside ``nn.MultiheadAttention`` are its own
  rows (:mod:`.attention`), and ``include``/``exclude`` select calling modules as they select
  parameters (by the module or a container above it).

The tap costs a Python call per torch function while it is entered, so it is entered on
measured forwards only, and once :data:`PROBE_FORWARDS` measured forwards called no SDPA, no
longer (a model without attention pays nothing after its first measured steps). A forward that
``torch.compile`` traced (its layers reported from the graph) records no SDPA row: the compiled
code, not the user's modules, runs the attention.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import stats
from ..layers import ActivationKind, ActivationSpec, Layer, Selector, _ancestors, _matches
from .attention import BATCH_SAMPLE, QUERY_SAMPLE, SATURATION, apply_mask, full_precision, stride
from .buffers import StepBuffers, in_backward, site_name
from .functional import FunctionalTaps
from .guard import Guard

SDPA = F.scaled_dot_product_attention
PROBE_FORWARDS = 3
"""Measured forwards the tap is entered for before it is known whether the model calls SDPA."""
LOGIT_BUDGET = 1 << 22
"""The most logits recomputed per call (16 MiB in float32): fewer sequences, then fewer queries."""
_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def sdpa_logits(query: Tensor, key: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                scale: Optional[float] = None, batch: int = BATCH_SAMPLE, queries: int = QUERY_SAMPLE,
                budget: int = LOGIT_BUDGET) -> Optional[Tensor]:
    """The scaled, masked logits ``(sequences, heads, queries, keys)`` of a sample of one SDPA call,
    masked keys at ``-inf``; float32. None when the shapes are not SDPA's. (The tensors are read,
    never modified.)"""
    q, k = query.detach(), key.detach()
    if q.dim() < 2 or k.dim() != q.dim() or q.shape[-1] != k.shape[-1]:
        return None
    mask = None if attn_mask is None else attn_mask.detach()
    if q.dim() == 3:  # (N, L, E): one head
        q, k = q.unsqueeze(-3), k.unsqueeze(-3)
        if mask is not None and mask.dim() >= 3:
            mask = mask.unsqueeze(-3)
    elif q.dim() == 2:  # (L, E)
        q, k = q[None, None], k[None, None]
    lead = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3])
    hq, hk, length, keys = q.shape[-3], k.shape[-3], q.shape[-2], k.shape[-2]
    if hq % hk:
        return None
    n = math.prod(lead)
    sb, sq = stride(n, batch), stride(length, queries)
    if -(-n // sb) * -(-length // sq) * hq * keys > budget:  # long contexts: one sequence, fewer queries
        sb = n
        sq = stride(length, max(1, budget // (hq * keys)))
    rows = _unravel(torch.arange(0, n, sb, device=q.device), lead)
    qs = q.expand(*lead, hq, length, q.shape[-1])[..., ::sq, :][rows].float()  # (B, Hq, Q, E)
    ks = k.expand(*lead, hk, keys, k.shape[-1])[rows].float()  # (B, Hk, S, E)
    b, e = qs.shape[0], qs.shape[-1]
    # Grouped-query attention: query head i reads key head i // (hq // hk), as repeat_interleave does.
    qg = qs.reshape(b, hk, hq // hk, -1, e)
    logits = torch.matmul(qg, ks.unsqueeze(2).transpose(-1, -2)).reshape(b, hq, -1, keys)
    logits = logits * (1.0 / math.sqrt(e) if scale is None else float(scale))
    if is_causal:
        rows_q = torch.arange(0, length, sq, device=logits.device)
        cols = torch.arange(keys, device=logits.device)
        logits = logits.masked_fill(cols > rows_q.unsqueeze(1), -math.inf)
    if mask is not None:
        m = mask.expand(*lead, hq, length, keys)[..., ::sq, :][rows]  # (B, Hq, Q, S)
        # SDPA's boolean masks say where a query may attend (nn.MultiheadAttention's: where not).
        logits = apply_mask(logits, ~m if m.dtype == torch.bool else m)
    return logits


def _unravel(flat: Tensor, shape: Sequence[int]) -> Tuple[Tensor, ...]:
    """Indices into the flattened ``shape`` -> one index tensor per dimension (``torch.unravel_index``,
    which torch 2.1 lacks)."""
    out = []
    for size in reversed(shape):
        out.append(flat % size)
        flat = flat // size
    return tuple(reversed(out))


class SdpaTaps:
    """Measures the SDPA calls the function tap sees, row by calling module."""

    def __init__(self, functional: FunctionalTaps, layers: Sequence[Layer], include: Sequence[Selector],
                 exclude: Sequence[Selector], guard: Guard, current: Callable[[], Optional[StepBuffers]],
                 compiled: Callable[[], bool] = lambda: False) -> None:
        self.functional = functional
        self.compiled_model = compiled  # the watched module is a torch.compile wrapper (or compiled in place)
        self.guard = guard
        self.current = current
        self.watched = {layer.module: layer for layer in layers}
        self.selected = _selected(functional.model, include, exclude)
        self.seen = False  # an SDPA call was seen (the tap stays on for measured forwards)
        self.compiled = False  # the model's forward is compiled (its SDPA calls are the graph's)
        self.probed = 0  # measured forwards the tap was entered for
        self._calls: Dict[str, int] = {}  # per calling module, SDPA calls in this forward
        self._recorded: List[Tuple[StepBuffers, str]] = []
        functional.add([SDPA], self._on_call, self)

    def wanted(self) -> bool:
        """Whether the next measured forward needs the function tap for SDPA. A compiled forward
        keeps it: the graph it was traced with stays the one of measured steps. A model compiled as a
        whole runs its attention in the graph: the tap is not entered for it (entering it would make
        torch.compile trace again)."""
        if self.compiled_model():
            return False
        return self.seen or self.compiled or self.probed < PROBE_FORWARDS

    def left(self, compiled: bool) -> None:
        """The model's forward, with the tap entered, ended."""
        self.probed += 1
        if compiled:
            self.compiled = True
            for buf, site in self._recorded:  # attributed by a module stack that the graph did not run
                s = buf.sites.get(site)
                if s is not None:
                    s.attention.clear()
                    if not s.parts and not s.out_grad:
                        del buf.sites[site]
        self._calls.clear()
        self._recorded.clear()

    def _on_call(self, owner: nn.Module, func: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any],
                 out: Any) -> None:
        self.seen = True
        buf = self.current()
        if (buf is None or self.compiled or isinstance(owner, nn.MultiheadAttention) or in_backward()
                or not self.selected.get(owner, False)):
            return
        layer = self._layer(owner)
        if layer.name in self.guard.broken:
            return
        call = self._calls[layer.name] = self._calls.get(layer.name, 0) + 1
        self.guard(layer.name, self._record, buf, site_name(layer.name, call), layer, args, kwargs)

    def _layer(self, owner: nn.Module) -> Layer:
        layer = self.watched.get(owner)
        if layer is None:
            name = self.functional.names.get(owner) or type(owner).__name__
            layer = self.functional.layers.get(name)
            if layer is None:
                layer = self.functional.layers[name] = Layer(name, owner, ActivationSpec(ActivationKind.NONE))
        return layer

    def _record(self, buf: StepBuffers, site: str, layer: Layer, args: Tuple[Any, ...],
                kwargs: Dict[str, Any]) -> None:
        call = dict(zip(_NAMES, args))
        call.update(kwargs)
        query, key, mask = call.get("query"), call.get("key"), call.get("attn_mask")
        if (not isinstance(query, Tensor) or not isinstance(key, Tensor) or query.is_nested or key.is_nested
                or not query.is_floating_point() or not (mask is None or isinstance(mask, Tensor))):
            return
        with torch.no_grad(), full_precision(query.device):
            logits = sdpa_logits(query, key, mask, bool(call.get("is_causal", False)), call.get("scale"))
            if logits is None:
                return
            s = buf.site(site)
            s.attention.append(stats.attention_summary(logits, SATURATION))
            if layer.module not in self.watched:  # a row of its own: its calls are the SDPA calls
                s.calls += 1
        self._recorded.append((buf, site))


def _selected(model: nn.Module, include: Sequence[Selector], exclude: Sequence[Selector]) -> Dict[nn.Module, bool]:
    """Per module, whether its SDPA calls are measured: as for parameters, by the module or a
    container above it (``include="encoder"`` covers ``encoder.layer.0.attn``)."""
    modules = dict(model.named_modules())
    out: Dict[nn.Module, bool] = {}
    for name, module in modules.items():
        chain = [n for n in _ancestors(name) if n in modules]
        wanted = not include or any(_matches(n, modules[n], include) for n in chain)
        out[module] = wanted and not any(_matches(n, modules[n], exclude) for n in chain)
    return out
