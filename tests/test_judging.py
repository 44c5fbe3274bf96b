"""Healthy training that must stay silent, and causes that must be named right (issue 11),
through the public API on small real models: a fast subset of benchmarks/accuracy.py."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from gradwatch import FindingKind, GradWatch, GradWatchWarning, SaturationWarning
from gradwatch.layers import ActivationKind, activation_spec, is_elementwise, select_layers
from tests import models


def silent_run(model, steps, step_fn, **watch_kw):
    """Train under GradWatch with gradwatch's warnings as errors; returns the watch."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradWatchWarning)
        with GradWatch(model, quiet=True, strict=True, **watch_kw) as watch:
            for i in range(steps):
                step_fn(i)
    assert watch.findings == []
    return watch


# ---------------------------------------------------------------- mixed precision with a GradScaler
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grad_scaler_gradients_are_read_unscaled_and_skipped_steps_are_not_findings(dtype):
    torch.manual_seed(0)
    model = models.small_mlp(width=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    # growth_interval=2 with a large initial scale: the scale keeps overflowing and backing off
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24, growth_interval=2)
    x, y = models.batch(64)
    scales, unscaled = [], []

    def step(i):
        with torch.autocast("cpu", dtype=dtype):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scales.append(scaler.get_scale())
        unscaled.append(model[0].weight.grad.norm().item() / scales[-1])
        scaler.step(opt)
        scaler.update()

    watch = silent_run(model, 30, step, every=1, scaler=scaler)
    assert len(set(scales)) > 2  # the scale moved: skipped steps and growth happened
    last = watch.report().params["0.weight"].grad_norm
    assert last == pytest.approx(unscaled[-1], rel=1e-5)


def test_grad_scaler_without_the_option_still_raises_no_false_alarm():
    torch.manual_seed(0)
    model = models.small_mlp(width=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24, growth_interval=2)
    x, y = models.batch(64)

    def step(i):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    silent_run(model, 30, step, every=1)


def test_scaler_option_is_validated():
    with pytest.raises(TypeError, match="scaler must be the torch.amp.GradScaler"):
        GradWatch(models.small_mlp(), scaler=object())


# ---------------------------------------------------------------- slope saturation only for elementwise modules
class HandLayerNorm(nn.Module):
    def forward(self, x):
        return (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True, unbiased=False) + 1e-5).sqrt()


class MeanPool(nn.Module):  # aggregation written by hand: same shape out, every element mixes its row
    def forward(self, x):
        return x.mean(-1, keepdim=True).expand_as(x)


class Gate(nn.Module):
    def forward(self, value, gate):
        return value * torch.sigmoid(gate)


class Positive(nn.Module):  # an elementwise parametrization: still not an activation
    def forward(self, w):
        return w.exp()


def test_only_modules_shown_elementwise_are_generic_activations():
    for module in (models.Sigmoid(), models.Swish(), models.Relu()):
        assert is_elementwise(module) and activation_spec(module).kind is ActivationKind.GENERIC
    for module in (HandLayerNorm(), MeanPool(), Gate(), nn.Softmax(-1)):
        assert not is_elementwise(module) and activation_spec(module).kind is ActivationKind.NONE
    lin = nn.Linear(4, 4)
    parametrize.register_parametrization(lin, "weight", Positive())
    spec = {layer.name: layer.spec.kind for layer in select_layers(nn.Sequential(lin, models.Sigmoid()))}
    assert spec["0.parametrizations.weight.0"] is ActivationKind.NONE and spec["1"] is ActivationKind.GENERIC


def test_the_probe_leaves_the_users_random_stream_alone():
    class Noisy(nn.Module):
        def forward(self, x):
            return x + torch.randn_like(x)
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    assert not is_elementwise(Noisy())  # not deterministic: not an activation function
    assert torch.equal(torch.rand(3), expected)


def test_normalisation_and_two_input_modules_written_by_hand_are_silent():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.value, self.gate_proj = nn.Linear(8, 32), nn.Linear(8, 32)
            self.gate, self.norm, self.pool = Gate(), HandLayerNorm(), MeanPool()
            self.head = nn.Linear(32, 3)

        def forward(self, x):
            h = self.gate(self.value(x), self.gate_proj(x))
            return self.head(self.norm(h + self.pool(h)))

    torch.manual_seed(0)
    model = Net()
    x, y = models.batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(i):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    watch = silent_run(model, 12, step, every=1)
    assert all(watch.report().layers[n].saturated_fraction is None for n in ("gate", "norm", "pool"))


