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
