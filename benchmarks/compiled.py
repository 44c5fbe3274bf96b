"""gradwatch on a torch.compile'd model: compile time, recompiles, graph breaks and step-time ratios.

    python benchmarks/compiled.py [--model mlp|gpt] [--backend inductor|eager] [--rounds 15] [--device cuda]
    python benchmarks/compiled.py --model gpt --skip-ratios --compile-runs 5      # compile time only
    python benchmarks/compiled.py --model gpt --skip-ratios --cold                # ... with a cold compile cache

The loop is a training loop as nanoGPT's ``train.py`` runs it: each iteration accumulates the
gradients of ``--accumulate`` micro-batches, then steps the optimizer (AdamW); every
``--eval-every`` iterations, starting with the first, an evaluation pass (``model.eval()``, a
forward under ``torch.no_grad()``, ``model.train()``) comes first. Watched models are watched as
a user of that loop would: ``GradWatch(model, optimizer=opt, steps="optimizer")``, attached before
``torch.compile``. Models: ``mlp``, the Fashion-MNIST seed MLP (batch 256); ``gpt``, a
nanoGPT-style transformer (6 layers, width 128, 4 heads, SDPA attention, GELU MLPs, LayerNorm,
tied embeddings; 8 sequences of 64 tokens).

1. Compile time and recompiles. Each variant (unwatched, watched at the defaults, watched every
   step) trains in a fresh process, ``--compile-runs`` times, the variants interleaved. Reported:
   the first iteration's wall time (median; compiling dominates it) and its ratio to the unwatched
   one's, the same in CPU time of the process (steadier on a busy machine; without the compile
   workers a cold cache starts), the iterations at which graphs were compiled and what each such
   iteration took, and the graph breaks. All processes share one compile cache, warmed by an untimed run of each variant
   first (``--cold``: a fresh, empty cache for every process). Targets: first iteration <= 1.3x
   the unwatched one's; gradwatch's only extra graph is the one that measures, compiled once when
   the first measured (or, when measuring from the start, the first unmeasured) training
   iteration runs; no graph break.
2. Step-time ratios. The variants (watched at the defaults, every step, unwatched, and a second
   unwatched copy) each train their own copy in this process, compiled with the same backend and
   given a module class (and code object) of its own so that no two share graphs (torch.compile
   skips module-hook guards by default). Each warms up (compiling, and the automatic interval
   passing its first adaptation point at step 100), then the variants take turns block by block
   in a shuffled order; the ratio is the median over rounds of (variant / unwatched) block time.
   The second unwatched copy is an A/A control: how far two identical compiled copies differ on
   this machine. Graphs compiled and graph breaks are counted during warm-up and after it (the
   target: none after warm-up), and the interval each watch reached is printed. Targets: defaults
   <= 1.03 with an interval <= 100, every step <= 1.15.
3. One measured step of a compiled copy against the same step of an eager one: the numbers
   measured inside the graph must equal the eager ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_models import GPT, GPTConfig, own_class  # noqa: E402
from overhead import fashion_mlp  # noqa: E402

from gradwatch import GradWatch  # noqa: E402

VARIANTS: Dict[str, Optional[Dict[str, Any]]] = {
    "unwatched": None, "defaults": {}, "every step": {"every": 1, "histogram_every": None}}


@dataclass
class Task:
    """A model to train and how: ``make()`` a fresh model (seeded), ``batch()`` a micro-batch, ``loss``."""

    make: Callable[[], nn.Module]
    batch: Tuple[torch.Tensor, torch.Tensor]
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def gpt_config() -> GPTConfig:
    return GPTConfig(vocab_size=128, block_size=64, n_layer=6, n_head=4, n_embd=128)


def task(name: str, device: str) -> Task:
    g = torch.Generator().manual_seed(1)  # (seed 0 would draw the inputs as the first layer's weights)
    if name == "mlp":
        x, y = torch.rand(256, 784, generator=g) * 2 - 1, torch.randint(0, 10, (256,), generator=g)
        return Task(fashion_mlp, (x.to(device), y.to(device)), lambda m, x, y: F.cross_entropy(m(x), y))
    c = gpt_config()
    x = torch.randint(0, c.vocab_size, (8, c.block_size), generator=g)
    return Task(lambda: GPT(c), (x.to(device), torch.roll(x, -1, 1).to(device)), lambda m, x, y: m(x, y)[1])


class Loop:
    """nanoGPT's loop: an eval pass every ``eval_every`` iterations (first), ``accumulate``
    micro-batches, an optimizer step."""

    def __init__(self, model: nn.Module, run: nn.Module, t: Task, kwargs: Optional[Dict[str, Any]],
                 accumulate: int, eval_every: int, backend: str) -> None:
        self.model, self.task, self.accumulate, self.eval_every = model, t, accumulate, eval_every
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.watch = (GradWatch(model, quiet=True, optimizer=self.opt, steps="optimizer", **kwargs).attach()
                      if kwargs is not None else None)
        self.run = torch.compile(run, backend=backend)  # attached first, as the docs ask
        self.iteration = 0

    def step(self) -> None:
        x, y = self.task.batch
        if self.iteration % self.eval_every == 0:
            self.model.eval()
            with torch.no_grad():
                self.task.loss(self.run, x, y)
            self.model.train()
        for _ in range(self.accumulate):
            (self.task.loss(self.run, x, y) / self.accumulate).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.iteration += 1

    def block(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        if self.task.batch[0].is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def counts() -> Tuple[int, int]:
    """Graphs compiled and graph breaks so far in this process."""
    from torch._dynamo.utils import counters

    return counters["stats"].get("unique_graphs", 0), sum(counters["graph_break"].values())


# ------------------------------------------------------------------ 1. compile time, one process per run
def first_iterations(args: argparse.Namespace) -> None:
    """The child process: one variant's first ``--iterations`` iterations, as JSON on stdout."""
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    t = task(args.model, args.device)
    model = t.make().to(args.device)
    loop = Loop(model, model, t, VARIANTS[args.first_iterations], args.accumulate, args.eval_every, args.backend)
    times, cpu, compiled = [], [], []
    for i in range(args.iterations):
        before, c0 = counts()[0], time.process_time()
        times.append(loop.block(1))
        cpu.append(time.process_time() - c0)
        if counts()[0] > before:
            compiled.append([i, counts()[0] - before])
    graphs, breaks = counts()
    print(json.dumps({"times": times, "cpu": cpu, "compiled": compiled, "graphs": graphs, "breaks": breaks,
                      "layers": len(loop.watch.report().layers) if loop.watch else None}))


