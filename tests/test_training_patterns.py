"""The training code people really write: every number gradwatch reports is checked against a
hand computation, and the model computes bit for bit the same with and without gradwatch.

Each pattern is a function ``pattern(watched) -> Run``: it trains a small model for a few steps
(watched or not), records what it computed (outputs, gradients, parameters) and the numbers a
person would compute by hand. The tests check the numbers; one test runs every pattern twice
and compares the traces bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import math
import pickle
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gradwatch import ExplodingGradientWarning, GradWatch, GradWatchWarning, NonFiniteWarning, stats
from gradwatch.collect.gradients import GradientReader
from gradwatch.report import StepStats
from gradwatch.sinks.base import Sink
from tests import models


# ---------------------------------------------------------------- helpers
class Recorder(Sink):
    """Keeps every measured step's stats and every note."""

    def __init__(self) -> None:
        self.steps: Dict[int, StepStats] = {}
        self.notes: List[str] = []

    def on_step(self, data: Any, new_findings: Any) -> None:
        self.steps[data.stats.step] = data.stats

    def on_note(self, text: str) -> None:
        self.notes.append(text)


@dataclass
class Run:
    watch: Optional[GradWatch]
    rec: Recorder
    trace: List[Tensor] = field(default_factory=list)  # what the model computed, for bit-identity
    expected: Dict[Any, Any] = field(default_factory=dict)  # hand computations


@contextlib.contextmanager
def watching(model: nn.Module, watched: bool, **kwargs: Any) -> Iterator[Run]:
    rec = Recorder()
    if not watched:
        yield Run(None, rec)
        return
    kwargs.setdefault("every", 1)
    watch = GradWatch(model, quiet=True, strict=True, **kwargs)
    watch.sinks.sinks.append(rec)
    with watch:
        yield Run(watch, rec)


def norms(model: nn.Module) -> Dict[str, float]:
    """Per parameter: the L2 norm of its gradient now, in float64 (the hand computation)."""
    wide = {True: torch.complex128, False: torch.float64}
    return {n: torch.linalg.vector_norm(p.grad.detach().to(wide[p.is_complex()])).item()
            for n, p in model.named_parameters() if p.grad is not None}


def keep(run: Run, *tensors: Any) -> None:
    for t in tensors:
        if isinstance(t, Tensor):
            run.trace.append(t.detach().clone())
        elif isinstance(t, nn.Module):
            run.trace += [p.detach().clone() for p in t.parameters()]
            run.trace += [p.grad.detach().clone() for p in t.parameters() if p.grad is not None]


def seeded(make: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return make()


def check_params(st: StepStats, expected: Dict[str, float], rel: float = 1e-6) -> None:
    assert set(st.params) == set(expected)
    for name, value in expected.items():
        assert st.params[name].grad_norm == pytest.approx(value, rel=rel), name


X, Y = models.batch()


# ---------------------------------------------------------------- gradients read when final
def two_backward_passes(watched: bool) -> Run:
    """Two losses of one output, the first with retain_graph=True: the optimizer sees their sum."""
    model = seeded(models.small_mlp)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watching(model, watched) as run:
        for step in range(3):
            out = model(X)
            opt.zero_grad()
            F.cross_entropy(out, Y).backward(retain_graph=True)
            out.pow(2).mean().backward()
            run.expected[step] = norms(model)
            keep(run, out, model)
            opt.step()
    return run


def test_two_backward_passes_give_the_summed_gradient_the_optimizer_sees():
    run = two_backward_passes(True)
    assert sorted(run.rec.steps) == [0, 1, 2]
    for step, expected in run.expected.items():
        check_params(run.rec.steps[step], expected)
        total = math.sqrt(sum(v ** 2 for v in expected.values()))
        assert run.rec.steps[step].total_grad_norm == pytest.approx(total, rel=1e-6)


def accumulation_in_one_optimizer_step(watched: bool) -> Run:
    """Four micro-batches, one optimizer step: the norms are the accumulated gradient's."""
    model = seeded(models.small_mlp)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watching(model, watched, optimizer=opt, steps="optimizer") as run:
        for step in range(2):
            opt.zero_grad()
            for chunk in range(4):
                out = model(X[chunk::4])
                (F.cross_entropy(out, Y[chunk::4]) / 4).backward()
                keep(run, out)
            run.expected[step] = norms(model)
            keep(run, model)
            opt.step()
    return run


def test_accumulation_inside_one_step_reads_the_accumulated_gradient():
    run = accumulation_in_one_optimizer_step(True)
    for step, expected in run.expected.items():
        check_params(run.rec.steps[step], expected)
        assert run.rec.steps[step].layers["0"].calls == 4


def gradient_penalty(watched: bool) -> Run:
    """A WGAN-GP-style penalty: autograd.grad(create_graph=True), then loss.backward()."""
    model = seeded(models.small_mlp)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with watching(model, watched) as run:
        for step in range(3):
            x = X.clone().requires_grad_(True)
            out = model(x)
            (gx,) = torch.autograd.grad(out.logsumexp(-1).sum(), x, create_graph=True)
            loss = F.cross_entropy(out, Y) + gx.pow(2).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            run.expected[step] = norms(model)
            keep(run, out, gx, model)
            opt.step()
    return run


def test_gradient_penalty_step_reports_its_own_gradients():
    run = gradient_penalty(True)
    for step, expected in run.expected.items():
        check_params(run.rec.steps[step], expected)
    assert run.expected[1]["0.weight"] != pytest.approx(run.expected[2]["0.weight"], rel=1e-3)  # steps differ


def test_autograd_grad_alone_is_not_a_gradient_read():
    model = seeded(models.small_mlp)
    with watching(model, True) as run:
        x = X.clone().requires_grad_(True)
        torch.autograd.grad(model(x).sum(), x)  # writes no .grad
        assert all(p.grad is None for p in model.parameters())
    st = run.rec.steps[0]
    assert st.params == {} and st.layers["0"].count == 32 * 16  # activations only


def siamese(watched: bool, steps: str = "optimizer") -> Run:
    """Two forwards of one model per step (a contrastive pair), one backward."""
    model = seeded(models.small_mlp)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x2 = X.flip(0) + 0.1
    with watching(model, watched, steps=steps, optimizer=opt) as run:
        for step in range(2):
            a, b = model(X), model(x2)
            loss = (a - b).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            run.expected[step] = norms(model)
            run.expected["relu", step] = (F.relu(F.linear(X, model[0].weight, model[0].bias)),
                                          F.relu(F.linear(x2, model[0].weight, model[0].bias)))
            keep(run, a, b, model)
            opt.step()
    return run


def test_siamese_pairs_count_both_calls_and_read_gradients_once(monkeypatch):
    reads: List[int] = []
    real = GradientReader.read
    monkeypatch.setattr(GradientReader, "read", lambda self, *a, **k: reads.append(1) or real(self, *a, **k))
    run = siamese(True)
    for step in range(2):
        st = run.rec.steps[step]
        check_params(st, run.expected[step])
        relu = st.layers["1"]
        first, second = run.expected["relu", step]
        both = torch.cat([first, second])
        assert relu.calls == 2 and relu.count == 2 * 32 * 16  # both calls, one row
        assert relu.mean == pytest.approx(both.mean().item(), rel=1e-5)
    # Per step: one backward pass read at its end, and the read at optimizer.step().
    assert len(reads) == 2 * 2


def unfreezing(watched: bool) -> Run:
    """The first layer is frozen when the watch starts and unfrozen at step 2."""
    model = seeded(models.small_mlp)
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watching(model, watched) as run:
        for step in range(4):
            if step == 2:
                model[0].requires_grad_(True)
            out = model(X)
            opt.zero_grad()
            F.cross_entropy(out, Y).backward()
            run.expected[step] = norms(model)
            keep(run, out, model)
            opt.step()
    return run


def test_progressive_unfreezing_is_measured_from_the_step_it_gets_gradients():
    run = unfreezing(True)
    for step in range(4):
        check_params(run.rec.steps[step], run.expected[step])
    assert "0.weight" not in run.rec.steps[1].params and "0.weight" in run.rec.steps[2].params


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_any_floating_dtype_gets_gradient_statistics(dtype):
    run = dtypes(True, dtype)
    rel = 1e-9 if dtype == torch.float64 else 1e-5
    for step in range(2):
        check_params(run.rec.steps[step], run.expected[step], rel=rel)
        assert run.rec.steps[step].layers["1"].count == 32 * 16


def dtypes(watched: bool, dtype: torch.dtype = torch.float64) -> Run:
    model = seeded(models.small_mlp).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watching(model, watched) as run:
        for step in range(2):
            out = model(X.to(dtype))
            opt.zero_grad()
            F.cross_entropy(out.float(), Y).backward()
            run.expected[step] = norms(model)
            keep(run, out, model)
            opt.step()
    return run


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)
        self.big = nn.Parameter(torch.ones(4))

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) * self.big


