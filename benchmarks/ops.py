"""ATen ops and Python calls a step adds: what watching costs in dispatches and in interpreted code,
counted rather than timed.

    python benchmarks/ops.py            # the seed MLP, the seed CNN and a 50-layer ResNet-style model
    python benchmarks/ops.py --quick    # tiny sizes (what tests/test_benchmarks.py runs)

Each model trains a few steps unwatched and a few watched with ``every=1`` (every step measured),
with and without histograms (``histogram_every=1``), on the CPU with one thread; one step of each is
recorded with ``torch.profiler`` (CPU activity). Counted: every ``aten::`` event of
``profiler.key_averages()``, counts summed, including the ops one op calls inside itself (a
``sum`` that fills its output records ``aten::fill_`` too; a ``_foreach_`` op records its per-tensor
kernels on the CPU); printed is (watched step) - (plain step). Beside it, "top-level": only the
ops called from Python (an op inside another is not counted), and "kernels": the top-level ops
minus those that only make views or allocate (``as_strided``, ``view``, ``empty``, ...): about the
kernel launches the same step would cost on a GPU. Two paths are counted: the CPU's own
(``stats.HOST_ARRAYS``: NumPy reads float32/float64 tensors through their memory without a PyTorch
op, ``stats.host_array``, and reduces outputs, output gradients, parameter gradients and weights
there layer by layer; what is left in PyTorch is a sum over a large output, or per unit where dead
units are tracked, the sum of squares (``dot``) of a large tensor and the extremes (``aminmax``) of a
very large gradient, and one tensor made of the parameters' rows) and the device path (the one GPUs
take: samples of all layers reduced together, fused multi-tensor kernels for parameters), forced
on the CPU with ``stats.HOST_ARRAYS = False``.

Python calls: every Python function call (``sys.setprofile``'s ``call`` events: frames of Python
functions, gradwatch's and the libraries' it calls; calls of builtins and C functions not
counted) during one step, watched minus plain, for a measured step (``every=1``), for a measured
step with histograms written into a log_dir (``histogram_every=1``: binning and TensorBoard's
event included) and for a step that is not measured (``every=10**6``, after the first). On the
CPU most of what a measured step costs in time is interpreted code that runs cold between the
model's kernels, about a microsecond a call there; the count is its deterministic stand-in, as
the ATen count is a GPU's launches'. Targets: :data:`MEASURED_CALLS_PER_LAYER` and :data:`UNMEASURED_CALLS_PER_LAYER` per
watched layer output plus a fixed part (:data:`MEASURED_CALLS_FIXED`, :data:`UNMEASURED_CALLS_FIXED`).

The counts are deterministic for a given torch version and thread count (one thread here: with
more, a full reduction over a large tensor may split into partial ones that record more events).

Target: at most 3 added ops per watched layer plus 40 (the seed MLP, 9 watched
layers: 67). The formulas the code keeps, which tests/test_benchmarks.py checks, are
:data:`KERNELS_PER_LAYER` kernels per watched layer output plus :data:`KERNELS_FIXED` on the
device path, and :data:`CPU_OPS_PER_LAYER` ops (all events) per watched layer output plus
:data:`CPU_OPS_FIXED` on the CPU's own path.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from gradwatch import GradWatch, stats

try:
    from benchmarks.overhead import fashion_mlp, mnist_cnn
except ImportError:  # run as python benchmarks/ops.py
    from overhead import fashion_mlp, mnist_cnn  # type: ignore[no-redef]

KERNELS_PER_LAYER = 3
"""Kernels on the device path per output of a watched layer: its sum (per unit where dead units are
tracked), the copy of its sample into the step's buffer, the norm of the gradient at it."""
KERNELS_FIXED = 40
"""Kernels on the device path per measured step whatever the depth: reducing the samples of all
layers, the fused parameter-gradient norms, one read of every number."""

CPU_OPS_PER_LAYER = 2
"""All ops (events) on the CPU's own path per output of a watched layer, at most: one sum in PyTorch
(of the whole output above ``stats.HOST_SUM_ELEMENTS`` elements, or per unit where dead units are
tracked), which fills its output first; everything else is NumPy on the tensor's memory."""
CPU_OPS_FIXED = 3
"""All ops on the CPU's own path per measured step whatever the depth: the parameters' rows made a
tensor, once per gradient read (at the end of backward; with ``optimizer=`` also at its step) and
once for the update ratios."""

