"""A 20-second tour of gradwatch: three small networks, three diagnoses.

Trains on synthetic data (no download), so it runs anywhere:

1. a deep sigmoid MLP    -> VanishingGradientWarning (the first layer barely learns)
2. a ReLU MLP whose second layer starts with a large negative bias -> DeadUnitsWarning
3. a healthy ReLU MLP    -> no warnings

Each run writes TensorBoard data to runs/demo/<name>:  tensorboard --logdir runs/demo
"""

from __future__ import annotations

if not __package__:  # run as a file (python examples/demo.py): import from the checkout, not examples/
    import os
    import sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from gradwatch import GradWatch

from examples.common import positive_int


def mlp(act: Callable[[], nn.Module], dims: List[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def make_data(n: int = 4096, d: int = 64, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    teacher = torch.randn(d, classes, generator=g)
    return x, (x @ teacher).argmax(1)


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=positive_int, default=300)
    p.add_argument("--runs", default="runs/demo")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="CPU threads for torch (default 1: these networks are tiny, and more threads only "
                        "wait on each other, badly so on cores shared with other jobs)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = make_data()
    dims = [64, 128, 128, 128, 128, 10]
    sick = mlp(nn.ReLU, dims)
    with torch.no_grad():
        sick[2].bias.fill_(-20.0)
    networks = {"sigmoid-deep": mlp(nn.Sigmoid, dims), "relu-dead-bias": sick, "relu-healthy": mlp(nn.ReLU, dims)}
    out = {}
    for name, model in networks.items():
        print(f"\n=== {name} ===")
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        with GradWatch(model, log_dir=f"{args.runs}/{name}", every=10, histogram_every=50) as watch:
            for step in range(args.steps):
                idx = torch.randint(0, x.shape[0], (128,))
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        out[name] = {"loss": loss.item(), "findings": [f.kind.value for f in watch.findings]}
        print(f"final loss {loss.item():.3f}; findings: {out[name]['findings'] or 'none'}")
    print("\nNext:\n" + "\n".join(f"    {c}" for c in next_commands(args.runs)))
    return out


def next_commands(runs: str) -> List[str]:
    """The commands to run after the demo, spelled so that they are found: with the path of
    this interpreter's scripts folder (``.venv/bin/``) unless that folder is on ``PATH``."""
    import os
    import shutil
    import sys

    scripts = os.path.dirname(sys.executable)
    found = shutil.which("gradwatch")
    if found and os.path.dirname(found) == scripts:
        prefix = ""
    else:
        relative = os.path.relpath(scripts)
        prefix = (scripts if relative.startswith("..") else relative) + os.sep
    return [f"{prefix}gradwatch compare {runs} --png flow.png    # gradient flow of the three runs",
            f"{prefix}tensorboard --logdir {runs}    # the runs in TensorBoard"]


if __name__ == "__main__":
    main()