def huge_gradients(watched: bool) -> Run:
    """Gradients of 1e19 in float32: their squares overflow float32, their norm does not."""
    model = seeded(Scaled)
    with watching(model, watched) as run:
        out = model(X)
        (out.sum() * 1e19 / out.detach().sum()).backward()  # d/d big: about 1e19
        run.expected[0] = norms(model)
        keep(run, out, model)
    return run


def test_huge_but_finite_gradients_are_not_non_finite():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExplodingGradientWarning)  # 1e19 is exploding, rightly
        warnings.simplefilter("error", NonFiniteWarning)
        run = huge_gradients(True)
    big = run.rec.steps[0].params["big"]
    assert 1e18 < big.grad_norm < 1e21 and big.grad_norm == pytest.approx(run.expected[0]["big"], rel=1e-5)
    assert not big.nonfinite and not [f for f in run.watch.findings if f.kind.value == "non_finite"]


# ---------------------------------------------------------------- custom outputs
@dataclass
class DataOut:
    logits: Tensor
    label: str = "dataclass"


class MappingOut(Mapping):
    """Like transformers' ModelOutput: a mapping with attribute access."""

    def __init__(self, **kw: Any) -> None:
        self._d = dict(kw)

    def __getitem__(self, key: str) -> Any:
        return self._d[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["_d"][key]
        except KeyError:
            raise AttributeError(key) from None


class TupleOut(NamedTuple):
    logits: Tensor
    label: str
    ids: Tensor


class CustomOut(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.body = models.small_mlp()

    def forward(self, x: Tensor) -> Any:
        y = self.body(x)
        if self.kind == "dataclass":
            return DataOut(y)
        if self.kind == "mapping":
            return MappingOut(logits=y, label="mapping", ids=torch.arange(3))
        return TupleOut(y, "namedtuple", torch.arange(3))


def custom_outputs(watched: bool, kind: str = "mapping") -> Run:
    model = seeded(lambda: CustomOut(kind))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watching(model, watched, include="*") as run:
        for step in range(2):
            out = model(X)
            opt.zero_grad()
            F.cross_entropy(out.logits, Y).backward()
            run.expected[step] = norms(model)
            keep(run, out.logits, model)
            opt.step()
    return run


@pytest.mark.parametrize("kind", ["dataclass", "mapping", "namedtuple"])
def test_custom_output_objects_still_give_gradients(kind):
    run = custom_outputs(True, kind)
    for step in range(2):
        st = run.rec.steps[step]
        check_params(st, run.expected[step])
        assert st.layers["(model)"].count == 32 * 3  # the float tensor inside the object
        assert st.layers["(model)"].output_grad_norm > 0


# ---------------------------------------------------------------- methods other than forward
class TwoTower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.text = nn.Sequential(nn.Embedding(20, 16), nn.ReLU(), nn.Linear(16, 4))

    def encode_a(self, x: Tensor) -> Tensor:
        return self.image(x)

    def encode_b(self, t: Tensor) -> Tensor:
        return self.text(t)


TOKENS = torch.arange(32) % 20


def two_tower(watched: bool, with_optimizer: bool = True) -> Run:
    """A CLIP-like model trained only through encode_a/encode_b: its forward is never called."""
    model = seeded(TwoTower)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs = dict(optimizer=opt, steps="optimizer") if with_optimizer else {}
    with watching(model, watched, **kwargs) as run:
        for step in range(4):
            a, b = model.encode_a(X), model.encode_b(TOKENS)
            loss = F.cross_entropy(a @ b.T, torch.arange(32))
            opt.zero_grad()
            loss.backward()
            run.expected[step] = norms(model)
            keep(run, a, b, model)
            opt.step()
    return run


def test_a_model_trained_through_other_methods_is_measured_with_the_optimizer():
    run = two_tower(True)
    assert run.watch.steps == 4  # one per optimizer.step()
    for step in range(4):
        st = run.rec.steps[step]
        check_params(st, run.expected[step])
        assert st.layers["image.1"].count == 32 * 16 and st.layers["text.1"].count == 32 * 16


def test_without_the_optimizer_it_says_once_how_to_count_steps():
    with pytest.warns(GradWatchWarning, match=r'optimizer=opt, steps="optimizer"') as record:
        run = two_tower(True, with_optimizer=False)
    assert len([r for r in record if "steps=" in str(r.message)]) == 1
    assert sum("steps=\"optimizer\"" in n for n in run.watch.report().notes) == 1


# ---------------------------------------------------------------- complex parameters
class Spectral(nn.Module):
    """A Fourier layer: a complex weight multiplies the spectrum."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.weight = nn.Parameter(torch.randn(5, dtype=torch.cfloat))
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.fft.irfft(torch.fft.rfft(self.lin(x)) * self.weight, n=8)
        return self.head(h)


def complex_params(watched: bool) -> Run:
    model = seeded(Spectral)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watching(model, watched) as run:
        for step in range(2):
            out = model(X)
            opt.zero_grad()
            F.cross_entropy(out, Y).backward()
            run.expected[step] = norms(model)
            run.expected["max", step] = model.weight.grad.abs().max().item()
            keep(run, out, model)
            opt.step()
    return run


def test_complex_parameters_get_magnitude_statistics_and_cost_others_nothing():
    run = complex_params(True)
    for step in range(2):
        st = run.rec.steps[step]
        check_params(st, run.expected[step], rel=1e-5)
        assert st.params["weight"].grad_max_abs == pytest.approx(run.expected["max", step], rel=1e-5)
        assert st.params["weight"].weight_norm > 0 and not st.params["weight"].nonfinite


# ---------------------------------------------------------------- parameters replaced after attach
def replaced_parameters(watched: bool) -> Run:
    """Built on the meta device and materialised with to_empty(); weights loaded with assign=True;
    the head re-created -- each after the watch started."""
    with torch.device("meta"):
        model = models.small_mlp()
    with watching(model, watched) as run:
        model.to_empty(device="cpu")
        torch.manual_seed(0)
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
        for step in range(6):
            if step == 2:
                model.load_state_dict(seeded(models.small_mlp).state_dict(), assign=True)
            if step == 4:
                model[4] = nn.Linear(16, 3)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            out = model(X)
            opt.zero_grad()
            F.cross_entropy(out, Y).backward()
            run.expected[step] = norms(model)
            keep(run, out, model)
            opt.step()
    return run


def test_parameters_replaced_after_attach_are_looked_up_when_read():
    run = replaced_parameters(True)
    for step in range(6):
        check_params(run.rec.steps[step], run.expected[step])


# ---------------------------------------------------------------- one row per call site
class Residual(nn.Module):
    """One nn.ReLU object at two call sites; the second is dead (its input is always negative)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.relu = nn.ReLU()
        with torch.no_grad():
            self.fc2.bias.fill_(-100.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.fc2(self.relu(self.fc1(x))) + x)


class ResNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Residual()
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(x) + x)


def reused_relu(watched: bool) -> Run:
    model = seeded(ResNetish)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watching(model, watched) as run:
        for step in range(2):
            out = model(X)
            opt.zero_grad()
            F.cross_entropy(out, Y).backward()
            h = F.relu(F.linear(X, model.block.fc1.weight, model.block.fc1.bias))
            run.expected[step] = (h.amax(0) <= 0).float().mean().item()  # units never active in the batch
            keep(run, out, model)
            opt.step()
    return run


@pytest.mark.filterwarnings("ignore::gradwatch.VanishingGradientWarning")  # the dead site passes no gradient
def test_a_reused_relu_gets_one_row_per_call_site_not_an_average():
    run = reused_relu(True)
    st = run.rec.steps[1]
    first, second = st.layers["block.relu#1"], st.layers["block.relu#2"]
    assert "block.relu" not in st.layers and first.calls == 1 and second.calls == 1
    assert second.dead_fraction == 1.0 and second.zero_fraction == 1.0
    assert first.dead_fraction == pytest.approx(run.expected[1]) and first.dead_fraction < 0.5


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(checkpoint(self.block, x, use_reentrant=False))


def checkpointed(watched: bool) -> Run:
    model = seeded(Checkpointed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watching(model, watched) as run:
        for step in range(2):
            out = model(X)
            opt.zero_grad()
            F.cross_entropy(out, Y).backward()
            run.expected[step] = norms(model)
            keep(run, out, model)
            opt.step()
    return run


def test_activation_checkpointing_counts_each_call_once():
    run = checkpointed(True)
    assert run.watch.steps == 2
    for step in range(2):
        st = run.rec.steps[step]
        check_params(st, run.expected[step])
        for name in ("block.0", "block.1", "block.2", "block.3"):
            assert st.layers[name].calls == 1 and st.layers[name].count == 32 * 16, name
        assert st.layers["block.3"].output_grad_norm > 0


class Recursive(nn.Module):
    """A root whose forward calls the root module again."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.act = nn.Tanh()

    def forward(self, x: Tensor, depth: int = 2) -> Tensor:
        h = self.act(self.lin(x))
        return h if depth == 0 else self(h, depth - 1)


def recursive(watched: bool) -> Run:
    model = seeded(Recursive)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watching(model, watched) as run:
        for step in range(3):
            out = model(X)
            opt.zero_grad()
            out.pow(2).mean().backward()
            run.expected[step] = norms(model)
            keep(run, out, model)
            opt.step()
    return run


def test_a_recursive_root_counts_one_step_per_training_step():
    run = recursive(True)
    assert run.watch.steps == 3 and sorted(run.rec.steps) == [0, 1, 2]
    for step in range(3):
        st = run.rec.steps[step]
        check_params(st, run.expected[step])
        assert [n for n in st.layers if n.startswith("lin")] == ["lin#1", "lin#2", "lin#3"]


# ---------------------------------------------------------------- dead units on the right axis
def test_unit_dim_rule():
    assert stats.unit_dim(1) is None
    assert stats.unit_dim(2) == 1  # (N, F)
    assert stats.unit_dim(3) == 2  # (N, L, F): the sequence convention
    assert stats.unit_dim(3, channels_first=True) == 1  # Conv1d / BatchNorm1d: (N, C, L)
    assert stats.unit_dim(4) == 1 and stats.unit_dim(5) == 1  # (N, C, H, W), (N, C, D, H, W)
    assert stats.unit_dim(4, channels_first=False) == 3  # a Linear over channels-last images
    y = torch.zeros(2, 3, 5)
    y[:, 1, 0] = 1.0
    assert stats.active_units(y, channels_first=True).tolist() == [False, True, False]
    assert stats.active_units(y).tolist() == [True, False, False, False, False]


def dead_first_unit(model: nn.Module) -> nn.Module:
    """Unit 0 of the first Linear/Conv gives -1 everywhere, so the ReLU after it is dead there."""
    layer = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)))
    with torch.no_grad():
        layer.weight[0].zero_()
        layer.bias[0] = -1.0
    return model


class Seq(nn.Module):
    """(N, L, F) sequences through a Linear: units are the last dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.fc(x))


def bn_then_relu() -> nn.Module:
    """BatchNorm1d over (N, C, L), its channel 0 shifted far below zero."""
    bn = nn.BatchNorm1d(4)
    with torch.no_grad():
        bn.bias[0] = -100.0
    return nn.Sequential(nn.Conv1d(3, 4, 3), bn, nn.ReLU())


@pytest.mark.parametrize("make, shape", [
    (lambda: dead_first_unit(nn.Sequential(nn.Linear(6, 4), nn.ReLU())), (64, 6)),
    (lambda: dead_first_unit(nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU())), (16, 3, 10)),  # (N, C, L)
    (lambda: dead_first_unit(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())), (16, 3, 6, 6)),
    (lambda: dead_first_unit(nn.Sequential(nn.Conv3d(3, 4, 3), nn.ReLU())), (4, 3, 5, 5, 5)),
    (bn_then_relu, (16, 3, 10)),
    (lambda: dead_first_unit(Seq()), (16, 7, 6)),  # (N, L, F): features, not positions
], ids=["linear", "conv1d", "conv2d", "conv3d", "batchnorm1d", "sequence"])
def test_dead_units_are_counted_on_the_right_axis(make, shape):
    # The data comes from a generator of its own: torch seeds its global generator anew in every
    # process, so data drawn at collection differed from run to run (and 16 random rows left a
    # second unit of the Linear without a positive output now and then).
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = make()
    relu = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)][0]
    with watching(model, True) as run:
        model(x).sum().backward()
    assert run.rec.steps[0].layers[relu].dead_fraction == pytest.approx(1 / 4)  # unit 0 of 4 units