MEASURED_CALLS_PER_LAYER = 200
"""Python calls a measured step adds per watched layer output, at most (CPU path, torch 2.13)."""
MEASURED_CALLS_FIXED = 400
"""Python calls a measured step adds whatever the depth, at most (the summary's, rules' and clock's)."""
UNMEASURED_CALLS_PER_LAYER = 8
"""Python calls a step that is not measured adds per watched layer, at most: the layer's hook (and
the module's hook-running path in PyTorch that any forward hook opens)."""
UNMEASURED_CALLS_FIXED = 80
"""Python calls a step that is not measured adds whatever the depth, at most: the root module's
hooks, the step's count, the finiteness check."""

VIEWS = {"aten::as_strided", "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::expand", "aten::slice",
         "aten::select", "aten::narrow", "aten::unsqueeze", "aten::squeeze", "aten::t", "aten::transpose",
         "aten::permute", "aten::alias", "aten::detach", "aten::detach_", "aten::lift_fresh", "aten::resolve_conj",
         "aten::resolve_neg", "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
         "aten::flatten", "aten::split", "aten::split_with_sizes", "aten::unbind", "aten::to",
         "aten::_local_scalar_dense", "aten::item"}
"""Ops that only make views or allocate, or read a number on the CPU: no kernel on a GPU (``aten::to``
counts when it copies: an op is a kernel when it or an op inside it is not one of these)."""


class Block(nn.Module):
    """A residual block: conv, batch norm, ReLU, conv, batch norm, added to its input, ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(x + self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))


def resnet_style(watched_layers: int = 50, channels: int = 16, classes: int = 10) -> nn.Module:
    """A ResNet-style CNN with ``watched_layers`` modules gradwatch watches, give or take a few: a stem of
    two conv, batch norm and ReLU triples, residual blocks of six, pooling and a linear head."""
    blocks = max(1, (watched_layers - 8) // 6)

    def stem(c_in: int) -> List[nn.Module]:
        return [nn.Conv2d(c_in, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
    return nn.Sequential(*stem(3), *stem(channels), *[Block(channels) for _ in range(blocks)],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


@dataclass
class Count:
    """Ops of one recorded step: every aten event, the top-level ones, and the top-level kernels."""

    all: float
    top: float
    kernels: float

    def __sub__(self, other: "Count") -> "Count":
        return Count(self.all - other.all, self.top - other.top, self.kernels - other.kernels)


def _count(prof: Any, steps: int) -> Count:
    total = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    top = kernels = 0
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            top += 1
            kernels += _computes(e)
    return Count(total / steps, top / steps, kernels / steps)


def _computes(event: Any) -> bool:
    """Whether an op, or an op inside it, does more than make views, allocate or read a number."""
    return event.name.startswith("aten::") and event.name not in VIEWS or any(_computes(c) for c in event.cpu_children)


@contextlib.contextmanager
def _training(model: nn.Module, x: torch.Tensor, y: torch.Tensor, watch: Dict[str, Any] | None,
              warmup: int) -> Iterator[Tuple[Callable[[], None], Optional[GradWatch]]]:
    """``model`` trained ``warmup`` steps with Adam, watched with ``watch`` (GradWatch keywords) or not;
    gives its step and its watch, detached on leaving."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    w = GradWatch(model, quiet=True, **watch).attach() if watch is not None else None

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    try:
        for _ in range(warmup):
            step()
        yield step, w
    finally:
        if w is not None:
            w.detach()


def count_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, watch: Dict[str, Any] | None,
               warmup: int = 12, steps: int = 2) -> Tuple[Count, int, int]:
    """Ops per training step of ``model`` (Adam), watched with ``watch`` (GradWatch keywords) or
    not; also the number of watched layer outputs and parameters of a measured step."""
    from torch.profiler import ProfilerActivity, profile

    with _training(model, x, y, watch, warmup) as (step, w):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        layers = params = 0
        if w is not None:
            report = w.report()
            layers, params = sum(ls.calls for ls in report.layers.values()), len(report.params)
        return _count(prof, steps), layers, params


