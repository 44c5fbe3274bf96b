"""Attention entropy collapse in a small transformer, seen live: the same model trained twice.

A 2-layer ``nn.TransformerEncoder`` (width 64, 4 heads, feed-forward 128, no dropout, learned
positions, mean-pooled into a linear head) learns a synthetic task: the most frequent token
of a random sequence (32 tokens from a vocabulary of 16; a fresh batch of 64 per step, seeded).
Attention that averages over the sequence solves it, so healthy heads stay far from one-hot.

- ``healthy``: Adam, learning rate 1e-3, linear warm-up over the first 50 steps;
- ``collapse``: Adam, learning rate 1e-1 with no warm-up -- the setting in which Zhai et al.
  (2023, "Stabilizing Transformer Training by Preventing Attention Entropy Collapse") and
  Wortsman et al. (2023, "Small-scale proxies for large-scale Transformer training
  instabilities") see attention logits grow until each query attends to one key.

Both run under ``GradWatch(model, every=10, optimizer=opt)``: on measured steps gradwatch
recomputes each attention layer's weights for a sample of queries (the model's forward is
untouched) and reports the normalised entropy (1: uniform, 0: one key), the share of queries
with a weight above 0.99 and the largest logit, and each step's update-to-weight ratios.

Outputs (``--out``, default ``runs/transformer_attention``): ``results.json`` (per measured
step and layer: entropy, saturated share, largest logit; the loss; every finding) and
``attention_entropy.png``; TensorBoard runs under ``runs/transformer_attention/<variant>``.

    python -m examples.transformer_attention --quick   # 150 steps per variant
    python -m examples.transformer_attention           # 600 steps per variant

Results (full mode, seed 0, CPU) are in ``docs/results/transformer_attention``.
"""

from __future__ import annotations

if not __package__:  # run as a file (python examples/transformer_attention.py): import from the checkout
    import os
    import sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import math
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from gradwatch import GradWatch

from examples import common

EXAMPLE = "transformer_attention"
VOCAB, LENGTH, BATCH = 16, 32, 64
WIDTH, HEADS, FEEDFORWARD, LAYERS = 64, 4, 128, 2
EVERY = 10
VARIANTS = {"healthy": {"lr": 1e-3, "warmup": 50}, "collapse": {"lr": 1e-1, "warmup": 0}}


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Parameter(torch.randn(LENGTH, WIDTH) * 0.02)
        layer = nn.TransformerEncoderLayer(WIDTH, HEADS, FEEDFORWARD, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x) + self.pos).mean(1))


def batch(g: torch.Generator, device: torch.device) -> tuple:
    x = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g)
    y = F.one_hot(x, VOCAB).sum(1).argmax(1)  # the most frequent token (the lowest one on a tie)
    return x.to(device), y.to(device)


def train(name: str, run: common.Run, progress, task) -> dict:
    cfg = VARIANTS[name]
    torch.manual_seed(run.args.seed)
    model = Classifier().to(run.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    warmup = cfg["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    g = torch.Generator().manual_seed(run.args.seed + 1)
    log_dir = run.runs / name if run.args.runs else None
    curves: Dict[str, Dict[str, List[Optional[float]]]] = {}
    steps: List[int] = []
    losses: List[float] = []
    loss_at: Dict[int, float] = {}
    ratios: List[Optional[float]] = []
    with warnings.catch_warnings(record=True):  # the findings are kept in the results and printed below
        warnings.simplefilter("always")
        with GradWatch(model, every=EVERY, optimizer=opt, quiet=True, log_dir=log_dir) as watch:
            seen = -1
            for step in range(run.steps):
                x, y = batch(g, run.device)
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                loss_at[step] = loss.item()
                rep = watch.report()
                if rep.stats is not None and rep.step != seen:  # a measured step was closed by this one
                    seen = rep.step
                    steps.append(rep.step)
                    losses.append(round(loss_at.pop(rep.step), 4))
                    loss_at.clear()
                    ups = [p.update_ratio for p in rep.params.values() if p.update_ratio is not None and p.ndim >= 2]
                    ratios.append(max(ups) if ups else None)
                    for layer, ls in rep.layers.items():
                        if ls.attention_entropy_normalised is None:
                            continue
                        c = curves.setdefault(layer, {"entropy_normalised": [], "saturated_fraction": [],
                                                      "max_logit": []})
                        c["entropy_normalised"].append(round(ls.attention_entropy_normalised, 4))
                        c["saturated_fraction"].append(round(ls.attention_saturated_fraction or 0.0, 4))
                        c["max_logit"].append(round(ls.attention_max_logit or math.nan, 2))
                progress.advance(task)
    x, y = batch(torch.Generator().manual_seed(run.args.seed + 2), run.device)
    with torch.no_grad():
        accuracy = (model.eval()(x).argmax(1) == y).float().mean().item()
    return {"lr": cfg["lr"], "warmup_steps": warmup, "measured_steps": steps, "loss": losses,
            "largest_update_ratio": ratios, "attention": curves, "held_out_accuracy": round(accuracy, 4),
            "findings": common.findings_summary(watch), "_report": watch.report()}


def plot(results: Dict[str, dict], path: Path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"healthy": "-", "collapse": "--"}
    for name, r in results.items():
        for i, (layer, c) in enumerate(r["attention"].items()):
            label = f"{name}: {layer.replace('enc.layers.', 'layer ').replace('.self_attn', '')}"
            color = f"C{i}"
            axes[0].plot(r["measured_steps"], c["entropy_normalised"], styles[name], color=color, label=label)
            axes[1].plot(r["measured_steps"], c["saturated_fraction"], styles[name], color=color, label=label)
        axes[2].plot(r["measured_steps"], r["loss"], styles[name], color="k", label=f"{name} (lr {r['lr']:g})")
    axes[0].set(title="attention entropy / log(keys)", xlabel="step", ylim=(-0.02, 1.02))
    axes[1].set(title="queries with a weight > 0.99", xlabel="step", ylim=(-0.02, 1.02))
    axes[1].axhline(0.5, color="red", lw=0.8, ls=":", label="attention_collapse threshold")
    axes[2].set(title="training loss (chance: log 16 = 2.77)", xlabel="step")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> dict:
    p = common.parser(__doc__, data=False, steps=(600, 150))
    run = common.start(p, EXAMPLE, argv)
    run.variants = list(VARIANTS)
    results = run.train(lambda name, progress, task: train(name, run, progress, task))
    for name, r in results.items():
        common.console.print(f"{name}: lr {r['lr']:g}, warm-up {r['warmup_steps']} steps, final loss {r['loss'][-1]}, "
                             f"held-out accuracy {r['held_out_accuracy']:.1%}, findings "
                             f"{common.finding_kinds(r['findings']) or '-'}")
    figure = run.out / "attention_entropy.png"
    plot(results, figure)
    setup = {"task": f"most frequent of {LENGTH} random tokens (vocabulary {VOCAB}), batch {BATCH}, fresh each step",
             "model": f"nn.TransformerEncoder: {LAYERS} layers, width {WIDTH}, {HEADS} heads, feed-forward "
                      f"{FEEDFORWARD}, no dropout, learned positions, mean pooling, linear head",
             "optimizer": "Adam", "variants": VARIANTS, "steps": run.steps,
             "gradwatch": f"GradWatch(model, every={EVERY}, optimizer=opt), default Thresholds",
             **run.environment()}
    return run.finish({"setup": setup, "variants": results}, [figure])


if __name__ == "__main__":
    main()
