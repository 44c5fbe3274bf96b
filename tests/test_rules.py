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


# ---------------------------------------------------------------- judging over a run (issue 11)
from gradwatch.rules import Judge, count, names  # noqa: E402


def layered(step_no: int, sizes, grads, weights=None, types=None, **layer_fields) -> StepStats:
    """One weighted layer per entry: ``sizes`` elements, gradient RMS ``grads``, weight norm ``weights``."""
    st = StepStats(step=step_no)
    for i, (n, g) in enumerate(zip(sizes, grads)):
        name = f"l{i}"
        w = 1.0 if weights is None else weights[i]
        st.layers[name] = LayerStats(name=name, type=(types or {}).get(name, "Linear"), count=10,
                                     **layer_fields.get(name, {}))
        st.params[f"{name}.weight"] = ParamStats(f"{name}.weight", name, n, g * math.sqrt(n), g, w)
    return st


def judge_run(steps, unscaled=True, **kw):
    notes = []
    j = Judge(Thresholds(**kw), dead_window=1, note=notes.append, unscaled=lambda: unscaled)
    out = []
    for i, st in enumerate(steps):
        out += j.new_findings(st, final=i == len(steps) - 1)
    return out, notes


def test_gradient_scales_are_compared_per_element_not_by_norm():
    # 100x more elements gives a 10x larger norm at the same per-element gradient: healthy.
    st = layered(0, (40000, 400, 4), (1.0, 1.0, 1.0))
    assert found(st) == set()
    st = layered(0, (4, 400, 40000), (1e-4, 1.0, 1.0))
    assert found(st) == {(FindingKind.VANISHING, "l0")}


def test_vanishing_must_persist_over_the_window():
    bad = lambda s: layered(s, (10, 10), (1e-5, 1.0))  # noqa: E731
    good = lambda s: layered(s, (10, 10), (1.0, 1.0))  # noqa: E731
    out, _ = judge_run([bad(0), bad(1), good(2), bad(3), good(4)])
    assert out == []  # never three measured steps in a row
    out, _ = judge_run([bad(0), bad(1), bad(2), bad(3), good(4)])
    assert [(f.kind, f.step) for f in out] == [(FindingKind.VANISHING, 2)]  # once, when the window is full
    out, _ = judge_run([bad(0)])  # a run of one measured step is judged on it at its end
    assert [f.kind for f in out] == [FindingKind.VANISHING]
    out, _ = judge_run([good(0), bad(1)])
    assert out == []


def test_zero_initialised_head_and_adapters_are_not_vanishing():
    # step 0: the head's weights are zero, nothing reaches the layers below it
    st0 = layered(0, (100, 100, 10), (0.0, 0.0, 1.0), weights=(5.0, 5.0, 0.0))
    # later: the head has grown a little, the backbone's gradients are small but even across it
    later = [layered(s, (100, 100, 10), (1e-5, 1e-5, 1.0), weights=(5.0, 5.0, 0.01 * s)) for s in range(1, 6)]
    out, _ = judge_run([st0] + later)
    assert out == []
    # the same gradients without a zero-initialised head are vanishing
    out, _ = judge_run([layered(s, (100, 100, 10), (1e-7, 1e-5, 1.0)) for s in range(5)])
    assert [f.kind for f in out] == [FindingKind.VANISHING]


def test_output_activation_compensated_by_its_loss_is_not_saturation():
    st = layered(0, (10, 10), (1.0, 1.0))
    st.layers["head_act"] = LayerStats(name="head_act", type="Sigmoid", count=10, saturated_fraction=0.9,
                                       saturation_method="bounds")
    assert found(st) == set()
    st.layers["l1"].saturated_fraction = 0.9  # a hidden activation (it has parameters after it)
    st.layers = {"l0": st.layers["l0"], "hidden": LayerStats(name="hidden", type="Sigmoid", count=10,
                                                             saturated_fraction=0.9, saturation_method="bounds"),
                 "l1": st.layers["l1"], "head_act": st.layers["head_act"]}
    assert found(st) == {(FindingKind.SATURATION, "hidden"), (FindingKind.SATURATION, "l1")}


def test_non_finite_values_are_the_root_and_their_consequences_are_not_reported():
    steps = [layered(s, (10, 10, 10), (1.0, 1.0, 1.0), l1={"nonfinite": True},
                     l2={"dead_fraction": 1.0, "dead_window": 5, "saturated_fraction": 1.0}) for s in range(4)]
    out, _ = judge_run(steps)
    assert [(f.kind, f.layer) for f in out] == [(FindingKind.NON_FINITE, "l1")]


