"""Attention saturation: per head entropy, one-hot share and largest logit of ``nn.MultiheadAttention``.

Softmax attention saturates the way a sigmoid does: when query-key logits grow, each query puts
all its weight on one key, the softmax passes almost no gradient, and the head stops learning
(entropy collapse). Fused attention kernels do not return their weights, so on measured steps
a forward pre-hook on each watched ``nn.MultiheadAttention`` (also inside
``nn.TransformerEncoderLayer``/``DecoderLayer``) recomputes them for a bounded sample:

- at most :data:`BATCH_SAMPLE` sequences of the batch and :data:`QUERY_SAMPLE` query positions
  of each (evenly strided), against every key;
- the queries and keys are projected with the module's own ``in_proj_weight``/``in_proj_bias``
  (or ``q_proj_weight``/``k_proj_weight``), in float32 with autocast off, split into heads and
  scaled by ``1/sqrt(head_dim)`` as the module does; ``attn_mask`` (boolean or additive, 2-D or per head), ``key_padding_mask``,
  ``is_causal``, ``add_bias_kv`` and ``add_zero_attn`` are applied the same way;
- :func:`gradwatch.stats.attention_summary` reduces them on the device, per head.

The hook works under ``torch.no_grad()`` on detached tensors, draws no random numbers and returns
``None``: the module's forward, its outputs and gradients are exactly what they are without
gradwatch. Attention dropout is left out (the weights are measured before it). Several calls of
one attention module in a forward add up in its first call site.

Attention computed with ``F.scaled_dot_product_attention`` is measured by :mod:`.sdpa`, into the
same fields, with this module's sampling, masking and host side.

On the host, :func:`fold` sums the calls per head, :func:`add_totals` puts the sums into the
site's totals (combined over processes like every other total) and :func:`finish_layer` writes
``LayerStats.attention_*``. The per-head values are this process's sample.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .. import stats
from ..layers import Layer
from ..report import LayerStats
from .buffers import StepBuffers, in_backward
from .guard import Guard
from .hooks import eager, forward_pre_hook

BATCH_SAMPLE = 4
"""The most sequences of a batch whose attention is recomputed, per call."""
QUERY_SAMPLE = 64
"""The most query positions per sequence whose attention is recomputed (against every key)."""
SATURATION = 0.99
"""A query is saturated when its largest attention weight exceeds this."""
MASKED = -1e4
"""An additive mask value at or below this masks its key: ``exp(-1e4)`` is 0 in float32. Hugging Face
models mask with ``torch.finfo(dtype).min``, older code with -10000; counted as keys a query may
attend to, they would make every causal query look one-hot."""

Current = Callable[[], Optional[StepBuffers]]


class AttentionTaps:
    """Forward pre-hooks on the watched ``nn.MultiheadAttention`` modules, on measured steps only."""

    def __init__(self, layers: List[Layer], guard: Guard, current: Current) -> None:
        self.layers = [layer for layer in layers if isinstance(layer.module, nn.MultiheadAttention)]
        self.guard = guard
        self.current = current
        self.handles: List[RemovableHandle] = []
        # Runs the hook's work (``apart(fn, *args)``): outside the function tap while one is entered
        # (``FunctionalTaps.apart``; an attention module's own call of SDPA enters it).
        self.apart: Callable[..., Any] = lambda fn, *args: fn(*args)

    def register(self) -> None:
        if self.handles:
            return
        for layer in self.layers:
            self.handles.append(forward_pre_hook(layer.module, self._hook(layer), with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, layer: Layer) -> Callable[..., None]:
        name = layer.name

        def pre_hook(module: nn.Module, args: Any, kwargs: Dict[str, Any]) -> None:  # None: inputs unchanged
            buf = self.current()
            if buf is None or name in self.guard.broken or in_backward():
                return
            self.apart(self.guard, name, self._record, module, buf, name, args, kwargs)
        return eager(pre_hook)

    @staticmethod
    def _record(module: nn.MultiheadAttention, buf: StepBuffers, name: str, args: Any,
                kwargs: Dict[str, Any]) -> None:
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                 "average_attn_weights", "is_causal")
        call = dict(zip(names, args))
        call.update(kwargs)
        query, key = call.get("query"), call.get("key")
        if not isinstance(query, Tensor) or not isinstance(key, Tensor) or query.is_nested or key.is_nested:
            return
        with torch.no_grad(), full_precision(query.device):
            logits = attention_logits(module, query, key, call.get("attn_mask"), call.get("key_padding_mask"),
                                      bool(call.get("is_causal", False)))
            buf.site(name).attention.append(stats.attention_summary(logits, SATURATION))


def attention_logits(mha: nn.MultiheadAttention, query: Tensor, key: Tensor, attn_mask: Optional[Tensor] = None,
                     key_padding_mask: Optional[Tensor] = None, is_causal: bool = False,
                     batch: int = BATCH_SAMPLE, queries: int = QUERY_SAMPLE) -> Tensor:
    """The scaled, masked query-key logits ``(batch, heads, queries, keys)`` of a sample of ``mha``'s
    call, masked keys at ``-inf``; float32. (The tensors are read, never modified.)"""
    query, key = query.detach(), key.detach()
    if query.dim() == 2:  # unbatched (L, E): one sequence, whatever batch_first says
        query, key = query.unsqueeze(1), key.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif mha.batch_first:  # (N, L, E) -> (L, N, E)
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    length, n = query.shape[0], query.shape[1]
    sb, sq = stride(n, batch), stride(length, queries)
    q_in = query[::sq, ::sb].transpose(0, 1)  # (B, Q, E)
    k_in = key[:, ::sb].transpose(0, 1)  # (B, S, kdim)
    e, h = mha.embed_dim, mha.num_heads
    if mha._qkv_same_embed_dim:
        w_q, w_k = mha.in_proj_weight[:e], mha.in_proj_weight[e:2 * e]
    else:
        w_q, w_k = mha.q_proj_weight, mha.k_proj_weight
    b_q = b_k = None
    if mha.in_proj_bias is not None:
        b_q, b_k = mha.in_proj_bias[:e], mha.in_proj_bias[e:2 * e]
    # In float32 whatever the model's dtype (the sample is small): bf16 logits would blur the entropy.
    q = F.linear(q_in.float(), w_q.detach().float(), None if b_q is None else b_q.detach().float())
    k = F.linear(k_in.float(), w_k.detach().float(), None if b_k is None else b_k.detach().float())
    bsz = q.shape[0]
    extra = 0
    if mha.bias_k is not None:
        k = torch.cat([k, mha.bias_k.detach().float().reshape(1, 1, e).expand(bsz, 1, e)], dim=1)
        extra += 1
    if mha.add_zero_attn:
        k = torch.cat([k, k.new_zeros(bsz, 1, e)], dim=1)
        extra += 1
    d = e // h
    qh = q.reshape(bsz, -1, h, d).transpose(1, 2)  # (B, H, Q, d)
    kh = k.reshape(bsz, -1, h, d).transpose(1, 2)  # (B, H, S, d)
    logits = torch.matmul(qh, kh.transpose(-1, -2)) * (1.0 / math.sqrt(d))
    s_keys = key.shape[0]
    if attn_mask is None and is_causal:
        rows = torch.arange(0, length, sq, device=logits.device)
        cols = torch.arange(s_keys, device=logits.device)
        attn_mask = cols.unsqueeze(0) > rows.unsqueeze(1)  # already sampled: (Q, S)
    elif attn_mask is not None:
        attn_mask = attn_mask.detach()
        if attn_mask.dim() == 3:  # (N * H, L, S)
            attn_mask = attn_mask.reshape(n, h, length, -1)[::sb, :, ::sq]
        else:
            attn_mask = attn_mask[::sq]
    if attn_mask is not None:
        logits = apply_mask(logits, _pad(attn_mask, extra))
    if key_padding_mask is not None:
        kpm = key_padding_mask.detach()[::sb]  # (B, S)
        logits = apply_mask(logits, _pad(kpm, extra)[:, None, None, :])
    return logits


def full_precision(device: torch.device) -> Any:
    """Autocast off inside the hook (it would run the recomputation in half precision)."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


