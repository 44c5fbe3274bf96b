"""Where a CPU tensor's sums, sum of squares and extremes are cheapest: NumPy on one thread, or PyTorch.

    python benchmarks/reductions.py [--threads 2] [--repeat 200] [--in-step]

On the CPU, gradwatch reduces float32/float64 tensors in NumPy, through their memory
(``stats.host_array``), as long as NumPy's single-threaded call costs less than PyTorch's
dispatch; from ``stats.DOT_ELEMENTS`` elements a dense gradient's or weight's sum of squares
is ``torch.dot`` (PyTorch's own threads). Extremes are NumPy's (``max`` and ``min``, two passes)
up to ``stats.AMINMAX_ELEMENTS``, from there a dense gradient's are ``torch.aminmax`` (one pass, on
PyTorch's threads). A layer output's sum and per-unit sums are NumPy's (``einsum``) up to
``stats.HOST_SUM_ELEMENTS``, PyTorch's above. This prints both ways at several sizes (median µs per
call), so that the thresholds can be checked on another machine.

By default the code and the tensor are warm in the caches, as in a micro-benchmark. ``--in-step``:
as inside a training step, where the model's own kernels ran in between: before each call the
caches are flushed (a sum over 32 MB) and the tensor alone is read back into them (a copy), so
that the code runs cold on data that was just produced.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from gradwatch import stats

SIZES = (8192, 32768, 131072, 262144, 401408, 1048576, 3211264)


_FLUSH = np.ones(8_000_000, np.float32)  # 32 MB: more than the caches of the machines this runs on


def per_call(fn: Callable[[], object], repeat: int, data: Optional[np.ndarray] = None) -> float:
    """Median µs of one call of ``fn`` over ``repeat`` calls (after one call to warm up). ``data``:
    flush the caches before each call and read ``data`` back into them (``--in-step``)."""
    fn()
    scratch = None if data is None else np.empty_like(data)
    times = []
    for _ in range(repeat):
        if data is not None:
            _FLUSH.sum()
            np.copyto(scratch, data)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def measure(sizes: List[int], repeat: int, in_step: bool = False) -> List[Dict[str, float]]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        t = torch.randn(n, generator=g)
        a = t.numpy()
        out = torch.relu(t.reshape(256, -1) if n % 256 == 0 else t.reshape(1, -1)).requires_grad_()
        b = out.detach().numpy()
        data = lambda x: x if in_step else None  # noqa: E731
        rows.append({
            "elements": n,
            "numpy sum (einsum)": per_call(lambda: stats.host_sum(b), repeat, data(b)),
            "torch sum": per_call(lambda: float(stats.full_sum(out)), repeat, data(b)),
            "numpy per-unit sums": per_call(lambda: stats.host_unit_sums(b, 1), repeat, data(b)),
            "torch per-unit sums": per_call(lambda: stats.unit_sums(out, False, keepdim=True), repeat, data(b)),
            "numpy sum of squares (einsum)": per_call(lambda: stats.sum_squares(a), repeat, data(a)),
            "torch.dot": per_call(lambda: torch.dot(t, t).item(), repeat, data(a)),
            "numpy max and min": per_call(lambda: (float(a.max()), float(a.min())), repeat, data(a)),
            "torch.aminmax": per_call(lambda: [v.item() for v in torch.aminmax(t)], repeat, data(a)),
        })
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=200)
    p.add_argument("--in-step", action="store_true", help="code cold, the tensor in the caches (see above)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = measure(list(SIZES), args.repeat, args.in_step)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; float32, median µs per call, "
          f"{'in a step (caches flushed, the tensor read back)' if args.in_step else 'warm'} "
          f"(stats.HOST_SUM_ELEMENTS = {stats.HOST_SUM_ELEMENTS}, DOT_ELEMENTS = {stats.DOT_ELEMENTS}, "
          f"AMINMAX_ELEMENTS = {stats.AMINMAX_ELEMENTS}); sums of a (256, n/256) ReLU output, per unit over its rows")
    keys = [k for k in rows[0] if k != "elements"]
    print(f"{'elements':>10s} " + " ".join(f"{k:>{max(len(k), 9)}s}" for k in keys))
    for r in rows:
        print(f"{r['elements']:>10d} " + " ".join(f"{r[k]:>{max(len(k), 9)}.1f}" for k in keys))


if __name__ == "__main__":
    main()
