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

from gradwatch import FindingKind, GradWatch, GradWatchWarning
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
