"""Attention collapse (entropy collapse): most of an attention layer's sampled queries put over
0.99 of their weight on one key; the softmax is saturated. The heads doing so are named."""

from __future__ import annotations

from typing import List

from ..config import Thresholds
from ..report import Finding, FindingKind, StepStats

ADVICE = ("Bound the logits: normalise queries and keys (QK-norm) or scale the logits down; use "
          "learning-rate warm-up, and a lower learning rate (or weight decay) for the attention's "
          "query/key projections.")


def attention_collapse(stats: StepStats, thresholds: Thresholds) -> List[Finding]:
    """More than ``attention_saturated_fraction`` of a layer's sampled queries are saturated."""
    limit = thresholds.attention_saturated_fraction
    out = []
    for ls in stats.layers.values():
        frac = ls.attention_saturated_fraction
        if frac is None or not frac > limit:
            continue
        heads = [i for i, h in enumerate(ls.attention_heads or [])
                 if h.get("saturated_fraction") is not None and h["saturated_fraction"] > limit]
        which = (f"heads {', '.join(map(str, heads))} of {len(ls.attention_heads or [])}" if heads
                 else "its heads together")
        entropy = ("" if ls.attention_entropy_normalised is None
                   else f", entropy {ls.attention_entropy_normalised:.2f} of the uniform")
        logit = "" if ls.attention_max_logit is None else f", largest logit {ls.attention_max_logit:.3g}"
        out.append(Finding(
            FindingKind.ATTENTION_COLLAPSE, ls.name, stats.step, frac, limit,
            f"{frac:.0%} of the sampled queries attend to a single key (weight > 0.99) in {which}"
            f"{entropy}{logit}: the softmax is saturated and passes almost no gradient to queries and keys.",
            ADVICE))
    return out
