"""The schedule of measured steps: pure, reproducible, dense at the start, bounded."""

from __future__ import annotations

from gradwatch.schedule import CEILING, DEFAULT_EVERY, DENSE_STEPS, Schedule, choose_interval, intervals


def measured(s: Schedule, n: int) -> list:
    return [step for step in range(n) if s.measures(step)]


def test_defaults_are_dense_first_then_every_20_and_identical_on_every_run():
    a, b = Schedule(), Schedule()
    assert measured(a, 101) == measured(b, 101)
    assert measured(a, 101) == list(range(DENSE_STEPS)) + list(range(20, 101, DEFAULT_EVERY))


def test_a_given_interval_has_no_dense_start_and_histograms_join_it():
    s = Schedule(every=7, histogram_every=10)
    assert measured(s, 30) == [0, 7, 10, 14, 20, 21, 28]
    assert [k for k in range(30) if s.histograms(k)] == [0, 10, 20]


def test_budget_moves_the_interval_only_at_adaptation_steps_and_never_past_the_ceiling():
    s = Schedule()
    for k in range(1, 100):
        s.record(0.001 + (0.05 if s.measures(k) else 0.0), s.measures(k), k)  # measuring costs 50 plain steps
        assert s.adapt(k) is None or k == 100
    assert s.adapt(99) is None and s.adapt(100) == CEILING
    assert s.over_budget is not None and s.over_budget > 0.02  # too costly even at the ceiling: said


def test_cheap_measuring_keeps_the_default_interval():
    s = Schedule()
    for k in range(1, 100):
        s.record(0.010 + (0.001 if s.measures(k) else 0.0), s.measures(k), k)
    assert s.adapt(100) is None and s.every == DEFAULT_EVERY and s.over_budget is None


def test_interval_choices():
    assert intervals(20) == (20, 40, 80, 100)
    assert choose_interval((20, 40, 80, 100), 1e-3, 10e-3, 0.02) == 20  # 0.5 % at 20
    assert choose_interval((20, 40, 80, 100), 5e-3, 10e-3, 0.02) == 40  # 2.5 % at 20, 1.25 % at 40


def test_every_step_with_a_budget_weighs_gradwatchs_time_per_measured_step_not_since_attach():
    """With every=1 no plain step is timed: the budget weighs gradwatch's own time per measured step
    since the last adaptation, which is part of the step, never more than it."""
    import torch

    from gradwatch import GradWatch
    from tests import models

    torch.manual_seed(0)
    model = models.small_mlp()
    with GradWatch(model, every=1, budget=0.5, quiet=True) as watch:
        models.train(model, 101)
    assert watch.every < 100
    shares = [n for n in watch.report().notes if "of the step time even at" in n]
    assert not shares, shares
