"""Gradient flow per layer on Fashion-MNIST, for six activation functions.

The classic experiment: one MLP, six activations, one batch. With sigmoid the
weight gradients shrink by orders of magnitude from the output layer back to the
input layer (vanishing gradients); with tanh, ReLU, LeakyReLU, ELU and Swish they
stay of similar size across depth; ReLU also shows gradients that are exactly zero
(units that are off for every sample of the batch). gradwatch watches that batch and
must raise a ``VanishingGradientWarning`` for sigmoid only. Each network is then
trained briefly to compare test accuracy.

Setup (every hyper-parameter):

- data: Fashion-MNIST (60,000 train / 10,000 test, 28x28 grey), pixels scaled to
  [-1, 1] (``x / 127.5 - 1``), flattened to 784 inputs.
- model: MLP 784-512-256-256-128-10 (``fc1``..``fc5``), an activation after every
  hidden layer, PyTorch's default ``nn.Linear`` initialisation; the same weights
  (seed ``--seed``, default 0) for every activation.
- activations, written as small ``nn.Module`` classes the way a user would:
  sigmoid ``1 / (1 + exp(-x))``, tanh, ReLU ``clamp(x, min=0)``, LeakyReLU
  (alpha = 0.1), ELU (alpha = 1), Swish ``x * sigmoid(x)``.
- gradient pass: one batch of 256 training images (a seeded random draw), cross-entropy
  loss, one backward, no optimizer step; watched by
  ``GradWatch(model, log_dir=runs/fashion_mnist_gradients/<act>, every=1, quiet=True)``.
  Reported per activation: the weight-gradient norm of fc1 over that of fc5 (the
  "first/last ratio"), the per-layer distribution of log10 |dL/dW|, and gradwatch's
  findings and warnings.
- training: Adam, lr 1e-3, batch 128, cross-entropy, reshuffled each epoch (seeded);
  full mode 1 epoch (468 steps), ``--quick`` 200 steps; test accuracy on all 10,000
  test images. Training is watched too (``every=50``, TensorBoard in
  ``runs/fashion_mnist_gradients/<act>/train``); its findings are reported separately.

Outputs (``--out``, default the runs folder): ``results.json`` and
``gradient_histograms.png``.

    python -m examples.fashion_mnist_gradients --quick --data-dir DATA
    python -m examples.fashion_mnist_gradients --data-dir DATA --threads 2

Wall time on 2 CPU cores (torch 2.13, CPU): ``--quick`` 15-25 s; full mode 44 s measured
for ``--data-dir ../shared/data --threads 2`` (about 2-3 s of training per activation,
plus loading, six watched gradient passes and the figure). On cores shared with other
jobs, ``--threads 1`` is the steadier choice: ``--quick`` measured 22 s with 1 thread
and 69-97 s with 2 threads while another job was using the cores.

Results on the real data (full mode, seed 0) are in ``docs/results/fashion_mnist_gradients``.
"""

from __future__ import annotations

if not __package__:  # run as a file (python examples/fashion_mnist_gradients.py): import from the checkout
    import os
    import sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import math
import time
import warnings
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Type

import numpy as np
import torch
import torch.nn.functional as F
from rich import box
from rich.table import Table
from torch import nn

from gradwatch import GradWatch

from examples import common
from examples.datasets import load_fashion_mnist

EXAMPLE = "fashion_mnist_gradients"
DIMS = (784, 512, 256, 256, 128, 10)
GRAD_BATCH = 256
BATCH = 128
LR = 1e-3
EPOCHS = 1
QUICK_STEPS = 200
TRAIN_EVERY = 50


# ----------------------------------------------------------------------------- activations
class Sigmoid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1 / (1 + torch.exp(-x))


class Tanh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


class ReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, min=0)


class LeakyReLU(nn.Module):
    def __init__(self, alpha: float = 0.1) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x, self.alpha * x)


class ELU(nn.Module):
    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # clamp: exp of a large positive x (the branch where() discards) would be inf and its gradient NaN
        return torch.where(x > 0, x, self.alpha * (torch.exp(torch.clamp(x, max=0)) - 1))


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


ACTIVATIONS: Dict[str, Type[nn.Module]] = OrderedDict(
    sigmoid=Sigmoid, tanh=Tanh, relu=ReLU, leakyrelu=LeakyReLU, elu=ELU, swish=Swish)


