"""Rules on plain numbers: each fires on its condition and stays quiet otherwise."""

from __future__ import annotations

import math

import pytest

from gradwatch import Thresholds
from gradwatch.report import FindingKind, LayerStats, ParamStats, StepStats
from gradwatch.rules import Judge, count, evaluate, names


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
    assert (FindingKind.EXPLODING, "l0") in found(step((1.0, 2e3)))
    assert (FindingKind.EXPLODING, "l0") in found(step((1.0, 200.0)), history=[1.0, 1.2, 0.9])
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


def test_a_condition_is_reported_again_only_after_it_cleared():
    j = Judge(Thresholds(flow_window=3), dead_window=1)
    dead = lambda: step(l0={"dead_fraction": 0.9, "dead_window": 1})  # noqa: E731
    assert len(j.new_findings(dead())) == 1
    assert j.new_findings(dead()) == []
    # absent on two measured steps (a share hovering at its threshold): not cleared, not raised again
    assert j.new_findings(step()) == [] and j.new_findings(step()) == []
    assert j.new_findings(dead()) == []
    # absent on flow_window = 3 measured steps in a row: cleared, and raised again when it returns
    assert [j.new_findings(step()) for _ in range(3)] == [[], [], []]
    assert len(j.new_findings(dead())) == 1


# ---------------------------------------------------------------- judging over a run


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


def judge_run(steps, unscaled=True, scaler=False, **kw):
    notes = []
    j = Judge(Thresholds(**kw), dead_window=1, note=notes.append, unscaled=lambda: unscaled, scaler=lambda: scaler)
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
    out, notes = judge_run([ok(0), skip(1), ok(2), ok(3)], scaler=True)
    assert out == [] and any("skipped" in n for n in notes)
    out, _ = judge_run([ok(0), skip(1), skip(2), skip(3), skip(20)], scaler=True)  # within a scaler's back-off
    assert out == []
    out, _ = judge_run([ok(0), skip(1), skip(2), skip(3), skip(40)], scaler=True)
    assert [(f.kind, f.step) for f in out] == [(FindingKind.NON_FINITE, 1)]
    # applied after all: the weights (and so the forward) went non-finite -- the first bad gradients are the root
    nan_weights = layered(2, (10, 10), (math.nan, math.nan), weights=(math.nan, math.nan), l0={"nonfinite": True})
    out, _ = judge_run([ok(0), skip(1), nan_weights], scaler=True)
    assert [(f.kind, f.step, f.layer) for f in out] == [(FindingKind.NON_FINITE, 1, "l1")]


def test_non_finite_gradients_without_a_scaler_are_reported_at_their_step():
    # fp32, no GradScaler: nothing skips the step, the optimizer applies the NaN/Inf
    skip = lambda s: layered(s, (10, 10), (1.0, math.inf))  # noqa: E731
    ok = lambda s: layered(s, (10, 10), (1.0, 1.0))  # noqa: E731
    out, notes = judge_run([ok(0), skip(1), ok(2), ok(3)])
    assert [(f.kind, f.step, f.layer, f.condition) for f in out] == [(FindingKind.NON_FINITE, 1, "l1", "backward")]
    assert not any("skipped" in n for n in notes)


def test_exploding_is_one_finding_while_it_lasts_and_says_when_it_cleared():
    def big(s, largest):
        g = [1.0, 1.0, 1.0]
        g[largest] = 1e4
        return layered(s, (10, 10, 10), g)
    healthy = [layered(s, (10, 10, 10), (1.0, 1.0, 1.0)) for s in (5, 6, 7)]
    steps = [big(0, 0), big(1, 1), big(2, 2), big(3, 0), big(4, 1)] + healthy
    out, notes = judge_run(steps)
    sizes = [f for f in out if f.condition == "size"]
    assert len(sizes) == 1 and sizes[0].step == 2
    # cleared once absent on flow_window (3) measured steps in a row: steps 5, 6 and 7
    assert [n for n in notes if "cleared" in n] and all("cleared at step 7" in n for n in notes if "cleared" in n)
    # under half precision the gradient at the end of backward may be a GradScaler's scaled one:
    # its size alone is no evidence
    assert judge_run(steps, unscaled=False)[0] == []


