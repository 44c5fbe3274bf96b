"""Where a measured step's time goes: gradwatch's parts timed inside one training process.

    python benchmarks/breakdown.py [--steps 300] [--histograms] [--model cnn]
    python benchmarks/breakdown.py --cold [--steps 300]
    python benchmarks/breakdown.py --between [--rounds 300] [--baseline DIR]
    python benchmarks/breakdown.py --between --same-model [--rounds 300] [--baseline DIR]
    python benchmarks/breakdown.py --fresh [--rounds 10]
    python benchmarks/breakdown.py --replay [--model cnn] [--baseline DIR]
    python benchmarks/breakdown.py --parts [--model cnn] [--rounds N]

Trains the Fashion-MNIST seed MLP (batch 256) watched every step, with a timer around each
part of gradwatch's work (the timers add a little of their own), and prints microseconds per
step beside the plain step's forward, backward and optimizer time. Parts nest: the sums and
samples are inside "layer outputs", "gradient read" runs inside the backward. Gradients at layer
outputs (a tensor hook and a norm each, during backward) are timed as "output gradients".
``--cpu-time``: every timer reads the process's CPU time instead of the wall clock (steadier on
a machine other processes share).

``--cold``: why a call costs more inside a training step than in a micro-benchmark. An unwatched
MLP gets a plain forward hook on each layer that calls the same function twice on the layer's
output (``activation_summary``; on the last layer also a one-element ``sum().item()``) and
times each call: the first call of a step finds PyTorch's and NumPy's code cold (the training's
own kernels ran in between), the second, on the same data, warm.

``--between``: what a step that is not measured costs (most of the defaults' overhead), built up
in parts on copies of the MLP, timed in interleaved blocks as ``overhead.py`` times its variants:
the root module's two hooks doing nothing (step counting's place), plus a forward hook doing
nothing on every layer (where outputs are kept), plus the per-step finiteness check (a sum read
of the model's output, and of the first layer's bias gradient from a hook during backward), plus
each layer's hook keeping its output until the forward returns (what lets the check name a
layer at the step its values turned non-finite), and
gradwatch itself with no step measured after its first (``every=10**6``). A second unwatched copy
is the A/A control. Blocks of 10 steps, 300 rounds: a single block's ratio varies by several per
cent on a shared machine, and the median of hundreds resolves the 2 % target. ``--baseline DIR``
adds another checkout's gradwatch (no step measured) to the same run.

``--between --same-model``: the same cost on one model, without the spread between copies (two
copies of one model differ by up to a few per cent in one run, more than a 2 % target): each round,
in shuffled order, a block of 10 steps unwatched and a block per gradwatch (attached with
``every=10**6``, three untimed steps, the timed block, detached). Printed: the median over rounds
of (watched block - unwatched block) per step, with the middle half of the rounds in brackets. Two
more blocks take parts away, to weigh them: gradwatch without the finiteness check (no sums read
and no output kept, as under several processes), and gradwatch without the layers' hooks (no call
per layer and no output kept; the root's hooks, step counting and the check stay).

``--replay``: the step summary (``Collector._summarise``: one host read, per-site totals, the
records) of one measured step, captured after a few steps watched every step and replayed 2,000
times in a row, best of three: the code warm, so that two versions of the bookkeeping compare to
within a few per cent where a training step's own spread hides them. ``--baseline DIR`` replays the
same step of another checkout's gradwatch after this one's.

``--parts``: what each part costs inside the training step, where the timers above miss what a part's
reads cost the model's own kernels afterwards (caches) and their own cold start: copies of the model
watched every step, each with one part of gradwatch's work switched off (its function replaced by
one that returns placeholder numbers), timed in interleaved blocks as ``overhead.py`` times its
variants. A part's cost is the full watch's extra time minus the copy's without it. The parts: the
samples' statistics, the parameter gradients' and weights' arithmetic, the output gradients' norms,
everything after the step (summary, rules and sinks; then the rules alone and the sinks alone), and
all four switched off at once (what remains: the hooks themselves, the outputs' sums and per-unit
sums, the per-layer records). The placeholder numbers are zeros, which the rules may judge (zero
gradients vanish): a copy's rules may then do a little more or less than the full watch's. Warnings
are silenced, so the runs print nothing but the table.

``--fresh``: what the first 100 steps of a new watch cost at the defaults (the dense start
measures the first 10 steps, then every 20th until the budget can act at step 100), as a new
user would time it: per round, a fresh copy of the MLP trained 100 steps with SGD unwatched and
a fresh copy watched from its first step, in alternating order; the median ratio over rounds, and
where it goes: each step's extra time (the median over rounds), summed by kind of step.
"""

