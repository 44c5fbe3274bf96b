"""Step-time overhead of gradwatch, measured side by side in one run.

For each seed model, every variant trains its own copy (same initial weights) and the
variants take turns, block by block, in a shuffled order each round, so drift in the
machine's speed hits them all alike. Reported: the median over rounds of
(variant block time / unwatched block time in the same round).

    python benchmarks/overhead.py            # full (a few minutes on 2 CPU cores)
    python benchmarks/overhead.py --quick    # a smoke run
    python benchmarks/overhead.py --baseline DIR   # also another checkout's gradwatch, in the same run
                                                   # (git worktree add DIR REF): before/after a change
    python benchmarks/overhead.py --attention      # a small nanoGPT with SDPA attention instead

Targets (CPU, 2 threads): defaults <= 1.03, every-step scalars <= 1.15 (with ``optimizer=`` too,
which adds the update-to-weight ratios on measured steps), every-step histograms written into a
log_dir (TensorBoard) <= 1.5 on the MLP and <= 1.25 on the CNN.

Beside gradwatch: the naive hooks people write by hand (three ``.item()`` reads per layer), and
per-layer statistics from bare hooks: the same statistics computed layer by layer, each output's
summary from ``gradwatch.stats.activation_summary``, with none of gradwatch's bookkeeping and none
of its batching (gradwatch every step should cost less); and every tensor a measured step reads, read
once by one sum and nothing computed: what the bytes alone cost, the reference below which no way of
computing the same statistics can go.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import inspect
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from gradwatch import GradWatch, stats


def fashion_mlp() -> nn.Module:
    dims = [784, 512, 256, 256, 128, 10]
    layers: List[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def mnist_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(7 * 7 * 64, 1024), nn.ReLU(), nn.Dropout(0.5), nn.Linear(1024, 10))


class _EveryLeaf:
    """:meth:`hook` as a forward hook on every leaf module; the trainable parameters."""

    def __init__(self, model: nn.Module) -> None:
        leaves = [m for m in model.modules() if not list(m.children())]
        self.handles = [m.register_forward_hook(self.hook) for m in leaves]
        self.params = [p for p in model.parameters() if p.requires_grad]

    def hook(self, module: nn.Module, args: Any, out: Any) -> None:
        raise NotImplementedError

    def detach(self) -> None:
        for h in self.handles:
            h.remove()


class NaiveHooks(_EveryLeaf):
    """What people write by hand: a forward hook per layer calling .item() per stat."""

    def __init__(self, model: nn.Module, opt: object = None) -> None:
        super().__init__(model)
        self.log: List[float] = []

    def hook(self, module: nn.Module, args, out) -> None:
        if isinstance(out, torch.Tensor):
            o = out.detach()
            self.log += [o.mean().item(), o.std().item(), (o == 0).float().mean().item()]
            self.log.clear()


class PerLayerStatistics(_EveryLeaf):
    """Per-layer statistics from bare hooks: the statistics gradwatch measures every step, computed
    one layer at a time with ``gradwatch.stats``' per-tensor functions (each output's
    ``activation_summary``, a rectifier's per-unit sums, each output gradient's norm, the parameter
    gradients' norms and largest entries, one read of the small results per step), with none of
    gradwatch's bookkeeping (call sites, step buffers, schedule, per-layer records, rules) and none
    of its batching across layers."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.small: List[torch.Tensor] = []

    def hook(self, module: nn.Module, args: Any, out: Any) -> None:
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return
        if isinstance(module, nn.ReLU):
            sums = stats.unit_sums(out)
            self.small += [stats.activation_summary(out, None, None, nonnegative=True, total=sums.sum()), sums > 0]
        else:
            self.small.append(stats.activation_summary(out))
        if out.requires_grad:
            out.register_hook(lambda g: self.small.append(stats.l2_norm(g)))

    def after_step(self, loss: torch.Tensor) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        self.small.append(stats.grad_summaries(grads, [p for p in self.params if p.grad is not None]))
        stats.to_host(self.small)
        self.small = []