# ---------------------------------------------------------------- output activations, zero-initialised heads
def test_sigmoid_output_with_bce_is_not_saturation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.Sigmoid())
    x = (torch.rand(64, 16, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)

    def step(i):
        opt.zero_grad()
        F.binary_cross_entropy(model(x), x).backward()
        opt.step()

    watch = silent_run(model, 60, step, every=5)
    assert watch.report().layers["3"].saturated_fraction > 0.25  # saturated, as a confident output is


def test_zero_initialised_head_is_not_vanishing():
    torch.manual_seed(0)
    model = models.mlp(nn.ReLU, (8, 64, 64, 64, 3))
    nn.init.zeros_(model[-1].weight)
    nn.init.zeros_(model[-1].bias)
    x, y = models.batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def step(i):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    silent_run(model, 12, step, every=1)


# ---------------------------------------------------------------- the cause, named
def test_learning_rate_blow_up_is_named_with_learning_rate_advice():
    torch.manual_seed(0)
    model = models.mlp(nn.Sigmoid, (32, 128, 128, 128, 10))
    x, y = models.batch(64, 32, 10)
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with GradWatch(model, every=1, quiet=True) as watch:
            for _ in range(30):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
    f, *later = watch.findings
    assert (f.kind, f.condition) == (FindingKind.LEARNING_RATE, "updates"), [str(f) for f in watch.findings]
    assert "learning rate" in f.advice and "ReLU" not in f.advice and "learning rate" in f.message
    # what it left behind once the weights stopped growing (saturated sigmoids) is named with it
    assert all(g.kind is FindingKind.SATURATION and f"after the learning-rate blow-up at step {f.step}" in g.message
               for g in later), [str(g) for g in later]


def test_healthy_default_schedule_runs_stay_silent():
    for act in (nn.ReLU, nn.Tanh, nn.GELU):
        torch.manual_seed(0)
        model = models.mlp(act, (8, 64, 64, 64, 3))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x, y = models.batch()

        def step(i):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

        watch = silent_run(model, 40, step)
        assert not math.isnan(watch.report().params["0.weight"].grad_norm)


# ---------------------------------------------------------------- judging over time, on real models
def _train(model, steps, step_fn, **watch_kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradWatch(model, quiet=True, **watch_kw) as watch:
            for i in range(steps):
                step_fn(i)
    return watch, caught


def test_a_forward_without_backward_at_the_end_does_not_hide_an_exploding_gradient():
    torch.manual_seed(0)
    model = models.small_mlp()
    x, y = models.batch()
    norms = []

    def step(i):
        out = model(x)
        if i == 0:  # a gradient of about 1e18, then one more forward with no backward
            (F.cross_entropy(out, y) * 1e19).backward()
            norms.append(math.sqrt(sum(p.grad.norm().item() ** 2 for p in model.parameters())))

    watch, _ = _train(model, 2, step, every=1)
    assert [(f.kind, f.condition, f.step) for f in watch.findings] == [(FindingKind.EXPLODING, "size", 0)]
    assert watch.findings[0].value == pytest.approx(norms[0], rel=1e-4)


def test_non_finite_gradients_in_fp32_without_a_scaler_are_reported_at_their_step():
    torch.manual_seed(0)
    model = models.small_mlp()
    x, y = models.batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def step(i):
        out = model(x)
        loss = F.cross_entropy(out, y)
        if i == 3:  # finite forward (sqrt(0) = 0), NaN in backward (0 * the infinite slope of sqrt at 0)
            loss = loss + torch.sqrt(out[:, :1].relu() * 0).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    watch, _ = _train(model, 8, step, every=1)
    assert [(f.kind, f.condition, f.step) for f in watch.findings] == [(FindingKind.NON_FINITE, "backward", 3)]
    assert not any("skipped" in n for n in watch.report().notes)


def test_a_corrupt_batch_is_reported_at_its_step_once_and_said_cleared():
    torch.manual_seed(0)
    model = models.mlp(nn.ReLU, (8, 64, 64, 3))
    x, y = models.batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    norms = []

    def step(i):
        loss = F.cross_entropy(model(x * 1000 if i == 8 else x), y)  # unnormalised inputs at step 8
        opt.zero_grad()
        loss.backward()
        norms.append(math.sqrt(sum(p.grad.norm().item() ** 2 for p in model.parameters())))
        opt.step()

    watch, _ = _train(model, 12, step, every=1)
    assert [(f.kind, f.condition, f.step, f.layer) for f in watch.findings] == [
        (FindingKind.EXPLODING, "jump", 8, "0")]
    # the jump over the median of the five measured steps before it
    expected = norms[8] / sorted(norms[3:8])[2]
    assert expected > 100 and watch.findings[0].value == pytest.approx(expected, rel=1e-4)
    assert any("spike at step 8" in n and "cleared at step 9" in n for n in watch.report().notes)


def test_lasting_dead_units_after_a_learning_rate_spike_are_named_with_it():
    torch.manual_seed(0)
    model = models.mlp(nn.ReLU, (32, 128, 128, 128, 10))
    x, y = models.batch(256, 32, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def step(i):
        for g in opt.param_groups:  # a learning-rate spike at steps 20-22, then back to normal
            g["lr"] = 20.0 if 20 <= i <= 22 else 0.05
        b = slice((i % 4) * 64, (i % 4 + 1) * 64)
        loss = F.cross_entropy(model(x[b]), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()

    watch, _ = _train(model, 60, step, every=2, dead_window=3)
    blowup, *later = watch.findings
    assert (blowup.kind, blowup.condition, blowup.step) == (FindingKind.LEARNING_RATE, "updates", 22)
    dead = [f for f in later if f.kind is FindingKind.DEAD_UNITS]
    assert dead and later == dead, [str(f) for f in later]
    assert {f.layer for f in dead} <= {"1", "3", "5"}
    for f in dead:  # still dead at the end of the run
        assert watch.report().layers[f.layer].dead_fraction > 0.5
        assert f"after the learning-rate blow-up at step {blowup.step}" in f.message and f.step > blowup.step


def test_vanishing_gives_the_named_first_layers_own_ratio():
    torch.manual_seed(0)
    layers, ch = [], 1
    for _ in range(8):
        layers += [nn.Conv2d(ch, 8, 3, padding=1), nn.Sigmoid()]
        ch = 8
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 8 * 8, 3))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(i):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    watch, _ = _train(model, 3, step, every=1)  # reported at step 2, the last measured: the report's step
    (f,) = watch.findings
    assert (f.kind, f.layer, f.step) == (FindingKind.VANISHING, "0", 2)
    params = watch.report().params

    def rms(layer):
        own = [p for p in params.values() if p.layer == layer]
        return math.sqrt(sum(p.grad_norm ** 2 for p in own) / sum(p.numel for p in own))
    assert f.value == pytest.approx(rms("0") / rms("17"), rel=1e-6)


def test_an_exploding_gradient_is_named_at_the_first_layer_and_says_which_is_largest():
    torch.manual_seed(0)
    model = models.mlp(nn.ReLU, (32,) + (64,) * 30 + (10,))
    for layer in model:
        if isinstance(layer, nn.Linear):  # 1.5x the Kaiming scale: each layer amplifies
            nn.init.normal_(layer.weight, std=1.5 * math.sqrt(2 / layer.in_features))
    x, y = models.batch(64, 32, 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(i):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    watch, _ = _train(model, 3, step, every=1)
    (f,) = watch.findings
    assert (f.kind, f.condition, f.layer, f.step) == (FindingKind.EXPLODING, "size", "0", 2)
    norms = {}
    for p in watch.report().params.values():
        norms[p.layer] = norms.get(p.layer, 0.0) + p.grad_norm ** 2
    largest = max(norms, key=norms.get)
    assert largest != "0" and f"the largest gradient is {largest}'s" in f.message


class _UnrolledCell(nn.Module):
    """A hand-written LSTM cell: its gate module called three times a time step, its candidate once."""

    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.lin = nn.Linear(inputs + hidden, 4 * hidden)
        self.gate, self.cand = nn.Sigmoid(), nn.Tanh()

    def forward(self, x, h, c):
        i, f, g, o = self.lin(torch.cat([x, h], -1)).chunk(4, -1)
        c = self.gate(f) * c + self.gate(i) * self.cand(g)
        return self.gate(o) * torch.tanh(c), c


def test_an_unrolled_cell_raises_one_warning_per_module_not_per_call_site():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell, self.head = _UnrolledCell(8, 16), nn.Linear(16, 2)

        def forward(self, x):
            h = c = x.new_zeros(x.shape[0], 16)
            for t in range(x.shape[1]):
                h, c = self.cell(x[:, t], h, c)
            return self.head(h)

    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(32, 10, 8) * 20, torch.randint(2, (32,))  # unnormalised inputs: saturated gates
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(i):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    watch, caught = _train(model, 4, step, every=1)
    rows = watch.report().layers
    assert sum(1 for n in rows if n.startswith("cell.gate#")) == 30  # rows stay per call site
    saturation = [w for w in caught if issubclass(w.category, SaturationWarning)]
    assert sorted(w.message.finding.layer for w in saturation) == ["cell.cand", "cell.gate"]
    gate = next(w.message.finding for w in saturation if w.message.finding.layer == "cell.gate")
    assert gate.message.startswith("30 of 30 call sites, ")


def test_a_run_that_ends_after_an_unmeasured_step_is_still_judged_at_its_end():
    """Too few measured steps for flow_window: a persistent condition that held on all of them is judged
    at the run's end, whether or not the last step was measured."""
    def vanishing_found(steps: int) -> list:
        torch.manual_seed(0)
        layers: list = []
        for _ in range(6):
            layers += [nn.Linear(32, 32), nn.Sigmoid()]
        model = nn.Sequential(nn.Linear(20, 32), nn.Sigmoid(), *layers, nn.Linear(32, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with GradWatch(model, every=5, quiet=True) as watch:
                for _ in range(steps):
                    loss = nn.functional.cross_entropy(model(torch.randn(16, 20)), torch.randint(0, 4, (16,)))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        return [(f.kind.value, f.step) for f in watch.findings]

    assert vanishing_found(1) == [("vanishing", 0)]  # the last step measured
    assert vanishing_found(3) == [("vanishing", 0)]  # steps 1 and 2 not measured
    assert vanishing_found(7) == [("vanishing", 5)]  # two measured steps, both with it
