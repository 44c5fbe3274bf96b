"""gradwatch on real-size models: a ResNet-50-sized CNN and a GPT-2-small-sized transformer.

    python benchmarks/gpu_models.py                      # on a CUDA device (the figures of record)
    python benchmarks/gpu_models.py --tiny --device cpu  # the same code at tiny sizes (a smoke run)

Models: ResNet-50 (bottleneck blocks 3-4-6-3, 25.6M parameters) on 224x224 images, batch 128,
under bf16 autocast; GPT-2 small (12 layers, 12 heads, width 768, 124M parameters with the
embeddings tied to the head) on sequences of 1024 tokens, batch 8, under bf16 autocast, with
``F.scaled_dot_product_attention``. Each trains with AdamW.

For each model, the variants train their own copy (same initial weights): each warms up
(``--warmup`` steps, 110 by default: compiling, the dense start, and the measuring interval's first
adaptation at step 100), then the variants take turns block by block in a shuffled order; a
variant's ratio is the median over rounds of its block time over its baseline's in the same round:

- unwatched (its step time is printed);
- gradwatch at its defaults, every step (scalars), every step with histograms written into a
  log_dir, against the unwatched copy;
- compiled (``torch.compile``, watched before compiling) at its defaults and every step, against a
  compiled unwatched copy (each compiled copy has a module class of its own, so none shares graphs).

Per variant it also reports the peak memory of a step above what was allocated before it
(``torch.cuda.max_memory_allocated``, reset before each block, less ``memory_allocated()`` then:
activations, gradients and temporaries; every copy's weights and optimizer state stay resident
throughout, and count for none) and the host synchronisations per measured step: for ``--sync-steps``
steps, ``torch.cuda.set_sync_debug_mode("warn")`` turns every synchronising CUDA call (``.item()``,
``.tolist()``, ``.cpu()``, a blocking copy, ...) into a warning; the warnings are counted, less
those of the same number of steps of its unwatched baseline, and divided by the measured steps
whose numbers were read in that window (a step's numbers are read when the next step opens).
On the CPU neither is measured ("-"). Compile time is ``benchmarks/compiled.py``'s.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import shutil
import statistics
import tempfile
import time
import types
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from gradwatch import GradWatch


# ---------------------------------------------------------------------------------------- GPT
@dataclass(frozen=True)
class GPTConfig:
    """nanoGPT's configuration; the defaults are GPT-2 small (124M parameters)."""

    vocab_size: int = 50304  # GPT-2's 50257, padded to a multiple of 64 as nanoGPT does
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.resid_dropout = nn.Dropout(c.dropout)
        self.n_head, self.dropout = c.n_head, c.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, e = x.shape
        q, k, v = self.c_attn(x).split(e, dim=2)
        q, k, v = (z.view(b, t, self.n_head, e // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(b, t, e)))


class MLP(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(c.n_embd, bias=c.bias), CausalSelfAttention(c)
        self.ln_2, self.mlp = nn.LayerNorm(c.n_embd, bias=c.bias), MLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's model: learned positions, pre-norm blocks, the token embedding tied to the head.
    ``forward(idx, targets)`` returns ``(logits, loss)``, loss None without targets."""

    def __init__(self, c: GPTConfig = GPTConfig()) -> None:
        super().__init__()
        self.config = c
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd), wpe=nn.Embedding(c.block_size, c.n_embd),
            drop=nn.Dropout(c.dropout), h=nn.ModuleList([Block(c) for _ in range(c.n_layer)]),
            ln_f=nn.LayerNorm(c.n_embd, bias=c.bias)))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        t = idx.shape[1]
        pos = torch.arange(t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def tiny_gpt_config() -> GPTConfig:
    """A GPT of the same shape at a size a CPU test trains in seconds."""
    return GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)


# ---------------------------------------------------------------------------------------- ResNet-50
class Bottleneck(nn.Module):
    """ResNet's bottleneck block (v1.5: the stride on the 3x3 convolution, as torchvision's)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """ResNet with bottleneck blocks; ``ResNet()`` is ResNet-50 (25.6M parameters, 1000 classes)."""

    def __init__(self, blocks: Tuple[int, ...] = (3, 4, 6, 3), width: int = 64, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1, self.relu, self.maxpool = nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        stages, cin = [], width
        for i, n in enumerate(blocks):
            w = width * 2 ** i
            stage = [Bottleneck(cin, w, 1 if i == 0 else 2)] + [Bottleneck(w * 4, w) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            cin = w * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(cin, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---------------------------------------------------------------------------------------- the benchmark
@dataclass
class Workload:
    """A model and its batch: ``make()`` builds it (seeded by the caller), ``loss(model)`` one batch's loss."""

    title: str
    make: Callable[[], nn.Module]
    loss: Callable[[nn.Module], torch.Tensor]


def workloads(device: str, tiny: bool) -> Dict[str, Workload]:
    g = torch.Generator().manual_seed(1)  # not the weights' seed: the data would repeat their random draws
    if tiny:
        images, batch, res = torch.rand(4, 3, 32, 32, generator=g), 4, dict(blocks=(1, 1, 1, 1), width=8, classes=10)
        c, seqs = tiny_gpt_config(), 2
    else:
        images, batch, res = torch.rand(128, 3, 224, 224, generator=g), 128, {}
        c, seqs = GPTConfig(), 8
    images = images.to(device)
    labels = torch.randint(0, res.get("classes", 1000), (batch,), generator=g).to(device)
    tokens = torch.randint(0, c.vocab_size, (seqs, c.block_size + 1), generator=g).to(device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    size = "tiny" if tiny else "full size"
    return {
        "resnet50": Workload(f"ResNet-50-style CNN ({size}, batch {batch}, {images.shape[-1]}px)",
                             lambda: ResNet(**res), lambda m: F.cross_entropy(m(images), labels)),
        "gpt2": Workload(f"GPT-2-small-style transformer ({size}, batch {seqs} x {c.block_size} tokens)",
                         lambda: GPT(c), lambda m: m(x, y)[1]),
    }


VARIANTS: Dict[str, Tuple[Optional[Dict[str, Any]], bool]] = {  # name: (GradWatch's arguments or None, compiled)
    "unwatched": (None, False),
    "defaults": ({}, False),
    "every step": ({"every": 1, "histogram_every": None}, False),
    "every step + histograms": ({"every": 1, "histogram_every": 1}, False),
    "compiled, unwatched": (None, True),
    "compiled, defaults": ({}, True),
    "compiled, every step": ({"every": 1, "histogram_every": None}, True),
}


def own_class(i: int, net: nn.Module) -> nn.Module:
    """``net`` inside a module class of its own, whose ``forward`` has a code object of its own:
    compiled graphs are cached per code object and guarded on the module's class (torch.compile
    skips module-hook guards by default), so no two compiled copies share graphs or a cache."""
    class Own(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.net = inner

        def forward(self, *args: Any) -> Any:
            return self.net(*args)
    f = Own.forward
    Own.forward = types.FunctionType(f.__code__.replace(co_name=f"forward_{i}"), f.__globals__, f"forward_{i}")
    Own.__name__ = Own.__qualname__ = f"{type(net).__name__}{i}"
    return Own(net)


class Trainer:
    """One variant: its own copy of the model, optimizer, watch and (maybe) compiled module."""

    def __init__(self, i: int, base: nn.Module, w: Workload, kwargs: Optional[Dict[str, Any]], compiled: bool,
                 args: argparse.Namespace) -> None:
        self.model = own_class(i, copy.deepcopy(base))
        self.loss_of, self.device = w.loss, args.device
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        histograms = kwargs is not None and kwargs.get("histogram_every") == 1
        self.log_dir = tempfile.mkdtemp(prefix="gradwatch-gpu-models-") if histograms else None  # written, as users do
        self.watch = (GradWatch(self.model, quiet=True, log_dir=self.log_dir, **kwargs).attach()
                      if kwargs is not None else None)
        self.run = torch.compile(self.model, backend=args.backend) if compiled else self.model
        dtype = torch.bfloat16 if args.amp else None
        self.autocast = (lambda: torch.autocast(torch.device(args.device).type, dtype=dtype)) if dtype else nullcontext

    def steps(self, n: int) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(n):
            with self.autocast():
                loss = self.loss_of(self.run)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        return time.perf_counter() - t0

    def close(self) -> None:
        if self.watch is not None:
            self.watch.detach()
        if self.log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def synchronisations(t: Trainer, steps: int) -> Tuple[int, int]:
    """Synchronising CUDA calls during ``steps`` steps (``torch.cuda.set_sync_debug_mode("warn")``
    turns each into a warning), and how many measured steps were closed meanwhile (a step's
    numbers are read when the next step opens)."""
    first = t.watch.steps if t.watch is not None else 0
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            t.steps(steps)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    count = sum(1 for r in seen if "synchroniz" in str(r.message).lower())
    if t.watch is None:
        return count, 0
    last = t.watch.steps
    return count, sum(1 for s in range(first - 1, last - 1) if s >= 0 and t.watch.schedule.measures(s))


def run_workload(name: str, w: Workload, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    base = w.make().to(args.device)
    params = sum(p.numel() for p in base.parameters())
    cuda = torch.device(args.device).type == "cuda"
    trainers: Dict[str, Trainer] = {}
    for i, (variant, (kwargs, compiled)) in enumerate(VARIANTS.items()):
        trainers[variant] = Trainer(i, base, w, kwargs, compiled, args)
        trainers[variant].steps(args.warmup)  # compiling, the dense start, the budget's first adaptation
    peak: Dict[str, float] = {v: 0.0 for v in trainers}
    times: Dict[str, List[float]] = {v: [] for v in trainers}
    order, rng = list(trainers), random.Random(0)
    for _ in range(args.rounds):
        rng.shuffle(order)
        for v in order:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            times[v].append(trainers[v].steps(args.block) / args.block)
            if cuda:
                peak[v] = max(peak[v], (torch.cuda.max_memory_allocated() - resident) / 2 ** 30)
    syncs: Dict[str, str] = {v: "-" for v in trainers}
    if cuda:
        base_syncs = {c: synchronisations(trainers[v], args.sync_steps)[0]
                      for v, c in (("unwatched", False), ("compiled, unwatched", True))}
        for v, t in trainers.items():
            if t.watch is not None:
                count, measured = synchronisations(t, args.sync_steps)
                extra = count - base_syncs[VARIANTS[v][1]]
                syncs[v] = f"{extra / measured:.1f}" if measured else f"{extra} in {args.sync_steps} steps"
    plain = statistics.median(times["unwatched"])
    print(f"\n{w.title}: {params:,} parameters; unwatched {plain * 1e3:.1f} ms/step"
          + (f", compiled unwatched {statistics.median(times['compiled, unwatched']) * 1e3:.1f} ms/step"))
    print(f"  {'variant':26s} {'ms/step':>9s} {'ratio':>7s} {'(rounds)':>15s} {'syncs/measured step':>20s} "
          f"{'step memory':>12s} {'interval':>8s}")
    for v, t in trainers.items():
        ref = times["compiled, unwatched" if VARIANTS[v][1] else "unwatched"]
        ratios = [a / b for a, b in zip(times[v], ref)]
        mem = f"{peak[v]:.2f} GiB" if cuda else "-"
        every = str(t.watch.every) if t.watch is not None else "-"
        spread = f"{min(ratios):.3f}-{max(ratios):.3f}"
        print(f"  {v:26s} {statistics.median(times[v]) * 1e3:9.1f} {statistics.median(ratios):6.3f}x "
              f"{spread:>15s} {syncs[v]:>20s} {mem:>12s} {every:>8s}")
        t.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny models (a smoke run, e.g. on the CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="resnet50,gpt2", help="comma-separated: resnet50, gpt2")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled variants")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16 autocast")
    p.add_argument("--warmup", type=int, default=None, help="steps per variant before timing (default 110; tiny 3)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of blocks (default 5; tiny 1)")
    p.add_argument("--block", type=int, default=None, help="steps per block (default 10; tiny 2)")
    p.add_argument("--sync-steps", type=int, default=20, help="steps per variant under the sync debug mode (CUDA)")
    args = p.parse_args()
    args.warmup = args.warmup if args.warmup is not None else (3 if args.tiny else 110)
    args.rounds = args.rounds if args.rounds is not None else (1 if args.tiny else 5)
    args.block = args.block if args.block is not None else (2 if args.tiny else 10)
    warnings.simplefilter("ignore")
    if torch.device(args.device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        print(f"{args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"bf16 autocast: {args.amp}; compiled with backend {args.backend}; {args.warmup} warm-up steps per "
          f"variant, then {args.rounds} rounds of {args.block} steps, variants interleaved")
    all_workloads = workloads(args.device, args.tiny)
    for name in args.models.split(","):
        if name not in all_workloads:
            raise SystemExit(f"--models: unknown model {name!r}; choose from {', '.join(all_workloads)}")
        run_workload(name, all_workloads[name], args)


if __name__ == "__main__":
    main()