class OneReadPerTensor(_EveryLeaf):
    """What reading alone costs: every tensor gradwatch reads on a measured step (each layer's output,
    the gradient at it, every parameter's gradient and weight), read once by one PyTorch sum, with one
    host read per step and nothing else. No statistic is computed: the reference for how much of a
    measured step is the bytes and how much the passes, kernels and Python around them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.sums: List[torch.Tensor] = []

    def hook(self, module: nn.Module, args: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            self.sums.append(out.detach().sum())
            if out.requires_grad:
                out.register_hook(lambda g: self.sums.append(g.sum()) and None)

    def after_step(self, loss: torch.Tensor) -> None:
        for p in self.params:
            if p.grad is not None:
                self.sums += [p.grad.sum(), p.detach().sum()]
        if self.sums:
            torch.stack(self.sums).tolist()
        self.sums = []


VARIANTS: Dict[str, Callable[[nn.Module, torch.optim.Optimizer], object]] = {
    "unwatched": lambda m, opt: None,
    "defaults": lambda m, opt: GradWatch(m, quiet=True).attach(),
    "defaults + optimizer= (update ratios)": lambda m, opt: GradWatch(m, quiet=True, optimizer=opt).attach(),
    "every-step scalars": lambda m, opt: GradWatch(m, every=1, histogram_every=None, quiet=True).attach(),
    "every-step scalars + optimizer=": lambda m, opt: GradWatch(m, every=1, histogram_every=None, quiet=True,
                                                               optimizer=opt).attach(),
    "every-step scalars + histograms": lambda m, opt: GradWatch(m, every=1, histogram_every=1, quiet=True,
                                                                log_dir=tempfile.mkdtemp(prefix="gw-bench-")).attach(),
    "naive .item() hooks": NaiveHooks,
    "per-layer statistics from bare hooks": PerLayerStatistics,
    "every tensor read once (no statistics)": OneReadPerTensor,
}


class SmallGPT(nn.Module):
    """nanoGPT (``gpu_models.GPT``: SDPA attention, pre-norm blocks, tied embeddings) at a size a CPU
    trains in tens of milliseconds a step: 4 layers, 4 heads, width 128, 256 tokens, 64 positions.
    Returns the logits flattened to (tokens, vocabulary), as the loss takes them."""

    def __init__(self) -> None:
        super().__init__()
        try:
            from benchmarks.gpu_models import GPT, GPTConfig
        except ImportError:  # run as python benchmarks/overhead.py
            from gpu_models import GPT, GPTConfig  # type: ignore[no-redef]
        self.gpt = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=128))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits, _ = self.gpt(idx)
        return logits.reshape(-1, logits.shape[-1])


def load_baseline(root: str) -> Any:
    """The gradwatch package of another checkout at ``root``, imported as ``gradwatch_baseline``
    (its relative imports stay inside it), so that old and new code take turns in one run."""
    init = Path(root) / "gradwatch" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline {root!r}: no gradwatch/__init__.py there; give a checkout of this "
                         f"project, for example one made with: git worktree add DIR REF")
    spec = importlib.util.spec_from_file_location("gradwatch_baseline", init, submodule_search_locations=[str(init.parent)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gradwatch_baseline"] = module
    spec.loader.exec_module(module)
    return module


def with_baseline(root: str) -> Dict[str, Callable[..., Any]]:
    """VARIANTS, and the defaults, every-step scalars and every-step histograms of the baseline at
    ``root`` beside them."""
    old = load_baseline(root).GradWatch
    variants = dict(VARIANTS)
    variants["defaults (baseline)"] = lambda m, opt: old(m, quiet=True).attach()
    variants["every-step scalars (baseline)"] = lambda m, opt: old(m, every=1, histogram_every=None,
                                                                  quiet=True).attach()
    variants["every-step scalars + histograms (baseline)"] = lambda m, opt: old(
        m, every=1, histogram_every=1, quiet=True, log_dir=tempfile.mkdtemp(prefix="gw-bench-")).attach()
    return variants


def _attach(attach: Callable[..., Any], model: nn.Module, opt: torch.optim.Optimizer) -> Any:
    """A variant is built from the model, or from the model and its optimizer (peers such as torchmortem need it)."""
    try:
        takes_optimizer = len(inspect.signature(attach).parameters) >= 2
    except (TypeError, ValueError):
        takes_optimizer = False
    return attach(model, opt) if takes_optimizer else attach(model)


def bench(name: str, make: Callable[[], nn.Module], batch: torch.Tensor, target: torch.Tensor,
          rounds: int, block: int, variants: Optional[Dict[str, Callable[..., Any]]] = None,
          detail: Optional[Dict[str, Any]] = None) -> Dict[str, float]:
    """Median ratios over ``rounds``. ``variants`` (default ``VARIANTS``; must hold "unwatched") map a name to a
    factory of ``model`` or ``(model, optimizer)``; the object it returns is ``detach()``-ed at the end, and its
    ``after_step(loss)``, if it has one, is called after every optimizer step (tools that need a call per step).
    ``detail``, if given, receives the median ms/step per variant and each variant's per-round ratios."""
    variants = VARIANTS if variants is None else variants
    torch.manual_seed(0)
    base = make()
    runs = {}
    for variant, attach in variants.items():
        model = copy.deepcopy(base)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        handle = _attach(attach, model, opt)
        runs[variant] = (model, opt, getattr(handle, "after_step", None), handle)

    def run_block(model: nn.Module, opt: torch.optim.Optimizer, after: Optional[Callable[[Any], None]]) -> float:
        t0 = time.perf_counter()
        for _ in range(block):
            loss = F.cross_entropy(model(batch), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if after is not None:
                after(loss)
        return time.perf_counter() - t0

    for model, opt, after, _ in runs.values():  # warm-up; the automatic interval settles meanwhile
        t0, done = time.perf_counter(), 0
        while done < 400 and time.perf_counter() - t0 < 5.0:
            run_block(model, opt, after)
            done += block
    ratios: Dict[str, List[float]] = {v: [] for v in variants if v != "unwatched"}
    per_step: Dict[str, List[float]] = {v: [] for v in variants}
    order = list(variants)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        times = {v: run_block(*runs[v][:3]) for v in order}
        for v in variants:
            per_step[v].append(times[v] / block)
        for v in ratios:
            ratios[v].append(times[v] / times["unwatched"])
    intervals = {v: h.every for v, (_, _, _, h) in runs.items() if type(h).__name__ == "GradWatch"}
    for _, _, _, handle in runs.values():
        if handle is not None:
            handle.detach()
    result = {v: statistics.median(r) for v, r in ratios.items()}
    print(f"\n{name}: unwatched {statistics.median(per_step['unwatched']) * 1e3:.1f} ms/step, "
          f"{rounds} rounds x {block} steps per variant")
    for v, r in result.items():
        print(f"  {v:34s} {r:.3f}x  (rounds: min {min(ratios[v]):.3f}, max {max(ratios[v]):.3f})"
              + (f"  interval {intervals[v]}" if v in intervals else ""))
    if detail is not None:
        detail["ms_per_step"] = {v: statistics.median(t) * 1e3 for v, t in per_step.items()}
        detail["ratios"] = ratios
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few rounds, for a smoke test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline", metavar="DIR", help="a checkout whose gradwatch runs beside this one")
    parser.add_argument("--attention", action="store_true",
                        help="instead of the seed models: a small nanoGPT with SDPA attention (SmallGPT), batch 8 x 64 "
                             "tokens, unwatched, at the defaults and every step (and the baseline's)")
    args = parser.parse_args()
    variants = with_baseline(args.baseline) if args.baseline else None
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    rounds = 3 if args.quick else 15
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.attention:
        keep = ("unwatched", "defaults", "every-step scalars", "defaults (baseline)", "every-step scalars (baseline)")
        tokens = torch.randint(0, 256, (8, 65), generator=g)
        bench("nanoGPT 4 layers, width 128, SDPA attention, batch 8 x 64 tokens", SmallGPT, tokens[:, :-1],
              tokens[:, 1:].reshape(-1), rounds, 10, {k: v for k, v in (variants or VARIANTS).items() if k in keep})
        return
    bench("Fashion-MNIST MLP 784-512-256-256-128-10, batch 256", fashion_mlp,
          torch.rand(256, 784, generator=g) * 2 - 1, torch.randint(0, 10, (256,), generator=g),
          rounds, 40, variants)
    bench("MNIST CNN conv32-conv64-fc1024, batch 64", mnist_cnn,
          torch.rand(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g),
          rounds, 20 if not args.quick else 10, variants)


if __name__ == "__main__":
    main()
