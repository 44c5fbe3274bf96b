"""MNIST test accuracy of one CNN with five activation functions, watched by gradwatch.

The classic experiment: the 4-layer CNN of TensorFlow's "Deep MNIST for experts"
tutorial, trained with ELU, LeakyReLU, ReLU, Tanh and Sigmoid in turn. Published
test accuracies (12k-20k steps): ELU 0.9894, LeakyReLU 0.9893, ReLU 0.9921,
Tanh 0.9868, Sigmoid 0.9814 -- sigmoid lowest. Every run is watched by gradwatch,
whose findings appear live as rich panels; its table per activation and a table of
our accuracies next to the published ones are printed at the end.

Setup (every hyper-parameter):

- data: MNIST, 60,000 train / 10,000 test; pixels scaled to [0, 1] (``x / 255``),
  no augmentation, no validation split. ``--quick``: the first 10,000 training and
  the first 2,000 test images.
- model (``nn.Sequential``, layer names as gradwatch reports them):
  ``conv1`` 5x5, 1->32, padding 2, ``act1``, ``pool1`` 2x2 max-pool (28->14);
  ``conv2`` 5x5, 32->64, padding 2 ("SAME" as in the original), ``act2``, ``pool2``
  2x2 max-pool (14->7); ``flatten``; ``fc1`` 3136->1024, ``act3``, ``dropout``
  p = 0.5 (training only); ``fc2`` 1024->10 (logits; softmax inside the loss).
  Only ``act1..act3`` change: ``torch.nn`` ``ELU`` (alpha 1), ``LeakyReLU``
  (negative slope 0.01, PyTorch's default), ``ReLU``, ``Tanh``, ``Sigmoid``.
- initialisation (``--init tf``, default): as in the original tutorial, weights
  truncated normal with std 0.1 (cut at +-2 std), biases 0.1; the same seed, hence
  the same weights, for every activation. ``--init torch`` keeps PyTorch's defaults.
- training: cross-entropy, Adam (lr 1e-4, betas 0.9/0.999, eps 1e-8), batch 50,
  reshuffled every epoch (seeded). Full mode: 20,000 steps per activation, the
  original's schedule (1,000,000 images, 16.7 epochs); ``--quick``: 200 steps.
  ``--steps N`` overrides both.
- evaluation: test accuracy and cross-entropy on the first 2,000 test images every
  250 steps (50 with ``--quick``) for the curves; the reported accuracy is on the
  whole test set (10,000; 2,000 with ``--quick``) after the last step.
- gradwatch: ``GradWatch(model, writer=SummaryWriter(runs/mnist_activations/<act>),
  every=50, histogram_every=1000, quiet=True)`` (``--quick``: every 10, histograms
  every 100); default thresholds. The same writer gets ``loss/train_cross_entropy``
  (every 10 steps), ``eval/test_accuracy`` and ``eval/test_cross_entropy``.

Deviations from the original: PyTorch instead of TensorFlow (LeakyReLU's slope is
PyTorch's default 0.01 -- the original's is not stated), and the accuracy is of one seed.

Outputs (``--out``, default the runs folder): ``results.json`` and ``test_curves.png``.

    python -m examples.mnist_activations --quick --data-dir ../shared/data   # ~1 min on 2 CPU cores
    python -m examples.mnist_activations --data-dir ../shared/data           # full: 5 x 20,000 steps
    OMP_WAIT_POLICY=PASSIVE python -m examples.mnist_activations --data-dir ../shared/data --threads 2 --steps 4000
                        # 5 x 4,000 steps: 15 min on 2 shared CPU cores (35-55 ms/step)

(On a CPU shared with other jobs, ``OMP_WAIT_POLICY=PASSIVE`` keeps ``--threads 2`` from
spinning: with one other busy process we measured 5x slower steps without it.) The five
activations can also run side by side, one process each, and be combined afterwards with
``--merge`` (see ``examples/common.py``): on one H100 GPU the five full runs side by side
took 134 s (6 ms/step each). ``docs/reproduction.md`` has the commands and the results.
"""

from __future__ import annotations

if not __package__:  # run as a file (python examples/mnist_activations.py): import from the checkout, not examples/
    import os
    import sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import math
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple, Type

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from gradwatch import GradWatch

from examples import common
from examples.datasets import load_mnist