def stride(n: int, most: int) -> int:
    return max(1, -(-n // most))


def _pad(mask: Tensor, extra: int) -> Tensor:
    """Masks gain a column, never masked, per key that add_bias_kv / add_zero_attn append."""
    if not extra:
        return mask
    return F.pad(mask, (0, extra), value=False if mask.dtype == torch.bool else 0.0)


def apply_mask(logits: Tensor, mask: Tensor) -> Tensor:
    """``logits`` with a boolean mask (True: masked) or an additive one applied; additive values at
    or below :data:`MASKED` mask their key (``-inf``), as the softmax gives it no weight."""
    if mask.dtype == torch.bool or not mask.is_floating_point():
        return logits.masked_fill(mask.bool(), -math.inf)
    mask = mask.float()
    return (logits + mask).masked_fill(mask <= MASKED, -math.inf)


# ---------------------------------------------------------------------- host side
FIELDS = stats.ATTENTION_FIELDS


def fold(rows: List[List[float]]) -> List[List[float]]:
    """The calls' flat ``attention_summary`` values -> per head, the ``FIELDS`` over all calls."""
    heads: List[List[float]] = []
    k = len(FIELDS)
    for flat in rows:
        h = len(flat) // k
        per = [[flat[f * h + i] for f in range(k)] for i in range(h)]
        if not heads:
            heads = per
        elif len(heads) == len(per):
            heads = [[a + b for a, b in zip(x[:-1], y[:-1])] + [max(x[-1], y[-1])] for x, y in zip(heads, per)]
    return heads


def add_totals(t: Any, heads: List[List[float]]) -> None:
    """Per-head sums -> the site's additive totals (``SiteTotals.attn_*``)."""
    t.attn_queries = sum(v[0] for v in heads)
    t.attn_entropy = sum(v[1] for v in heads)
    t.attn_entropy_normalised = sum(v[2] for v in heads)
    t.attn_normalisable = sum(v[3] for v in heads)
    t.attn_saturated = sum(v[4] for v in heads)
    t.attn_max_logit = max((v[5] for v in heads), default=-math.inf)


def finish_layer(ls: LayerStats, t: Any, heads: Optional[List[List[float]]]) -> None:
    """Totals (combined over processes) -> ``ls.attention_*``; per head from this process's sample."""
    if not t.attn_queries:
        return
    ls.attention_entropy = t.attn_entropy / t.attn_queries
    ls.attention_entropy_normalised = (t.attn_entropy_normalised / t.attn_normalisable
                                       if t.attn_normalisable else None)
    ls.attention_saturated_fraction = t.attn_saturated / t.attn_normalisable if t.attn_normalisable else None
    ls.attention_max_logit = t.attn_max_logit if math.isfinite(t.attn_max_logit) else None
    if heads:
        ls.attention_heads = [_head(v) for v in heads]


def _head(v: List[float]) -> Dict[str, Optional[float]]:
    queries, entropy, normalised, normalisable, saturated, max_logit = v
    return {"entropy": entropy / queries if queries else None,
            "entropy_normalised": normalised / normalisable if normalisable else None,
            "saturated_fraction": saturated / normalisable if normalisable else None,
            "max_logit": max_logit if math.isfinite(max_logit) else None}
