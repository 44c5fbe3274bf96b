"""Memory over a long run: gradwatch retains nothing between steps.

    python benchmarks/memory.py [--steps 10000] [--device cpu|cuda]

Each variant trains the Fashion-MNIST seed MLP (batch 256) for ``--steps`` steps in a process
of its own (so that peak figures are its own): unwatched, watched at the defaults, and watched
every step with histograms written into a log_dir (the most gradwatch ever holds and writes).
Printed per variant: resident memory (RSS) after the first 1,000 steps and at the end, the
growth in between, the process's peak RSS, and on CUDA the allocated and peak device memory.
Flat means no growth beyond the allocator's noise (a few MiB) between step 1,000 and the end.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Dict

VARIANTS = ("unwatched", "defaults", "every step + histograms into a log_dir")


def rss_mib() -> float:
    """Current resident set size of this process (Linux ``/proc``; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 2 ** 20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(variant: str, steps: int, device: str) -> Dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from gradwatch import GradWatch
    from overhead import fashion_mlp  # noqa: E402  (run from the repository root or benchmarks/)

    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = fashion_mlp().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(256, 784, generator=g) * 2 - 1).to(device)
    y = torch.randint(0, 10, (256,), generator=g).to(device)
    watch = None
    if variant == "defaults":
        watch = GradWatch(model, quiet=True).attach()
    elif variant != "unwatched":
        watch = GradWatch(model, every=1, histogram_every=1, quiet=True,
                          log_dir=tempfile.mkdtemp(prefix="gw-memory-")).attach()
    out: Dict[str, Any] = {"variant": variant}
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == min(1000, steps):
            out["rss_early"] = rss_mib()
            if device == "cuda":
                out["cuda_early"] = torch.cuda.memory_allocated() / 2 ** 20
    out["rss_end"] = rss_mib()
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        out["cuda_end"] = torch.cuda.memory_allocated() / 2 ** 20
        out["cuda_peak"] = torch.cuda.max_memory_allocated() / 2 ** 20
    out["seconds"] = time.perf_counter() - t0
    if watch is not None:
        out["measured_steps_every"] = watch.every
        watch.detach()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # one variant, in a process of its own
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run(args.variant, args.steps, args.device)))
        return
    print(f"{args.steps} steps of the seed MLP (batch 256) on {args.device}, one process per variant")
    for variant in VARIANTS:
        done = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--device", args.device,
                               "--variant", variant], capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        line = (f"  {variant:40s} RSS {r['rss_early']:7.1f} MiB at step 1,000 -> {r['rss_end']:7.1f} MiB at the end "
                f"({r['rss_end'] - r['rss_early']:+.1f}), peak {r['peak_rss']:7.1f} MiB, {r['seconds']:.0f} s")
        if "cuda_end" in r:
            line += (f"; CUDA {r['cuda_early']:.1f} -> {r['cuda_end']:.1f} MiB allocated, "
                     f"peak {r['cuda_peak']:.1f} MiB")
        print(line, flush=True)


if __name__ == "__main__":
    main()