EXAMPLE = "mnist_activations"
ACTIVATIONS: Dict[str, Type[nn.Module]] = OrderedDict(
    elu=nn.ELU, leakyrelu=nn.LeakyReLU, relu=nn.ReLU, tanh=nn.Tanh, sigmoid=nn.Sigmoid)
PUBLISHED = {"elu": 0.9894, "leakyrelu": 0.9893, "relu": 0.9921, "tanh": 0.9868, "sigmoid": 0.9814}
TOLERANCE = 0.01  # "within +-0.01 of the published accuracy"

LR = 1e-4
BATCH = 50
DROPOUT = 0.5
INIT_STD = 0.1
INIT_BIAS = 0.1
FULL_STEPS = 20_000  # the original's schedule
QUICK_STEPS = 200
QUICK_TRAIN = 10_000
QUICK_TEST = 2_000
CURVE_TEST = 2_000  # test images used for the curves
EVAL_EVERY = {"full": 250, "quick": 50}
WATCH_EVERY = {"full": 50, "quick": 10}
HIST_EVERY = {"full": 1000, "quick": 100}
LOSS_LOG_EVERY = 10


# ----------------------------------------------------------------------------- model
def build_cnn(act: Type[nn.Module]) -> nn.Sequential:
    """The Deep-MNIST CNN with ``act`` after conv1, conv2 and fc1; named for gradwatch's findings."""
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 32, 5, padding=2)), ("act1", act()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(32, 64, 5, padding=2)), ("act2", act()), ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(7 * 7 * 64, 1024)), ("act3", act()), ("dropout", nn.Dropout(DROPOUT)),
        ("fc2", nn.Linear(1024, 10)),
    ]))


@torch.no_grad()
def init_tf_(model: nn.Module, std: float = INIT_STD, bias: float = INIT_BIAS) -> nn.Module:
    """The tutorial's ``truncated_normal(stddev=0.1)`` weights and ``constant(0.1)`` biases."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.constant_(m.bias, bias)
    return model


def weighted_layers(model: nn.Module) -> List[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# ----------------------------------------------------------------------------- data
def to_inputs(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1]."""
    return torch.from_numpy(images).unsqueeze(1).float().div_(255.0)


