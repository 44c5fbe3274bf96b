"""How gradwatch's cost grows with model size, and whether its memory stays flat.

Step-time ratio watched/unwatched at defaults for MLPs of 10, 100 and 1,000 layers and
for a 12-layer transformer encoder (CPU), measured side by side as in overhead.py; then
the resident memory of a watched training loop over many steps.

    python benchmarks/scaling.py            # full
    python benchmarks/scaling.py --quick    # smoke run

Target: ratio at defaults <= 1.05 at every size; memory flat over 10,000 steps.
"""

from __future__ import annotations

import argparse
import copy
import random
import resource
import statistics
import time
import warnings
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from gradwatch import GradWatch


def deep_mlp(depth: int, width: int = 64) -> nn.Module:
    layers: List[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    def __init__(self, layers: int = 12, d: int = 128) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


def ratio(make: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, rounds: int,
          block: int) -> Tuple[float, float, int]:
    torch.manual_seed(0)
    base = make()
    runs = {}
    for variant in ("unwatched", "defaults"):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        watch = GradWatch(model, quiet=True).attach() if variant == "defaults" else None
        runs[variant] = (model, opt, watch)

    def run(model: nn.Module, opt: torch.optim.Optimizer) -> float:
        t0 = time.perf_counter()
        for _ in range(block):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - t0

    # Warm up, and let the automatic interval settle: up to 1,000 steps or 5 s per variant.
    for model, opt, _ in runs.values():
        t0, done = time.perf_counter(), 0
        while done < 1000 and time.perf_counter() - t0 < 5.0:
            run(model, opt)
            done += block
    ratios, base_times = [], []
    order = list(runs)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        t = {v: run(*runs[v][:2]) for v in order}
        ratios.append(t["defaults"] / t["unwatched"])
        base_times.append(t["unwatched"] / block)
    settled = None
    for _, _, watch in runs.values():
        if watch is not None:
            settled = watch.every
            watch.detach()
    return statistics.median(ratios), statistics.median(base_times), settled


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def memory(steps: int) -> List[Tuple[int, float]]:
    torch.manual_seed(0)
    model = deep_mlp(10)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    points = []
    with GradWatch(model, quiet=True):
        for step in range(steps):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % max(1, steps // 10) == 0 or step == steps - 1:
                points.append((step, rss_mb()))
    return points


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    rounds = 3 if args.quick else 9
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ratio = watched / unwatched at defaults")
    cases: Dict[str, Tuple[Callable[[], nn.Module], torch.Tensor, int]] = {
        "MLP 10 layers (width 64, batch 64)": (lambda: deep_mlp(10), torch.randn(64, 64), 40),
        "MLP 100 layers": (lambda: deep_mlp(100), torch.randn(64, 64), 40),
        "MLP 1,000 layers": (lambda: deep_mlp(1000), torch.randn(64, 64), 40),
        "Transformer encoder, 12 layers (d=128, seq 64, batch 16)": (Encoder, torch.randn(16, 64, 128), 20),
    }
    for name, (make, x, block) in cases.items():
        y = torch.randint(0, 10, (x.shape[0],))
        r, t, every = ratio(make, x, y, rounds, block)
        print(f"  {name:58s} {t * 1e3:8.1f} ms/step   {r:.3f}x   (interval settled at {every})")
    steps = 1000 if args.quick else 10_000
    points = memory(steps)
    print(f"RSS over {steps} watched steps (MB): " + ", ".join(f"{s}:{m:.0f}" for s, m in points))
    print(f"  growth after the first tenth: {points[-1][1] - points[1][1]:+.1f} MB")


if __name__ == "__main__":
    main()
