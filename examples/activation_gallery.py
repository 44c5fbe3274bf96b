"""A gallery of activation functions: shape, slope, output distribution, and what gradwatch sees.

For each of eleven ``torch.nn`` activations — Sigmoid, Tanh, Hardtanh, ReLU,
LeakyReLU, ELU, SELU, CELU, Softplus, Swish (``nn.SiLU``) and Mish — this example

1. plots the function and its derivative on [-5, 5] (derivative by autograd, 1,001
   points) -> ``activation_functions.png``;
2. feeds it standard-normal input and plots the output distribution (histogram,
   mean, std) -> ``activation_outputs.png``;
3. runs that input through the activation with gradwatch watching it alone
   (``GradWatch(act, every=1, quiet=True, include=["*"])``, one forward and a
   backward of ``ones``) and reports what gradwatch measures on the layer
   ``"(model)"``: saturated fraction (``-`` for activations gradwatch does not treat as
   saturating: only bounded ones by type, here Sigmoid, Tanh and Hardtanh), fraction of
   exact zeros, dead-unit fraction, and any findings it raised.

Setup (every hyper-parameter):

- modules with PyTorch's defaults: Hardtanh [-1, 1], LeakyReLU negative_slope 0.01,
  ELU alpha 1, CELU alpha 1, Softplus beta 1 (threshold 20); SELU's fixed constants.
- input: ``torch.randn(rows, 100)`` (seed ``--seed``, default 0): 100 units, rows =
  10,000 (1,000,000 values) in full mode, 1,000 (100,000 values) with ``--quick``.
- gradwatch thresholds: the defaults (``Thresholds()``): saturated = within 1 % of the
  output range from a bound; a SaturationWarning above 25 % saturated.
- no dataset, no training, no TensorBoard.

Outputs (``--out``, default ``runs/activation_gallery``): ``results.json``,
``activation_functions.png``, ``activation_outputs.png``.

    python -m examples.activation_gallery --quick     # ~4 s wall on 2 CPU cores
    python -m examples.activation_gallery             # full: ~5 s wall on 2 CPU cores

Results (full mode, seed 0) are in ``docs/results/activation_gallery``.
"""

from __future__ import annotations

if not __package__:  # run as a file (python examples/activation_gallery.py): import from the checkout
    import os
    import sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import math
import warnings
from collections import OrderedDict
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from rich import box
from rich.table import Table
from torch import nn

from gradwatch import GradWatch

from examples import common

EXAMPLE = "activation_gallery"
UNITS = 100
ROWS_FULL = 10_000
ROWS_QUICK = 1_000
CURVE_POINTS = 1001
CURVE_RANGE = (-5.0, 5.0)

ACTIVATIONS: Dict[str, Callable[[], nn.Module]] = OrderedDict([
    ("Sigmoid", nn.Sigmoid), ("Tanh", nn.Tanh), ("Hardtanh", nn.Hardtanh), ("ReLU", nn.ReLU),
    ("LeakyReLU", nn.LeakyReLU), ("ELU", nn.ELU), ("SELU", nn.SELU), ("CELU", nn.CELU),
    ("Softplus", nn.Softplus), ("Swish (SiLU)", nn.SiLU), ("Mish", nn.Mish),
])


def curve(act: nn.Module, points: int = CURVE_POINTS) -> tuple:
    """x on [-5, 5], f(x) and f'(x) (autograd) as numpy arrays."""
    x = torch.linspace(*CURVE_RANGE, points, dtype=torch.float64, requires_grad=True)
    y = act(x)
    (dy,) = torch.autograd.grad(y.sum(), x)
    return x.detach().numpy(), y.detach().numpy(), dy.numpy()