def test_learning_rate_blow_up_is_named_instead_of_its_consequences_while_it_lasts():
    sat = {"l1": {"saturated_fraction": 1.0, "saturation_method": "bounds"}}
    grown = lambda s, w: layered(s, (100, 100, 10), (1e-7, 1e-6, 1.0), weights=w,  # noqa: E731
                                 types={"l1": "Sigmoid"}, **sat)
    steps = [layered(0, (100, 100, 10), (1e-2, 0.1, 1.0), weights=(5.0, 5.0, 5.0), types={"l1": "Sigmoid"}),
             # three steps later l2's weights are 24x larger (l1's 5x), the sigmoids saturated, the gradients vanished
             grown(3, (5.0, 25.0, 120.0)),
             grown(6, (5.0, 100.0, 500.0)),  # still growing: 500 / 120 = 4.2x over step 3
             grown(9, (5.0, 100.0, 500.0)),  # steps 6..9 (within blowup_steps=5): no growth, the blow-up is over
             grown(12, (5.0, 100.0, 500.0))]
    out, _ = judge_run(steps)
    assert [(f.kind, f.condition, f.step, f.layer) for f in out] == [
        (FindingKind.LEARNING_RATE, "updates", 3, "l2"), (FindingKind.SATURATION, "", 9, "l1")]
    blow, lasting = out
    assert blow.value == 24.0 and "learning rate" in blow.advice.lower() and "ReLU" not in blow.advice
    assert "l1" in blow.message and "2 layers grew 5.0 x or more" in blow.message
    # the saturation outlasted its cause: named, with it
    assert "since step 3, after the learning-rate blow-up at step 3 (l2)" in lasting.message
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


# ---------------------------------------------------------------- judging over time: steps, events, causes
def no_grads(step_no: int, n_layers: int = 2) -> StepStats:
    """A measured step with a forward and no backward: layers, no parameter gradients."""
    st = StepStats(step=step_no)
    for i in range(n_layers):
        st.layers[f"l{i}"] = LayerStats(name=f"l{i}", type="Linear", count=10)
    return st


def test_steps_without_gradients_neither_extend_nor_break_a_gradient_streak():
    bad = lambda s: layered(s, (10, 10), (1e-5, 1.0))  # noqa: E731
    # gradient steps 0, 2, 4 hold the condition; the forwards-only steps 1 and 3 between them say nothing
    out, _ = judge_run([bad(0), no_grads(1), bad(2), no_grads(3), bad(4), no_grads(5), bad(6)])
    assert [(f.kind, f.step) for f in out] == [(FindingKind.VANISHING, 4)]  # the third gradient step
    # and they do not clear an active finding (which would raise it again)
    out, notes = judge_run([bad(0), bad(1), bad(2), no_grads(3), bad(4)])
    assert [(f.kind, f.step) for f in out] == [(FindingKind.VANISHING, 2)] and notes == []


def test_a_forward_without_backward_at_the_end_does_not_hide_an_exploding_gradient():
    # one gradient step of 1e18 per element: global norm sqrt(2 layers * 10 elements) * 1e18 = 4.47e18
    huge = layered(0, (10, 10), (1e18, 1e18))
    out, _ = judge_run([huge, no_grads(1)])
    assert [(f.kind, f.condition, f.step) for f in out] == [(FindingKind.EXPLODING, "size", 0)]
    assert out[0].value == pytest.approx(math.sqrt(20) * 1e18)
    assert judge_run([layered(0, (10, 10), (1.0, 1.0)), no_grads(1)])[0] == []


def test_a_gradient_spike_is_an_event_reported_at_its_step_once_and_cleared():
    # totals are sqrt(20) * g; g = 200 on a median of g = 1 is a 200x jump (over jump_factor 100),
    # and its norm 894 stays under the bound (1e3)
    g = {6: 200.0, 11: 200.0, 12: 300.0}
    steps = [layered(s, (10, 10), (g.get(s, 1.0),) * 2) for s in range(16)]
    out, notes = judge_run(steps)
    assert [(f.kind, f.condition, f.step) for f in out] == [(FindingKind.EXPLODING, "jump", 6),
                                                           (FindingKind.EXPLODING, "jump", 11)]
    assert out[0].value == pytest.approx(200.0) and out[0].threshold == Thresholds().jump_factor
    assert "at this step" in out[0].message
    # a spike lasting two steps is one finding; each says when it cleared
    assert [n for n in notes if "spike" in n] == [
        "gradwatch: the gradient spike at step 6 (l0, 200 x its running median) cleared at step 7.",
        "gradwatch: the gradient spike at step 11 (l0, 200 x its running median) cleared at step 13."]
    # a running median needs three earlier steps: the second step of a run is not judged against the first
    assert judge_run([layered(0, (10, 10), (1.0, 1.0)), layered(1, (10, 10), (500.0, 500.0))])[0] == []


