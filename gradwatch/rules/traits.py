"""What the model is made of, as far as the rules need it: its kinds of layers (for advice
that fits), its output activation, its weighted layers and which of them compare across depth."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Set, Tuple

from ..report import StepStats


@dataclass(frozen=True)
class Traits:
    """The layer types of a model, as far as advice needs them (from ``LayerStats.type``)."""

    squashing: Tuple[str, ...] = ()  # sigmoid/tanh-like activations, by layer name
    normalised: bool = False
    attention: bool = False
    convolutional: bool = False
    recurrent: bool = False

    @property
    def norm_layer(self) -> str:
        if self.attention or self.recurrent:
            return "LayerNorm"
        return "BatchNorm" if self.convolutional else "BatchNorm or LayerNorm"


def traits(stats: StepStats) -> Traits:
    # The same layers come back at every measured step: worked out once per set of layers.
    return _traits(tuple((name, ls.type) for name, ls in stats.layers.items()))


@functools.lru_cache(maxsize=16)
def _traits(layers: Tuple[Tuple[str, str], ...]) -> Traits:
    types = {name: type_name.lower() for name, type_name in layers}
    return Traits(
        squashing=tuple(n for n, t in types.items()
                        if any(k in t for k in ("sigmoid", "tanh", "softsign")) and "shrink" not in t),
        normalised=any("norm" in t for t in types.values()),
        attention=any(any(k in text for k in ("attention", "attn", "transformer"))
                      for text in list(types.values()) + [n.lower() for n in types]),
        convolutional=any("conv" in t for t in types.values()),
        recurrent=any(t in ("lstm", "gru", "rnn") or "lstm" in t or "gru" in t for t in types.values()))


def module_of(site: str) -> str:
    """The module a row belongs to: ``layer4.0.relu#2`` -> ``layer4.0.relu`` (rows are per call site)."""
    return site.rsplit("#", 1)[0] if "#" in site else site


def output_activations(stats: StepStats) -> Set[str]:
    """Layers after the last layer with parameters, in forward order: the model's output
    activation (a sigmoid head with BCE, a softmax with cross-entropy), compensated by its loss."""
    owners = {ps.layer for ps in stats.params.values()}
    order = list(stats.layers)
    last = max((i for i, n in enumerate(order) if n in owners), default=-1)
    return set(order[last + 1:]) if last >= 0 else set()


@dataclass(frozen=True)
class Weighted:
    """A layer with trainable parameters at one step."""

    name: str
    rms: float  # gradient RMS per parameter element
    norm: float  # gradient L2 norm over the layer's parameters
    zero: bool  # its largest parameter is all zeros now (a zero-initialised head or adapter)


def weighted_layers(stats: StepStats) -> List[Weighted]:
    """Layers with trainable parameters, in forward order, with their per-element gradient
    scale: sqrt(sum of squared gradient norms / number of elements)."""
    sq: Dict[str, float] = {}
    numel: Dict[str, int] = {}
    largest: Dict[str, Tuple[int, float]] = {}
    for ps in stats.params.values():
        sq[ps.layer] = sq.get(ps.layer, 0.0) + ps.grad_norm ** 2
        numel[ps.layer] = numel.get(ps.layer, 0) + max(ps.numel, 1)
        if ps.numel > largest.get(ps.layer, (-1, 0.0))[0]:
            largest[ps.layer] = (ps.numel, ps.weight_norm)
    ordered = [n for n in stats.layers if n in sq] + [n for n in sq if n not in stats.layers]
    return [Weighted(n, math.sqrt(sq[n] / numel[n]), math.sqrt(sq[n]), largest[n][1] == 0) for n in ordered]


@dataclass(frozen=True)
class Depth:
    """The layers compared across depth, and the three that the gradient-flow rules judge by."""

    layers: List[Weighted]  # compared: not embeddings, normalisation or zero-initialised layers
    every: List[Weighted]  # every weighted layer with a finite gradient
    skipped: Set[str]  # layers that started at zero
    first: Weighted
    early: Weighted  # the best-fed layer of the first quarter of the depth
    last: Weighted


def depth(stats: StepStats, zero_init: Iterable[str] = (), *,
          weighted: Optional[List[Weighted]] = None) -> Optional[Depth]:
    """The weighted layers in forward order that say something about depth: not embeddings (only
    the rows of the tokens seen get a gradient), not normalisation layers, and not layers that
    started at zero (everything below one has a zero gradient at first, by design). None when
    fewer than two are left.

    The early layers are judged by the best-fed of the first quarter of the depth: one layer
    whose gradient is small by design (an attention query or key at initialisation, behind a
    softmax that is still flat) is not the network failing to pass gradient down."""
    skip = set(zero_init)
    compared = {n for n, ls in stats.layers.items()
                if "embedding" not in ls.type.lower() and "norm" not in ls.type.lower()}
    every = [w for w in (weighted_layers(stats) if weighted is None else weighted) if math.isfinite(w.rms)]
    layers = [w for w in every if w.name not in skip and not w.zero
              and (w.name in compared or w.name not in stats.layers)]
    if len(layers) < 2:
        return None
    early = layers[:max(1, (len(layers) - 1) // 4)]
    return Depth(layers, every, skip, layers[0], max(early, key=lambda w: w.rms), layers[-1])