def compile_section(args: argparse.Namespace) -> None:
    cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--backend", args.backend,
           "--device", args.device, "--threads", str(args.threads), "--accumulate", str(args.accumulate),
           "--eval-every", str(args.eval_every), "--iterations", str(args.iterations)]
    shared = tempfile.mkdtemp(prefix="gradwatch-compile-cache-")

    def child(variant: str) -> Dict[str, Any]:
        cache = tempfile.mkdtemp(prefix="gradwatch-compile-cache-") if args.cold else shared
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        out = subprocess.run(cmd + ["--first-iterations", variant], env=env, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{variant}: exit {out.returncode}\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    if not args.cold:
        for v in VARIANTS:  # warm the shared cache
            child(v)
    runs: Dict[str, List[Dict[str, Any]]] = {v: [] for v in VARIANTS}
    order, rng = list(VARIANTS), random.Random(0)
    for _ in range(args.compile_runs):
        rng.shuffle(order)
        for v in order:
            runs[v].append(child(v))
    cache = "a fresh cache per process" if args.cold else "a warm compile cache"
    print(f"1. Compile time: first iteration (eval pass + {args.accumulate} micro-batches), median of "
          f"{args.compile_runs} processes per variant, {cache}")
    base = statistics.median(r["times"][0] for r in runs["unwatched"])
    base_cpu = statistics.median(r["cpu"][0] for r in runs["unwatched"])
    for v, rs in runs.items():
        first = statistics.median(r["times"][0] for r in rs)
        first_cpu = statistics.median(r["cpu"][0] for r in rs)
        r = rs[0]
        where = ", ".join(f"iteration {i}: {n} graph(s), {statistics.median(x['times'][i] for x in rs):.2f} s"
                          for i, n in r["compiled"])
        same = all(x["compiled"] == r["compiled"] and x["breaks"] == r["breaks"] for x in rs)
        print(f"  {v:11s} first iteration {first:6.2f} s {first / base:5.2f}x (process CPU time {first_cpu:5.2f} s "
              f"{first_cpu / base_cpu:5.2f}x)  graphs compiled in {args.iterations} iterations: {r['graphs']} "
              f"({where}); graph breaks: {r['breaks']}" + ("" if same else " (differs between runs)")
              + (f"; layers measured {r['layers']}" if r["layers"] is not None else ""))


# ------------------------------------------------------------------ 2. step-time ratios, in one process
def ratio_section(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    torch._dynamo.reset()
    torch.manual_seed(0)
    t = task(args.model, args.device)
    base = t.make()
    configs = {"defaults": VARIANTS["defaults"], "every step (scalars)": VARIANTS["every step"],
               "unwatched": None, "unwatched again": None}  # the second: an A/A control
    loops: Dict[str, Loop] = {}
    stats: Dict[str, Dict[str, Any]] = {}
    for i, (name, kwargs) in enumerate(configs.items()):
        model = own_class(i, copy.deepcopy(base)).to(args.device)
        loops[name] = Loop(model, model, t, kwargs, args.accumulate, args.eval_every, args.backend)
        before, t0 = counts(), time.perf_counter()
        loops[name].block(args.warmup)
        after = counts()
        stats[name] = {"warmup": (time.perf_counter() - t0, after[0] - before[0], after[1] - before[1]),
                       "graphs": 0, "breaks": 0}
    order, ratios = list(loops), {n: [] for n in loops if n != "unwatched"}
    per_step: Dict[str, List[float]] = {n: [] for n in loops}
    rng = random.Random(0)
    for _ in range(args.rounds):
        rng.shuffle(order)
        times = {}
        for n in order:
            before = counts()
            times[n] = loops[n].block(args.block)
            after = counts()
            stats[n]["graphs"] += after[0] - before[0]
            stats[n]["breaks"] += after[1] - before[1]
        for n in loops:
            per_step[n].append(times[n] / args.block)
        for n in ratios:
            ratios[n].append(times[n] / times["unwatched"])
    print(f"2. Step time: {args.rounds} rounds x {args.block} iterations per variant after {args.warmup} warm-up "
          f"iterations ({args.accumulate} micro-batches each, an eval pass every {args.eval_every})")
    for n, loop in loops.items():
        seconds, graphs, breaks = stats[n]["warmup"]
        line = (f"  {n:22s} {statistics.median(per_step[n]) * 1e3:7.2f} ms/iteration"
                + (f"  {statistics.median(ratios[n]):.3f}x (rounds {min(ratios[n]):.3f}-{max(ratios[n]):.3f})"
                   if n in ratios else " " * 30)
                + f"  warm-up {seconds:5.1f} s: {graphs} graph(s), {breaks} break(s); after: "
                  f"{stats[n]['graphs']} graph(s), {stats[n]['breaks']} break(s)")
        if loop.watch is not None:
            line += f"; interval {loop.watch.every}, layers measured {len(loop.watch.report().layers)}"
            loop.watch.detach()
        print(line)


# ------------------------------------------------------------------ 3. compiled against eager
def compare(args: argparse.Namespace) -> str:
    """One measured step of a compiled copy against the same step of an eager one."""
    t = task(args.model, args.device)
    torch.manual_seed(0)
    base = t.make()
    x, y = t.batch
    reports = []
    for i, compiled in ((10, False), (11, True)):
        model = own_class(i, copy.deepcopy(base)).to(x.device)
        run = torch.compile(model, backend=args.backend) if compiled else model
        with GradWatch(model, every=2, histogram_every=None, quiet=True) as watch:
            t.loss(run, x, y).backward()  # step 0: measured
            t.loss(run, x, y)  # step 1 (not measured) closes step 0
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
    return (f"3. Compiled vs eager, one measured step: {len(comp)} of {len(eager)} layers measured, largest "
            f"relative difference of {'/'.join(fields)}: {worst:.2g} (eager samples tensors over "
            f"32768 elements; a compiled graph reduces every element)" + ("" if same else " (layers differ)"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("mlp", "gpt"), default="mlp")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--block", type=int, default=20)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--eval-every", type=int, default=20, help="iterations between eval passes")
    p.add_argument("--compile-runs", type=int, default=3, help="processes per variant for the compile time")
    p.add_argument("--iterations", type=int, default=25, help="iterations per compile-time process")
    p.add_argument("--cold", action="store_true", help="a fresh compile cache for every process")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--skip-ratios", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--first-iterations", choices=list(VARIANTS), help=argparse.SUPPRESS)  # a child process
    args = p.parse_args()
    if args.first_iterations:
        return first_iterations(args)
    print(f"torch {torch.__version__}, backend {args.backend}, {args.threads} threads, {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "") + f", model {args.model}")
    if not args.skip_compile:
        compile_section(args)
    if not args.skip_ratios:
        ratio_section(args)
        print(compare(args))


if __name__ == "__main__":
    main()
