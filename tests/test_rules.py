"""Rules on plain numbers: each fires on its condition and stays quiet otherwise."""

from __future__ import annotations

import math

from gradwatch import Thresholds
from gradwatch.report import FindingKind, LayerStats, ParamStats, StepStats
from gradwatch.rules import Debouncer, evaluate


def step(layer_grads=(1.0, 1.0), **layer_fields) -> StepStats:
    st = StepStats(step=7)
    for i, g in enumerate(layer_grads):
        name = f"l{i}"
        st.layers[name] = LayerStats(name=name, type="Linear", count=10, **layer_fields.get(name, {}))
        st.params[f"{name}.weight"] = ParamStats(f"{name}.weight", name, 10, g, g, 1.0)
    return st


def found(st: StepStats, history=()) -> set:
    return {(f.kind, f.layer) for f in evaluate(st, Thresholds(), history)}


def test_healthy_step_has_no_findings():
    assert found(step((0.5, 1.0, 2.0))) == set()


def test_vanishing_and_exploding_across_depth():
    assert found(step((1e-4, 1e-2, 1.0))) == {(FindingKind.VANISHING, "l0")}
    assert found(step((1e3 * 0.5, 1.0, 0.5))) == {(FindingKind.EXPLODING, "l0")}


def test_exploding_bound_and_jump():
    assert (FindingKind.EXPLODING, "l1") in found(step((1.0, 2e3)))
    assert (FindingKind.EXPLODING, "l1") in found(step((1.0, 200.0)), history=[1.0, 1.2, 0.9])
    assert found(step((1.0, 2.0)), history=[1.0, 1.2, 0.9]) == set()


def test_dead_and_saturated_layers_are_named():
    st = step(l0={"dead_fraction": 0.9, "dead_window": 10}, l1={"saturated_fraction": 0.6})
    assert found(st) == {(FindingKind.DEAD_UNITS, "l0"), (FindingKind.SATURATION, "l1")}
    st = step(l0={"dead_fraction": 0.4}, l1={"saturated_fraction": 0.2})
    assert found(st) == set()


def test_non_finite_prefers_forward_activations_then_backward_gradients():
    st = step((1.0, 1.0, 1.0), l1={"nonfinite": True}, l2={"nonfinite": True})
    assert [f.layer for f in evaluate(st, Thresholds()) if f.kind is FindingKind.NON_FINITE] == ["l1"]
    st = step((1.0, 1.0, 1.0), l0={"output_grad_nonfinite": True}, l2={"output_grad_nonfinite": True})
    st.backward_order = ["l2", "l1", "l0"]
    assert [f.layer for f in evaluate(st, Thresholds()) if f.kind is FindingKind.NON_FINITE] == ["l2"]
    st = step((1.0, math.nan))
    assert (FindingKind.NON_FINITE, "l1") in found(st)


def test_dead_units_wait_for_a_full_window():
    st = step(l0={"dead_fraction": 0.9, "dead_window": 3})
    assert evaluate(st, Thresholds(), dead_window=4) == []
    assert [f.layer for f in evaluate(st, Thresholds(), dead_window=3)] == ["l0"]


def test_findings_carry_value_threshold_and_advice():
    f = evaluate(step(l0={"dead_fraction": 0.9, "dead_window": 4}), Thresholds())[0]
    assert f.value == 0.9 and f.threshold == Thresholds().dead_fraction and f.step == 7
    assert "LeakyReLU" in f.advice and "4 logged batch" in f.message


def test_debouncer_repeats_only_after_the_condition_clears():
    d = Debouncer()
    a = evaluate(step(l0={"dead_fraction": 0.9, "dead_window": 1}), Thresholds())
    assert len(d.new(a)) == 1
    assert d.new(a) == []
    assert d.new([]) == []
    assert len(d.new(a)) == 1