from __future__ import annotations

import argparse
import collections
import copy
import math
import random
import statistics
import tempfile
import time
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from gradwatch import GradWatch, stats
from gradwatch.collect import Collector, buffers, summary
from gradwatch.rules import Judge
from gradwatch.sinks.fanout import Fanout
try:
    from benchmarks.overhead import bench, fashion_mlp, load_baseline, mnist_cnn
except ImportError:  # run as python benchmarks/breakdown.py
    from overhead import bench, fashion_mlp, load_baseline, mnist_cnn  # type: ignore[no-redef]

spent: Dict[str, float] = collections.Counter()
labels = ["output gradients"]  # the order they print in
clock = time.perf_counter


def timed(owner: Any, name: str, label: str) -> None:
    """Wrap ``owner.name`` (a function or method) in a timer adding to ``spent[label]`` (several
    functions may add to one label)."""
    fn = getattr(owner, name)
    if label not in labels:
        labels.append(label)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if label in running:  # inside another function of the same label: counted there
            return fn(*args, **kwargs)
        running.add(label)
        t0 = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[label] += clock() - t0
            running.discard(label)
    setattr(owner, name, wrapper)


running: set = set()  # labels whose timer is running


def cold_calls(steps: int, x: torch.Tensor, y: torch.Tensor) -> None:
    """Each layer's output summarised twice inside the step: median us of the first and second call."""
    model = fashion_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    first: Dict[str, list] = collections.defaultdict(list)
    again: Dict[str, list] = collections.defaultdict(list)

    def twice(name: str, fn: Callable[[torch.Tensor], Any]) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
            t0 = time.perf_counter()
            fn(out)
            t1 = time.perf_counter()
            fn(out)
            first[name].append(t1 - t0)
            again[name].append(time.perf_counter() - t1)
        return hook
    for i, layer in enumerate(model):
        model[i].register_forward_hook(twice(f"{i} {type(layer).__name__}: activation_summary", stats.activation_summary))
    last = len(model) - 1
    model[last].register_forward_hook(twice(f"{last} {type(model[last]).__name__}: sum().item() of 2560 floats",
                                            lambda out: out.detach().sum().item()))
    for _ in range(steps + 50):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; seed MLP, {steps} steps, unwatched; "
          f"median us per call inside the step")
    print(f"{'call':60s} {'first':>8s} {'again':>8s}")
    for name in first:
        a, b = statistics.median(first[name][50:]) * 1e6, statistics.median(again[name][50:]) * 1e6
        print(f"  {name:58s} {a:8.1f} {b:8.1f}")
    summaries = [n for n in first if "activation_summary" in n]
    print(f"  {'all activation_summary calls of a step':58s} "
          f"{sum(statistics.median(first[n][50:]) for n in summaries) * 1e6:8.0f} "
          f"{sum(statistics.median(again[n][50:]) for n in summaries) * 1e6:8.0f}")


class BetweenSteps:
    """The parts of an unmeasured step, without gradwatch: ``layers`` adds a forward hook doing
    nothing on every leaf module, ``keep`` makes those hooks keep each output until the model's
    forward returns, ``check`` adds the per-step finiteness check."""

    def __init__(self, model: torch.nn.Module, layers: bool, check: bool, keep: bool = False) -> None:
        kept: list = []
        nothing = torch.compiler.disable(lambda *args: None)  # as gradwatch's root hooks are
        out_check = torch.compiler.disable(
            lambda module, args, out: math.isfinite(out.detach().sum().item()) and None)
        let_go = torch.compiler.disable(lambda *args: kept.clear())
        self.handles = [model.register_forward_pre_hook(nothing),
                        model.register_forward_hook(out_check if check else nothing, always_call=True)]
        if keep:
            self.handles.append(model.register_forward_hook(let_go, always_call=True))
        if layers:
            leaves = [m for m in model.modules() if not list(m.children())]
            hook = (lambda module, args, out: kept.append(out)) if keep else (lambda *args: None)
            self.handles += [m.register_forward_hook(hook) for m in leaves]
        if check:
            first_bias = [p for p in model.parameters() if p.dim() == 1][0]
            self.handles.append(first_bias.register_post_accumulate_grad_hook(
                lambda p: math.isfinite(p.grad.sum().item()) and None))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()


