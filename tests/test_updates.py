"""Update-to-weight ratios across optimizer.step(), and the learning-rate finding and note."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from gradwatch import GradWatch, LearningRateWarning, Thresholds
from gradwatch import stats
from gradwatch.collect.updates import UPDATE_SAMPLE
from tests import models


def train(model, opt, steps, *, x=None, y=None, closure=False):
    if x is None:
        x, y = models.batch(64)
    for _ in range(steps):
        def loss_fn():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        if closure:
            opt.step(loss_fn)
        else:
            loss_fn()
            opt.step()


def watched(model, opt, steps, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradWatch(model, every=1, quiet=True, strict=True, optimizer=opt, **kw) as watch:
            train(model, opt, steps)
    return watch, [w for w in caught if issubclass(w.category, LearningRateWarning)]


def test_update_norms_against_hand_values():
    out = stats.update_norms([torch.tensor([3.0, 4.0]), torch.tensor([1.0])],
                             [torch.tensor([3.0, 5.0]), torch.tensor([3.0])], [1.0, 2.0])
    assert out.tolist() == [[1.0, 4.0], [5.0, 2.0]]


def test_sgd_ratio_is_lr_times_gradient_norm_over_weight_norm():
    torch.manual_seed(0)
    model = models.small_mlp()
    x, y = models.batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradWatch(model, every=1, quiet=True, strict=True, optimizer=opt) as watch:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        expected = {n: 0.1 * p.grad.norm().item() / p.norm().item() for n, p in model.named_parameters()}
        opt.step()
    got = watch.report().to_dict()["params"]
    for name, ratio in expected.items():
        assert got[name]["update_ratio"] == pytest.approx(ratio, rel=1e-5), name
        assert got[name]["learning_rate"] == 0.1
    assert watch.report().params["0.weight"].ndim == 2 and watch.report().params["0.bias"].ndim == 1
    # The layer's column is what the learning-rate rule judges there: its weight, not its bias.
    assert watch.report().layers["0"].update_ratio == pytest.approx(expected["0.weight"], rel=1e-5)
    assert expected["0.bias"] != pytest.approx(expected["0.weight"], rel=1e-2)
    from gradwatch.render import to_text

    assert "Δw/w" in to_text(watch.report().table())
    other = models.small_mlp()
    with GradWatch(other, every=1, quiet=True) as without:  # no optimizer=: no column, and no word of it
        models.train(other, 1)
    assert "Δw/w" not in to_text(without.report().table())


def test_large_tensors_are_sampled_with_the_same_elements_before_and_after():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 3))  # 60,000 > UPDATE_SAMPLE
    x, y = torch.randn(16, 300), torch.randint(0, 3, (16,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train(model, opt, 2, x=x, y=y)  # past Adam's first, sign-like step
    before = copy.deepcopy(model)
    with GradWatch(model, every=1, quiet=True, strict=True, optimizer=opt) as watch:
        train(model, opt, 1, x=x, y=y)
    exact = (model[0].weight - before[0].weight).norm() / before[0].weight.norm()
    sampled = watch.report().params["0.weight"].update_ratio
    assert model[0].weight.numel() > 10 * UPDATE_SAMPLE
    assert sampled == pytest.approx(exact.item(), rel=0.05)  # a 4,096-element strided sample's estimate
    # the sample is exact for a tensor below the cap
    exact2 = (model[2].weight - before[2].weight).norm() / before[2].weight.norm()
    assert watch.report().params["2.weight"].update_ratio == pytest.approx(exact2.item(), rel=1e-5)


def test_snapshot_memory_is_bounded():
    from gradwatch.collect.buffers import StepBuffers
    from gradwatch.collect.guard import Guard
    from gradwatch.collect.updates import UpdateReader

    big = nn.Linear(1000, 1000)
    buf = StepBuffers(histograms=False)
    reader = UpdateReader(lambda: [(n, "", p) for n, p in big.named_parameters()], Guard(True), lambda: buf)
    opt = torch.optim.SGD(big.parameters(), lr=0.1)
    reader._before(opt)
    held = sum(len(s.before) for s in reader._pending[1])  # 1-dimensional samples: tensors, or NumPy arrays on the CPU
    assert held <= UPDATE_SAMPLE + 1000  # the bias (1,000) whole, the weight (10^6) as a sample


@pytest.mark.parametrize("make, act", [
    (lambda p: torch.optim.Adam(p, lr=1e-3), nn.ReLU),
    (lambda p: torch.optim.AdamW(p, lr=1e-3), nn.Tanh),
    (lambda p: torch.optim.SGD(p, lr=0.1), nn.ReLU),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), nn.Sigmoid),
])
def test_healthy_training_is_silent(make, act):
    torch.manual_seed(0)
    model = models.small_mlp(act, 32)
    opt = make(model.parameters())
    watch, caught = watched(model, opt, 30)
    assert not caught and not [f for f in watch.findings if f.kind.value == "learning_rate"]
    assert not any("barely learn" in n for n in watch.report().notes)
    ratios = [p.update_ratio for p in watch.report().params.values()]
    assert all(r is not None and 0 < r < 0.1 for r in ratios)


@pytest.mark.parametrize("make, act, lr", [
    (lambda p: torch.optim.SGD(p, lr=10.0), nn.Sigmoid, "10"),
    (lambda p: torch.optim.Adam(p, lr=1.0), nn.ReLU, "1"),
])
def test_too_high_learning_rates_are_named(make, act, lr):
    torch.manual_seed(0)
    model = models.small_mlp(act, 32)
    opt = make(model.parameters())
    watch, caught = watched(model, opt, 12)
    found = [f for f in watch.findings if f.kind.value == "learning_rate"]
    assert found and caught
    f = found[0]
    assert f.layer in {"0", "2", "4"} and f.value >= f.threshold == 0.1
    assert f"learning rate {lr} is too high" in f.advice and ".weight " in f.message
    assert len([g for g in found if g.step == f.step]) == 1  # one finding per learning rate, naming the layers


def test_a_ratio_that_stays_high_over_the_window():
    # Adam at lr 0.05 on a small net: ratios ~0.1-0.3 every step, never 10x the threshold at once.
    torch.manual_seed(0)
    model = models.small_mlp(nn.ReLU, 32)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    watch, _ = watched(model, opt, 12)
    found = [f for f in watch.findings if f.kind.value == "learning_rate"]
    assert found and "measured steps" in found[0].message
    assert found[0].step >= Thresholds().update_window - 1  # not before the window is full


def test_too_small_updates_are_a_note_not_a_warning():
    torch.manual_seed(0)
    model = models.small_mlp(nn.ReLU, 32)
    opt = torch.optim.SGD(model.parameters(), lr=1e-7)
    watch, caught = watched(model, opt, 8)
    assert not caught and not watch.findings
    notes = [n for n in watch.report().notes if "barely learn" in n]
    assert len(notes) == 1 and "learning rate 1e-07" in notes[0]


def test_zero_initialised_weights_are_not_judged():
    torch.manual_seed(0)
    model = models.small_mlp(nn.ReLU, 32)
    nn.init.zeros_(model[4].weight)  # its ratios go inf, ~1, 1/2, 1/3, ... whatever the learning rate
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    watch, caught = watched(model, opt, 10)
    assert not caught
    assert watch.report().params["4.weight"].update_ratio is not None
    assert watch.report().params["4.weight"].update_window == 0


def test_closures_and_optimizer_steps():
    torch.manual_seed(0)
    model = models.small_mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.05, max_iter=3)
    with GradWatch(model, every=1, quiet=True, strict=True, optimizer=opt, steps="optimizer") as watch:
        train(model, opt, 3, closure=True)
    ratios = [p.update_ratio for p in watch.report().params.values()]
    assert ratios and all(r is not None and r > 0 for r in ratios)
    model = models.small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradWatch(model, every=1, quiet=True, strict=True, optimizer=opt) as watch:  # steps counted by forwards
        train(model, opt, 3, closure=True)
    assert watch.report().params["0.weight"].update_ratio > 0


def test_only_parameters_the_optimizer_holds():
    torch.manual_seed(0)
    model = models.small_mlp()
    opt = torch.optim.SGD(model[4].parameters(), lr=0.1)  # the head only
    with GradWatch(model, every=1, quiet=True, strict=True, optimizer=opt) as watch:
        train(model, opt, 2)
    params = watch.report().to_dict()["params"]
    assert params["4.weight"]["update_ratio"] > 0 and params["0.weight"]["update_ratio"] is None


def test_without_optimizer_there_is_no_ratio_and_hooks_go_on_detach():
    model = models.small_mlp()
    with GradWatch(model, every=1, quiet=True, strict=True) as watch:
        models.train(model, 2)
    assert watch.report().to_dict()["params"]["0.weight"]["update_ratio"] is None
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    watch = GradWatch(model, every=1, quiet=True, strict=True, optimizer=opt)
    watch.attach()
    assert len(opt._optimizer_step_pre_hooks) == 2 and len(opt._optimizer_step_post_hooks) == 1
    watch.detach()
    watch.detach()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_parameters_are_bit_identical_with_and_without_the_watch():
    torch.manual_seed(0)
    base = models.small_mlp(nn.Tanh, 32)

    def run(watch: bool):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if watch:
            with GradWatch(model, every=1, quiet=True, strict=True, optimizer=opt):
                train(model, opt, 5)
        else:
            train(model, opt, 5)
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True)))


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = models.small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradWatch(model, log_dir=tmp_path, every=1, quiet=True, optimizer=opt) as watch:
        train(model, opt, 3)
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("update.ratio/0.weight")
    assert [e.step for e in events] == [0, 1, 2]
    assert events[-1].value == pytest.approx(watch.report().params["0.weight"].update_ratio, rel=1e-6)


def test_thresholds_are_validated():
    with pytest.raises(ValueError, match="update_window must be an integer"):
        Thresholds(update_window=2.5)
    with pytest.raises(ValueError, match="update_ratio_low"):
        Thresholds(update_ratio_low=0.5, update_ratio_high=0.1)
    with pytest.raises(ValueError, match="between 0 and 1"):
        Thresholds(update_ratio_high=2.0)
    assert math.isclose(Thresholds().update_ratio_high, 0.1)


# ---------------------------------------------------------------- several processes
def _ratios_worker(rank: int, world: int, port: int, how: str, out: dict) -> None:
    import os

    import torch.distributed as dist

    from tests.test_distributed import data, make_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = make_model()
        if how == "ddp":
            model = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        x, y = data()
        x, y = x[rank * 32:(rank + 1) * 32], y[rank * 32:(rank + 1) * 32]
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with GradWatch(model, every=1, quiet=True, strict=True, optimizer=opt) as watch:
            train(model, opt, 2, x=x, y=y)
        out[rank] = {n: p.update_ratio for n, p in watch.report().params.items()}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ddp", "fsdp"])
def test_ranks_report_the_ratio_of_the_whole_parameter(how):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from tests.test_distributed import data, free_port, make_model

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    if how == "fsdp":
        from torch.distributed import fsdp

        if not hasattr(fsdp, "fully_shard"):
            pytest.skip("torch.distributed.fsdp.fully_shard is not in this torch")
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ratios_worker, args=(2, free_port(), how, out), nprocs=2, join=True)
        ranks = dict(out)
    model = make_model()
    x, y = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradWatch(model, every=1, quiet=True, strict=True, optimizer=opt) as watch:
        train(model, opt, 2, x=x, y=y)
    one = {n: p.update_ratio for n, p in watch.report().params.items()}
    for rank in (0, 1):
        assert ranks[rank].keys() == one.keys()
        for name, ratio in one.items():
            assert ranks[rank][name] == pytest.approx(ratio, rel=1e-4), (how, rank, name)


def test_vanishing_gradients_defer_to_the_update_ratios_when_the_optimizer_is_known():
    from gradwatch.report import FindingKind, LayerStats, ParamStats, StepStats
    from gradwatch.rules import evaluate

    def step(updates):  # gradient per weight 1e-6, 1e-3, 1 from the first layer to the last
        st = StepStats(step=7)
        for i, (g, u) in enumerate(zip((1e-6, 1e-3, 1.0), updates)):
            st.layers[f"l{i}"] = LayerStats(name=f"l{i}", type="Linear", count=10, update_ratio=u)
            st.params[f"l{i}.weight"] = ParamStats(f"l{i}.weight", f"l{i}", 10, g, g, 1.0)
        return {f.kind for f in evaluate(st, Thresholds())}

    assert FindingKind.VANISHING in step((None, None, None))  # no optimizer: judged by the gradients
    assert FindingKind.VANISHING not in step((2e-3, 2e-3, 2.5e-3))  # Adam: 2e-3 / 2.5e-3 = 0.8 of the last's
    assert FindingKind.VANISHING in step((1e-6, 1e-3, 2e-3))  # SGD: 1e-6 / 2e-3 = 5e-4 < 1e-3
