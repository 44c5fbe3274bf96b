"""torch.compile: gradwatch keeps training correct and says what it cannot see."""

from __future__ import annotations

import warnings

import pytest
import torch

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
