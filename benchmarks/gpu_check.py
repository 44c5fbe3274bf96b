"""The GPU path, checked on a CUDA machine (CI has none): CUDA tensors, fp16 autocast with a
GradScaler, on-device histograms, and how many host synchronisations gradwatch adds.

    python benchmarks/gpu_check.py

Prints, per configuration, the step time watched/unwatched, the number of synchronising CUDA
calls gradwatch's code made per measured step (``torch.cuda.set_sync_debug_mode("warn")``
turns each into a warning, counted here), and checks that outputs and gradients are
bit-identical with and without gradwatch.
"""

from __future__ import annotations

import copy
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, "benchmarks")
from overhead import fashion_mlp, mnist_cnn  # noqa: E402

from gradwatch import GradWatch  # noqa: E402


def train(model, opt, x, y, steps, amp=False, scaler=None):
    outs = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            out = model(x)
            loss = F.cross_entropy(out.float(), y)
        opt.zero_grad()
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        outs.append(out.detach())
    return outs


def timed(model, opt, x, y, steps, **kw):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    train(model, opt, x, y, steps, **kw)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def check(name, make, x, y, amp):
    torch.manual_seed(0)
    base = make().cuda()
    results = {}
    for label, kwargs in (("unwatched", None), ("defaults", {}), ("every step", {"every": 1, "histogram_every": None}),
                          ("every step + histograms", {"every": 1, "histogram_every": 1})):
        model = copy.deepcopy(base)
        opt = torch.optim.Adam(model.parameters(), 1e-4)
        scaler = torch.amp.GradScaler("cuda") if amp else None
        watch = GradWatch(model, quiet=True, **kwargs).attach() if kwargs is not None else None
        train(model, opt, x, y, 30, amp=amp, scaler=scaler)  # warm-up
        t = timed(model, opt, x, y, 100, amp=amp, scaler=scaler)
        syncs = 0
        if watch is not None:
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                train(model, opt, x, y, 20, amp=amp, scaler=scaler)
                torch.cuda.set_sync_debug_mode("default")
            syncs = sum(1 for r in rec if "synchroniz" in str(r.message).lower()
                        and "gradwatch" in (r.filename or ""))
            measured = sum(1 for s in range(watch.steps - 20, watch.steps) if watch.schedule.measures(s))
            findings = [f"{f.kind.value}:{f.layer}" for f in watch.findings]
            watch.detach()
            results[label] = (t, syncs, measured, findings)
        else:
            results[label] = (t, 0, 0, [])
    plain = results["unwatched"][0]
    print(f"\n{name} ({'fp16 autocast + GradScaler' if amp else 'fp32'}): unwatched {plain * 1e3:.2f} ms/step")
    for label, (t, syncs, measured, findings) in results.items():
        if label != "unwatched":
            print(f"  {label:26s} x{t / plain:.3f}  gradwatch syncs: {syncs} in {measured} measured steps; "
                  f"findings {findings}")


def identical(make, x, y):
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False  # else runs differ by themselves
    torch.manual_seed(0)
    base = make().cuda()
    runs = []
    for watched in (False, True):
        model = copy.deepcopy(base)
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        watch = GradWatch(model, every=1, histogram_every=1, quiet=True).attach() if watched else None
        torch.manual_seed(1)
        outs = train(model, opt, x, y, 5)
        grads = [p.grad.clone() for p in model.parameters()]
        if watch:
            watch.detach()
        runs.append((outs, grads))
    same = all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0])) and all(
        torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    print(f"bit-identical outputs and gradients with and without gradwatch: {same}")
    return same


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    g = torch.Generator().manual_seed(0)
    xm, ym = (torch.rand(256, 784, generator=g) * 2 - 1).cuda(), torch.randint(0, 10, (256,), generator=g).cuda()
    xc, yc = torch.rand(64, 1, 28, 28, generator=g).cuda(), torch.randint(0, 10, (64,), generator=g).cuda()
    ok = identical(fashion_mlp, xm, ym) and identical(mnist_cnn, xc, yc)
    for amp in (False, True):
        check("Fashion-MNIST MLP", fashion_mlp, xm, ym, amp)
        check("MNIST CNN", mnist_cnn, xc, yc, amp)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
