"""functional=True: activations called as functions are measured and attributed to their module."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradwatch import DeadUnitsWarning, GradWatch, SaturationWarning
from tests import models


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)

    def forward(self, x):
        return torch.tanh(self.fc(x))


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.block = Block()
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.block(F.relu(self.fc1(x))))


def test_functional_activations_are_found_and_named():
    torch.manual_seed(0)
    model = Functional()
    with torch.no_grad():
        model.fc1.bias.fill_(-100.0)  # F.relu in the root's forward: all dead
    with pytest.warns(DeadUnitsWarning, match=r"\(model\):relu"):
        with GradWatch(model, every=1, dead_window=2, quiet=True, functional=True) as watch:
            models.train(model, 3)
    relu = watch.report().layers["(model):relu"]
    assert relu.dead_fraction == 1.0 and relu.type == "relu()"

    model = Functional()
    with torch.no_grad():
        model.block.fc.weight.mul_(50)  # torch.tanh inside block: saturated
    with pytest.warns(SaturationWarning, match="block:tanh"):
        with GradWatch(model, every=1, quiet=True, functional=True) as watch:
            models.train(model, 2)
    tanh = watch.report().layers["block:tanh"]
    assert tanh.saturated_fraction > 0.5 and tanh.output_grad_norm is not None


def test_without_the_opt_in_functions_are_invisible_and_outputs_identical():
    torch.manual_seed(0)
    model = Functional()
    x, y = models.batch()
    with GradWatch(model, every=1, quiet=True) as plain:
        out_plain = model(x)
    assert not [n for n in plain.report().layers if ":" in n]
    with GradWatch(model, every=1, quiet=True, functional=True):
        out_tapped = model(x)
    assert torch.equal(out_plain, out_tapped)


def test_the_tap_is_left_when_forward_raises():
    from torch.overrides import _get_current_function_mode_stack

    model = Functional()
    model.block.register_forward_pre_hook(lambda m, a: 1 / 0)
    with GradWatch(model, every=1, quiet=True, functional=True):
        with pytest.raises(ZeroDivisionError):
            model(torch.randn(2, 8))
        assert not _get_current_function_mode_stack()
