from __future__ import annotations

import pytest
from torch import nn

from gradwatch.layers import ActivationKind, activation_spec, check_selectors, select_layers, select_parameters
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