# ---------------------------------------------------------------- surviving what users do
def gradwatch_traces(model: nn.Module) -> List[str]:
    """Every trace of gradwatch on ``model``: module hooks, parameter hooks, instance attributes."""
    found = []
    for name, m in model.named_modules():
        for key in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                    "_forward_hooks_always_called", "_forward_hooks_with_kwargs"):
            found += [f"{name}.{key}: {h!r}" for h in getattr(m, key, {}).values()
                      if "gradwatch" in type(h).__module__ or "gradwatch" in getattr(h, "__module__", "") or h is True]
        found += [f"{name}.{k}" for k in vars(m) if "gradwatch" in type(vars(m)[k]).__module__]
    for name, p in model.named_parameters():
        found += [f"{name}: {h!r}" for h in (p._post_accumulate_grad_hooks or {}).values()]
    return found


def _pickled(model: nn.Module) -> nn.Module:
    return pickle.loads(pickle.dumps(model))


def _saved(model: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(model, buf)
    assert b"gradwatch" not in buf.getvalue()  # loads where gradwatch is not installed
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES = {"deepcopy": copy.deepcopy, "pickle": _pickled, "torch.save": _saved,
          "AveragedModel": lambda m: torch.optim.swa_utils.AveragedModel(m).module,
          "ema": lambda m: copy.deepcopy(m).requires_grad_(False)}


@pytest.mark.parametrize("moment", ["between steps", "mid measured step"])
@pytest.mark.parametrize("how", list(COPIES))
def test_copies_of_a_watched_model_are_clean_and_compute_the_same(how, moment):
    model = seeded(models.small_cnn)
    x, y = torch.randn(4, 1, 12, 12), torch.randint(0, 3, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradWatch(model, every=1, quiet=True, strict=True, optimizer=opt, functional=True) as watch:
        models.train(model, 2, x, y)
        if moment == "mid measured step":
            out = model(x)  # the per-layer hooks are on now, the step is open
            assert gradwatch_traces(model)
        twin = COPIES[how](model)
        assert gradwatch_traces(twin) == []
        model.eval(), twin.eval()
        assert torch.equal(model(x), twin(x))
        seen = watch.steps
        models.train(twin.train().requires_grad_(True), 2, x, y)  # the copy trains unwatched
        assert watch.steps == seen
        with GradWatch(twin, every=1, quiet=True, strict=True) as other:  # and can be watched on its own
            models.train(twin, 1, x, y)
        assert other.report().layers["1"].count > 0 and gradwatch_traces(twin) == []
    assert gradwatch_traces(model) == [] and all_hooks(model) == 0


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_always_called)
               for m in model.modules())


