"""Memory: gradwatch retains nothing between steps, and raises no step's peak.

    python benchmarks/memory.py [--steps 10000] [--device cpu|cuda]    # resident memory over a long run
    python benchmarks/memory.py --peak [--device cpu|cuda]              # the peak of each kind of step

Long run: each variant trains the Fashion-MNIST seed MLP (batch 256) for ``--steps`` steps in a process
of its own (so that peak figures are its own): unwatched, watched at the defaults, and watched
every step with histograms written into a log_dir (the most gradwatch ever holds and writes).
Printed per variant: resident memory (RSS) after the first 1,000 steps and at the end, the
growth in between, the process's peak RSS, and on CUDA the allocated and peak device memory.
Flat means no growth beyond the allocator's noise (a few MiB) between step 1,000 and the end.

``--peak``: the most memory tensors hold at any moment of one training step (the loss, then
``zero_grad``, ``backward``, ``step``), watched or not, for the seed MLP, the seed CNN and an MLP whose
blocks are activation-checkpointed, with Adam (whose step is where an MLP's peak usually is) and with
plain SGD (no optimizer state or temporaries: the peak is in the forward or backward, where kept
tensors would show) (``torch.utils.checkpoint``, non-reentrant and reentrant, where
gradwatch must not keep what checkpointing frees). On the CPU: the tensors alive before the step
plus the highest running total of the allocations and frees ``torch.profiler`` records during it
(``profile_memory=True``); on CUDA, ``torch.cuda.max_memory_allocated``. A watched step of each
kind is measured: one gradwatch measures (``every=1``, with and without histograms) and one it
does not (``every=10**6`` after the first step: the per-step finiteness check and kept outputs).
Target: every ratio <= 1.05.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Dict, List, Optional

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
    try:
        from benchmarks.overhead import fashion_mlp
    except ImportError:  # run as python benchmarks/memory.py
        from overhead import fashion_mlp  # type: ignore[no-redef]

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


# ------------------------------------------------------------------------------------------- peaks
def _live_bytes(device: str) -> int:
    """Bytes of every tensor storage alive now (on ``device``)."""
    import torch

    seen, total = set(), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated module attributes found among the objects
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        try:
            if obj.device.type != device:
                continue
            storage = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - tensor subclasses without storage
            continue
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def step_peak(step: Callable[[], None], device: str) -> int:
    """The most bytes tensors hold at any moment of one call of ``step``."""
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    from torch.profiler import ProfilerActivity, profile

    start = _live_bytes("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda e: e.start_ns())
    running = high = 0
    for e in events:
        running += e.nbytes()
        high = max(high, running)
    return start + high


def checkpointed_mlp(reentrant: bool, blocks: int = 6, width: int = 512) -> Any:
    import torch
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Linear(784, width)
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width),
                                                      nn.Tanh()) for _ in range(blocks))
            self.head = nn.Linear(width, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x)
            for block in self.blocks:
                h = checkpoint(block, h, use_reentrant=reentrant)
            return self.head(h)
    return Checkpointed()


def peaks(device: str) -> List[Dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    from gradwatch import GradWatch
    try:
        from benchmarks.overhead import fashion_mlp, mnist_cnn
    except ImportError:
        from overhead import fashion_mlp, mnist_cnn  # type: ignore[no-redef]

    models: Dict[str, Any] = {
        "seed MLP": (fashion_mlp, (256, 784)),
        "seed CNN": (mnist_cnn, (64, 1, 28, 28)),
        "checkpointed MLP (non-reentrant)": (lambda: checkpointed_mlp(False), (512, 784)),
        "checkpointed MLP (reentrant)": (lambda: checkpointed_mlp(True), (512, 784)),
    }
    watches: Dict[str, Optional[Dict[str, Any]]] = {
        "unwatched": None, "step not measured": dict(every=10 ** 6), "every step": dict(every=1, histogram_every=None),
        "every step + histograms": dict(every=1, histogram_every=1),
    }
    rows = []
    for (name, (make, shape)), optimizer in [(m, o) for m in models.items() for o in ("Adam", "SGD")]:
        torch.manual_seed(0)
        base = make().to(device)
        g = torch.Generator().manual_seed(0)
        x = torch.rand(*shape, generator=g).to(device)
        y = torch.randint(0, 10, (shape[0],), generator=g).to(device)
        result: Dict[str, Any] = {"model": f"{name}, {optimizer}"}
        for variant, kwargs in watches.items():
            model = copy.deepcopy(base)
            opt = (torch.optim.Adam(model.parameters(), lr=1e-4) if optimizer == "Adam"
                   else torch.optim.SGD(model.parameters(), lr=1e-4))
            watch = GradWatch(model, quiet=True, **kwargs).attach() if kwargs is not None else None

            def step() -> None:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            for _ in range(3):
                step()
            # The first profiled step reads high (tensors of the profiler's own start); the next are steady.
            result[variant] = max([step_peak(step, device) for _ in range(3)][1:])
            if watch is not None:
                watch.detach()
            del model, opt, watch
        rows.append(result)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--peak", action="store_true", help="the peak of each kind of step (see above)")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # one variant, in a process of its own
    args = p.parse_args()
    if args.peak:
        import torch
        torch.set_num_threads(1)
        print(f"peak tensor memory of one training step on {args.device} (MiB; ratio to unwatched)")
        for r in peaks(args.device):
            base = r["unwatched"]
            cells = "  ".join(f"{k} {v / 2 ** 20:6.2f} ({v / base:.3f})" for k, v in r.items() if k not in ("model",))
            print(f"  {r['model']:40s} {cells}", flush=True)
        return
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
