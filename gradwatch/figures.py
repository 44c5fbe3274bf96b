"""PNG charts for ``gradwatch compare`` (matplotlib, the optional ``examples`` extra).

Both charts keep a sensible size whatever the run's length and the model's depth, and
say under the plot what is drawn.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .runs import Run

MAX_HEATMAP_LAYERS = 12
"""Heat-map panels per run; deeper models show this many layers, evenly spaced by depth."""
MAX_HEATMAP_COLUMNS = 120
"""Step columns per heat-map panel; longer runs average consecutive logged steps into one column."""
MAX_FIGURE_INCHES = (20.0, 14.0)
"""Largest figure (width, height) in inches; at the dpi used, at most 2400 x 1680 pixels."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("gradwatch: PNG charts need matplotlib: pip install 'gradwatch[examples]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(figsize: Tuple[float, float]) -> Any:
    """A figure drawn by matplotlib's Agg renderer without pyplot, so that drawing one inside
    a training process (the TensorBoard image) leaves the backend its session chose alone."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise SystemExit("gradwatch: PNG charts need matplotlib: pip install 'gradwatch[examples]'") from None
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


# ---------------------------------------------------------------------------------- gradient flow
def layer_scales(run: Run, *, per_element: bool) -> Dict[str, float]:
    """Per weighted layer: median over logged steps of its parameter-gradient scale.

    ``per_element=True``: RMS, the L2 norm divided by the square root of the layer's number of
    parameter elements, so a layer's size does not decide its height. Non-finite steps are
    left out of the median; a layer whose median is 0 maps to 0.0 (no gradient at all).
    """
    out: Dict[str, float] = {}
    for name in run.weighted_layers():
        values = [v for _, v in run.series("gradient.layer_norm", name) if math.isfinite(v)]
        if not values:
            continue
        median = statistics.median(values)
        if per_element:
            numel = run.layer_numel(name)
            if not numel:
                continue
            median /= math.sqrt(numel)
        out[name] = median
    return out


def nonfinite_steps(run: Run) -> Tuple[int, int]:
    """How many logged steps had a NaN/Inf gradient norm in some weighted layer, of how many logged."""
    bad, logged = set(), set()
    for name in run.weighted_layers():
        for step, v in run.series("gradient.layer_norm", name):
            logged.add(step)
            if not math.isfinite(v):
                bad.add(step)
    return len(bad), len(logged)


def gradient_flow(runs: List[Run], path: Any, *, dpi: int = 120) -> Any:
    """Per-element gradient scale (RMS) of each weighted layer against depth, one line per
    run, log scale: vanishing gradients fall towards the input. Layers whose gradient is
    exactly 0 are drawn along the bottom with a cross. ``path``: a file name or a binary
    file object. Returns the matplotlib figure."""
    per_element = all(run.sized for run in runs)
    layers: List[str] = []
    for run in runs:
        layers += [n for n in run.weighted_layers() if n not in layers]
    pos = {n: i for i, n in enumerate(layers)}
    scales = [layer_scales(run, per_element=per_element) for run in runs]
    positive = [v for s in scales for v in s.values() if v > 0]
    floor = min(positive) / 10 if positive else 1e-8
    width = min(max(8.0, 0.22 * len(layers) + 2.5), MAX_FIGURE_INCHES[0])
    fig = _figure((width, 5.2))
    ax = fig.subplots()
    any_zero = False
    for run, scale in zip(runs, scales):
        xs = [pos[n] for n in layers if n in scale]
        ys = [scale[n] if scale[n] > 0 else math.nan for n in layers if n in scale]
        (line,) = ax.plot(xs, ys, marker="o", markersize=4 if len(layers) > 40 else 6, label=run.name)
        zeros = [pos[n] for n in layers if scale.get(n) == 0]
        if zeros:
            any_zero = True
            ax.scatter(zeros, [floor] * len(zeros), marker="x", s=70, linewidths=2, color=line.get_color(),
                       zorder=3, clip_on=False)
    if any_zero:
        ax.scatter([], [], marker="x", color="grey", label="gradient exactly 0 (drawn along the bottom)")
    step = max(1, math.ceil(len(layers) / 40))  # at most ~40 labels, so they stay readable
    ax.set_xticks(range(0, len(layers), step), layers[::step], rotation=45, ha="right",
                  fontsize=8 if len(layers) <= 20 else 6)
    ax.set_xlim(-0.5, max(len(layers) - 0.5, 0.5))
    ax.set_yscale("log")
    # (always set: with no positive value at all -- every gradient NaN -- the log axis has no range)
    ax.set_ylim(bottom=floor / 2, top=max(positive) * 3 if positive else floor * 100)
    ax.set_xlabel("layer with parameters (input → output)")
    what = "RMS gradient per parameter element" if per_element else "gradient L2 norm of the layer's parameters"
    ax.set_ylabel(f"{what}\n(median over logged steps)")
    ax.set_title("gradient flow: " + ("per-element gradient scale by depth" if per_element
                                      else "gradient norm by depth"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if per_element:
        caption = ("Each point: a layer's parameter gradient as RMS per element (L2 norm / √number of elements), "
                   "median over the logged steps; log scale, one line per run. The vanishing rule compares the "
                   "same per-element scale, first layer over last, at each measured step.")
    else:
        caption = ("Each point: L2 norm of a layer's parameter gradients, median over the logged steps; log scale. "
                   "Parameter sizes are not recorded in these run folders (older gradwatch), so larger layers "
                   "sit higher.")
    if any_zero:
        caption += " ×: the layer received no gradient at all (median exactly 0), drawn along the bottom."
    for run in runs:  # steps left out of the medians are said, and a run left with nothing to draw
        bad, logged = nonfinite_steps(run)
        if bad and bad == logged:
            caption += f" {run.name}: every logged step's gradient is NaN/Inf, nothing to draw."
        elif bad:
            caption += f" {run.name}: {bad} of {logged} logged steps had NaN/Inf gradients, left out."
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.text(0.01, 0.012, _wrap(caption, int(width * 15)), fontsize=8, va="bottom", ha="left")
    fig.savefig(path, dpi=dpi)
    return fig


# ---------------------------------------------------------------------------------- activation heat maps
def pick_layers(layers: Sequence[str], most: int = MAX_HEATMAP_LAYERS) -> List[str]:
    """At most ``most`` layers, evenly spaced by depth, first and last included."""
    if len(layers) <= most:
        return list(layers)
    idx = sorted({int(round(i)) for i in np.linspace(0, len(layers) - 1, most)})
    return [layers[i] for i in idx]


def aggregate_steps(steps: Sequence[int], grid: np.ndarray, most: int = MAX_HEATMAP_COLUMNS
                    ) -> Tuple[np.ndarray, np.ndarray, int]:
    """Average consecutive step columns of ``grid`` (bins x steps) into at most ``most``
    columns. Returns the new grid, the x edges of its columns, and the steps per column."""
    steps_a = np.asarray(steps, dtype=float)
    groups = np.array_split(np.arange(len(steps_a)), min(most, len(steps_a)))
    out = np.stack([grid[:, g].mean(axis=1) for g in groups], axis=1)
    gap = float(np.median(np.diff(steps_a))) if len(steps_a) > 1 else 1.0
    mids = (steps_a[1:] + steps_a[:-1]) / 2
    edges = [steps_a[0] - gap / 2] + [mids[g[-1]] for g in groups[:-1]] + [steps_a[-1] + gap / 2]
    return out, np.asarray(edges), max(len(g) for g in groups)


def activation_heatmaps(runs: List[Run], path: str, bins: int = 40) -> Any:
    """Per run (rows) and activation layer (columns): the activation histogram over time,
    re-binned onto one value grid per run and layer ("colorful dimension" plots). A run
    with a single histogram step is drawn as a bar chart of that step. Returns the figure."""
    plt = _pyplot()
    all_layers: List[str] = []
    for r in runs:
        all_layers += [n for n in r.layers if n in r.histograms and n not in all_layers]
    if not all_layers:
        raise SystemExit("gradwatch: no activation histograms in these runs (histogram_every=None?)")
    layers = pick_layers(all_layers)
    width = min(2.2 * len(layers) + 1.2, MAX_FIGURE_INCHES[0])
    height = min(1.8 * len(runs) + 1.1, MAX_FIGURE_INCHES[1])
    fig, axes = plt.subplots(len(runs), len(layers), figsize=(width, height), squeeze=False)
    per_column, one_step = 1, False
    for j, layer in enumerate(layers):
        for i, run in enumerate(runs):
            ax = axes[i][j]
            hist = run.histograms.get(layer, [])
            if hist:
                per_column = max(per_column, _panel(ax, hist, bins))
                one_step = one_step or len(hist) == 1
            else:
                ax.text(0.5, 0.5, "no histogram", ha="center", va="center", fontsize=7, transform=ax.transAxes)
            ax.tick_params(labelsize=6)
            if i == 0:
                ax.set_title(layer, fontsize=8)
            if j == 0:
                ax.set_ylabel(run.name, fontsize=8)
    fig.suptitle("activation histograms over steps", fontsize=10)
    shown = (f"{len(layers)} of {len(all_layers)} layers, evenly spaced by depth" if len(layers) < len(all_layers)
             else "layers")
    averaged = f" (each column averages {per_column} logged steps)" if per_column > 1 else ""
    caption = f"rows: runs · columns: {shown} · x: step{averaged} · y: activation value · colour: log(1 + count)"
    if one_step:
        caption += " · bars: a run with a single histogram step (x: count)"
    fig.tight_layout(rect=(0, 0.05 if height < 6 else 0.03, 1, 1))
    fig.text(0.01, 0.005, _wrap(caption, int(width * 15)), fontsize=7, va="bottom", ha="left")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def _panel(ax: Any, hist: List[Tuple[int, List[float], List[float]]], bins: int) -> int:
    """One run's histograms of one layer: a heat map over steps, or a bar chart for one step.
    Returns how many logged steps each drawn column averages."""
    lo = min(h[1][0] - (h[1][1] - h[1][0] if len(h[1]) > 1 else 1e-9) for h in hist)
    hi = max(h[1][-1] for h in hist)
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    grid = np.stack([_rebin(limits, counts, edges) for _, limits, counts in hist], axis=1)
    if len(hist) == 1:
        centres = (edges[1:] + edges[:-1]) / 2
        ax.barh(centres, grid[:, 0], height=(hi - lo) / bins, color="#b5367a")
        ax.set_xlabel(f"count at step {hist[0][0]}", fontsize=6)
        ax.set_ylim(lo, hi)
        return 1
    grid, x_edges, per_column = aggregate_steps([h[0] for h in hist], grid)
    ax.pcolormesh(x_edges, edges, np.log1p(grid), cmap="magma", shading="flat")
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(3, integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _short(v)))
    return per_column


def _short(v: float) -> str:
    """Step numbers short enough for a narrow panel: 1200 -> 1.2k, 2000000 -> 2M."""
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.0f}"


def _rebin(limits: List[float], counts: List[float], edges: np.ndarray) -> np.ndarray:
    """Move bucket counts (right edges ``limits``; the first bucket as wide as the second)
    onto ``edges``, each bucket's count spread evenly over its width: a bucket that straddles
    two target bins gives each its share, so re-binning leaves no empty stripes."""
    limits_a = np.asarray(limits, dtype=float)
    counts_a = np.asarray(counts, dtype=float)
    bins = len(edges) - 1
    if len(limits_a) < 2 or not np.all(np.diff(limits_a) > 0):
        # One bucket (or degenerate limits): all of a bucket's count at its right edge.
        idx = np.clip(np.searchsorted(edges, limits_a, side="right") - 1, 0, bins - 1)
        return np.bincount(idx, weights=counts_a, minlength=bins)
    src = np.concatenate([[limits_a[0] - (limits_a[1] - limits_a[0])], limits_a])
    cumulative = np.concatenate([[0.0], np.cumsum(counts_a)])
    return np.diff(np.interp(edges, src, cumulative))


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, max(width, 40)))


def png_size(path: str) -> Optional[Tuple[int, int]]:
    """(width, height) in pixels from a PNG file's header."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