def between_steps(rounds: int, x: torch.Tensor, y: torch.Tensor, baseline: Optional[str] = None) -> None:
    variants: Dict[str, Callable[..., Any]] = {
        "unwatched": lambda m: None,
        "unwatched again (A/A control)": lambda m: None,
        "root hooks doing nothing": lambda m: BetweenSteps(m, layers=False, check=False),
        "+ a hook doing nothing per layer": lambda m: BetweenSteps(m, layers=True, check=False),
        "+ the finiteness check (2 sums read)": lambda m: BetweenSteps(m, layers=True, check=True),
        "+ each layer keeps its output": lambda m: BetweenSteps(m, layers=True, check=True, keep=True),
        "gradwatch, no step measured": lambda m: GradWatch(m, every=10**6, quiet=True).attach(),
    }
    if baseline is not None:
        old = load_baseline(baseline).GradWatch
        variants["the baseline's gradwatch, no step measured"] = lambda m: old(m, every=10**6, quiet=True).attach()
    detail: Dict[str, Any] = {}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; seed MLP, steps that are not measured")
    # Many short blocks: a round's ratio varies by +-10 % on a shared machine, and a 2 % target needs the
    # median of hundreds of them (the A/A control then stays within about 0.1 %).
    bench("Fashion-MNIST MLP 784-512-256-256-128-10, batch 256", fashion_mlp, x, y, rounds, 10, variants, detail)
    plain = detail["ms_per_step"]["unwatched"]
    print("extra per step over unwatched (median of rounds, us)")
    for v, ratios in detail["ratios"].items():
        print(f"  {v:40s} {(statistics.median(ratios) - 1) * plain * 1e3:7.0f}")


def _without_check(watch: GradWatch) -> None:
    watch._collector.checking = False  # no sums read, no outputs kept (what several processes run)


def _without_layer_hooks(watch: GradWatch) -> None:
    watch._collector.taps.detach()  # no call per layer, no outputs kept


def between_same_model(rounds: int, x: torch.Tensor, y: torch.Tensor, baseline: Optional[str] = None,
                       make: Callable[[], torch.nn.Module] = fashion_mlp) -> None:
    watches: Dict[str, Tuple[Any, Callable[[Any], None]]] = {
        "gradwatch, no step measured": (GradWatch, lambda w: None),
        "  without the finiteness check": (GradWatch, _without_check),
        "  without the layers' hooks": (GradWatch, _without_layer_hooks),
    }
    if baseline is not None:
        watches["the baseline's gradwatch, no step measured"] = (load_baseline(baseline).GradWatch, lambda w: None)
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def block(steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (time.perf_counter() - t0) / max(steps, 1)
    block(50)
    rng = random.Random(0)
    extra: Dict[str, list] = {name: [] for name in watches}
    plain = []
    for _ in range(rounds):
        order = ["unwatched"] + list(watches)
        rng.shuffle(order)
        times = {}
        for name in order:
            if name == "unwatched":
                block(3)
                times[name] = block(10)
                continue
            make, change = watches[name]
            watch = make(model, every=10 ** 6, quiet=True).attach()
            try:
                block(1)  # the first step is measured
                change(watch)
                block(2)
                times[name] = block(10)
            finally:
                watch.detach()
        plain.append(times["unwatched"])
        for name in watches:
            extra[name].append(times[name] - times["unwatched"])
    ms = statistics.median(plain) * 1e3
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; seed MLP (Adam, batch 256), one model "
          f"watched and unwatched in turns, {rounds} rounds of 10 steps; unwatched {ms:.2f} ms/step")
    for name, values in extra.items():
        q = sorted(values)
        mid = statistics.median(q)
        print(f"  {name:42s} {mid * 1e6:6.0f} us per step ({mid / ms * 1e5:.2f} %), middle half of the rounds "
              f"{q[len(q) // 4] * 1e6:.0f} to {q[(3 * len(q)) // 4] * 1e6:.0f} us")