def test_weight_blow_up_is_judged_per_layer_not_by_the_total():
    # An embedding of norm 100 (std-1 init) dominates the total: enc0-enc2 tripling moves it from
    # sqrt(100^2 + 3) = 100.015 to sqrt(100^2 + 3 * 9) = 100.13, a growth of 1.001.
    def st(s, enc):
        out = StepStats(step=s)
        for name, w in [("emb", 100.0)] + [(f"enc{i}", v) for i, v in enumerate(enc)] + [("head", 1.0)]:
            out.layers[name] = LayerStats(name=name, type="Embedding" if name == "emb" else "Linear", count=10)
            out.params[f"{name}.weight"] = ParamStats(f"{name}.weight", name, 100, 1.0, 0.1, w)
        return out
    steps = [st(0, (1.0, 1.0, 1.0)), st(1, (1.5, 1.6, 1.4)), st(2, (2.2, 2.5, 1.9)), st(3, (3.0, 3.2, 2.9))]
    out, _ = judge_run(steps)
    assert [(f.kind, f.condition, f.step, f.layer) for f in out] == [(FindingKind.LEARNING_RATE, "updates", 2, "enc1")]
    assert out[0].value == pytest.approx(2.5) and "2 layers grew 2.2 x or more: enc1, enc0" in out[0].message


def test_lasting_damage_after_a_blow_up_is_named_with_its_cause():
    # weights: 1 at steps 0-1, 2.5 at step 2 (blow-up: 2.5x), 5 from step 3 on; the blow-up holds while
    # a step within blowup_steps (5) before has half the norm or less: up to step 7 (5 / 2.5 at step 2),
    # and ends at step 8. Act2's units die at step 5 and stay dead.
    w = {0: 1.0, 1: 1.0, 2: 2.5}
    dead = {"l1": {"dead_fraction": 0.64, "dead_window": 1}}
    steps = [layered(s, (10, 10, 10), (1.0, 1.0, 1.0), weights=(w.get(s, 5.0),) * 3, **(dead if s >= 5 else {}))
             for s in range(12)]
    out, _ = judge_run(steps)
    assert [(f.kind, f.step, f.layer) for f in out] == [(FindingKind.LEARNING_RATE, 2, "l0"),
                                                       (FindingKind.DEAD_UNITS, 8, "l1")]
    assert out[1].value == 0.64
    assert out[1].message.endswith("This holds since step 5, after the learning-rate blow-up at step 2 (l0): "
                                   "lasting damage from it.")
    # a condition reported before the cause is not reported again after it
    early = [layered(s, (10, 10, 10), (1.0, 1.0, 1.0), weights=(w.get(s, 5.0),) * 3, **dead) for s in range(12)]
    out, _ = judge_run(early)
    assert [(f.kind, f.step) for f in out] == [(FindingKind.DEAD_UNITS, 0), (FindingKind.LEARNING_RATE, 2)]


def test_lasting_damage_after_non_finite_values_is_named_with_them():
    # NaN in l0's output at steps 2-3 (a bad batch); l1's units dead from step 2 on
    dead = {"dead_fraction": 0.8, "dead_window": 1}
    steps = [layered(s, (10, 10), (1.0, 1.0), l0={"nonfinite": s in (2, 3)}, l1=dead if s >= 2 else {})
             for s in range(6)]
    out, _ = judge_run(steps)
    assert [(f.kind, f.step, f.layer) for f in out] == [(FindingKind.NON_FINITE, 2, "l0"),
                                                       (FindingKind.DEAD_UNITS, 4, "l1")]
    assert "since step 4, after the non-finite values at step 2 (l0)" in out[1].message