def load(args, quick: bool) -> Tuple[torch.Tensor, ...]:
    kw = dict(download=not args.no_download, verify=not args.no_verify)
    xtr, ytr = load_mnist(args.data_dir, train=True, **kw)
    xte, yte = load_mnist(args.data_dir, train=False, **kw)
    if quick:
        xtr, ytr, xte, yte = xtr[:QUICK_TRAIN], ytr[:QUICK_TRAIN], xte[:QUICK_TEST], yte[:QUICK_TEST]
    return to_inputs(xtr), torch.from_numpy(ytr), to_inputs(xte), torch.from_numpy(yte)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> Tuple[float, float]:
    """(accuracy, mean cross-entropy) in eval mode (gradwatch ignores eval forwards)."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, x.shape[0], batch_size):
        logits = model(x[i:i + batch_size])
        correct += (logits.argmax(1) == y[i:i + batch_size]).sum().item()
        loss += F.cross_entropy(logits, y[i:i + batch_size], reduction="sum").item()
    model.train(was_training)
    return correct / x.shape[0], loss / x.shape[0]


# ----------------------------------------------------------------------------- training
def train(act: str, data: tuple, run: common.Run, progress, task) -> dict:
    xtr, ytr, xte, yte = data
    args, steps, mode = run.args, run.steps, run.mode
    torch.manual_seed(args.seed)  # the same initial weights and dropout masks for every activation
    model = build_cnn(ACTIVATIONS[act])
    if args.init == "tf":
        init_tf_(model)
    model.to(run.device)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    batch = min(BATCH, len(xtr))
    gen = torch.Generator().manual_seed(args.seed)  # the same batches for every activation
    x_curve, y_curve = xte[:CURVE_TEST], yte[:CURVE_TEST]
    eval_every = args.eval_every or EVAL_EVERY[mode]
    grads = common.GradNormLog(weighted_layers(model))
    losses: List[float] = []
    curve: Dict[str, list] = {"step": [], "test_accuracy": [], "test_loss": [], "train_loss": []}
    writer = SummaryWriter(log_dir=str(run.runs / act))
    t0 = time.perf_counter()
    try:
        acc0, loss0 = evaluate(model, x_curve, y_curve)  # step 0: the untrained network
        for key, v in (("step", 0), ("test_accuracy", acc0), ("test_loss", loss0), ("train_loss", None)):
            curve[key].append(v)
        with GradWatch(model, writer=writer, every=WATCH_EVERY[mode], histogram_every=HIST_EVERY[mode],
                       quiet=True, console=common.console) as watch:
            for step, (xb, yb) in enumerate(common.batches(xtr, ytr, batch, gen, steps)):
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                grads.poll(watch)
                losses.append(loss.item())
                if step % LOSS_LOG_EVERY == 0:
                    writer.add_scalar("loss/train_cross_entropy", losses[-1], step)
                done = step + 1
                if done % eval_every == 0 or done == steps:
                    acc, test_loss = evaluate(model, x_curve, y_curve)
                    writer.add_scalar("eval/test_accuracy", acc, step)
                    writer.add_scalar("eval/test_cross_entropy", test_loss, step)
                    curve["step"].append(done)
                    curve["test_accuracy"].append(acc)
                    curve["test_loss"].append(test_loss)
                    curve["train_loss"].append(float(np.mean(losses[-eval_every:])))
                    progress.update(task, completed=done, status=f"{act} test acc {acc:.4f}")
                elif step % 10 == 0:
                    progress.update(task, completed=done, status=f"{act} loss {losses[-1]:.3f}")
        grads.poll(watch)  # the last measured step is published on leaving the block
        train_seconds = time.perf_counter() - t0
        acc, test_loss = evaluate(model, xte, yte)
        writer.add_scalar("eval/final_test_accuracy", acc, len(losses))
    finally:
        writer.close()
    report = watch.report()
    findings = common.findings_summary(watch)
    return {
        "test_accuracy": acc,
        "test_loss": test_loss,
        "published_test_accuracy": PUBLISHED[act],
        "difference": acc - PUBLISHED[act],
        "final_train_loss": float(np.mean(losses[-100:])) if losses else math.nan,
        "steps": len(losses),
        "epochs": len(losses) * batch / len(xtr),
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": common.seconds(t0),
        "ms_per_step": round(1000 * train_seconds / max(len(losses), 1), 1),
        "curve": curve,
        "weight_grad_norm": grads.thinned(),
        "last_weight_grad_norm": grads.last(),
        "layers": {n: {k: v for k, v in ls.to_dict().items()
                       if k in ("type", "zero_fraction", "saturated_fraction", "dead_fraction", "grad_norm")}
                   for n, ls in report.layers.items()},
        "findings": findings,
        "finding_kinds": common.finding_kinds(findings),
        "_report": report,
    }


# ----------------------------------------------------------------------------- figure
def plot_curves(results: Dict[str, dict], path, steps: int, mode: str) -> None:
    plt = common.pyplot()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 5.4))
    colors = plt.get_cmap("tab10")
    for i, (act, r) in enumerate(results.items()):
        c = r["curve"]
        color = colors(i)
        ax_acc.plot(c["step"], c["test_accuracy"], "-o", ms=3, color=color,
                    label=f"{act}: {r['test_accuracy']:.4f} (published {PUBLISHED[act]:.4f})")
        ax_acc.axhline(PUBLISHED[act], color=color, ls=":", lw=1)
        ax_loss.plot(c["step"], c["test_loss"], "-o", ms=3, color=color, label=f"{act} test")
        ax_loss.plot(c["step"][1:], c["train_loss"][1:], "--", lw=1, color=color, alpha=0.7, label=f"{act} train")
    # from just below the lowest final accuracy: early points of slow starters go off the bottom
    finals = [r["curve"]["test_accuracy"][-1] for r in results.values()]
    lo = math.floor((min(finals + [min(PUBLISHED.values())]) - 0.03) * 50) / 50
    ax_acc.set_ylim(max(lo, 0.0), 1.0)
    ax_acc.set_xlabel("training step (batch 50)")
    ax_acc.set_ylabel(f"test accuracy (first {CURVE_TEST:,} test images)")
    ax_acc.set_title("Test accuracy (dotted: published final accuracy)")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("training step (batch 50)")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.set_title("Test cross-entropy (solid) and training cross-entropy (dashed)")
    ax_loss.grid(alpha=0.3, which="both")
    ax_loss.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.suptitle(f"MNIST, Deep-MNIST CNN, Adam lr 1e-4, batch 50, {steps:,} steps per activation ({mode})",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- checks and tables
def acceptance(results: Dict[str, dict]) -> Dict[str, object]:
    """The experiment's claims, checked on our numbers: each accuracy within +-0.01 of the
    published one, and sigmoid the lowest."""
    checks: Dict[str, object] = {
        f"{a}_within_{TOLERANCE}": abs(r["difference"]) <= TOLERANCE for a, r in results.items()}
    if "sigmoid" in results and len(results) > 1:
        checks["sigmoid_lowest"] = min(results, key=lambda a: results[a]["test_accuracy"]) == "sigmoid"
    checks["all"] = all(bool(v) for v in checks.values())
    return checks


def results_table(results: Dict[str, dict], steps: int, test_size: int) -> Table:
    t = Table(title=f"MNIST test accuracy after {steps:,} steps ({test_size:,} test images) vs published "
                    f"(12k-20k steps)", caption="↓: the lowest accuracy; Δ: ours - published (green: within ±0.01)")
    for col, justify in (("activation", "left"), ("ours", "right"), ("published", "right"), ("Δ", "right"),
                         ("test loss", "right"), ("train s", "right"), ("gradwatch findings", "left")):
        t.add_column(col, justify=justify)
    best = min(results, key=lambda a: results[a]["test_accuracy"]) if results else None
    for act, r in results.items():
        d = r["difference"]
        t.add_row(act + (" ↓" if act == best and len(results) > 1 else ""), f"{r['test_accuracy']:.4f}",
                  f"{PUBLISHED[act]:.4f}",
                  f"[{'green' if abs(d) <= TOLERANCE else 'red'}]{d:+.4f}[/]", f"{r['test_loss']:.4f}",
                  f"{r['train_seconds']:.0f}", "\n".join(r["finding_kinds"]) or "-")
    return t


# ----------------------------------------------------------------------------- main
def describe(run: common.Run, n_train: int, n_test: int) -> dict:
    """Every hyper-parameter of this run, for results.json."""
    mode = run.mode
    return {"model": "conv5x5x32(pad2)-act-maxpool2-conv5x5x64(pad2)-act-maxpool2-fc1024-act-dropout0.5-fc10",
            "init": ("truncated normal std 0.1 (+-2 std), bias 0.1" if run.args.init == "tf" else "PyTorch default"),
            "inputs": "x / 255 in [0, 1]", "optimizer": "Adam", "lr": LR, "betas": [0.9, 0.999],
            "eps": 1e-8, "batch_size": min(BATCH, n_train), "dropout": DROPOUT, "steps": run.steps,
            "eval_every": run.args.eval_every or EVAL_EVERY[mode], "curve_test_images": min(CURVE_TEST, n_test),
            "leakyrelu_negative_slope": 0.01, "elu_alpha": 1.0,
            "gradwatch": {"every": WATCH_EVERY[mode], "histogram_every": HIST_EVERY[mode], "thresholds": "defaults"},
            **run.environment(), "train_size": n_train, "test_size": n_test}


def main(argv: Optional[List[str]] = None) -> dict:
    p = common.parser(__doc__, variants=ACTIVATIONS, steps=(FULL_STEPS, QUICK_STEPS))
    p.add_argument("--eval-every", type=int, default=None,
                   help=f"steps between test evaluations for the curves (default {EVAL_EVERY['full']}; "
                        f"{EVAL_EVERY['quick']} with --quick)")
    p.add_argument("--init", choices=("tf", "torch"), default="tf",
                   help="tf: the tutorial's truncated-normal(0.1) weights and 0.1 biases (default); "
                        "torch: PyTorch's default initialisation")
    run = common.start(p, EXAMPLE, argv)
    results, setup, parts = run.train_or_merge(lambda: load(run.args, run.quick), describe, train)

    checks = acceptance(results)
    common.console.print(results_table(results, run.steps, setup["test_size"]))
    verdict = "[green]holds[/]" if checks["all"] else "[red]does not hold[/]"
    common.console.print(f"acceptance (±{TOLERANCE} of published, sigmoid lowest): {verdict}  "
                         + ", ".join(f"{k}={v}" for k, v in checks.items() if k != "all"))
    fig = run.out / "test_curves.png"
    plot_curves(results, fig, run.steps, run.mode)
    return run.finish({"setup": setup, "published": {a: PUBLISHED[a] for a in results},
                       "published_steps": "12k-20k", "acceptance": checks, "activations": results},
                      [fig], parts)


if __name__ == "__main__":
    main()