def build_mlp(act: Callable[[], nn.Module], dims: Sequence[int] = DIMS) -> nn.Sequential:
    """``fc1, act1, fc2, act2, ..., fc5``: named, so gradwatch's findings name the layer."""
    parts: "OrderedDict[str, nn.Module]" = OrderedDict()
    n = len(dims) - 1
    for i in range(n):
        parts[f"fc{i + 1}"] = nn.Linear(dims[i], dims[i + 1])
        if i < n - 1:
            parts[f"act{i + 1}"] = act()
    return nn.Sequential(parts)


def linear_names(model: nn.Module) -> List[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


# ----------------------------------------------------------------------------- data
def to_inputs(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 784) in [-1, 1]."""
    return torch.from_numpy(images).reshape(len(images), -1).float().div_(127.5).sub_(1.0)


def load(args) -> tuple:
    kw = dict(download=not args.no_download, verify=not args.no_verify)
    xtr, ytr = load_fashion_mnist(args.data_dir, train=True, **kw)
    xte, yte = load_fashion_mnist(args.data_dir, train=False, **kw)
    return to_inputs(xtr), torch.from_numpy(ytr), to_inputs(xte), torch.from_numpy(yte)


def gradient_batch(x: torch.Tensor, y: torch.Tensor, seed: int, size: int = GRAD_BATCH) -> tuple:
    """A seeded random batch of ``size`` training examples (all of them if fewer)."""
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:size]
    return x[idx], y[idx]


# ----------------------------------------------------------------------------- the gradient pass
def gradient_pass(act: str, batch_x: torch.Tensor, batch_y: torch.Tensor, seed: int = 0,
                  log_dir=None, device: Optional[torch.device] = None) -> dict:
    """One watched forward/backward of a fresh MLP with activation ``act`` on one batch.

    Returns the model (gradients in place), gradwatch's watch, the warnings it raised,
    and the first/last weight-gradient ratio (from gradwatch's report, checked against
    the gradients themselves)."""
    device = device or torch.device("cpu")
    torch.manual_seed(seed)  # the same initial weights for every activation
    model = build_mlp(ACTIVATIONS[act]).to(device)
    x, y = batch_x.to(device), batch_y.to(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradWatch(model, log_dir=log_dir, every=1, quiet=True) as watch:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
    report = watch.report()
    fcs = linear_names(model)
    norms = {n: report.params[f"{n}.weight"].grad_norm for n in fcs}
    # gradwatch's numbers against the tensors themselves (a check of the library, cheap)
    direct = {n: float(model.get_submodule(n).weight.grad.norm()) for n in fcs}
    mismatch = max(abs(norms[n] - direct[n]) / max(direct[n], 1e-30) for n in fcs)
    return {"model": model, "watch": watch, "loss": loss.item(), "warnings": caught,
            "weight_grad_norm": norms, "ratio": norms[fcs[0]] / norms[fcs[-1]],
            "layer_grad_norm": {n: report.layers[n].grad_norm for n in fcs},
            "gradwatch_vs_torch_max_rel_diff": mismatch}


def gradient_ratios(batch_x: torch.Tensor, batch_y: torch.Tensor, seed: int = 0,
                    activations: Sequence[str] = tuple(ACTIVATIONS)) -> Dict[str, float]:
    """First/last layer weight-gradient-norm ratio per activation for one batch (no files)."""
    return {a: gradient_pass(a, batch_x, batch_y, seed)["ratio"] for a in activations}


def grad_magnitudes(model: nn.Module) -> Dict[str, np.ndarray]:
    """|dL/dW| of every Linear's weight, flattened, per layer (forward order)."""
    return {n: model.get_submodule(n).weight.grad.detach().abs().flatten().cpu().double().numpy()
            for n in linear_names(model)}


def magnitude_summary(mags: np.ndarray) -> dict:
    nz = mags[mags > 0]
    q = np.quantile(nz, [0.01, 0.5, 0.99]) if nz.size else [math.nan] * 3
    return {"numel": int(mags.size), "zero_fraction": float(1 - nz.size / mags.size),
            "p01": float(q[0]), "median": float(q[1]), "p99": float(q[2]), "max": float(mags.max())}


# ----------------------------------------------------------------------------- figure
def plot_histograms(mags: Dict[str, Dict[str, np.ndarray]], ratios: Dict[str, float],
                    warned: Dict[str, List[str]], path) -> None:
    """One panel per activation; in each, one histogram of log10 |dL/dW| per layer.
    Exact zeros have no logarithm: they are drawn as a separate bar at the left edge."""
    plt = common.pyplot()
    finite = np.concatenate([m[m > 0] for per in mags.values() for m in per.values()])
    lo = math.floor(np.log10(finite.min())) if finite.size else -12
    lo = max(lo, -12)
    hi = math.ceil(np.log10(finite.max())) if finite.size else 0
    edges = np.linspace(lo, hi, 81)
    zero_x = lo - 1.2  # where the "exactly zero" bars go, one thin bar per layer side by side
    acts = list(mags)
    cols = 3
    rows = math.ceil(len(acts) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), sharex=True, sharey=True,
                             squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, act in zip(axes.flat, acts):
        layers = list(mags[act])
        bar_w = 0.8 / len(layers)
        for i, name in enumerate(layers):
            m = mags[act][name]
            color = cmap(i / max(len(layers) - 1, 1))
            nz = m[m > 0]
            weights = np.full(nz.size, 1.0 / m.size)
            ax.hist(np.log10(nz), bins=edges, weights=weights, histtype="step", lw=1.6, color=color,
                    label=f"{name} ({m.size:,})")
            zero = 1.0 - nz.size / m.size
            if zero > 0:
                ax.bar(zero_x + (i - (len(layers) - 1) / 2) * bar_w, zero, width=bar_w, color=color,
                       alpha=0.8, edgecolor="0.3", lw=0.4)
        ax.axvline(lo - 0.5, color="0.6", lw=0.8, ls=":")
        verdict = ", ".join(warned.get(act, [])) or "no gradwatch warning"
        ax.set_title(f"{act}: |∇W| fc1/fc5 = {ratios[act]:.1e}\n({verdict})", fontsize=10)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="major")
    for ax in axes.flat[len(acts):]:
        ax.axis("off")
    ticks = list(range(lo, hi + 1, 2 if hi - lo > 6 else 1))
    for ax in axes[-1]:
        ax.set_xticks([zero_x] + ticks)
        ax.set_xticklabels(["0"] + [f"1e{t}" for t in ticks], fontsize=8)
        ax.set_xlabel("|dL/dW| (log scale; bar at left: exactly 0)")
    for ax in axes[:, 0]:
        ax.set_ylabel("fraction of the layer's weights")
    axes.flat[0].legend(fontsize=7, loc="upper left", title="layer (weights)", title_fontsize=7)
    fig.suptitle("Fashion-MNIST MLP 784-512-256-256-128-10, one batch of 256, default init: "
                 "weight-gradient magnitudes per layer", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- training
def train(act: str, data: tuple, steps: int, seed: int, device: torch.device, log_dir, progress, task) -> dict:
    """A brief watched training of a fresh MLP; test accuracy, findings and warnings."""
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = build_mlp(ACTIVATIONS[act]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    batch = min(BATCH, len(xtr))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    losses: List[float] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradWatch(model, log_dir=log_dir, every=TRAIN_EVERY, quiet=True) as watch:
            for step, (xb, yb) in enumerate(common.batches(xtr, ytr, batch, gen, steps)):
                loss = F.cross_entropy(model(xb.to(device)), yb.to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
                if step % 20 == 0 or step == steps - 1:
                    progress.update(task, completed=step + 1, status=f"{act} loss {loss.item():.3f}")
    acc = common.accuracy(model, xte.to(device), yte.to(device))
    return {"steps": len(losses), "final_loss": float(np.mean(losses[-20:])) if losses else math.nan,
            "test_accuracy": acc, "train_seconds": common.seconds(t0),
            "findings": common.findings_summary(watch),
            "warnings": sorted({w.category.__name__ for w in caught})}


# ----------------------------------------------------------------------------- main
def gradient_passes(run: common.Run, bx: torch.Tensor, by: torch.Tensor) -> tuple:
    """One watched batch per activation: (results per activation, |dL/dW| per activation and layer)."""
    results: Dict[str, dict] = {}
    mags: Dict[str, Dict[str, np.ndarray]] = {}
    with common.progress() as progress:
        task = progress.add_task("gradient pass", total=len(run.variants), status="")
        for act in run.variants:
            progress.update(task, status=act)
            g = gradient_pass(act, bx, by, run.args.seed, log_dir=run.runs / act, device=run.device)
            mags[act] = grad_magnitudes(g["model"])
            results[act] = {
                "first_last_weight_grad_ratio": g["ratio"],
                "weight_grad_norm": g["weight_grad_norm"],
                "layer_grad_norm": g["layer_grad_norm"],
                "gradwatch_vs_torch_max_rel_diff": g["gradwatch_vs_torch_max_rel_diff"],
                "weight_grad_magnitude": {n: magnitude_summary(m) for n, m in mags[act].items()},
                "loss": g["loss"],
                "findings": common.findings_summary(g["watch"]),
                "warnings": sorted({w.category.__name__ for w in g["warnings"]}),
                "layers": {n: {k: v for k, v in ls.to_dict().items()
                               if k in ("type", "zero_fraction", "saturated_fraction", "saturation_method",
                                        "dead_fraction", "output_grad_norm", "grad_norm")}
                           for n, ls in g["watch"].report().layers.items()},
            }
            progress.advance(task)
    return results, mags


def gradient_table(results: Dict[str, dict], batch: int) -> Table:
    table = Table(title=f"One batch of {batch}: median |dL/dW| per layer", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("activation")
    table.add_column("fc1/fc5", justify="right")
    for name in linear_names(build_mlp(nn.Identity)):
        table.add_column(name, justify="right")
    table.add_column("gradwatch")
    for act, r in results.items():
        med = [f"{s['median']:.0e}" for s in r["weight_grad_magnitude"].values()]
        found = ", ".join(common.finding_kinds(r["findings"])) or "-"
        table.add_row(act, f"{r['first_last_weight_grad_ratio']:.1e}", *med, found)
    return table


def training_table(results: Dict[str, dict], steps: int, batch: int) -> Table:
    table = Table(title=f"Test accuracy after {steps} steps (Adam lr {LR:g}, batch {batch})",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("activation", "test acc.", "train loss", "gradwatch while training", "seconds"):
        table.add_column(col, justify="left" if col in ("activation", "gradwatch while training") else "right")
    for act, r in results.items():
        t = r["training"]
        found = ", ".join(sorted({f"{f['kind']}@{f['layer']}" for f in t["findings"]})) or "-"
        table.add_row(act, f"{t['test_accuracy']:.2%}", f"{t['final_loss']:.3f}", found, f"{t['train_seconds']:.1f}")
    return table


def main(argv: Optional[List[str]] = None) -> dict:
    p = common.parser(__doc__, variants=ACTIVATIONS, merge=False)
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps per activation (default: {EPOCHS} epoch; {QUICK_STEPS} with --quick)")
    run = common.start(p, EXAMPLE, argv)
    data = run.load(lambda: load(run.args))
    xtr, ytr, xte, yte = data
    batch = min(BATCH, len(xtr))
    steps_per_epoch = len(xtr) // batch
    run.steps = run.args.steps if run.args.steps is not None else (
        QUICK_STEPS if run.quick else EPOCHS * steps_per_epoch)
    bx, by = gradient_batch(xtr, ytr, run.args.seed)

    # 1. one watched batch per activation
    results, mags = gradient_passes(run, bx, by)
    fig = run.out / "gradient_histograms.png"
    plot_histograms(mags, {a: r["first_last_weight_grad_ratio"] for a, r in results.items()},
                    {a: r["warnings"] for a, r in results.items()}, fig)
    common.console.print(gradient_table(results, len(bx)))

    # 2. brief training per activation
    trained = run.train(lambda act, bar, task: train(act, data, run.steps, run.args.seed, run.device,
                                                     run.runs / act / "train", bar, task))
    for act, t in trained.items():
        results[act]["training"] = t
    common.console.print(training_table(results, run.steps, batch))

    setup = {"dims": list(DIMS), "init": "PyTorch default nn.Linear", "inputs": "x / 127.5 - 1 in [-1, 1]",
             "gradient_batch": len(bx), "optimizer": "Adam", "lr": LR, "batch_size": batch,
             "train_steps": run.steps, "steps_per_epoch": steps_per_epoch, "train_watch_every": TRAIN_EVERY,
             **run.environment(), "train_size": len(xtr), "test_size": len(xte), "leakyrelu_alpha": 0.1,
             "elu_alpha": 1.0}
    return run.finish({"setup": setup,
                       "ratio_definition": "L2 norm of fc1.weight's gradient / L2 norm of fc5.weight's gradient, "
                                           "one batch",
                       "activations": results}, [fig])


if __name__ == "__main__":
    main()
