"""torch.compile: gradwatch keeps training correct and says what it cannot see."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.gpu_models import GPT, tiny_gpt_config
from gradwatch import GradWatch, GradWatchWarning
from tests import models

pytestmark = pytest.mark.skipif(not hasattr(torch, "compile"), reason="no torch.compile")


def fresh():
    torch._dynamo.reset()
    torch.manual_seed(0)
    return models.small_mlp()


@pytest.mark.slow
def test_a_model_compiled_before_attaching_is_reported_as_blind_but_gradients_are_measured():
    model = fresh()
    compiled = torch.compile(model, backend="eager")
    x, y = models.batch()
    models.train(compiled, 1, x, y)  # compiled (and cached) without gradwatch's hooks
    with pytest.warns(GradWatchWarning, match="compiled with torch.compile.*only parameter gradients"):
        with GradWatch(compiled, every=1, quiet=True) as watch:
            losses = models.train(compiled, 3, x, y)
    rep = watch.report()
    assert rep.params["0.weight"].grad_norm > 0  # named as in the uncompiled model
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_a_model_compiled_after_attaching_is_measured():
    model = fresh()
    x, y = models.batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # dynamo's notes about tracing our hooks
        with GradWatch(model, every=1, quiet=True) as watch:
            compiled = torch.compile(model, backend="eager")
            models.train(compiled, 3, x, y)
    rep = watch.report()
    assert rep.layers["1"].count == 32 * 16 and rep.params["0.weight"].grad_norm > 0


def _compile_counts():
    from torch._dynamo.utils import counters

    return counters["stats"].get("unique_graphs", 0), sum(counters["graph_break"].values())


@pytest.mark.slow
def test_compiled_layers_are_measured_inside_the_graph_without_recompiles_or_breaks_per_layer():
    from torch._dynamo.utils import counters

    model = fresh()
    x, y = models.batch()
    counters.clear()
    with GradWatch(model, every=3, quiet=True) as watch:  # measured and unmeasured steps alternate
        compiled = torch.compile(model, backend="eager")
        models.train(compiled, 4, x, y)  # warm-up: the measuring and the non-measuring graph
        graphs, breaks = _compile_counts()
        models.train(compiled, 12, x, y)
        assert _compile_counts() == (graphs, breaks)  # no recompile, no new break as steps advance
    assert graphs == 2
    # The root's hooks, the graph's edges (their frame once more under the function tap of measured
    # steps, see collect/functional.py): none per layer (the model has 5).
    assert breaks <= 4
    rep = watch.report()
    assert rep.step == 15
    for name in ("0", "1", "2", "3", "4"):  # every layer's activations, measured in the graph
        assert rep.layers[name].count == 32 * (16 if name != "4" else 3)
    assert rep.layers["1"].dead_fraction is not None and rep.params["0.weight"].grad_norm > 0


@pytest.mark.slow
@pytest.mark.parametrize("make", [models.small_mlp, models.small_cnn])
def test_compiled_and_eager_measure_the_same_numbers_and_training_is_unchanged(make):
    x, y = (models.batch() if make is models.small_mlp else
            (torch.randn(16, 1, 12, 12, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3))
    reports, losses = [], []
    for compile_it in (False, True, None):  # eager watched, compiled watched, compiled unwatched
        torch._dynamo.reset()
        torch.manual_seed(0)  # the same weights, and the same dropout masks, in every run
        model = make()
        watch = GradWatch(model, every=2, quiet=True).attach() if compile_it is not None else None
        run = torch.compile(model, backend="eager") if compile_it is not False else model
        losses.append(torch.tensor(models.train(run, 6, x, y)))
        if watch is not None:
            reports.append(watch.report())
            watch.detach()
    assert torch.equal(losses[1], losses[2])  # watching a compiled model changes nothing in its training
    eager, compiled = reports
    assert eager.step == compiled.step == 4
    assert sum(ls.dead_fraction is not None for ls in compiled.layers.values()) >= 2  # the ReLUs' units
    for name, ls in eager.layers.items():
        other = compiled.layers[name]
        assert (other.count, other.zero_fraction, other.dead_fraction) == (ls.count, ls.zero_fraction, ls.dead_fraction)
        assert other.mean == pytest.approx(ls.mean, rel=1e-5, abs=1e-7)
        assert other.std == pytest.approx(ls.std, rel=1e-5)
        assert other.output_grad_norm is None  # not measured inside a compiled graph (documented)


# ------------------------------------------------------------------ a nanoGPT-style loop
class _DynamoLog(logging.Handler):
    """Dynamo's graph-break and recompile messages (``torch._logging``), kept as text."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def dynamo_log():
    torch._logging.set_logs(graph_breaks=True, recompiles=True)
    handler = _DynamoLog()
    logger = logging.getLogger("torch._dynamo")  # (set_logs stops its records at this logger)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        torch._logging.set_logs()


