"""The gradient noise scale against its exact value, on synthetic linear regression.

    python benchmarks/noise_scale.py            # 5 seeds per setting (several minutes on 2 CPU cores)
    python benchmarks/noise_scale.py --quick    # 2 seeds, fewer steps

The problem (``tests/test_noise_scale.py``): y = x·w* + ε with 64 Gaussian features and label
noise of standard deviation sigma, a linear model a distance of about 1 from w*, and a learning
rate of 0, so that the exact answer holds throughout: B_simple = tr(Σ)/|G|² from every sample's
gradient over the whole data set (16,384 samples). Each setting is watched with ``every=1`` for
``--steps`` measured steps, batches drawn with replacement; printed: the exact value, and the
watch's value after the last step over the seeds (median, smallest, largest, as ratios to the exact).
Settings: gradient accumulation in one process (micro-batch x micro-batches), and two gloo
processes under DDP (micro-batch x micro-batches per rank; with and without ``no_sync``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path
from typing import Dict, List

import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the checkout's tests/
from tests.test_distributed import free_port  # noqa: E402
from tests.test_noise_scale import accumulate, ddp_worker, exact_noise_scale, problem  # noqa: E402

ACCUMULATION = ((0.5, 64, 4), (0.5, 16, 4), (0.5, 8, 4), (3.0, 16, 4), (3.0, 4, 4))  # sigma, micro, micro-batches
DDP = ((0.5, (("ddp 64/rank", 64, 1, False), ("no_sync 32x2/rank", 32, 2, True),
             ("synced 32x2/rank", 32, 2, False))),
       (3.0, (("ddp 16/rank", 16, 1, False), ("no_sync 8x2/rank", 8, 2, True))))


def row(name: str, batch: int, exact: float, values: List[float]) -> str:
    ratios = sorted(v / exact for v in values if v is not None)
    none = len(values) - len(ratios)
    spread = f"{statistics.median(ratios):.3f}  {ratios[0]:.3f}-{ratios[-1]:.3f}" if ratios else "-"
    missing = f"  ({none} without a value)" if none else ""
    return f"{name:<28} {batch:>6} {exact:>9.1f} {batch / exact:>7.3f}   {spread}{missing}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    seeds = args.seeds or (2 if args.quick else 5)
    steps = args.steps or (40 if args.quick else 100)
    warnings.simplefilter("ignore")
    print(f"{seeds} seeds, {steps} measured steps each, moving averages' decay 0.95")
    print(f"{'setting':<28} {'batch':>6} {'exact':>9} {'B/exact':>7}   watch / exact: median  range")
    for sigma, micro, batches in ACCUMULATION:
        exact = exact_noise_scale(*problem(sigma=sigma))
        values = [accumulate(steps, micro, batches, seed=s, sigma=sigma).report().stats.noise_scale
                  for s in range(seeds)]
        print(row(f"accumulation {micro}x{batches}", micro * batches, exact, values), flush=True)
    for sigma, settings in DDP:
        exact = exact_noise_scale(*problem(sigma=sigma))
        found: Dict[str, List[float]] = {name: [] for name, *_ in settings}
        for s in range(seeds):
            with mp.Manager() as manager:
                out = manager.dict()
                mp.spawn(ddp_worker, args=(2, free_port(), out, steps, s, settings, sigma), nprocs=2, join=True)
                for name, (value, _, _) in out[0].items():
                    found[name].append(value)
        for name, micro, batches, _ in settings:
            print(row(f"DDP x2, {name}", 2 * micro * batches, exact, found[name]), flush=True)


if __name__ == "__main__":
    main()
