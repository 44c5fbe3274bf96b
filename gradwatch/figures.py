"""PNG charts for ``gradwatch compare`` (matplotlib, the optional ``examples`` extra)."""

from __future__ import annotations

import math
import statistics
from typing import List

import numpy as np

from .runs import Run


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("gradwatch: PNG charts need matplotlib: pip install 'gradwatch[examples]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def gradient_flow(runs: List[Run], path: str) -> None:
    """Median parameter-gradient norm of each weighted layer against depth, one line per run,
    log scale: the picture that makes vanishing gradients obvious."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run in runs:
        layers = run.weighted_layers()
        values = []
        for n in layers:
            s = [v for _, v in run.series("gradient.layer_norm", n) if math.isfinite(v) and v > 0]
            values.append(statistics.median(s) if s else math.nan)
        ax.plot(range(len(layers)), values, marker="o", label=run.name)
        ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("layer (input → output)")
    ax.set_ylabel("gradient norm of the layer's parameters\n(median over logged steps)")
    ax.set_title("gradient flow")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def activation_heatmaps(runs: List[Run], path: str, bins: int = 40) -> None:
    """Per run (rows) and activation layer (columns): the activation histogram over time,
    re-binned onto one value grid per run and layer ("colorful dimension" plots)."""
    plt = _pyplot()
    layers: List[str] = []
    for r in runs:
        layers += [n for n in r.layers if n in r.histograms and n not in layers]
    if not layers:
        raise SystemExit("gradwatch: no activation histograms in these runs (histogram_every=None?)")
    fig, axes = plt.subplots(len(runs), len(layers), figsize=(2.2 * len(layers) + 1, 1.8 * len(runs) + 0.5),
                             squeeze=False)
    for j, layer in enumerate(layers):
        for i, run in enumerate(runs):
            ax = axes[i][j]
            hist = run.histograms.get(layer, [])
            if hist:
                lo = min(h[1][0] - (h[1][1] - h[1][0] if len(h[1]) > 1 else 1e-9) for h in hist)
                hi = max(h[1][-1] for h in hist)
                edges = np.linspace(lo, hi, bins + 1)
                grid = np.stack([_rebin(limits, counts, edges) for _, limits, counts in hist], axis=1)
                ax.imshow(np.log1p(grid), aspect="auto", origin="lower", cmap="magma",
                          extent=(hist[0][0], hist[-1][0], lo, hi))
            ax.tick_params(labelsize=6)
            if i == 0:
                ax.set_title(layer, fontsize=8)
            if j == 0:
                ax.set_ylabel(run.name, fontsize=8)
    fig.suptitle("activation histograms over steps (log counts)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rebin(limits: List[float], counts: List[float], edges: np.ndarray) -> np.ndarray:
    """Move bucket counts (right edges ``limits``) onto ``edges`` by bucket centre."""
    limits_a = np.asarray(limits)
    if len(limits_a) > 1:
        width = np.diff(limits_a, prepend=limits_a[0] - (limits_a[1] - limits_a[0]))
    else:
        width = np.zeros(1)
    centres = limits_a - width / 2
    out, _ = np.histogram(centres, bins=edges, weights=np.asarray(counts))
    return out