def _placeholder_row(self: buffers.SampleRows, t: torch.Tensor, limits: Any = None, scale: Any = None,
                     a: Any = None) -> Optional[buffers.Row]:
    m = stats.sample_size(t, self.max_elements)
    return buffers.Row(m, values=[0.0] * (4 if limits is not None else 3)) if m else None


def _no_step_end(self: Collector, step: int) -> None:
    self._buf = None


PARTS: Dict[str, Tuple[Any, str, Any]] = {
    # part: (owner, attribute, what replaces it)
    "samples' statistics": (buffers.SampleRows, "add", _placeholder_row),
    "gradient and weight arithmetic": (stats, "_grad_rows_cpu",
                                       lambda grads, weights: torch.zeros(3, len(grads), dtype=torch.float64)),
    "output gradients' norms": (stats, "l2_norm_now", lambda g: 0.0),
    "summary, rules and sinks": (Collector, "end", _no_step_end),
    "rules": (Judge, "new_findings", lambda self, data, final=False: []),
    "sinks": (Fanout, "on_step", lambda self, data, new: None),
}
ALL_OFF = ("samples' statistics", "gradient and weight arithmetic", "output gradients' norms",
           "summary, rules and sinks")


class WithoutParts:
    """gradwatch every step on ``model``, with the ``parts`` of :data:`PARTS` replaced while this copy
    trains: switched at the start of each of its forwards (a pre-hook placed before gradwatch's, which
    is where the previous step's summary runs) and back after each of its steps."""

    original = {part: getattr(owner, name) for part, (owner, name, _) in PARTS.items()}

    def __init__(self, model: torch.nn.Module, parts: Tuple[str, ...]) -> None:
        self.parts = parts
        self.handle = model.register_forward_pre_hook(lambda *args: self.switch(self.parts), prepend=True)
        self.watch = GradWatch(model, every=1, histogram_every=None, quiet=True).attach()

    @classmethod
    def switch(cls, off: Tuple[str, ...]) -> None:
        for part, (owner, name, replacement) in PARTS.items():
            setattr(owner, name, replacement if part in off else cls.original[part])

    def after_step(self, loss: torch.Tensor) -> None:
        self.switch(())

    def detach(self) -> None:
        self.switch(())
        self.watch.detach()
        self.handle.remove()


def parts_in_step(make: Callable[[], torch.nn.Module], x: torch.Tensor, y: torch.Tensor, rounds: int,
                  block: int, name: str) -> None:
    variants: Dict[str, Callable[..., Any]] = {
        "unwatched": lambda m: None,
        "gradwatch every step": lambda m: WithoutParts(m, ()),
    }
    for part in PARTS:
        variants[f"without {part}"] = (lambda off: lambda m: WithoutParts(m, off))((part,))
    variants["without all four (the rest)"] = lambda m: WithoutParts(m, ALL_OFF)
    detail: Dict[str, Any] = {}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {name}, watched every step, "
          f"one part switched off per copy")
    bench(name, make, x, y, rounds, block, variants, detail)
    plain = detail["ms_per_step"]["unwatched"] * 1e3
    extra = {v: (statistics.median(r) - 1) * plain for v, r in detail["ratios"].items()}
    full = extra["gradwatch every step"]
    print(f"extra per step over unwatched, and what each part costs inside the step (us; {plain:.0f} us plain)")
    for v, e in extra.items():
        part = f"   part: {full - e:7.0f}" if v.startswith("without") and not v.endswith("(the rest)") else ""
        print(f"  {v:45s} {e:7.0f}{part}")


