from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradwatch.layers import (ActivationKind, FlatSide, activation_spec, check_selectors, select_layers,
                              select_parameters)
from tests import models


@pytest.mark.parametrize("module,kind,lo,hi", [
    (nn.Sigmoid(), ActivationKind.BOUNDED, 0.0, 1.0),
    (nn.Tanh(), ActivationKind.BOUNDED, -1.0, 1.0),
    (nn.Hardtanh(-2, 3), ActivationKind.BOUNDED, -2.0, 3.0),
    (nn.ReLU6(), ActivationKind.RECTIFIER, None, 6.0),
    (nn.ReLU(inplace=True), ActivationKind.RECTIFIER, None, None),
    (nn.LeakyReLU(), ActivationKind.SMOOTH, None, None),
    (nn.ELU(), ActivationKind.SMOOTH, None, None),
    (models.Sigmoid(), ActivationKind.GENERIC, None, None),
    (models.LeakyRelu(), ActivationKind.GENERIC, None, None),
    (nn.Linear(2, 2), ActivationKind.NONE, None, None),
    (nn.Softmax(dim=1), ActivationKind.NONE, None, None),
    (nn.Dropout(), ActivationKind.NONE, None, None),
])
def test_activation_spec(module, kind, lo, hi):
    spec = activation_spec(module)
    assert (spec.kind, spec.lower, spec.upper) == (kind, lo, hi)


def _edge(slope_of, peak: float, share: float, lo: float = -60.0, hi: float = 0.0) -> float:
    """Where |f'| rises through ``share`` of ``peak``, by bisection (f' from its formula, in math)."""
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if abs(slope_of(mid)) < share * peak else (lo, mid)
    return lo


def _phi(x: float) -> float:
    return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _Phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _gelu(x: float) -> float:  # peak at sqrt(2) (GELU'' = phi(x) (2 - x^2))
    return _Phi(x) + x * _phi(x)


def _silu(x: float) -> float:  # peak at 2.3994 (a root of SiLU'')
    s = _sigmoid(x)
    return s * (1 + x * (1 - s))


def _mish(x: float) -> float:
    t = math.tanh(math.log1p(math.exp(x)))
    return t + x * (1 - t * t) * _sigmoid(x)


def _peak(slope_of, lo: float, hi: float) -> float:
    return max(abs(slope_of(lo + (hi - lo) * i / 20000)) for i in range(20001))


# Hand-computed cut-offs at the default share of 4 %: closed forms where f' is exp-like on the flat side,
# else the edge of |f'| < 0.04 * peak found with f' written out in math.
CUTOFFS = [
    (nn.ELU(), True, math.log(0.04)),  # alpha e^c = 0.04 * max(1, alpha)
    (nn.ELU(alpha=0.5), True, math.log(0.04 / 0.5)),
    (nn.ELU(alpha=2.0), True, math.log(0.04)),
    (nn.CELU(alpha=2.0), True, 2.0 * math.log(0.04)),  # e^(c / alpha) = 0.04
    (nn.SELU(), True, math.log(0.04)),  # scale alpha e^c = 0.04 scale alpha
    (nn.Softplus(), True, math.log(0.04 / 0.96)),  # sigmoid(beta c) = 0.04
    (nn.Softplus(beta=2.0), True, math.log(0.04 / 0.96) / 2),
    (nn.Hardswish(), False, -3.0),  # slope 0 below -3, -0.5 just above it; peak 1.5
    (nn.GELU(), False, _edge(_gelu, _gelu(math.sqrt(2)), 0.04)),  # -2.4047
    (nn.SiLU(), False, _edge(_silu, _peak(_silu, 0.0, 5.0), 0.04)),  # -4.2797
    (nn.Mish(), False, _edge(_mish, _peak(_mish, 0.0, 5.0), 0.04)),  # -4.3180
]


@pytest.mark.parametrize("module,increasing,cutoff", CUTOFFS, ids=[type(m).__name__ for m, _, _ in CUTOFFS])
def test_smooth_rectifiers_have_a_flat_side_with_the_hand_computed_cut_off(module, increasing, cutoff):
    spec = activation_spec(module)
    assert spec.kind is ActivationKind.SMOOTH and spec.tracks_dead_units
    assert spec.flat.increasing is increasing and spec.reads_input is not increasing
    assert spec.flat.cutoff(0.04) == pytest.approx(cutoff, abs=1e-4)
    if increasing:  # the output at the cut-off, to compare the output's maxima with
        assert spec.flat.output_cutoff(0.04) == pytest.approx(float(module(torch.tensor(cutoff))), abs=1e-6)


def test_the_tanh_approximation_of_gelu_has_its_own_cut_off():
    exact, tanh = activation_spec(nn.GELU()).flat, activation_spec(nn.GELU(approximate="tanh")).flat
    assert exact != tanh and tanh.kwargs == (("approximate", "tanh"),)
    assert tanh.cutoff(0.04) == pytest.approx(-2.4105, abs=1e-3)


@pytest.mark.parametrize("module", [nn.LeakyReLU(), nn.PReLU(), nn.RReLU(), nn.Tanhshrink(), nn.Softshrink()])
def test_activations_without_a_fading_negative_slope_track_no_dead_units(module):
    spec = activation_spec(module)
    assert spec.kind is ActivationKind.SMOOTH and spec.flat is None and not spec.tracks_dead_units


def test_a_function_without_a_flat_side_is_refused():
    with pytest.raises(ValueError, match="no flat negative side"):
        FlatSide("leaky_relu", (("negative_slope", 0.5),)).cutoff(0.04)


def test_user_module_with_parameters_is_not_a_generic_activation():
    assert activation_spec(models.TupleOut()).kind is ActivationKind.NONE


def test_default_selection_is_leaves_without_dropout_or_flatten():
    names = [layer.name for layer in select_layers(models.small_cnn())]
    assert names == ["0", "1", "2", "3", "4", "5", "7", "8", "10"]


def test_include_and_exclude_by_pattern_and_type():
    model = models.small_cnn()
    assert [l.name for l in select_layers(model, include=("3", "4"))] == ["3", "4"]
    assert [l.name for l in select_layers(model, exclude=(nn.ReLU, nn.MaxPool2d))] == ["0", "3", "7", "10"]
    params = [p for p, _, _ in select_parameters(model, include=(nn.Conv2d,))]
    assert params == ["0.weight", "0.bias", "3.weight", "3.bias"]


def test_parameters_follow_their_containers():
    model = models.WithTuple()
    assert [p for p, _, _ in select_parameters(model, include=("block",))] == ["block.lin.weight", "block.lin.bias"]
    assert [p for p, _, _ in select_parameters(model, exclude=("block",))] == ["head.weight", "head.bias"]


def test_selectors_are_validated():
    assert check_selectors("include", "a.*") == ("a.*",)
    assert check_selectors("include", nn.ReLU) == (nn.ReLU,)
    with pytest.raises(TypeError, match="exclude"):
        check_selectors("exclude", [1.5])