def test_a_copied_hook_is_a_no_op_that_removes_itself():
    """Copies that bypass the module's __getstate__ (a hook dict copied by hand) get inert hooks."""
    model = seeded(models.small_mlp)
    with GradWatch(model, every=1, quiet=True, strict=True):
        model(X)  # mid measured step: root and layer hooks
        twin = seeded(models.small_mlp)
        for a, b in zip(model.modules(), twin.modules()):
            for key in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_always_called"):
                getattr(b, key).update(copy.deepcopy(getattr(a, key)))
        assert all_hooks(twin) > 0
        assert torch.equal(twin(X), model(X))
    assert all_hooks(twin) == 0 and all_hooks(model) == 0


@pytest.mark.parametrize("every", [1, None])  # None: the default schedule, unmeasured steps from step 10
@pytest.mark.parametrize("with_optimizer", [False, True])
def test_a_forgotten_watch_never_keeps_the_model_alive(with_optimizer, every):
    model = models.small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = GradWatch(model, every=every, quiet=True, optimizer=opt if with_optimizer else None).attach()
    models.train(model, 12)
    model(X)  # mid measured step
    ref, watch_ref = weakref.ref(model), weakref.ref(watch)
    del model, watch, opt
    gc.collect()
    assert ref() is None and watch_ref() is None