def fresh_watches(rounds: int, x: torch.Tensor, y: torch.Tensor,
                  make: Callable[[], torch.nn.Module] = lambda: fashion_mlp()) -> None:
    torch.manual_seed(0)
    base = make()

    def hundred(watched: bool) -> list:
        """Seconds of: attach, each of the 100 steps, detach."""
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        t0 = clock()
        watch = GradWatch(model, quiet=True).attach() if watched else None
        times = [clock() - t0]
        for _ in range(100):
            t0 = clock()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(clock() - t0)
        t0 = clock()
        if watch is not None:
            watch.detach()
        return times + [clock() - t0]
    hundred(False), hundred(True)  # warm-up: imports, first-call costs of both
    runs: Dict[bool, list] = {False: [], True: []}
    for r in range(rounds):
        for w in ([False, True] if r % 2 == 0 else [True, False]):
            runs[w].append(hundred(w))
    ratios = [sum(a) / sum(b) for a, b in zip(runs[True], runs[False])]
    plain = [sum(b) for b in runs[False]]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; seed MLP, SGD: the first 100 steps of a "
          f"fresh watch at the defaults (attach and detach included)")
    print(f"  unwatched {statistics.median(plain) * 10:.2f} ms/step; watched / unwatched: median "
          f"{statistics.median(ratios):.3f}x over {rounds} rounds (min {min(ratios):.3f}, max {max(ratios):.3f})")
    # Where it goes: the median of each step's extra time over the rounds, summed by kind of step.
    extra = [statistics.median(t[i] for t in runs[True]) - statistics.median(t[i] for t in runs[False])
             for i in range(102)]
    total = sum(statistics.median(t[i] for t in runs[False]) for i in range(1, 101))
    kinds = {"attach": [0], "step 0": [1], "steps 1-9 (the dense start)": list(range(2, 11)),
             "steps 20, 40, 60, 80 (measured)": [21, 41, 61, 81],
             "the 86 steps not measured": [i for i in range(11, 101) if (i - 1) % 20], "detach": [101]}
    print("  extra time by kind of step, as a share of the 100 unwatched steps (medians per step):")
    for kind, idx in kinds.items():
        print(f"    {kind:34s} {sum(extra[i] for i in idx) / total * 100:5.2f} %")


