"""Update ratios and attention saturation on a CUDA machine: host synchronisations, step time,
bit-identical outputs and gradients, and the planted attention collapse found under bf16 autocast.

    python benchmarks/gpu_updates_attention.py

Models: the Fashion-MNIST seed MLP with Adam and ``optimizer=`` (update ratios), and a small
transformer encoder (4 layers, width 256, 8 heads, 128 tokens, batch 32). For each: step time
watched / unwatched at every step and with the defaults, and the number of synchronising CUDA
calls made from gradwatch's code per measured step (``torch.cuda.set_sync_debug_mode("warn")``).
"""

from __future__ import annotations

import copy
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, "benchmarks")
from overhead import fashion_mlp  # noqa: E402

from gradwatch import GradWatch  # noqa: E402


class Encoder(nn.Module):
    def __init__(self, vocab: int = 64, d: int = 256, heads: int = 8, layers: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.1, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        return self.head(self.enc(self.emb(x), mask=mask, is_causal=True))


def step(model, opt, x, y, amp):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        out = model(x)
        loss = F.cross_entropy(out.float().reshape(-1, out.shape[-1]), y.reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return out


def timed(model, opt, x, y, steps, amp):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(model, opt, x, y, amp)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def check(name, make, x, y, lr, amp=False):
    torch.manual_seed(0)
    base = make().cuda()
    plain = None
    print(f"\n{name}{' (bf16 autocast)' if amp else ''}")
    for label, kwargs in (("unwatched", None), ("defaults + optimizer=", {}),
                          ("every step + optimizer=", {"every": 1, "histogram_every": None})):
        model = copy.deepcopy(base)
        opt = torch.optim.Adam(model.parameters(), lr)
        watch = GradWatch(model, quiet=True, optimizer=opt, **kwargs).attach() if kwargs is not None else None
        for _ in range(30):
            step(model, opt, x, y, amp)
        t = timed(model, opt, x, y, 100, amp)
        if watch is None:
            plain = t
            print(f"  unwatched {t * 1e3:.2f} ms/step")
            continue
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            for _ in range(20):
                step(model, opt, x, y, amp)
            torch.cuda.set_sync_debug_mode("default")
        syncs = sum(1 for r in rec if "synchroniz" in str(r.message).lower() and "gradwatch" in (r.filename or ""))
        measured = sum(1 for s in range(watch.steps - 20, watch.steps) if watch.schedule.measures(s))
        rep = watch.report()
        ratios = [p.update_ratio for p in rep.params.values() if p.update_ratio is not None]
        attn = {n: round(ls.attention_entropy_normalised, 3) for n, ls in rep.layers.items()
                if ls.attention_entropy_normalised is not None}
        watch.detach()
        print(f"  {label:24s} x{t / plain:.3f}  gradwatch syncs: {syncs} in {measured} measured steps; "
              f"update ratios {min(ratios):.2g}..{max(ratios):.2g}; attention entropy {attn or '-'}; "
              f"findings {[f'{f.kind.value}:{f.layer}' for f in watch.findings]}")


def identical(make, x, y, amp):
    # The attention backward on CUDA is not deterministic by itself: two unwatched runs of the
    # encoder differ too. Deterministic kernels make the comparison mean something.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.manual_seed(0)
    base = make().cuda()
    runs = []
    for watched in (False, True):
        model = copy.deepcopy(base)
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        watch = GradWatch(model, every=1, histogram_every=1, quiet=True, optimizer=opt).attach() if watched else None
        torch.manual_seed(1)
        outs = [step(model, opt, x, y, amp).detach() for _ in range(5)]
        grads = [p.grad.clone() for p in model.parameters()]
        if watch:
            watch.detach()
        runs.append((outs, grads))
    same = all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0])) and all(
        torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    print(f"bit-identical outputs and gradients with and without gradwatch ({make.__name__}, amp={amp}): {same}")
    return same


def collapse(x, y):
    torch.manual_seed(0)
    model = Encoder().cuda()
    with torch.no_grad():
        for layer in model.enc.layers:
            e = layer.self_attn.embed_dim
            layer.self_attn.in_proj_weight[:2 * e] *= 16.0
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with GradWatch(model, every=1, quiet=True, optimizer=opt) as watch:
            for _ in range(3):
                step(model, opt, x, y, True)
    found = [f"{f.layer}: {f.message}" for f in watch.findings if f.kind.value == "attention_collapse"]
    print(f"\nq/k scaled x16 under bf16 autocast: {len(found)} attention_collapse finding(s)")
    for f in found[:2]:
        print("  ", f)
    return bool(found)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    g = torch.Generator().manual_seed(0)
    xm, ym = (torch.rand(256, 784, generator=g) * 2 - 1).cuda(), torch.randint(0, 10, (256,), generator=g).cuda()
    tokens = torch.randint(0, 64, (32, 129), generator=g).cuda()
    xt, yt = tokens[:, :-1], tokens[:, 1:]
    ok = identical(fashion_mlp, xm, ym, False) and identical(Encoder, xt, yt, False)
    check("Fashion-MNIST MLP, Adam", fashion_mlp, xm, ym, 1e-4)
    check("Transformer encoder 4 x 256, 8 heads, 128 tokens, batch 32, Adam", Encoder, xt, yt, 3e-4)
    check("Transformer encoder 4 x 256, 8 heads, 128 tokens, batch 32, Adam", Encoder, xt, yt, 3e-4, amp=True)
    ok = collapse(xt, yt) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