def count_calls(model: nn.Module, x: torch.Tensor, y: torch.Tensor, watch: Dict[str, Any] | None,
                warmup: int = 12, steps: int = 2) -> float:
    """Python function calls per training step of ``model`` (Adam), watched with ``watch`` or not."""
    calls = 0

    def count(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        if event == "call":
            calls += 1

    with _training(model, x, y, watch, warmup) as (step, _):
        sys.setprofile(count)
        try:
            for _ in range(steps):
                step()
        finally:
            sys.setprofile(None)
    return calls / steps


def python_calls(models: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per model: Python calls of a plain step, and those a measured step, a measured step with
    histograms written into a log_dir (TensorBoard's event included; no gradient-flow image, whose
    first two are drawn in the warm-up) and a step that is not measured add to it; the watched layer
    outputs of a measured step."""
    rows = []
    for name, (make, data) in models.items():
        torch.manual_seed(0)
        base = make()
        x, y = data(torch.Generator().manual_seed(0))
        plain = count_calls(copy.deepcopy(base), x, y, None)
        _, layers, _ = count_step(copy.deepcopy(base), x, y, VARIANTS["every step"], warmup=2, steps=1)
        with tempfile.TemporaryDirectory(prefix="gw-ops-") as log_dir:
            histograms = count_calls(copy.deepcopy(base), x, y, dict(every=1, histogram_every=1, log_dir=log_dir))
        rows.append({"model": name, "plain": plain, "layers": layers,
                     "measured": count_calls(copy.deepcopy(base), x, y, VARIANTS["every step"]) - plain,
                     "histograms": histograms - plain,
                     "unmeasured": count_calls(copy.deepcopy(base), x, y, dict(every=10 ** 6)) - plain})
    return rows


MODELS: Dict[str, Tuple[Callable[[], nn.Module], Callable[[torch.Generator], Tuple[torch.Tensor, torch.Tensor]]]] = {
    "seed MLP (Fashion-MNIST 784-512-256-256-128-10, batch 256)":
        (fashion_mlp, lambda g: (torch.rand(256, 784, generator=g), torch.randint(0, 10, (256,), generator=g))),
    "seed CNN (MNIST conv32-conv64-fc1024, batch 64)":
        (mnist_cnn, lambda g: (torch.rand(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g))),
    "ResNet-style, 50 watched layers (16 channels, 16x16, batch 8)":
        (resnet_style, lambda g: (torch.rand(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g))),
}

QUICK: Dict[str, Tuple[Callable[[], nn.Module], Callable[[torch.Generator], Tuple[torch.Tensor, torch.Tensor]]]] = {
    "MLP 32-16-16-4, batch 8": (lambda: nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(),
                                                      nn.Linear(16, 4)),
                                lambda g: (torch.rand(8, 32, generator=g), torch.randint(0, 4, (8,), generator=g))),
    "ResNet-style, 14 watched layers (4 channels, 8x8, batch 2)":
        (lambda: resnet_style(14, channels=4), lambda g: (torch.rand(2, 3, 8, 8, generator=g),
                                                         torch.randint(0, 10, (2,), generator=g))),
}

VARIANTS = {"every step": dict(every=1, histogram_every=None), "every step + histograms": dict(every=1, histogram_every=1)}


def measure(models: Dict[str, Any], device_path: bool) -> List[Dict[str, Any]]:
    """One row per (model, variant): added ops (all events, top-level, kernels), watched layer
    outputs and parameters."""
    host = stats.HOST_ARRAYS
    stats.HOST_ARRAYS = not device_path
    rows = []
    try:
        for name, (make, data) in models.items():
            torch.manual_seed(0)
            base = make()
            x, y = data(torch.Generator().manual_seed(0))
            plain, _, _ = count_step(copy.deepcopy(base), x, y, None)
            for variant, kwargs in VARIANTS.items():
                watched, layers, params = count_step(copy.deepcopy(base), x, y, kwargs)
                rows.append({"model": name, "variant": variant, "plain": plain.all, "added": watched - plain,
                             "layers": layers, "params": params})
    finally:
        stats.HOST_ARRAYS = host
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, for a smoke test")
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, 1 thread; ATen ops a measured step adds over a plain one "
          f"(all events / top-level / kernels; target: 3 per watched layer + 40, all events)")
    for device_path in (False, True):
        print("\ndevice path (what a GPU runs, on the CPU)" if device_path else "\nthe CPU's own path (the default here)")
        for r in measure(QUICK if args.quick else MODELS, device_path):
            a, target = r["added"], 3 * r["layers"] + 40
            print(f"  {r['model']:62s} {r['variant']:24s} plain {r['plain']:5.0f}  added {a.all:5.0f} / {a.top:4.0f} / "
                  f"{a.kernels:4.0f}  ({r['layers']} layer outputs, {r['params']} parameters; "
                  f"target {target}; per layer {a.all / max(r['layers'], 1):.1f} / {a.kernels / max(r['layers'], 1):.1f})")
    print("\nPython calls a step adds over a plain one (function calls, builtins not counted; the CPU's own path)")
    for r in python_calls(QUICK if args.quick else MODELS):
        n = r["layers"]
        print(f"  {r['model']:62s} plain {r['plain']:5.0f}  measured +{r['measured']:5.0f} (target "
              f"{MEASURED_CALLS_PER_LAYER * n + MEASURED_CALLS_FIXED})  with histograms into a log_dir "
              f"+{r['histograms']:5.0f}  not measured +{r['unmeasured']:4.0f} (target "
              f"{UNMEASURED_CALLS_PER_LAYER * n + UNMEASURED_CALLS_FIXED})  ({n} layer outputs)")


if __name__ == "__main__":
    main()