class WithScripted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.scripted = torch.jit.script(nn.Sequential(nn.Linear(16, 16), nn.Tanh()))
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.scripted(self.stem(x)))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_a_torchscript_child_is_skipped_with_one_note_and_the_rest_is_measured():
    model = seeded(WithScripted)
    with pytest.warns(GradWatchWarning, match=r"scripted of WithScripted is TorchScript.*2 layer\(s\)") as record:
        with watching(model, True, functional=True) as run:
            for _ in range(3):
                out = model(X)
                model.zero_grad()
                F.cross_entropy(out, Y).backward()
                run.expected = norms(model)
    assert len([r for r in record if "TorchScript" in str(r.message)]) == 1
    st = run.rec.steps[2]
    assert {"stem.0", "stem.1", "head"} <= set(st.layers) and not any(n.startswith("scripted") for n in st.layers)
    check_params(st, run.expected)  # the scripted child's parameters too
    assert sum("TorchScript" in n for n in run.rec.notes) == 1


# ---------------------------------------------------------------- non-finite values at the step they appear
class NanGrad(torch.autograd.Function):
    """Identity forward; a NaN gradient backward (a sqrt at 0, a norm of a zero vector)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        return g * float("nan")


class Planted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act1 = nn.Linear(8, 16), nn.Tanh()
        self.fc2, self.nan, self.act2 = nn.Linear(16, 16), models.NanAt(), nn.Tanh()
        self.head = nn.Linear(16, 3)
        self.grad_nan = False

    def forward(self, x: Tensor) -> Tensor:
        h = self.act1(self.fc1(x))
        if self.grad_nan:
            h = NanGrad.apply(h)
        return self.head(self.act2(self.nan(self.fc2(h))))


def nonfinite_at(step_of_nan: int, where: str, watched: bool = True) -> Run:
    model = seeded(Planted)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradWatchWarning)
        with watching(model, watched, every=None) as run:  # the default schedule: steps 12, 13 not measured
            for step in range(25):
                model.nan.armed = where == "activation" and step >= step_of_nan
                model.grad_nan = where == "gradient" and step >= step_of_nan
                out = model(X)
                opt.zero_grad()
                F.cross_entropy(out, Y).backward()
                keep(run, out, model)
                opt.step()
    return run


def nan_between_measured_steps(watched: bool) -> Run:
    run = nonfinite_at(12, "activation", watched)
    run.trace += nonfinite_at(13, "gradient", watched).trace
    return run


def test_a_non_finite_activation_is_reported_at_its_own_step_naming_the_first_layer():
    run = nonfinite_at(12, "activation")
    watch, rec = run.watch, run.rec
    assert not watch.schedule.measures(12)  # by the schedule
    first = [f for f in watch.findings if f.kind.value == "non_finite"][0]
    assert (first.step, first.layer) == (12, "nan")
    st = rec.steps[12]  # measured because of the NaN: the outputs kept until the forward returned, in forward order
    assert [n for n, s in st.layers.items() if s.nonfinite][0] == "nan"
    assert st.layers["act1"].count == 32 * 16 and not st.layers["act1"].nonfinite
    # fc1's output and the NaN's, which nothing but gradwatch held once the tanh after each had consumed them,
    # were let go during the forward as without gradwatch: fc1 is not in that step's record, "nan" is, as
    # non-finite from the tanh it fed (a tanh makes no NaN of finite values). fc2's fed a module of the user's,
    # which may make a NaN of anything: it was kept, and measured finite.
    assert "fc1" not in st.layers and not st.layers["fc2"].nonfinite and st.layers["fc2"].count == 32 * 16
    gone = st.layers["nan"]
    assert gone.count == 32 * 16 and math.isnan(gone.mean) and math.isnan(gone.zero_fraction)
    assert 11 not in rec.steps  # steps before it stay unmeasured


def test_between_measured_steps_the_outputs_only_gradwatch_holds_are_let_go_as_without_it():
    """What is alive at the end of an unmeasured forward is what is alive without gradwatch: a Linear's
    output that a ReLU consumed (no backward formula saves it) is freed during the forward, the ReLUs'
    (saved by the next Linear) live on, and so do outputs the forward itself holds in variables."""
    class Held(nn.Module):  # keeps its first Linear's output in a variable until it returns
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act1, self.fc2, self.act2, self.fc3 = (nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16),
                                                                   nn.ReLU(), nn.Linear(16, 3))

        def forward(self, x: Tensor) -> Tensor:
            h = self.fc1(x)
            return self.fc3(self.act2(self.fc2(self.act1(h)))) + 0 * h.sum()

    def alive_at_the_end(model: nn.Module, watched: bool) -> Dict[str, bool]:
        refs: Dict[str, Any] = {}
        found: Dict[str, bool] = {}
        names = [n for n, m in model.named_children()]
        with GradWatch(model, every=10 ** 6, quiet=True) if watched else contextlib.nullcontext():
            for step in range(2):  # step 0 is measured, step 1 is not
                handles = [m.register_forward_hook(lambda m, a, o, n=n: refs.__setitem__(n, weakref.ref(o)))
                           for n, m in model.named_children()]
                last = getattr(model, names[-1]).register_forward_hook(
                    lambda m, a, o: found.update({n: refs[n]() is not None for n in names[:-1]}))
                out = model(X)
                for h in handles + [last]:
                    h.remove()
                F.cross_entropy(out, Y).backward()
        return found

    for make in (lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)),
                 Held):
        plain = alive_at_the_end(seeded(make), watched=False)
        assert alive_at_the_end(seeded(make), watched=True) == plain
        assert not all(plain.values()) and any(plain.values())  # some freed, some saved: the test tells them apart
    assert alive_at_the_end(seeded(Held), watched=True)["fc1"]  # held by the forward: kept, and measurable


def planted_nan(model: nn.Module, step_of_nan: int, plant: Callable[[], None]) -> GradWatch:
    """``model`` watched at the defaults for two steps past ``step_of_nan``, where ``plant()`` puts a NaN
    into a weight (under no_grad) before the step's forward."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradWatchWarning)
        with GradWatch(model, quiet=True) as watch:
            for step in range(step_of_nan + 2):
                if step == step_of_nan:
                    with torch.no_grad():
                        plant()
                F.cross_entropy(model(X), Y).backward()
    return watch


