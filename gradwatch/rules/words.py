"""Wording shared by the rules: lists of layers, counts, and advice as one sentence."""

from __future__ import annotations

from typing import List, Sequence

from ..report import StepStats


def names(items: Sequence[str], limit: int = 3) -> str:
    """``conv1, layer1.0.conv1, layer1.0.conv2 and 14 more``."""
    items = list(items)
    if len(items) <= limit + 1:
        return ", ".join(items)
    return f"{', '.join(items[:limit])} and {len(items) - limit} more"


def count(n: int, what: str) -> str:
    """``8 layers (Linear)``."""
    return f"{n} layer{'s' if n != 1 else ''} ({what})"


def listed(layers: Sequence[str], stats: StepStats) -> str:
    """``fc1`` or ``3 layers (Linear): fc1, fc2, fc3`` -- long lists shortened."""
    if len(layers) == 1:
        return layers[0]
    types = sorted({stats.layers[n].type for n in layers if n in stats.layers})
    return f"{count(len(layers), ', '.join(types) or 'parameters')}: {names(layers)}"


def sentence(tips: List[str]) -> str:
    """``["a", "b", "c"]`` -> ``"A, b and c."``"""
    text = tips[0] if len(tips) == 1 else ", ".join(tips[:-1]) + " and " + tips[-1]
    return text[0].upper() + text[1:] + "."


def percent_range(values: Sequence[float]) -> str:
    """``74-76%`` (or ``75%`` when they round alike)."""
    lo, hi = f"{100 * min(values):.0f}", f"{100 * max(values):.0f}"
    return f"{lo}%" if lo == hi else f"{lo}-{hi}%"
