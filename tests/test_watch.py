"""GradWatch through its public API: it observes without touching, and finds what is planted."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import (
    AlreadyWatchedError,
    DeadUnitsWarning,
    ExplodingGradientWarning,
    GradWatch,
    GradWatchWarning,
    LogDirError,
    NonFiniteWarning,
    SaturationWarning,
    Thresholds,
    VanishingGradientWarning,
)
from tests import models


def kinds(watch: GradWatch) -> set:
    return {(f.kind.value, f.layer) for f in watch.findings}


def all_hooks(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        n += len(getattr(m, "_backward_pre_hooks", {}))
    return n


# ---------------------------------------------------------------- never break training
def test_outputs_gradients_and_parameters_are_bit_identical():
    torch.manual_seed(0)
    base = models.small_cnn()
    x = torch.randn(8, 1, 12, 12)
    y = torch.randint(0, 3, (8,))

    def run(watched: bool):
        model = copy.deepcopy(base)
        torch.manual_seed(123)  # dropout draws from the global RNG: gradwatch must not
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        outs, grads = [], []
        ctx = GradWatch(model, every=1, histogram_every=2, quiet=True) if watched else None
        if ctx:
            ctx.attach()
        try:
            for _ in range(5):
                out = model(x)
                loss = nn.functional.cross_entropy(out, y)
                opt.zero_grad()
                loss.backward()
                outs.append(out.detach().clone())
                grads.append([p.grad.clone() for p in model.parameters()])
                opt.step()
        finally:
            if ctx:
                ctx.detach()
        return outs, grads, [p.detach().clone() for p in model.parameters()]

    plain, watched = run(False), run(True)
    for a, b in zip(plain[0], watched[0]):
        assert torch.equal(a, b)
    for ga, gb in zip(plain[1], watched[1]):
        assert all(torch.equal(a, b) for a, b in zip(ga, gb))
    assert all(torch.equal(a, b) for a, b in zip(plain[2], watched[2]))


def test_every_hook_is_removed_on_exit_and_on_exception():
    model = models.small_cnn()
    before = all_hooks(model)
    with GradWatch(model, every=1, quiet=True):
        assert all_hooks(model) > before
        models.train(model, 2, torch.randn(4, 1, 12, 12), torch.randint(0, 3, (4,)))
    assert all_hooks(model) == before

    with pytest.raises(ZeroDivisionError):
        with GradWatch(model, every=1, quiet=True):
            model(torch.randn(4, 1, 12, 12))  # mid-step: layer hooks are registered now
            1 / 0
    assert all_hooks(model) == before


def test_detach_twice_and_reuse():
    model = models.small_mlp()
    watch = GradWatch(model, every=1, quiet=True)
    watch.attach()
    models.train(model, 2)
    watch.detach()
    watch.detach()
    assert all_hooks(model) == 0
    with watch:  # usable again
        models.train(model, 1)
    assert watch.steps == 3


def test_inplace_relu_does_not_raise_and_is_measured():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 3))
    with GradWatch(model, every=1, quiet=True, strict=True) as watch:
        models.train(model, 2)
    layer = watch.report().layers["1"]
    assert 0 < layer.zero_fraction < 1
    assert layer.output_grad_norm is not None and layer.output_grad_norm > 0


def test_tuple_dict_outputs_shared_modules_frozen_params():
    model = models.WithTuple()
    model.head.bias.requires_grad_(False)
    with GradWatch(model, every=1, quiet=True, strict=True, include=["block*", "act", "head"]) as watch:
        models.train(model, 2)
    rep = watch.report()
    assert rep.layers["block.lin"].calls == 1
    # block returns (h, {"aux": ..., "note": str, "ids": int tensor}): h and aux are measured.
    assert rep.layers["block"].calls == 1 and rep.layers["block"].count == 2 * 32 * 8
    assert "head.bias" not in rep.params and "head.weight" in rep.params

    shared = models.Shared()
    with GradWatch(shared, every=1, quiet=True, strict=True) as watch:
        models.train(shared, 2)
    rep = watch.report()
    # One module object called at three places: one row per call site, in forward order.
    sites = [n for n in rep.layers if n.startswith(("lin", "act"))]
    assert sites == ["lin#1", "act#1", "lin#2", "act#2", "lin#3", "act#3"]
    assert all(rep.layers[n].calls == 1 and rep.layers[n].count == 32 * 8 for n in sites)
    assert rep.layers["lin#1"].grad_norm is not None and rep.layers["lin#2"].grad_norm is None  # weights: once


def test_no_grad_and_eval_forwards():
    model = models.small_mlp()
    x, _ = models.batch()
    with GradWatch(model, every=1, quiet=True, strict=True) as watch:
        with torch.no_grad():
            model(x)  # training mode, autograd off (a rollout): no training step
        with torch.inference_mode():
            model(x)
    assert watch.steps == 0 and watch.report().stats is None
    with GradWatch(model, every=1, quiet=True, strict=True, include_eval=True) as watch:
        with torch.no_grad():
            model(x)  # include_eval: every forward is measured, this one as a step of its own
            model(x)
    rep = watch.report()
    assert watch.steps == 2 and rep.layers["0"].count == 32 * 16 and rep.layers["0"].calls == 1
    assert rep.layers["0"].output_grad_norm is None and not rep.params

    model.eval()
    with GradWatch(model, every=1, quiet=True) as watch:
        model(x)
    assert watch.steps == 0 and watch.report().stats is None  # eval forwards are skipped by default
    with GradWatch(model, every=1, quiet=True, include_eval=True) as watch:
        with torch.no_grad():
            model(x)
    assert watch.steps == 1 and watch.report().layers["0"].count == 32 * 16


def test_gradient_accumulation_with_manual_steps():
    model = models.small_mlp()
    x, y = models.batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradWatch(model, every=1, quiet=True, strict=True, steps="manual") as watch:
        for _ in range(3):
            opt.zero_grad()
            for chunk in range(4):  # 4 micro-batches per optimizer step
                loss = nn.functional.cross_entropy(model(x[chunk::4]), y[chunk::4]) / 4
                loss.backward()
            expected = torch.linalg.vector_norm(model[0].weight.grad).item()
            opt.step()
            watch.step()
    assert watch.steps == 3  # three watch.step() calls ended three steps (step 3 is open, empty)
    # The measured gradient is the accumulated one the optimizer applied.
    assert watch.report().step == 2
    assert watch.report().params["0.weight"].grad_norm == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- planted pathologies
def test_dead_relu_layer_is_named():
    model = models.small_mlp(width=32)
    with torch.no_grad():
        model[2].bias.fill_(-100.0)  # second hidden layer: every unit switched off
    with pytest.warns(DeadUnitsWarning, match=r"^3: ") as record:
        with GradWatch(model, every=1, dead_window=3, quiet=True) as watch:
            models.train(model, 4)
    dead = [f for f in watch.findings if f.kind.value == "dead_units"]
    assert [f.layer for f in dead] == ["3"]
    assert dead[0].value == 1.0 and dead[0].step == 2  # reported once the 3-batch window is full
    assert len([r for r in record if r.category is DeadUnitsWarning]) == 1  # not repeated every step
    assert watch.report().layers["1"].dead_fraction < 0.5


def test_saturated_tanh_is_flagged_by_bounds():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
    with torch.no_grad():
        model[0].weight.mul_(50)
    with pytest.warns(SaturationWarning):
        with GradWatch(model, every=1, quiet=True) as watch:
            models.train(model, 2, lr=0.0)
    layer = watch.report().layers["1"]
    assert layer.saturation_method == "bounds" and layer.saturated_fraction > 0.8


def test_user_written_sigmoid_saturation_is_measured_by_slope():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), models.Sigmoid(), nn.Linear(32, 3))
    with GradWatch(model, every=1, quiet=True, strict=True) as watch:
        models.train(model, 1, lr=0.0)
    healthy = watch.report().layers["1"]
    assert healthy.saturation_method == "slope" and healthy.saturated_fraction < 0.05
    with torch.no_grad():
        model[0].weight.mul_(10)  # (x50 would overflow exp(-x): the naive sigmoid's NaN gradient)
    with pytest.warns(SaturationWarning, match="local slope"):
        with GradWatch(model, every=1, quiet=True) as watch:
            models.train(model, 1, lr=0.0)
    # Cross-check with the definition: slope s'(x) = y(1-y) below 4% of the peak 0.25.
    x, _ = models.batch()
    y = torch.sigmoid(model[0](x))
    expected = ((y * (1 - y)) < 0.04 * 0.25).float().mean().item()
    assert watch.report().layers["1"].saturated_fraction == pytest.approx(expected, abs=0.02)


def test_healthy_relu_network_is_not_saturated_and_silent():
    torch.manual_seed(0)
    for act in (nn.ReLU, models.Relu):  # typed and user-written rectifiers
        model = models.small_mlp(act, width=32)
        with warnings.catch_warnings():
            warnings.simplefilter("error", GradWatchWarning)
            with GradWatch(model, every=1, quiet=True, strict=True) as watch:
                models.train(model, 3)
        for layer in ("1", "3"):
            frac = watch.report().layers[layer].saturated_fraction
            assert frac is None or frac == 0.0


def test_nan_names_the_first_bad_layer():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), models.NanAt(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 3))
    with pytest.warns(NonFiniteWarning, match=r"^2: "):
        with GradWatch(model, every=1, quiet=True, include=["*"]) as watch:
            models.train(model, 1, lr=0.0)
            model[2].armed = True
            models.train(model, 1, lr=0.0)
    nonfinite = [f for f in watch.findings if f.kind.value == "non_finite"]
    assert [(f.layer, f.step) for f in nonfinite] == [("2", 1)]


@pytest.mark.parametrize("act,flagged", [(nn.Sigmoid, True), (nn.ReLU, False), (nn.Tanh, False)])
def test_seed_mlp_vanishing_gradients(act, flagged):
    torch.manual_seed(0)
    model = models.mlp(act)
    x = torch.rand(256, 784) * 2 - 1
    y = torch.randint(0, 10, (256,))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with GradWatch(model, every=1, quiet=True):
            models.train(model, 1, x, y, lr=0.0)
    vanishing = [r for r in record if issubclass(r.category, VanishingGradientWarning)]
    assert bool(vanishing) is flagged
    if flagged:
        assert vanishing[0].message.finding.layer == "0"
        assert vanishing[0].message.finding.value < 1e-2


def test_amplifying_deep_stack_is_exploding():
    torch.manual_seed(0)
    layers = []
    for _ in range(12):
        lin = nn.Linear(32, 32)
        nn.init.normal_(lin.weight, std=3.0 / 32 ** 0.5)  # gain 3 per layer
        layers.append(lin)
    model = nn.Sequential(*layers)
    with pytest.warns(ExplodingGradientWarning):
        with GradWatch(model, every=1, quiet=True) as watch:
            models.train(model, 1, torch.randn(16, 32), torch.randint(0, 32, (16,)), lr=0.0)
    assert any(f.kind.value == "exploding" for f in watch.findings)


def test_warnings_can_be_filtered_the_standard_way():
    model = models.small_mlp()
    with torch.no_grad():
        model[2].bias.fill_(-100.0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=DeadUnitsWarning)
        with GradWatch(model, every=1, dead_window=1, quiet=True):
            models.train(model, 2)
    assert not [r for r in record if issubclass(r.category, DeadUnitsWarning)]


# ---------------------------------------------------------------- reports
def test_report_to_dict_is_json_and_has_the_documented_keys():
    model = models.small_mlp()
    with torch.no_grad():
        model[2].bias[:12].fill_(-100.0)  # 12 of 16 units dead; the other 4 still pass gradient
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with GradWatch(model, every=1, dead_window=1, quiet=True) as watch:
            models.train(model, 2)
    d = json.loads(json.dumps(watch.report().to_dict()))
    layer = d["layers"]["3"]
    for key in ("dead_fraction", "saturated_fraction", "grad_norm", "output_grad_norm", "mean", "std",
                "zero_fraction"):
        assert key in layer
    assert d["layers"]["0"]["grad_norm"] > 0
    assert d["findings"][0].keys() >= {"kind", "layer", "step", "value", "message"}
    assert d["findings"][0]["kind"] == "dead_units"


def test_measures_only_every_nth_step():
    model = models.small_mlp()
    with GradWatch(model, every=3, histogram_every=None, quiet=True) as watch:
        models.train(model, 5)
    assert watch.steps == 5
    assert watch.report().step == 3  # steps 0 and 3 were measured


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,exc,needle", [
    ({"every": 0}, ValueError, "every"),
    ({"every": -5}, ValueError, "every"),
    ({"every": 2.5}, TypeError, "every"),
    ({"histogram_every": 0}, ValueError, "histogram_every"),
    ({"dead_window": -1}, ValueError, "dead_window"),
    ({"thresholds": {"dead_fraction": 1.5}}, ValueError, "dead_fraction"),
    ({"thresholds": {"no_such": 1}}, ValueError, "no_such"),
    ({"include": [3]}, TypeError, "include"),
    ({"steps": "backward"}, ValueError, "steps"),
    ({"include": "nothing.matches"}, ValueError, "nothing.matches"),
    ({"exclude": "*"}, ValueError, "exclude='\\*' leaves no module of Sequential to watch"),
    ({"include": "0", "exclude": "0"}, ValueError, "exclude='0' leaves no module.*include='0' matches"),
    ({"log_dir": 123}, TypeError, "log_dir must be a folder's path.*123"),
    ({"log_dir": ""}, TypeError, "log_dir"),
    ({"writer": "runs/x"}, TypeError, "writer must be a TensorBoard SummaryWriter.*str"),
    ({"console": "stdout"}, TypeError, "console must be a rich.console.Console.*str"),
    ({"bins": 10 ** 9}, ValueError, "bins must be at most 8192.*1000000000"),
    ({"quiet": "no"}, TypeError, "quiet must be True or False, got 'no'"),
    ({"include_eval": "yes"}, TypeError, "include_eval must be True or False"),
])
def test_bad_arguments_fail_at_construction(kwargs, exc, needle):
    with pytest.raises(exc, match=needle):
        GradWatch(models.small_mlp(), **kwargs)


def test_non_module_is_a_type_error():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        GradWatch(lambda x: x)  # type: ignore[arg-type]


def test_thresholds_validate_their_fields():
    with pytest.raises(ValueError, match="vanishing_ratio"):
        Thresholds(vanishing_ratio=0)
    with pytest.raises(ValueError, match="exploding_norm"):
        Thresholds(exploding_norm=float("nan"))


def test_unwritable_log_dir_names_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(LogDirError, match="file"):
        GradWatch(models.small_mlp(), log_dir=blocker / "runs")


def test_second_watch_on_the_same_model_is_refused():
    model = models.small_mlp()
    with GradWatch(model, quiet=True):
        with pytest.raises(AlreadyWatchedError, match="already watched"):
            GradWatch(model[0])
    GradWatch(model, quiet=True)  # fine again once the first has detached


def test_public_surface():
    # Written out on purpose: a change of the public surface must show in this test.
    assert sorted(gradwatch.__all__) == sorted([
        "GradWatch", "Thresholds", "StepMode", "Report", "LayerStats", "ParamStats", "Finding", "FindingKind",
        "GradWatchError", "AlreadyWatchedError", "LogDirError", "GradWatchWarning", "VanishingGradientWarning",
        "ExplodingGradientWarning", "DeadUnitsWarning", "SaturationWarning", "NonFiniteWarning",
        "LearningRateWarning", "AttentionCollapseWarning", "FP16OverflowWarning"])
    for name in gradwatch.__all__:
        assert getattr(gradwatch, name).__module__.startswith("gradwatch.")
    assert issubclass(NonFiniteWarning, GradWatchWarning) and issubclass(GradWatchWarning, UserWarning)


def test_optimizer_steps_and_clipped_gradients():
    model = models.small_mlp()
    x, y = models.batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradWatch(model, every=1, quiet=True, strict=True, optimizer=opt, steps="optimizer") as watch:
        for _ in range(3):
            opt.zero_grad()
            for chunk in range(4):  # gradient accumulation: 4 forwards, one optimizer step
                (nn.functional.cross_entropy(model(x[chunk::4]), y[chunk::4]) / 4).backward()
            pre_clip = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3).item()
            opt.step()
    rep = watch.report()
    assert watch.steps == 3 and rep.step == 2  # three optimizer steps; steps 0-2 measured
    assert rep.stats.total_grad_norm == pytest.approx(pre_clip, rel=1e-5)  # end of backward: before clipping
    assert rep.stats.total_applied_grad_norm == pytest.approx(1e-3, rel=1e-3)  # what the optimizer applied
    assert rep.to_dict()["params"]["0.weight"]["applied_grad_norm"] < rep.params["0.weight"].grad_norm


def test_a_gradient_changed_after_it_was_written_is_read_as_it_is_at_the_end_of_backward():
    # A hook that changes a gradient after it was accumulated, in the same backward: the numbers are
    # those of the gradient the optimizer will see, never of the one first written.
    model = models.small_mlp()
    x, y = models.batch()
    weight = model[0].weight
    with GradWatch(model, every=1, quiet=True, strict=True) as watch:
        models.train(model, 1)  # gradwatch's gradient hooks are placed, and stay (every step is measured)
        def halve(p: torch.Tensor) -> None:
            p.grad.mul_(0.5)
        weight.register_post_accumulate_grad_hook(halve)  # runs after gradwatch's
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        halved = torch.linalg.vector_norm(weight.grad).item()
        untouched = torch.linalg.vector_norm(model[2].weight.grad).item()
        model(x)  # the next step begins: the one before is summarised
        params = watch.report().params
    assert params["0.weight"].grad_norm == pytest.approx(halved, rel=1e-6)
    assert params["2.weight"].grad_norm == pytest.approx(untouched, rel=1e-6)


def test_optimizer_steps_need_the_optimizer():
    with pytest.raises(ValueError, match="optimizer=opt"):
        GradWatch(models.small_mlp(), steps="optimizer")
    with pytest.raises(TypeError, match="optimizer"):
        GradWatch(models.small_mlp(), optimizer="adam")  # type: ignore[arg-type]


def test_budget_widens_the_interval_only_at_its_adaptation_step():
    model = models.small_mlp()
    with GradWatch(model, every=1, budget=1e-4, quiet=True) as tight:  # gradwatch costs far more than 0.01 %
        models.train(model, 99)
        assert tight.every == 1  # nothing moves before step 100
        models.train(model, 21)
    assert tight.every >= 8 and tight.report().every == tight.every
    assert any("measuring every" in n for n in tight.report().notes)
    with pytest.raises(ValueError, match="budget"):
        GradWatch(model, budget=2)


def test_step_on_a_watch_that_is_not_attached_places_no_hook():
    model = models.small_mlp()
    watch = GradWatch(model, quiet=True, steps="manual")
    with watch:
        models.train(model, 2)
        watch.step()
    before = watch.steps
    with pytest.warns(GradWatchWarning, match="not attached"):
        watch.step()
    watch.step()  # said once
    assert watch.steps == before
    assert not any(getattr(p, "_post_accumulate_grad_hooks", None) or p._backward_hooks for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_weights_non_finite_at_the_first_step_are_not_blamed_on_an_earlier_update():
    model = models.small_mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradWatchWarning)
        with GradWatch(model, every=1, quiet=True) as watch:
            models.train(model, 1)
    (first,) = [f for f in watch.findings if f.kind.value == "non_finite"]
    assert (first.step, first.layer, first.condition) == (0, "0", "weights")
    assert "before training began" in first.message and "earlier" not in first.message