def test_a_non_finite_output_that_fed_a_residual_sum_is_kept_and_named_at_its_own_step():
    """An output no backward formula saves but that fed no known activation (a residual branch's, summed with
    its input) is kept between measured steps: it alone can say where the values arose."""
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act1, self.fc2 = nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16)
            self.fc3, self.act3, self.head = nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = self.act1(self.fc1(x))
            return self.head(self.act3(self.fc3(h + self.fc2(h))))

    model = seeded(Residual)
    watch = planted_nan(model, 12, lambda: model.fc2.bias.__setitem__(0, float("nan")))
    assert not watch.schedule.measures(12)
    first = [f for f in watch.findings if f.kind.value == "non_finite"][0]
    assert (first.step, first.layer) == (12, "fc2")


def test_a_non_finite_gradient_is_reported_at_its_own_step_naming_the_first_parameter():
    run = nonfinite_at(13, "gradient")
    watch, rec = run.watch, run.rec
    assert not watch.schedule.measures(13)
    first = [f for f in watch.findings if f.kind.value == "non_finite"][0]
    assert (first.step, first.layer) == (13, "fc1")
    st = rec.steps[13]
    assert st.params["fc1.weight"].nonfinite and not st.params["head.weight"].nonfinite
    assert 12 not in rec.steps
    # Begun in backward, the step has no layer outputs by design: no blind spot to report.
    assert not [n for n in watch.report().notes if "watched layers being seen" in n]


