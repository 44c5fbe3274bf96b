"""Where a CPU tensor's sum of squares and extremes are cheapest: NumPy on one thread, or PyTorch.

    python benchmarks/reductions.py [--threads 2] [--repeat 200]

On the CPU, gradwatch reduces float32/float64 tensors in NumPy, through their memory
(``stats.host_array``), as long as NumPy's single-threaded call costs less than PyTorch's
dispatch; from ``stats.DOT_ELEMENTS`` elements a dense gradient's or weight's sum of squares
is ``torch.dot`` (PyTorch's own threads). Extremes are NumPy's (``max`` and ``min``, two passes)
up to ``stats.AMINMAX_ELEMENTS``, from there a dense gradient's are ``torch.aminmax`` (one pass, on
PyTorch's threads). This prints both ways at several sizes (median µs per call, the tensor warm in
the caches), so that the thresholds can be checked on another machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import numpy as np
import torch

from gradwatch import stats

SIZES = (8192, 32768, 131072, 401408, 3211264)


def per_call(fn: Callable[[], object], repeat: int) -> float:
    """Median µs of one call of ``fn`` over ``repeat`` calls (after one call to warm up)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def measure(sizes: List[int], repeat: int) -> List[Dict[str, float]]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        t = torch.randn(n, generator=g)
        a = t.numpy()
        rows.append({
            "elements": n,
            "numpy sum of squares (einsum)": per_call(lambda: stats.sum_squares(a), repeat),
            "torch.dot": per_call(lambda: torch.dot(t, t).item(), repeat),
            "numpy max and min": per_call(lambda: (float(a.max()), float(a.min())), repeat),
            "torch.aminmax": per_call(lambda: [v.item() for v in torch.aminmax(t)], repeat),
        })
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = measure(list(SIZES), args.repeat)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; float32, median µs per call "
          f"(stats.DOT_ELEMENTS = {stats.DOT_ELEMENTS})")
    keys = [k for k in rows[0] if k != "elements"]
    print(f"{'elements':>10s} " + " ".join(f"{k:>30s}" for k in keys))
    for r in rows:
        print(f"{r['elements']:>10d} " + " ".join(f"{r[k]:>30.1f}" for k in keys))


if __name__ == "__main__":
    main()
