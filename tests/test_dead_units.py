"""Dead units of smooth rectifiers (GELU, SiLU, Mish, ELU, CELU, SELU, Softplus, Hardswish), through the
public API: a unit is dead when its pre-activation stayed below the flat side's cut-off on every sample
of the window, although its output is not exactly zero. Expected shares are counted by hand: 16 of a
layer's 20 units get a bias of -20."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradwatch import DeadUnitsWarning, FindingKind, GradWatch, GradWatchWarning
from tests import models

WIDTH = 20
PLANTED = torch.arange(WIDTH) % 5 != 0  # 16 of 20 units: 80 %

ACTIVATIONS = {
    "GELU": nn.GELU, "GELU-tanh": lambda: nn.GELU(approximate="tanh"), "SiLU": nn.SiLU,
    "SiLU-inplace": lambda: nn.SiLU(inplace=True), "Mish": nn.Mish, "Mish-inplace": lambda: nn.Mish(inplace=True),
    "ELU": nn.ELU, "ELU-inplace": lambda: nn.ELU(inplace=True), "CELU": nn.CELU, "SELU": nn.SELU,
    "Softplus": nn.Softplus, "Hardswish": nn.Hardswish, "Hardswish-inplace": lambda: nn.Hardswish(inplace=True),
}


def mlp(act, planted: bool) -> nn.Sequential:
    """8 -> 20 -> act -> 20 -> act -> 3; planted: 16 of the first layer's 20 units at a pre-activation
    near -20 (bias -20, |w . x| a few units at most)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, WIDTH), act(), nn.Linear(WIDTH, WIDTH), act(), nn.Linear(WIDTH, 3))
    if planted:
        with torch.no_grad():
            model[0].bias[PLANTED] = -20.0
    return model


def run(model, steps=4, **kw):
    x, y = models.batch(64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GradWatchWarning)
        with GradWatch(model, every=1, dead_window=2, quiet=True, strict=True, **kw) as watch:
            models.train(model, steps, x, y)
    return watch, [w for w in caught if issubclass(w.category, GradWatchWarning)]


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_a_smooth_rectifier_pushed_far_negative_is_named_at_its_layer(name):
    watch, caught = run(mlp(ACTIVATIONS[name], planted=True))
    layer = watch.report().layers["1"]
    assert layer.dead_fraction == pytest.approx(16 / 20) and layer.dead_window == 2
    assert [(f.kind, f.layer) for f in watch.findings] == [(FindingKind.DEAD_UNITS, "1")]
    assert [w.category for w in caught] == [DeadUnitsWarning]
    message = watch.findings[0].message
    assert "80%" in message and "passed almost no gradient" in message and "non-zero" not in message
    assert f"below {layer.dead_cutoff:.3g}" in message


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_healthy_smooth_rectifiers_have_no_dead_units(name):
    watch, caught = run(mlp(ACTIVATIONS[name], planted=False))
    report = watch.report()
    assert report.layers["1"].dead_fraction == 0.0 and report.layers["3"].dead_fraction is not None
    assert watch.findings == [] and caught == []


def test_silu_units_are_dead_although_no_output_is_zero():
    """SiLU(-20) = -4e-8: not one exact zero, yet 80 % of the units pass no gradient."""
    watch, _ = run(mlp(nn.SiLU, planted=True))
    layer = watch.report().layers["1"]
    assert layer.zero_fraction == 0.0 and layer.dead_fraction == pytest.approx(0.8)


def test_in_place_modules_are_judged_as_without_in_place():
    """An in-place SiLU overwrites its input: its pre-hook reads it first; an in-place ELU's output
    says as much as its input. Training is unchanged by either."""
    for inplace, plain in ((lambda: nn.SiLU(inplace=True), nn.SiLU), (lambda: nn.ELU(inplace=True), nn.ELU)):
        got = []
        for act in (inplace, plain):
            model = mlp(act, planted=True)
            x, y = models.batch(64)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeadUnitsWarning)
                with GradWatch(model, every=1, dead_window=1, quiet=True, strict=True) as watch:
                    losses = models.train(model, 2, x, y)
            got.append(([ls.dead_fraction for ls in watch.report().layers.values()], losses))
        assert got[0] == got[1]