class NanGradAt(nn.Module):
    """Identity forward; during backward, the gradient through it is NaN while ``armed``."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: Tensor) -> Tensor:
        return NanGrad.apply(x) if self.armed else x


def test_a_non_finite_gradient_between_measured_steps_names_the_parameter_nearest_the_output():
    """A NaN that arises in backward at fc2's output spreads to fc2's and fc1's gradients, not to the head's:
    the step (not measured by the schedule) names fc2, nearest the output, as a measured step names the layer
    whose output gradient turned non-finite first; and under -W error nothing of it is lost."""
    def run(step_of_nan: int) -> GradWatch:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), NanGradAt(), nn.Tanh(), nn.Linear(16, 3))
        raised: List[Warning] = []
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            watch = GradWatch(model, quiet=True, include=[nn.Linear, nn.Tanh]).attach()
            try:
                for step in range(16):
                    model[3].armed = step == step_of_nan
                    try:
                        F.cross_entropy(model(X), Y).backward()
                    except GradWatchWarning as w:
                        raised.append(w)
            finally:
                watch.detach()
        assert [type(w) for w in raised] == [NonFiniteWarning]  # no blind-spot warning beside it
        return watch

    for step_of_nan in (13, 5):  # not measured by the schedule, and measured
        watch = run(step_of_nan)
        first = [f for f in watch.findings if f.kind.value == "non_finite"][0]
        assert (first.step, first.layer) == (step_of_nan, "2"), step_of_nan
    assert not [n for n in watch.report().notes if "watched layers being seen" in n]


def test_on_an_accelerator_the_step_is_named_a_step_later(monkeypatch):
    """On a device the flag is read a step late (simulated here: a finished event on the CPU)."""
    from gradwatch.collect import finite

    real = finite.Sentinel.check

    class Finished:
        def query(self) -> bool:
            return True

    def deferred(self: Any, value: Any, step: Optional[int], what: str) -> Optional[bool]:
        if real(self, value, step, what) is False:
            self.pending.append((step, what, torch.tensor(True), Finished()))
        return None

    monkeypatch.setattr(finite.Sentinel, "check", deferred)
    run = nonfinite_at(12, "activation")
    notes = [n for n in run.watch.report().notes if "first appeared" in n]
    assert len(notes) == 1 and "at step 12, in the model's output" in notes[0] and "step 13 is measured" in notes[0]
    assert 12 not in run.rec.steps and run.rec.steps[13].layers["nan"].nonfinite


def test_the_finiteness_check_is_cheap_and_changes_nothing_on_healthy_steps():
    model = seeded(models.small_mlp)
    with watching(model, True, every=5) as run:
        models.train(model, 12)
    assert sorted(run.rec.steps) == [0, 5, 10]


def test_the_sentinel_check_itself():
    from gradwatch.collect.finite import Sentinel

    s = Sentinel()
    big = torch.full((4,), 60000.0, dtype=torch.float16)  # its fp16 sum overflows; it is finite
    assert s.check(big, 0, "out") is True
    assert s.check({"a": torch.ones(3), "b": torch.tensor([1.0, math.inf])}, 0, "out") is False
    assert s.check(torch.tensor([math.nan]), 0, "out") is False
    assert s.check((torch.arange(3), "text"), 0, "out") is None  # nothing floating to check
    assert s.poll() is None and not s.pending


# ---------------------------------------------------------------- what a step is
def rollouts(watched: bool, with_rollouts: bool = True) -> Run:
    """A policy in training mode: before each update two rollouts, under torch.no_grad() and
    torch.inference_mode(); in each update a target from the same network under no_grad. A deep
    sigmoid network, whose gradients vanish."""
    policy = seeded(lambda: models.mlp(nn.Sigmoid, (8,) + (32,) * 8 + (3,)))
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    with watching(policy, watched, every=None) as run:  # the default schedule: steps 0-9 measured
        for update in range(12):
            if with_rollouts:
                with torch.no_grad():
                    keep(run, policy(X))
                with torch.inference_mode():
                    acted = policy(X * 0.5)
                keep(run, acted)
            out = policy(X)
            with torch.no_grad():
                target = policy(X.flip(0)).softmax(-1)
            loss = F.cross_entropy(out, target)
            opt.zero_grad()
            loss.backward()
            run.expected[update] = norms(policy)
            keep(run, out, target, policy)
            opt.step()
    return run


def test_forwards_with_autograd_off_are_no_steps():
    run = rollouts(True)
    # 12 updates, 12 steps: the 24 rollouts and the 12 target forwards open and close none.
    assert run.watch.steps == 12 and sorted(run.rec.steps) == list(range(10))
    for step in range(10):
        st = run.rec.steps[step]
        check_params(st, run.expected[step])  # the update's gradients, not a rollout's absence of them
        assert st.layers["1"].calls == 1 and st.layers["1"].count == 32 * 32  # the update's forward only
    vanishing = [f.step for f in run.watch.findings if f.kind.value == "vanishing"]
    plain = rollouts(True, with_rollouts=False)
    assert vanishing and vanishing == [f.step for f in plain.watch.findings if f.kind.value == "vanishing"]
    assert not any("no parameter gradient" in n or "had a parameter gradient" in n for n in run.rec.notes)


class Generator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 8)

    def forward(self, z: Tensor) -> Tensor:
        return self.lin(z)


def gan(watched: bool) -> Run:
    """The discriminator is watched. Its update sees a real and a fake batch, then one backward;
    the generator's update runs it once more, frozen, with a backward through it."""
    disc = seeded(lambda: models.mlp(nn.ReLU, (8, 16, 16, 1)))
    gen = Generator()
    opt_d, opt_g = torch.optim.SGD(disc.parameters(), lr=0.1), torch.optim.SGD(gen.parameters(), lr=0.1)
    z = torch.randn(32, 4, generator=torch.Generator().manual_seed(2))
    real, fake = torch.ones(32, 1), torch.zeros(32, 1)
    with watching(disc, watched) as run:
        for it in range(3):
            d_real, d_fake = disc(X), disc(gen(z).detach())
            loss_d = F.binary_cross_entropy_with_logits(d_real, real) + F.binary_cross_entropy_with_logits(d_fake, fake)
            opt_d.zero_grad()
            loss_d.backward()
            run.expected[2 * it] = norms(disc)
            hidden = [F.relu(F.linear(x, disc[0].weight, disc[0].bias)) for x in (X, gen(z))]
            run.expected["relu", 2 * it] = torch.cat(hidden).mean().item()
            keep(run, d_real, d_fake, disc)
            opt_d.step()
            disc.requires_grad_(False)
            d_gen = disc(gen(z))
            opt_g.zero_grad()
            F.binary_cross_entropy_with_logits(d_gen, real).backward()
            disc.requires_grad_(True)
            keep(run, d_gen, gen)
            opt_g.step()
    return run


def test_a_gan_discriminator_step_holds_both_of_its_forwards_and_their_backward():
    run = gan(True)
    # Per iteration: the discriminator's step (real + fake, one backward) and the generator's step
    # (one forward of the frozen discriminator, a backward through it): 3 iterations, 6 steps.
    assert run.watch.steps == 6 and sorted(run.rec.steps) == list(range(6))
    for it in range(3):
        mine, theirs = run.rec.steps[2 * it], run.rec.steps[2 * it + 1]
        check_params(mine, run.expected[2 * it])
        assert mine.layers["1"].calls == 2 and mine.layers["1"].count == 2 * 32 * 16
        assert mine.layers["1"].mean == pytest.approx(run.expected["relu", 2 * it], rel=1e-5)
        assert theirs.layers["1"].calls == 1 and theirs.params == {}  # frozen: no gradient of its own
    # Half the measured steps have no parameter gradient, and that is no blind spot.
    assert not any("parameter gradient" in n for n in run.rec.notes)


def test_siamese_pairs_make_one_step_in_the_default_step_mode():
    run = siamese(True, steps="forward")
    assert run.watch.steps == 2  # 2 iterations of two forwards and one backward
    for step in range(2):
        st = run.rec.steps[step]
        check_params(st, run.expected[step])
        assert st.layers["1"].calls == 2 and st.layers["1"].count == 2 * 32 * 16


def summed_micro_batches(watched: bool) -> Run:
    """Four micro-batches per update whose losses are summed before one backward."""
    model = seeded(models.small_mlp)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watching(model, watched) as run:
        for step in range(3):
            outs = [model(X[chunk::4]) for chunk in range(4)]
            loss = sum(F.cross_entropy(out, Y[chunk::4]) for chunk, out in enumerate(outs)) / 4
            opt.zero_grad()
            loss.backward()
            run.expected[step] = norms(model)
            keep(run, *outs, model)
            opt.step()
    return run


def test_gradient_accumulation_in_the_default_step_mode():
    run = summed_micro_batches(True)
    assert run.watch.steps == 3  # four forwards, one backward: one step each
    for step in range(3):
        check_params(run.rec.steps[step], run.expected[step])
        assert run.rec.steps[step].layers["1"].calls == 4 and run.rec.steps[step].layers["1"].count == 32 * 16
    # A backward per micro-batch ends a step per micro-batch: 2 updates of 4 are 8 steps here
    # (steps="optimizer" makes them 2, see test_after_n_optimizer_steps_the_count_is_n).
    model = seeded(models.small_mlp)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watching(model, True) as each:
        for _ in range(2):
            opt.zero_grad()
            for chunk in range(4):
                (F.cross_entropy(model(X[chunk::4]), Y[chunk::4]) / 4).backward()
            opt.step()
    assert each.watch.steps == 8