def test_the_value_of_a_finding_is_the_named_layers():
    # 9 weighted layers: the first quarter is l0-l1. l1 (1e-6 per weight) is the best-fed of them and
    # decides, below 1e-3 of the last layer; the finding names l0 with l0's own ratio, 1e-8.
    st = layered(0, (10,) * 9, (1e-8, 1e-6) + (1.0,) * 7)
    (f,) = evaluate(st, Thresholds())
    assert (f.kind, f.layer, f.value) == (FindingKind.VANISHING, "l0", pytest.approx(1e-8))
    assert "1.0e-08 x" in f.message and "l1, gets 1.0e-06 x" in f.message
    # exploding across depth: named at the early layer the value is from
    # (l1's norm 200 * sqrt(10) = 632 keeps the global norm under its bound)
    st = layered(0, (10,) * 9, (10.0, 200.0) + (1.0,) * 7)
    (f,) = evaluate(st, Thresholds())
    assert (f.kind, f.condition, f.layer, f.value) == (FindingKind.EXPLODING, "depth", "l1", pytest.approx(200.0))
    # the norm bound: the value is the model's; named at the first layer, the message naming the layer with
    # the largest gradient (norms 31.6, 1265, 31.6; total 1265.7)
    st = layered(0, (10, 10, 10), (10.0, 400.0, 10.0))
    (f,) = evaluate(st, Thresholds())
    assert (f.kind, f.condition, f.layer) == (FindingKind.EXPLODING, "size", "l0")
    assert f.value == pytest.approx(math.sqrt(2 * 1000 + 1600000))
    assert "named at the first layer; the largest gradient is l1's (norm 1.26e+03 of 1.27e+03)" in f.message


def test_call_sites_of_one_module_make_one_finding():
    # a hand-written LSTM cell unrolled 10 times: its gate called 3 times a step (30 sites, 74-76 %
    # saturated), its candidate once (10 sites, 50 %); rows stay per call site
    def st(s):
        out = StepStats(step=s)
        out.layers["cell.lin"] = LayerStats(name="cell.lin", type="Linear", count=10)
        out.params["cell.lin.weight"] = ParamStats("cell.lin.weight", "cell.lin", 10, 1.0, 1.0, 1.0)
        for i in range(1, 31):
            out.layers[f"cell.gate#{i}"] = LayerStats(name=f"cell.gate#{i}", type="Sigmoid", count=10,
                                                      saturated_fraction=0.74 + 0.02 * (i % 2) * (i > 20),
                                                      saturation_method="bounds")
        for i in range(1, 11):
            out.layers[f"cell.cand#{i}"] = LayerStats(name=f"cell.cand#{i}", type="Tanh", count=10,
                                                      saturated_fraction=0.5, saturation_method="bounds")
        out.layers["head"] = LayerStats(name="head", type="Linear", count=10)
        out.params["head.weight"] = ParamStats("head.weight", "head", 10, 1.0, 1.0, 1.0)
        return out
    out, _ = judge_run([st(0), st(1), st(2)])
    assert [(f.kind, f.layer, f.step) for f in out] == [(FindingKind.SATURATION, "cell.gate", 0),
                                                       (FindingKind.SATURATION, "cell.cand", 0)]
    gate, cand = out
    assert gate.message.startswith("30 of 30 call sites, 74-76% saturated; the most at cell.gate#21: 76% of Sigmoid")
    assert gate.value == pytest.approx(0.76)
    assert cand.message.startswith("10 of 10 call sites, 50% saturated")
    # one site of a shared module keeps its own name
    one = st(0)
    for i in range(2, 31):
        one.layers[f"cell.gate#{i}"].saturated_fraction = 0.1
    assert ("cell.gate#1", 0.74) in [(f.layer, f.value) for f in judge_run([one])[0]]


def test_a_blow_ups_gradients_are_part_of_it_and_the_running_median_starts_again_after_it():
    # weights 1 at steps 0-4, 3 from step 5 (a 3x blow-up) with a 200x gradient spike at step 5; the blow-up
    # holds while a step within blowup_steps (5) has a third of the norm: until step 9, over at step 10
    steps = [layered(s, (10, 10), (200.0 if s == 5 else 1.0,) * 2, weights=(1.0 if s < 5 else 3.0,) * 2)
             for s in range(14)]
    out, notes = judge_run(steps)
    assert [(f.kind, f.condition, f.step) for f in out] == [(FindingKind.LEARNING_RATE, "updates", 5)]
    assert notes == []