def test_the_cut_off_follows_saturation_slope():
    """GELU'(-4) = Phi(-4) - 4 phi(-4) = -5.0e-4, 4.5e-4 of its peak slope (1.129): units held at -4
    are dead at the default share (4 %: cut-off -2.40), alive at a share of 1e-6 (cut-off -5.4)."""
    shares = []
    for slope in (0.04, 1e-6):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, WIDTH), nn.GELU(), nn.Linear(WIDTH, 3))
        with torch.no_grad():
            model[0].weight.mul_(1e-3)
            model[0].bias[PLANTED] = -4.0
        watch, _ = run(model, steps=2, thresholds={"saturation_slope": slope})
        shares.append(watch.report().layers["1"].dead_fraction)
    assert shares == [pytest.approx(0.8), 0.0]


class Functional(nn.Module):
    """Activations called as functions: F.gelu, then F.elu with alpha 0.5 given positionally."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.elu(self.fc2(F.gelu(self.fc1(x))), 0.5))


def test_functional_smooth_rectifiers_are_judged_with_the_parameters_they_were_called_with():
    torch.manual_seed(0)
    model = Functional()
    with torch.no_grad():
        model.fc1.bias[PLANTED] = -20.0
    watch, _ = run(model, functional=True)
    layers = watch.report().layers
    assert layers["(model):gelu"].dead_fraction == pytest.approx(0.8)
    assert layers["(model):elu"].dead_cutoff == pytest.approx(math.log(0.04 / 0.5), abs=1e-4)  # 0.5 e^c = 0.04
    assert [(f.kind, f.layer) for f in watch.findings] == [(FindingKind.DEAD_UNITS, "(model):gelu")]


def test_leaky_relu_has_no_dead_units():
    """Its negative slope never fades: a unit at -20 still learns at that slope."""
    watch, _ = run(mlp(nn.LeakyReLU, planted=True))
    assert watch.report().layers["1"].dead_fraction is None and watch.findings == []


def test_a_gelu_transformer_block_stays_silent():
    """Pre-norm block (LayerNorm, MHA, LayerNorm, GELU MLP) trained with AdamW: no finding."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
    model = nn.Sequential(nn.Linear(8, 32), layer, nn.Flatten(), nn.Linear(32 * 6, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradWatchWarning)
        with GradWatch(model, every=1, dead_window=3, quiet=True, strict=True) as watch:
            for _ in range(6):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
    assert watch.findings == []


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(torch, "compile"), reason="no torch.compile")
@pytest.mark.parametrize("act", [nn.GELU, lambda: nn.SiLU(inplace=True), lambda: nn.ELU(inplace=True)],
                         ids=["GELU", "SiLU-inplace", "ELU-inplace"])
def test_compiled_models_measure_the_same_dead_units_without_recompiles(act):
    from torch._dynamo.utils import counters

    x, y = models.batch(64)
    reports = []
    for compile_it in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = mlp(act, planted=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # dynamo's notes about tracing our hooks
            with GradWatch(model, every=2, dead_window=2, quiet=True, strict=True) as watch:
                run_ = torch.compile(model, backend="eager") if compile_it else model
                models.train(run_, 4, x, y)  # warm-up: the measuring and the non-measuring graph
                graphs = counters["stats"].get("unique_graphs", 0)
                models.train(run_, 6, x, y)
                assert counters["stats"].get("unique_graphs", 0) == graphs  # no recompile as steps advance
                # The root's hooks, the graph's edges (see tests/test_compile.py): none per layer.
                assert sum(counters["graph_break"].values()) <= 4
        reports.append(watch.report())
    eager, compiled = reports
    assert compiled.layers["1"].dead_fraction == eager.layers["1"].dead_fraction == pytest.approx(0.8)
    assert compiled.layers["3"].dead_fraction == eager.layers["3"].dead_fraction
    assert compiled.layers["1"].dead_cutoff == eager.layers["1"].dead_cutoff


def test_non_finite_outputs_are_neither_zeros_nor_dead_units():
    """Once a layer's outputs are NaN, how many of them are zero, saturated or dead is not known: the
    report says so (NaN), never "zeros 100%, dead 100%" (a NaN is not a zero, nor evidence of no activity)."""
    torch.manual_seed(0)
    model = models.small_mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")  # every output of the first layer, and all after it, NaN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradWatchWarning)
        with GradWatch(model, every=1, dead_window=2, quiet=True) as watch:
            models.train(model, 4)
    st = watch.report().stats
    relu = st.layers["1"]
    assert relu.nonfinite and math.isnan(relu.zero_fraction)
    assert relu.dead_fraction is None  # unknown, never "all units dead"
    assert [f.kind for f in watch.findings] == [FindingKind.NON_FINITE]