def watched(act: nn.Module, x: torch.Tensor) -> dict:
    """Run ``x`` through ``act`` with gradwatch watching ``act`` alone; backward of ones."""
    xi = x.clone().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradWatch(act, every=1, quiet=True, include=["*"]) as w:
            y = act(xi)
            y.backward(torch.ones_like(y))
    ls = w.report().layers["(model)"]
    slope = xi.grad
    return {
        "y": y.detach(),
        "gradwatch": {"saturated_fraction": ls.saturated_fraction, "saturation_method": ls.saturation_method,
                      "zero_fraction": ls.zero_fraction, "dead_fraction": ls.dead_fraction,
                      "mean": ls.mean, "std": ls.std,
                      "output_grad_norm": ls.output_grad_norm},
        "findings": common.findings_summary(w),
        "warnings": sorted({c.category.__name__ for c in caught}),
        "mean_slope": float(slope.mean()),
        "zero_slope_fraction": float((slope == 0).double().mean()),
    }


def plot_functions(curves: Dict[str, tuple], path) -> None:
    plt = common.pyplot()
    cols = 4
    rows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax, (name, (x, y, dy)) in zip(axes.flat, curves.items()):
        ax.axhline(0, color="0.7", lw=0.8)
        ax.axvline(0, color="0.7", lw=0.8)
        ax.plot(x, y, color="C0", lw=2, label="f(x)")
        ax.plot(x, dy, color="C3", lw=1.6, ls="--", label="f'(x)")
        ax.set_title(name, fontsize=10)
        ax.set_xlim(*CURVE_RANGE)
        ax.set_ylim(-1.6, 3.2)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(curves):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("Activation functions (solid) and their derivatives by autograd (dashed) on [-5, 5]; "
                 "y-axis clipped at 3.2", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def point_masses(y: np.ndarray, min_share: float = 0.005) -> Dict[float, float]:
    """Values that occur exactly with a share above ``min_share`` (ReLU's 0, Hardtanh's +-1)."""
    values, counts = np.unique(y, return_counts=True)
    keep = counts > min_share * y.size
    return {float(v): float(c) / y.size for v, c in zip(values[keep], counts[keep])}


def plot_outputs(outputs: Dict[str, np.ndarray], path) -> None:
    """Histogram (share of outputs per bin) of each activation's output for standard-normal
    input. Point masses -- values taken exactly by a share of the outputs, like ReLU's
    zeros -- would dwarf every bin: they are drawn as red lines (not to scale) with their share;
    a bin more than 4x the 90th-percentile bin is clipped and labelled with its share."""
    plt = common.pyplot()
    cols = 4
    rows = math.ceil(len(outputs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax, (name, y) in zip(axes.flat, outputs.items()):
        masses = point_masses(y)
        rest = y[~np.isin(y, list(masses))] if masses else y
        lo, hi = np.quantile(y, [0.0005, 0.9995])
        pad = 0.03 * (hi - lo)
        edges = np.linspace(lo - pad, hi + pad, 81)
        frac, _ = np.histogram(rest, bins=edges)  # the outer 0.1% of the tails is left out
        frac = frac / y.size
        # A bin far above the rest (LeakyReLU squeezes half the inputs into [-0.05, 0]) is clipped and labelled.
        cap = 4 * np.quantile(frac[frac > 0], 0.9)
        top = (min(frac.max(), cap)) * 1.15
        ax.bar(edges[:-1], np.minimum(frac, cap), width=np.diff(edges), align="edge", color="C0", alpha=0.75)
        mid = (edges[0] + edges[-1]) / 2
        for i in np.flatnonzero(frac > cap):
            ax.text(edges[i + 1] + pad, cap * 0.97, f"← {frac[i]:.0%} in [{edges[i]:.2f}, {edges[i + 1]:.2f}] "
                    f"(bar clipped)".replace("-0.00", "0"), ha="left", va="top", fontsize=7, color="C0")
        for v, share in masses.items():
            ax.vlines(v, 0, top * 0.95, color="C3", lw=2.5)
            ax.text(v, top * 0.97, f"y={v:g}: {share:.0%}", ha="left" if v <= mid else "right", va="bottom",
                    fontsize=7, color="C3")
        mean, std = float(y.mean()), float(y.std())
        ax.axvline(mean, color="k", lw=1.2)
        ax.axvspan(mean - std, mean + std, color="0.5", alpha=0.15)
        ax.set_ylim(0, top * 1.15)
        ax.set_title(f"{name}: mean {mean:.2f}, std {std:.2f}".replace("-0.00", "0.00"), fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(outputs):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("share of outputs per bin", fontsize=8)
    fig.suptitle("Output distribution for standard-normal input (black line: mean; grey band: ±1 std; "
                 "red: values taken exactly, with their share; central 99.9%)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v: Optional[float], spec: str = "{:.1%}") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else spec.format(v)


def main(argv: Optional[List[str]] = None) -> dict:
    p = common.parser(__doc__, data=False, devices=False)  # on the CPU: the tensors are small
    run = common.start(p, EXAMPLE, argv)  # (no TensorBoard)
    console = common.console
    rows = ROWS_QUICK if run.quick else ROWS_FULL
    x = torch.randn(rows, UNITS, generator=torch.Generator().manual_seed(run.args.seed))

    curves: Dict[str, tuple] = {}
    outputs: Dict[str, np.ndarray] = {}
    results: Dict[str, dict] = {}
    with common.progress() as progress:
        task = progress.add_task("activations", total=len(ACTIVATIONS), status="")
        for name, make in ACTIVATIONS.items():
            progress.update(task, status=name)
            act = make()
            curves[name] = curve(act)
            r = watched(act, x)
            y = r.pop("y")
            outputs[name] = y.flatten().numpy()
            x_c, f_c, d_c = curves[name]
            results[name] = {
                "module": repr(act),
                # exact, over every value (gradwatch's spread and shares come from a sample of the tensor)
                "output": {"mean": float(y.mean()), "std": float(y.std()), "min": float(y.min()),
                           "max": float(y.max()), "zero_fraction": float((y == 0).double().mean())},
                **r,
                "derivative_range_on_[-5,5]": [float(d_c.min()), float(d_c.max())],
            }
            progress.advance(task)

    f1, f2 = run.out / "activation_functions.png", run.out / "activation_outputs.png"
    plot_functions(curves, f1)
    plot_outputs(outputs, f2)

    table = Table(title=f"Standard-normal input ({x.numel():,} values): output, slope, and gradwatch's view",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("activation", "mean", "std", "mean f'", "saturated", "zeros", "dead", "gradwatch"):
        table.add_column(col, justify="left" if col in ("activation", "gradwatch") else "right",
                         no_wrap=col == "activation")
    for name, r in results.items():
        g = r["gradwatch"]
        found = ", ".join(f["kind"] for f in r["findings"]) or "-"
        table.add_row(name, f"{r['output']['mean']:.3f}", f"{r['output']['std']:.3f}", f"{r['mean_slope']:.3f}",
                      _fmt(g["saturated_fraction"]), _fmt(g["zero_fraction"]), _fmt(g["dead_fraction"]), found)
    console.print(table)
    console.print("saturated: share of outputs within 1% of the output range from a bound (bounded activations "
                  "only, '-' otherwise); zeros: exact zeros; dead: units (of 100) with no non-zero output, or, for "
                  "the smooth rectifiers, no input above their flat side's cut-off ('-': not tracked); "
                  "mean f': mean slope, by autograd")

    setup = {"input": f"torch.randn({rows}, {UNITS}), seed {run.args.seed}", "values": x.numel(),
             "curve": {"range": list(CURVE_RANGE), "points": CURVE_POINTS, "dtype": "float64"},
             "gradwatch": "GradWatch(act, every=1, quiet=True, include=['*']), default Thresholds",
             "threads": torch.get_num_threads()}
    return run.finish({"setup": setup, "activations": results}, [f1, f2])

if __name__ == "__main__":
    main()