def replay_summary(make: Callable[[], torch.nn.Module], x: torch.Tensor, y: torch.Tensor,
                   baseline: Optional[str] = None) -> None:
    import timeit

    packages = [("this checkout", GradWatch)]
    if baseline is not None:
        packages.append((f"baseline {baseline}", load_baseline(baseline).GradWatch))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; the step summary of one measured step, "
          f"replayed warm (best of 3 x 2,000 calls)")
    for label, watch_class in packages:
        torch.manual_seed(0)
        model = make()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        watch = watch_class(model, every=1, quiet=True).attach()
        collector = watch._collector
        captured: Dict[str, Any] = {}
        summarise = collector._summarise

        def capture(step: int, buf: Any) -> Any:
            captured.update(step=step, buf=buf)
            return summarise(step, buf)
        collector._summarise = capture
        for _ in range(5):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        collector._summarise = summarise
        data = summarise(captured["step"], captured["buf"])
        best = min(timeit.repeat(lambda: summarise(captured["step"], captured["buf"]), number=2000, repeat=3))
        watch.detach()
        print(f"  {label:50s} {best / 2000 * 1e6:7.1f} us per step ({len(data.stats.layers)} layers, "
              f"{len(data.stats.params)} parameters)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--histograms", action="store_true", help="histograms every step, into a log_dir")
    p.add_argument("--cold", action="store_true", help="the same call twice inside the step (see above)")
    p.add_argument("--between", action="store_true", help="what a step that is not measured costs (see above)")
    p.add_argument("--same-model", action="store_true", help="with --between: one model, watched and unwatched "
                                                              "in turns (see above)")
    p.add_argument("--rounds", type=int, help="rounds of --between (default 300), --fresh (default 10) or --parts "
                                              "(default 15; 40 for the CNN)")
    p.add_argument("--fresh", action="store_true", help="the first 100 steps of a fresh watch (see above)")
    p.add_argument("--replay", action="store_true", help="the step summary replayed warm (see above)")
    p.add_argument("--parts", action="store_true", help="each part's cost inside the step (see above)")
    p.add_argument("--baseline", metavar="DIR", help="with --between or --replay: another checkout's gradwatch "
                                                     "beside this one (git worktree add DIR REF)")
    p.add_argument("--model", choices=("mlp", "cnn"), default="mlp",
                   help="the seed model of a measured step's breakdown: the MLP (batch 256) or the CNN (batch 64)")
    p.add_argument("--cpu-time", action="store_true", help="time with the process's CPU time (see above)")
    args = p.parse_args()
    global clock
    if args.cpu_time:
        clock = time.process_time
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    base = fashion_mlp()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(256, 784, generator=g) * 2 - 1, torch.randint(0, 10, (256,), generator=g)
    if args.cold:
        cold_calls(args.steps, x, y)
        return
    if args.between and args.same_model:
        between_same_model(args.rounds or 300, x, y, args.baseline)
        return
    if args.between:
        between_steps(args.rounds or 300, x, y, args.baseline)
        return
    if args.fresh:
        fresh_watches(args.rounds or 10, x, y)
        return
    if args.model == "cnn":
        base = mnist_cnn()
        x, y = torch.rand(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    if args.parts:
        cnn = args.model == "cnn"
        parts_in_step(mnist_cnn if cnn else fashion_mlp, x, y, args.rounds or (40 if cnn else 15), 5 if cnn else 20,
                      f"seed {args.model.upper()}")
        return
    if args.replay:
        replay_summary(mnist_cnn if args.model == "cnn" else fashion_mlp, x, y, args.baseline)
        return
    plain, watched = copy.deepcopy(base), copy.deepcopy(base)
    kwargs: Dict[str, Any] = {"histogram_every": 1, "log_dir": tempfile.mkdtemp(prefix="gw-breakdown-")} \
        if args.histograms else {"histogram_every": None}
    watch = GradWatch(watched, every=1, quiet=True, **kwargs).attach()
    c = watch._collector
    original_hook = buffers.StepBuffers._output_grad_hook

    def output_grad_hook(self: buffers.StepBuffers, site: str) -> Callable[[torch.Tensor], None]:
        hook = original_hook(self, site)

        def timed_hook(grad: torch.Tensor) -> None:
            t0 = clock()
            hook(grad)
            spent["output gradients"] += clock() - t0
        return timed_hook
    buffers.StepBuffers._output_grad_hook = output_grad_hook  # type: ignore[method-assign]
    timed(c.taps, "_on_output", "layer outputs (forward)")
    timed(buffers.stats, "full_sum", "  sums of outputs")
    timed(buffers.stats, "host_sum", "  sums of outputs")  # (NumPy's, on the CPU up to HOST_SUM_ELEMENTS)
    timed(buffers.stats, "unit_sums", "  per-unit sums (dead units)")
    timed(buffers.stats, "host_unit_sums", "  per-unit sums (dead units)")
    timed(buffers.SampleRows, "add", "  samples: copied, or reduced at once on the CPU")
    timed(buffers.SampleRows, "add_with_histogram", "  samples: copied, or reduced at once on the CPU")
    timed(buffers.StepBuffers, "flush", "samples of all layers reduced (end of forward)")
    timed(c.gradients, "read", "gradient read (end of backward)")
    timed(c, "end", "step summary (Collector.end)")
    timed(summary, "_gather", "  one read of the step's small tensors, unit counters")
    timed(summary, "finish", "  per-layer records")
    timed(watch._judge, "new_findings", "rules")
    timed(watch.sinks, "on_step", "sinks (TensorBoard event when a log_dir is given)")
    phases = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}

    def run(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, record: bool) -> None:
        for _ in range(steps):
            t0 = clock()
            out = model(x)
            t1 = clock()
            loss = F.cross_entropy(out, y)
            opt.zero_grad()
            t2 = clock()
            loss.backward()
            t3 = clock()
            opt.step()
            t4 = clock()
            if record:
                phases["forward"] += t1 - t0
                phases["backward"] += t3 - t2
                phases["optimizer"] += t4 - t3
    opts = [torch.optim.Adam(m.parameters(), lr=1e-4) for m in (plain, watched)]
    run(plain, opts[0], 50, False)
    run(watched, opts[1], 50, False)
    spent.clear()
    run(plain, opts[0], args.steps, True)
    plain_phases = dict(phases)
    phases.update(forward=0.0, backward=0.0, optimizer=0.0)
    run(watched, opts[1], args.steps, True)
    watch.detach()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; seed {args.model.upper()}, every step"
          + (" with histograms into a log_dir" if args.histograms else "") + f", {args.steps} steps")
    print(f"{'phase':52s} {'plain':>9s} {'watched':>9s}  (us per step)")
    for k in phases:
        print(f"  {k:50s} {plain_phases[k] / args.steps * 1e6:9.0f} {phases[k] / args.steps * 1e6:9.0f}")
    print(f"  {'(the step summary, rules and sinks run in the forward)':50s}")
    print("gradwatch's parts (us per step)")
    for label in labels:
        if label in spent:
            print(f"  {label:50s} {spent[label] / args.steps * 1e6:9.0f}")


if __name__ == "__main__":
    main()