def breaks_in(lines, package: str) -> list:
    """The graph breaks Dynamo located in a file of ``package``'s folder."""
    return [line for line in lines if "Graph break" in line and package in line.split("\n")[0]]


def nanogpt_loop(model, run, opt, iterations, accumulate=2, eval_every=3):
    """nanoGPT's train.py in miniature: an eval pass under no_grad every ``eval_every`` iterations
    (first), ``accumulate`` micro-batches, then the optimizer's step. Returns the last losses."""
    g = torch.Generator().manual_seed(1)
    losses = []
    for it in range(iterations):
        x = torch.randint(0, model.config.vocab_size, (4, model.config.block_size), generator=g)
        if it % eval_every == 0:
            model.eval()
            with torch.no_grad():
                run(x, x)
            model.train()
        for _ in range(accumulate):
            _, loss = run(x, torch.roll(x, -1, 1))
            (loss / accumulate).backward()
            losses.append(loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


def _gpt(seed: int = 0):
    torch._dynamo.reset()
    torch.manual_seed(seed)
    return GPT(tiny_gpt_config())


@pytest.mark.slow
def test_a_nanogpt_loop_compiles_one_graph_more_than_unwatched_and_nothing_after_each_mode_ran():
    from torch._dynamo.utils import counters

    runs = {}
    for watched in (False, True):
        model = _gpt()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        watch = GradWatch(model, optimizer=opt, steps="optimizer", every=2, quiet=True, strict=True).attach() \
            if watched else None
        run = torch.compile(model, backend="eager")
        counters.clear()
        with dynamo_log() as log:
            # Warm-up: eval passes, measured and unmeasured training iterations, each at least once.
            losses = nanogpt_loop(model, run, opt, 4)
            warm = _compile_counts()
            losses += nanogpt_loop(model, run, opt, 8)
        recompiles = [line for line in log.lines if line.startswith("Recompiling")]
        runs[watched] = (warm, _compile_counts(), torch.stack(losses), recompiles, watch)
    (plain_warm, plain_end, plain_losses, plain_recompiles, _), (warm, end, losses, recompiles, watch) = \
        runs[False], runs[True]
    assert plain_end == plain_warm and end == warm  # no recompile, no new break once each mode ran
    assert warm[0] == plain_warm[0] + 1  # the one graph that measures: eval passes share the unwatched one
    assert warm[1] == plain_warm[1] == 0  # no graph break at all: the root's hooks run beside the graph
    assert len(recompiles) == len(plain_recompiles) + 1  # the eval passes' grad mode, and the measuring flag
    # The graph that measures differs by the measuring flag and, the model calling SDPA, by the
    # function tap of measured forwards: Dynamo names whichever guard it checks first.
    assert sum("gradwatch" in line or "function_mode_stack" in line for line in recompiles) == 1
    assert torch.equal(losses, plain_losses)  # training unchanged
    rep = watch.report()
    watch.detach()
    assert rep.step == 10 and len(rep.layers) == len(watch.layers)  # every layer measured in the graph
    assert all(ls.count > 0 and ls.mean is not None for ls in rep.layers.values())


def test_a_training_step_compiled_with_its_backward_and_optimizer_step_never_traces_gradwatch():
    """torch.compile(train_step) where the step calls loss.backward() and opt.step(): Dynamo's frame
    callback stays set while the graph-broken backward runs, so gradwatch's backward-side hooks (tensor
    and gradient hooks, the end-of-backward callback, the finiteness check, optimizer hooks) would be
    compiled frame by frame. None of them may be: no graph break and no recompile in gradwatch's code."""
    import gradwatch

    torch.manual_seed(0)
    model = models.small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = models.batch()
    watch = GradWatch(model, quiet=True, strict=True, optimizer=opt).attach()  # the defaults: some steps measured

    def train_step() -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    step = torch.compile(train_step, backend="eager")
    with dynamo_log() as log:
        for _ in range(24):
            step()
    watch.detach()
    here = os.path.dirname(gradwatch.__file__)
    assert not breaks_in(log.lines, here)
    # (the model's forward compiles once more where the steps start or stop measuring: not gradwatch's code)
    assert not [line for line in log.lines if line.startswith("Recompiling function") and here in line.split("\n")[0]]
    assert watch.report().step == 20  # measured as the schedule says: 0-9, then 20
    assert watch.report().layers and watch.report().params


@pytest.mark.slow
@pytest.mark.parametrize("how", ["torch.compile(model)", "compiled training step", "model.compile()", "nn.Sequential"])
def test_graphs_break_only_at_the_root_modules_hooks_never_inside_gradwatch(how):
    import gradwatch

    if how == "nn.Sequential":
        model, x = models.small_mlp(), models.batch()[0]
        loss_of = lambda m: m(x).square().mean()  # noqa: E731
    else:
        model, x = _gpt(), torch.randint(0, 64, (4, 32))
        loss_of = lambda m: m(x, x)[1]  # noqa: E731
    watch = GradWatch(model, every=2, quiet=True, strict=True).attach()
    if how == "compiled training step":
        step = torch.compile(lambda: loss_of(model), backend="eager")
    elif how == "model.compile()":
        model.compile(backend="eager")
        step = lambda: loss_of(model)  # noqa: E731
    else:
        run = torch.compile(model, backend="eager")
        step = lambda: loss_of(run)  # noqa: E731
    with dynamo_log() as log:
        for _ in range(4):
            step().backward()
    watch.detach()
    assert watch.report().layers
    breaks = [line.split("\n")[0] for line in log.lines if "Graph break" in line]
    assert not breaks_in(log.lines, os.path.dirname(gradwatch.__file__))
    if how in ("torch.compile(model)", "model.compile()"):
        assert not breaks  # the root's hooks run beside the graph
    else:  # the root's hooks are called inside the traced code: the graph breaks at their call
        assert breaks and all("torch/nn/modules/module.py" in b.replace(os.sep, "/") for b in breaks), breaks


@pytest.mark.slow
def test_a_last_batch_of_another_size_gives_one_dynamic_graph_and_no_break_in_gradwatch():
    import gradwatch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = models.mlp(nn.ReLU, (8, 64, 48, 3))
    counters.clear()
    with dynamo_log() as log, GradWatch(model, every=1, quiet=True, strict=True) as watch:
        run = torch.compile(model, backend="eager")
        for n in (256, 256, 200, 190, 256, 100):  # the second size makes PyTorch compile a dynamic graph
            run(torch.randn(n, 8)).square().mean().backward()
            if n == 200:
                graphs = _compile_counts()[0]
    assert _compile_counts()[0] == graphs  # later sizes reuse the dynamic graph
    assert not breaks_in(log.lines, os.path.dirname(gradwatch.__file__))
    rep = watch.report()
    assert rep.layers["1"].count == 100 * 64 and rep.layers["1"].dead_fraction is not None


@pytest.mark.slow
def test_a_compiled_run_prints_nothing_from_gradwatch(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent("""
        import logging, warnings
        import torch
        from benchmarks.gpu_models import GPT, tiny_gpt_config
        from gradwatch import GradWatch

        logging.basicConfig(level=logging.WARNING)
        warnings.simplefilter("always")
        torch.manual_seed(0)
        model = GPT(tiny_gpt_config())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randint(0, 64, (4, 32))
        with GradWatch(model, optimizer=opt, steps="optimizer", every=2, quiet=True, strict=True):
            run = torch.compile(model, backend="eager")
            for it in range(4):
                if it % 2 == 0:
                    model.eval()
                    with torch.no_grad():
                        run(x)
                    model.train()
                run(x, x)[1].backward()
                opt.step()
                opt.zero_grad()
        print("done")
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr[-2000:]
    assert "gradwatch" not in out.stderr and "lru_cache" not in out.stderr, out.stderr[-2000:]


def test_a_detached_watch_leaves_no_trace_for_compiled_graphs():
    from gradwatch.collect import traced

    model = fresh()
    watch = GradWatch(model, every=1, quiet=True).attach()
    key = watch._collector.taps.traced.key
    assert getattr(traced.LIVE, key) is watch._collector.taps.traced
    watch.detach()
    assert not hasattr(traced.LIVE, key)  # the graphs traced with it fail their guard and are traced again


# ------------------------------------------------------------------ the reductions inside the graph
def _reference(a: np.ndarray, lower, upper, margin):
    a = a.astype(np.float64).reshape(-1)
    values = [a.sum(), math.sqrt(((a - a.mean()) ** 2).sum()) if a.size else 0.0, float(np.count_nonzero(a))]
    if lower is not None and upper is not None:
        center, half = (upper + lower) / 2, (upper - lower) / 2
        values.append(float(np.count_nonzero(np.abs(a - center) > half * (1 - 2 * margin))))
    elif upper is not None:
        values.append(float(np.count_nonzero(a > upper - margin)))
    elif lower is not None:
        values.append(float(np.count_nonzero(a < lower + margin)))
    return values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bounds", [(None, None), (0.0, 1.0), (-1.0, 1.0), (None, 6.0), (None, 0.0)])
def test_graph_summary_matches_a_numpy_reference_and_the_eager_summary(dtype, bounds):
    from gradwatch import stats
    from gradwatch.collect.traced import graph_summary

    g = torch.Generator().manual_seed(0)
    lower, upper = bounds
    for shape in [(7,), (16, 33), (2, 3, 5, 5), (0, 4)]:
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5)
        x = torch.where(x.abs() < 0.3, torch.zeros_like(x), x)  # exact zeros
        if lower is not None and upper is not None:
            x = x.clamp(lower, upper)
        x = x.to(dtype)
        got = graph_summary(x, lower, upper, 0.01)
        want = _reference(x.double().numpy(), lower, upper, 0.01)
        assert got.dtype == (torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype)
        assert got.tolist() == pytest.approx(want, rel=1e-5, abs=1e-4)
        if x.numel():  # a tensor under the sample size is sampled whole: the eager summary agrees
            eager = stats.activation_summary(x, lower, upper, 0.01, 1 << 15)  # (its spread: in half precision)
            assert got.tolist() == pytest.approx(eager.tolist(), rel=1e-4 if dtype in (torch.float32, torch.float64)
                                                 else 1e-2, abs=1e-4)
    x = torch.tensor([1.0, float("nan"), 2.0], dtype=dtype)
    assert not math.isfinite(graph_summary(x)[0].item())  # non-finite values show in the sum


@pytest.mark.slow
def test_graph_summary_traces_without_breaks_and_gives_the_eager_numbers():
    from gradwatch.collect.traced import graph_summary

    x = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)).relu()
    torch._dynamo.reset()
    compiled = torch.compile(graph_summary, backend="eager", fullgraph=True)  # fullgraph: a break raises
    assert compiled(x, None, 6.0, 0.01).tolist() == pytest.approx(graph_summary(x, None, 6.0, 0.01).tolist())


@pytest.mark.slow
def test_an_eval_pass_before_the_first_measured_step_compiles_nothing_when_it_comes_again():
    """The eval graph is traced before any step is measured; measuring every step afterwards must
    leave it valid (no function tap or module-stack hooks placed for a compiled model's forwards)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model, (x, y) = models.small_mlp(), models.batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = torch.compile(model, backend="eager")
    counters.clear()
    with GradWatch(model, optimizer=opt, steps="optimizer", every=1, quiet=True, strict=True) as watch:
        for it in range(4):
            if it % 2 == 0:
                model.eval()
                with torch.no_grad():
                    run(x)
                model.train()
            nn.functional.cross_entropy(run(x), y).backward()
            opt.step()
            opt.zero_grad()
            if it == 1:
                after_each_mode = _compile_counts()
        rep = watch.report()
    assert _compile_counts() == after_each_mode  # the second eval pass reuses the first one's graph
    assert rep.layers and all(ls.count > 0 for ls in rep.layers.values())


def test_eager_code_runs_directly_outside_compiled_code_and_with_dynamo_off_inside_it():
    """gradwatch's eager code (``hooks.eager``) costs one Python frame where nothing compiled runs,
    not torch.compiler.disable's wrapper; called from a compiled function it runs with Dynamo's
    frame callback off, so none of its frames is compiled."""
    from torch._C._dynamo.eval_frame import get_eval_frame_callback

    from gradwatch.collect.hooks import eager

    seen = []

    def body() -> None:
        seen.append(get_eval_frame_callback())
    run = eager(body)
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event == "call"
    sys.setprofile(count)
    try:
        run()
    finally:
        sys.setprofile(None)
    assert calls == 2 and seen == [None]  # the deciding frame and the body

    @torch.compile(backend="eager")
    def step(x: torch.Tensor) -> torch.Tensor:
        run()  # the graph breaks here; the body runs eagerly, Dynamo off
        return x + 1

    assert torch.equal(step(torch.ones(2)), torch.full((2,), 2.0))
    assert seen == [None, None]


def test_functional_taps_left_out_of_a_compiled_graph_are_said_once():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)))

    model = Net()
    x, y = models.batch()
    with pytest.warns(GradWatchWarning, match="functional=True.*not measured") as seen:
        with GradWatch(model, every=1, quiet=True, functional=True):
            run = torch.compile(model, backend="eager")
            for _ in range(3):
                nn.functional.cross_entropy(run(x), y).backward()
    assert sum("functional=True" in str(w.message) for w in seen) == 1
