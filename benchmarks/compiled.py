"""gradwatch on a torch.compile'd model: step-time ratios, graph breaks and recompiles.

    python benchmarks/compiled.py [--backend inductor|eager] [--rounds 15] [--warmup 150]

Variants, each on its own copy of the Fashion-MNIST seed MLP (batch 256), compiled with the
same backend: watched at the defaults, watched every step, and unwatched. The watched copies
are compiled first: torch.compile skips module-hook guards by default, so a graph compiled for
an unwatched twin of the same class could otherwise be reused without gradwatch's hooks, and two
watched twins would share one graph (see "compiled models" in docs/performance.md); each copy is
also given a class of its own, so that every variant compiles its own graphs. Each variant warms up (compiling, and the automatic
interval passing its first adaptation point at step 100), then the variants take turns block by
block in a shuffled order; the ratio is the median over rounds of (variant / unwatched) block
time. Graph breaks and recompiles are counted during warm-up and after it (the target: none
after warm-up), and the interval each watch reached is printed.

Targets (issue 12): defaults <= 1.03 with the interval <= 100, every step <= 1.15.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
import warnings
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from gradwatch import GradWatch

from overhead import fashion_mlp  # noqa: E402  (run from the repository root or benchmarks/)


def _counts() -> Tuple[int, int]:
    from torch._dynamo.utils import counters

    return counters["stats"].get("unique_graphs", 0), sum(counters["graph_break"].values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--block", type=int, default=20)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = fashion_mlp()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(256, 784, generator=g) * 2 - 1, torch.randint(0, 10, (256,), generator=g)
    configs: Dict[str, Any] = {"defaults": {}, "every step (scalars)": {"every": 1, "histogram_every": None},
                               "unwatched": None}  # watched copies first (see the docstring)
    runs: Dict[str, Dict[str, Any]] = {}
    print(f"torch {torch.__version__}, backend {args.backend}, {torch.get_num_threads()} threads")
    for i, (name, kwargs) in enumerate(configs.items()):
        model = _own_class(i)(copy.deepcopy(base))  # graphs of its own (see the docstring)
        watch = GradWatch(model, quiet=True, **kwargs).attach() if kwargs is not None else None
        run = {"model": torch.compile(model, backend=args.backend), "watch": watch,
               "opt": torch.optim.Adam(model.parameters(), lr=1e-4), "graphs": 0, "breaks": 0}
        runs[name] = run
        before = _counts()
        t0 = time.perf_counter()
        _block(run, args.warmup, x, y)
        after = _counts()
        run["warmup"] = (time.perf_counter() - t0, after[0] - before[0], after[1] - before[1])
    order, ratios = list(runs), {n: [] for n in runs if n != "unwatched"}
    per_step: Dict[str, List[float]] = {n: [] for n in runs}
    rng = random.Random(0)
    for _ in range(args.rounds):
        rng.shuffle(order)
        times = {}
        for n in order:
            before = _counts()
            times[n] = _block(runs[n], args.block, x, y)
            after = _counts()
            runs[n]["graphs"] += after[0] - before[0]
            runs[n]["breaks"] += after[1] - before[1]
        for n in runs:
            per_step[n].append(times[n] / args.block)
        for n in ratios:
            ratios[n].append(times[n] / times["unwatched"])
    print(f"{args.rounds} rounds x {args.block} steps per variant after {args.warmup} warm-up steps")
    for n, run in runs.items():
        seconds, graphs, breaks = run["warmup"]
        watch = run["watch"]
        line = (f"  {n:22s} {statistics.median(per_step[n]) * 1e3:6.2f} ms/step"
                + (f"  {statistics.median(ratios[n]):.3f}x (rounds {min(ratios[n]):.3f}-{max(ratios[n]):.3f})"
                   if n in ratios else " " * 30)
                + f"  warm-up {seconds:5.1f} s: {graphs} graph(s), {breaks} break(s); after: "
                  f"{run['graphs']} recompile(s), {run['breaks']} break(s)")
        if watch is not None:
            line += f"; interval {watch.every}, layers measured {len(watch.report().layers)}"
            watch.detach()
        print(line)


def _own_class(i: int) -> type:
    """A module class of its own for variant ``i``, wrapping the seed MLP (as users' models are
    their own ``nn.Module`` subclasses)."""
    class SeedMLP(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)
    SeedMLP.__name__ = SeedMLP.__qualname__ = f"SeedMLP{i}"
    return SeedMLP


def _block(run: Dict[str, Any], steps: int, x: torch.Tensor, y: torch.Tensor) -> float:
    model, opt = run["model"], run["opt"]
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