def test_non_finite_gradients_alone_are_a_scalers_skipped_step_unless_they_persist():
    skip = lambda s: layered(s, (10, 10), (1.0, math.inf))  # noqa: E731
    ok = lambda s: layered(s, (10, 10), (1.0, 1.0))  # noqa: E731
    out, notes = judge_run([ok(0), skip(1), ok(2), ok(3)])
    assert out == [] and any("skipped" in n for n in notes)
    out, _ = judge_run([ok(0), skip(1), skip(2), skip(3), skip(20)])  # within a scaler's back-off
    assert out == []
    out, _ = judge_run([ok(0), skip(1), skip(2), skip(3), skip(40)])
    assert [(f.kind, f.step) for f in out] == [(FindingKind.NON_FINITE, 1)]
    # applied after all: the weights (and so the forward) went non-finite -- the first bad gradients are the root
    nan_weights = layered(2, (10, 10), (math.nan, math.nan), weights=(math.nan, math.nan), l0={"nonfinite": True})
    out, _ = judge_run([ok(0), skip(1), nan_weights])
    assert [(f.kind, f.step, f.layer) for f in out] == [(FindingKind.NON_FINITE, 1, "l1")]


def test_exploding_is_one_finding_while_it_lasts_and_says_when_it_cleared():
    def big(s, largest):
        g = [1.0, 1.0, 1.0]
        g[largest] = 1e4
        return layered(s, (10, 10, 10), g)
    steps = [big(0, 0), big(1, 1), big(2, 2), big(3, 0), big(4, 1), layered(5, (10, 10, 10), (1.0, 1.0, 1.0))]
    out, notes = judge_run(steps)
    sizes = [f for f in out if f.condition == "size"]
    assert len(sizes) == 1 and sizes[0].step == 2
    assert any("cleared at step 5" in n for n in notes)
    # under half precision the gradient at the end of backward may be a GradScaler's scaled one:
    # its size alone is no evidence
    assert judge_run(steps, unscaled=False)[0] == []


def test_learning_rate_blow_up_is_named_instead_of_its_consequences():
    steps = [layered(0, (100, 100, 10), (1e-2, 0.1, 1.0), weights=(5.0, 5.0, 5.0),
                     types={"l1": "Sigmoid"})]
    # five steps later the weights are 5x larger, the sigmoids saturated, the gradients vanished
    for s in (3, 6, 9, 12):
        steps.append(layered(s, (100, 100, 10), (1e-7, 1e-6, 1.0), weights=(5.0, 25.0, 120.0),
                             types={"l1": "Sigmoid"}, l1={"saturated_fraction": 1.0, "saturation_method": "bounds"}))
    out, _ = judge_run(steps)
    assert [(f.kind, f.condition) for f in out] == [(FindingKind.LEARNING_RATE, "updates")]
    assert out[0].step == 3 and out[0].layer == "l2" and "learning rate" in out[0].advice.lower()
    assert "ReLU" not in out[0].advice
    # slow, healthy growth of the weights is not a blow-up
    slow = [layered(s, (10, 10), (1.0, 1.0), weights=(5.0 * 1.04 ** s, 5.0)) for s in range(0, 40, 5)]
    assert judge_run(slow)[0] == []


def test_saturation_that_explains_a_vanishing_gradient_is_reported_once_at_the_cause():
    st = layered(0, (10, 10, 10), (1e-6, 1e-3, 1.0), l1={"saturated_fraction": 0.9, "saturation_method": "bounds"})
    st.layers["act"] = LayerStats(name="act", type="Tanh", count=10, saturated_fraction=0.9,
                                  saturation_method="bounds")
    st.layers["l2"] = st.layers.pop("l2")  # forward order: l0, l1, act, l2
    fs = evaluate(st, Thresholds())
    assert {f.kind for f in fs} == {FindingKind.SATURATION}
    assert all("l0" in f.message for f in fs)


def test_advice_fits_the_model():
    def advice(types):
        st = layered(0, (10, 10, 10), (1e-6, 1.0, 1.0), types=types)
        return evaluate(st, Thresholds())[0].advice
    relu_only = advice({})
    assert "sigmoid/tanh" not in relu_only and "BatchNorm or LayerNorm" in relu_only
    transformer = advice({"l1": "MultiheadAttention"})
    assert "BatchNorm" not in transformer and "LayerNorm" in transformer
    normalised_sigmoid = advice({"l1": "Sigmoid", "l2": "BatchNorm1d"})
    assert "ReLU-family" in normalised_sigmoid and "add normalisation" not in normalised_sigmoid


def test_long_layer_lists_are_shortened_and_counts_name_the_type():
    layers = ["conv1"] + [f"layer{i}.conv{j}" for i in range(1, 5) for j in (1, 2)]
    assert names(layers[:4]) == "conv1, layer1.conv1, layer1.conv2, layer2.conv1"
    assert names(layers) == "conv1, layer1.conv1, layer1.conv2 and 6 more"
    assert count(8, "Linear") == "8 layers (Linear)" and count(1, "Conv2d") == "1 layer (Conv2d)"
    st = layered(0, (10,) * 9, (1e-6,) * 8 + (1.0,))
    msg = evaluate(st, Thresholds())[0].message
    assert "below the threshold: 8 layers (Linear): l0, l1, l2 and 5 more." in msg
