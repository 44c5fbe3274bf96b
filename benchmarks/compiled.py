"""gradwatch on a torch.compile'd model: step-time ratios, graph breaks and recompiles.

    python benchmarks/compiled.py [--backend inductor|eager] [--rounds 15] [--warmup 150] [--device cuda]

Variants, each on its own copy of the Fashion-MNIST seed MLP (batch 256), compiled with the
same backend: watched at the defaults, watched every step, and unwatched. The watched copies
are compiled first: torch.compile skips module-hook guards by default, so a graph compiled for
an unwatched twin of the same class could otherwise be reused without gradwatch's hooks, and two
watched twins would share one graph (see "compiled models" in docs/performance.md); each copy is
also given a class of its own, so that every variant compiles its own graphs. Each variant warms up (compiling, and the automatic
interval passing its first adaptation point at step 100), then the variants take turns block by
block in a shuffled order; the ratio is the median over rounds of (variant / unwatched) block
time. A second unwatched copy is timed the same way: its ratio, an A/A control, shows how far
two identical compiled copies differ on this machine (a few percent on a shared 2-core machine,
the size of the defaults' target). Graph breaks and recompiles are counted during warm-up and after it (the target: none
after warm-up), and the interval each watch reached is printed. Last, one measured step of a
compiled copy is compared with the same step of an eager one (the numbers measured inside the
graph must equal the eager ones).

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
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = fashion_mlp()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(256, 784, generator=g) * 2 - 1, torch.randint(0, 10, (256,), generator=g)
    x, y = x.to(args.device), y.to(args.device)
    configs: Dict[str, Any] = {"defaults": {}, "every step (scalars)": {"every": 1, "histogram_every": None},
                               "unwatched": None,  # watched copies first (see the docstring)
                               "unwatched again": None}  # an A/A control: how far two plain copies differ
    runs: Dict[str, Dict[str, Any]] = {}
    print(f"torch {torch.__version__}, backend {args.backend}, {torch.get_num_threads()} threads, {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    for i, (name, kwargs) in enumerate(configs.items()):
        model = _own_class(i)(copy.deepcopy(base)).to(args.device)  # graphs of its own (see the docstring)
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
    print(_compare(base, x, y, args.backend))


def _compare(base: nn.Module, x: torch.Tensor, y: torch.Tensor, backend: str) -> str:
    """One measured step of a compiled copy against the same step of an eager one."""
    reports = []
    for i, compiled in ((10, False), (11, True)):
        model = _own_class(i)(copy.deepcopy(base)).to(x.device)
        run = torch.compile(model, backend=backend) if compiled else model
        with GradWatch(model, every=2, histogram_every=None, quiet=True) as watch:
            F.cross_entropy(run(x), y).backward()  # step 0: measured
            run(x)  # step 1 (not measured) closes step 0
            report = watch.report()
        if report.step != 0 or watch.steps != 2:
            return f"compiled vs eager: not compared (step {report.step} of {watch.steps} reported)"
        reports.append(report.layers)
    eager, comp = reports
    worst, fields = 0.0, ("mean", "std", "zero_fraction", "dead_fraction")
    for name, ls in eager.items():
        for f in fields:
            a, b = getattr(ls, f), getattr(comp.get(name), f, None)
            if a is not None and b is not None:
                worst = max(worst, abs(a - b) / max(abs(a), 1e-12))
            elif (a is None) != (b is None):
                return f"compiled vs eager: {name}.{f} measured in one only ({a} vs {b})"
    same = sorted(eager) == sorted(comp)
    return (f"compiled vs eager, one measured step: {len(comp)} of {len(eager)} layers measured, "
            f"largest relative difference of {'/'.join(fields)}: {worst:.2g}" + ("" if same else " (layers differ)"))


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
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