def test_a_loop_that_never_calls_backward_still_advances():
    from gradwatch.collect.forwards import MAX_FORWARDS

    model = seeded(models.small_mlp)
    with watching(model, True) as run:
        for _ in range(10):
            model(X).argmax(-1)  # the output is dropped: no backward can follow it
        assert run.watch.steps == 10
        kept = [model(X) for _ in range(2 * MAX_FORWARDS + 1)]  # alive, never backpropagated
        assert run.watch.steps == 10 + 3  # at most MAX_FORWARDS forwards a step
    assert len(kept) == 2 * MAX_FORWARDS + 1 and run.rec.steps[11].layers["1"].calls == MAX_FORWARDS


def test_a_model_checkpointed_whole_with_reentrant_checkpointing_is_still_trained_forwards():
    """Reentrant checkpointing runs the forward with autograd off (its input requires gradients)
    and again during backward: one step per update, its gradients read."""
    model = seeded(models.small_mlp)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watching(model, True) as run:
        for step in range(3):
            out = checkpoint(model, X.clone().requires_grad_(True), use_reentrant=True)
            opt.zero_grad()
            F.cross_entropy(out, Y).backward()
            run.expected[step] = norms(model)
            opt.step()
    assert run.watch.steps == 3
    for step in range(3):
        check_params(run.rec.steps[step], run.expected[step])
        assert run.rec.steps[step].layers["1"].calls == 1  # the recomputation is not counted again


@pytest.mark.parametrize("mode", ["optimizer", "manual"])
def test_after_n_optimizer_steps_the_count_is_n(mode):
    model = seeded(models.small_mlp)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watching(model, True, optimizer=opt, steps=mode) as run:
        assert run.watch.steps == 0
        for n in range(1, 4):
            for chunk in range(4):  # four micro-batches make one step
                (F.cross_entropy(model(X[chunk::4]), Y[chunk::4]) / 4).backward()
            assert run.watch.steps == n - 1
            opt.step()
            opt.zero_grad()
            if mode == "manual":
                run.watch.step()
            assert run.watch.steps == n
    assert sorted(run.rec.steps) == [0, 1, 2] and run.watch.report().to_dict()["steps_seen"] == 3
    assert all(run.rec.steps[s].layers["1"].calls == 4 for s in range(3))


@pytest.mark.parametrize("forwards", [9, 10])
def test_the_no_gradient_note_waits_for_ten_measured_steps_none_with_a_gradient(forwards):
    from gradwatch.collect.blind import NO_GRADIENT_AFTER

    model = seeded(models.small_mlp)
    with watching(model, True) as run:
        for _ in range(forwards):
            model(X).sum()  # dropped: a step each, measured, no backward
    notes = [n for n in run.rec.notes if "parameter gradient" in n]
    assert NO_GRADIENT_AFTER == 10 and run.watch.steps == forwards
    assert len(notes) == (forwards >= NO_GRADIENT_AFTER)
    assert all(f"first {NO_GRADIENT_AFTER} measured steps" in n for n in notes)


# ---------------------------------------------------------------- the same numbers, watched or not
PATTERNS = [two_backward_passes, accumulation_in_one_optimizer_step, gradient_penalty, siamese, unfreezing, dtypes,
            huge_gradients, custom_outputs, two_tower, complex_params, replaced_parameters, reused_relu,
            checkpointed, recursive, nan_between_measured_steps, rollouts, gan, summed_micro_batches]


@pytest.mark.parametrize("pattern", PATTERNS, ids=[p.__name__ for p in PATTERNS])
def test_outputs_and_gradients_are_bit_identical_with_and_without_gradwatch(pattern):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradWatchWarning)
        plain, watched = pattern(False), pattern(True)
    assert len(plain.trace) == len(watched.trace) > 0
    for a, b in zip(plain.trace, watched.trace):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))


def test_layers_called_outside_the_models_forward_are_measured_only_in_training_calls():
    """A LightningModule-like wrapper whose steps call ``self.net(x)``: the root's forward never runs, and an
    evaluation call of the layers (eval mode, autograd off) inside a measured step is no part of it."""
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

    torch.manual_seed(0)
    model = Wrapper()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradWatch(model, every=1, quiet=True, optimizer=opt, steps="optimizer") as watch:
        rec = Recorder()
        watch.sinks.sinks.append(rec)
        for _ in range(3):
            F.cross_entropy(model.net(X), Y).backward()
            model.eval()
            with torch.no_grad():
                model.net(X * 100)  # validation: not measured
            model.train()
            opt.step()
            opt.zero_grad()
    for st in rec.steps.values():
        assert sorted(st.layers) == ["net.0", "net.1", "net.2"]
        assert all(ls.count == X.shape[0] * (16 if n != "net.2" else 3) for n, ls in st.layers.items())
    assert abs(rec.steps[1].layers["net.1"].mean) < 0.9  # no saturated validation batch mixed in


def test_a_non_finite_output_whose_layers_kept_nothing_is_named_at_the_models_output():
    """Under activation checkpointing (as inside a compiled graph) no layer output is kept between measured
    steps: a NaN found in the model's output at such a step is reported there, at the model's output, and
    not as the gradients it spreads to."""
    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))

        def forward(self, x: Tensor) -> Tensor:
            return checkpoint(self.body, x, use_reentrant=False)

    model = seeded(Checkpointed)
    watch = planted_nan(model, 13, lambda: model.body[2].weight.__setitem__((0, 0), float("nan")))
    assert not watch.schedule.measures(13)
    first = [f for f in watch.findings if f.kind.value == "non_finite"][0]
    assert (first.step, first.layer, first.condition) == (13, "(model)", "forward")
    assert "not known" in first.message
    assert not [n for n in watch.report().notes if "watched layers being seen" in n]
