"""gradwatch on a torch.compile'd model: step-time ratio and the graph breaks it causes.

    python benchmarks/compiled.py [--backend inductor|eager] [--steps N]

Variants, each on its own copy of the Fashion-MNIST seed MLP (batch 256): compiled and
unwatched; compiled with GradWatch attached before compiling (defaults, and every=1).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from gradwatch import GradWatch

from overhead import fashion_mlp  # noqa: E402  (run from the repository root or benchmarks/)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    base = fashion_mlp()
    x, y = torch.rand(256, 784) * 2 - 1, torch.randint(0, 10, (256,))
    results = {}
    for name, kwargs in (("compiled, unwatched", None), ("compiled, watched (defaults)", {}),
                         ("compiled, watched (every=1)", {"every": 1, "histogram_every": None})):
        torch._dynamo.reset()
        counters.clear()
        model = copy.deepcopy(base)
        watch = GradWatch(model, quiet=True, **kwargs).attach() if kwargs is not None else None
        compiled = torch.compile(model, backend=args.backend)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        t0 = time.perf_counter()
        times = []
        for step in range(args.steps):
            t = time.perf_counter()
            loss = F.cross_entropy(compiled(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
        total = time.perf_counter() - t0
        if watch is not None:
            watch.detach()
        breaks = sum(counters["graph_break"].values())
        graphs = counters["stats"].get("unique_graphs", 0)
        steady = statistics.median(times[args.steps // 2:])
        results[name] = steady
        print(f"{name:32s} first {args.steps} steps {total:6.1f} s, steady {steady * 1e3:6.2f} ms/step, "
              f"graphs {graphs}, graph breaks {breaks}"
              + (f", layers measured {len(watch.report().layers)}" if watch is not None else ""))
    base_t = results["compiled, unwatched"]
    for name, t in results.items():
        print(f"  {name:32s} {t / base_t:.3f}x")


if __name__ == "__main__":
    main()
