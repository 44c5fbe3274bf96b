"""The gradient noise scale B_simple = tr(Σ)/|G|²: the estimator against numpy, and the watch against
the exact value of a synthetic problem, under gradient accumulation and under two DDP processes."""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gradwatch import GradWatch
from gradwatch.noise_scale import FAR_BELOW, SETTLED, NoiseScale, estimate, observations
from tests.test_distributed import free_port

D, N, SIGMA = 64, 16384, 0.5  # features, samples, label noise


def problem(seed: int = 0, sigma: float = SIGMA):
    """Linear regression y = x·w* + ε (x ~ N(0, I), ε ~ N(0, sigma²)) and weights w about 1 away from w*:
    B_simple is about D (1 + sigma²), 80 at the default sigma."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w_star = torch.randn(D, generator=g, dtype=torch.float64)
    y = x @ w_star + sigma * torch.randn(N, generator=g, dtype=torch.float64)
    return x, y, w_star + torch.randn(D, generator=g, dtype=torch.float64) / math.sqrt(D)


def exact_noise_scale(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
    """Brute force: every sample's gradient of (x·w - y)²/2 is (x·w - y) x; tr(Σ) and |G|² over the
    whole data set, in numpy."""
    x, y, w = x.numpy(), y.numpy(), w.numpy()
    per_sample = (x @ w - y)[:, None] * x
    g = per_sample.mean(0)
    return float(((per_sample - g) ** 2).sum(1).mean() / (g @ g))


def linear(w: torch.Tensor) -> nn.Module:
    model = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w[None])
    return model


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((model(x)[:, 0] - y) ** 2).mean()


def accumulate(steps: int, micro: int, batches: int, *, scale=lambda k: 1.0 / k, seed: int = 1, mode: str = "manual",
               scaler=None, grad_calls: bool = False, sizes=None, sigma: float = SIGMA, **kwargs) -> GradWatch:
    """``steps`` optimizer steps of ``batches`` micro-batches of ``micro`` samples drawn with replacement
    (``sizes``: per micro-batch instead), each loss times ``scale(batches)``; the weights stay where
    they are (learning rate 0), so the exact answer holds throughout."""
    x, y, w = problem(sigma=sigma)
    model = linear(w)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    g = torch.Generator().manual_seed(seed)
    extra = dict(optimizer=opt, steps="optimizer") if mode == "optimizer" else dict(steps=mode)
    with GradWatch(model, every=1, quiet=True, strict=True, scaler=scaler, **extra, **kwargs) as watch:
        for _ in range(steps):
            for size in sizes or [micro] * batches:
                idx = torch.randint(N, (size,), generator=g)
                loss = loss_of(model, x[idx], y[idx]) * scale(batches)
                if grad_calls:  # autograd.grad writes no .grad: not a micro-batch
                    torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
                (scaler.scale(loss) if scaler is not None else loss).backward()
            if mode == "optimizer":
                opt.step()
            elif mode == "manual":
                watch.step()
            opt.zero_grad()
    return watch


# ------------------------------------------------------------------ the estimator, pure
def test_the_estimates_are_unbiased_against_numpy_draws():
    """Per-sample gradients drawn with a known mean G and covariance Σ: averaged over many steps, the
    per-step estimates come to |G|² and tr(Σ)."""
    rng = np.random.default_rng(0)
    d, small, big = 32, 8, 32
    mean = rng.standard_normal(d) * 0.5
    cov_sqrt = rng.standard_normal((d, d)) / math.sqrt(d)
    trace = float(np.trace(cov_sqrt @ cov_sqrt.T))
    est = []
    for _ in range(4000):
        samples = mean + rng.standard_normal((big, d)) @ cov_sqrt.T
        g_small, g_big = samples[:small].mean(0), samples.mean(0)
        est.append(estimate(float(g_small @ g_small), small, float(g_big @ g_big), big))
    gradient_sq, trace_sq = np.mean(est, axis=0)
    assert gradient_sq == pytest.approx(float(mean @ mean), rel=0.05)
    assert trace_sq == pytest.approx(trace, rel=0.05)


def test_expected_norms_give_the_answer_exactly():
    g2, tr = 0.3, 12.0
    expected = lambda b: g2 + tr / b  # noqa: E731
    assert estimate(expected(16), 16, expected(48), 48) == pytest.approx((g2, tr), rel=1e-12)


def test_a_common_factor_on_both_gradients_cancels_in_the_ratio():
    """A loss averaged or summed over micro-batches, or scaled, multiplies both gradients by one c:
    both estimates by c², their ratio not at all."""
    for c in (1.0, 0.25, 1000.0):
        g2, tr = estimate(2.0 * c * c, 8, 1.25 * c * c, 32)
        assert tr / g2 == pytest.approx(8.0, rel=1e-12)


def test_one_batch_size_gives_no_observations():
    assert observations(2.0, micro_batches=1, samples=64, accumulated_sq=2.0) is None  # one pass, one process
    assert observations(4.0, micro_batches=2, samples=128, accumulated_sq=1.0, world=2) == (2.0, 64.0, 1.0, 128.0)
    assert observations(8.0, micro_batches=4, samples=128, accumulated_sq=4.0, world=2) == (2.0, 32.0, 1.0, 128.0)


def test_the_average_is_the_ratio_of_the_two_averages():
    avg = NoiseScale(decay=0.5)
    assert avg.value is None
    avg.add(1.0, 10.0)
    avg.add(3.0, 10.0)
    assert avg.value == pytest.approx((0.25 * 10 + 0.5 * 10) / (0.25 * 1 + 0.5 * 3))  # not the mean of 10 and 10/3
    avg.add(math.nan, 1.0)  # non-finite steps are left out
    assert avg.steps == 2
    avg.add(-100.0, 1.0)
    assert avg.value is None  # |G|² not positive on average: the mean gradient is lost in the noise


# ------------------------------------------------------------------ the watch against the exact answer
@pytest.mark.slow
def test_accumulation_agrees_with_the_exact_noise_scale():
    x, y, w = problem()
    exact = exact_noise_scale(x, y, w)
    watch = accumulate(steps=100, micro=64, batches=4)
    st = watch.report().stats
    assert st.batch_size == 256 and st.noise_scale_steps == 100
    assert st.noise_scale == pytest.approx(exact, rel=0.25)
    assert watch.report().to_dict()["noise_scale"] == st.noise_scale


@pytest.mark.filterwarnings("ignore:.*Global gradient norm")  # the loss times 1000
def test_how_the_loss_is_scaled_does_not_change_it():
    """Mean over micro-batches (loss / k), their sum, a factor of 1000, a GradScaler, and steps ended by
    optimizer.step(): the same estimates."""
    ref = accumulate(steps=12, micro=16, batches=3).report().stats.noise_scale
    assert ref is not None
    for kwargs in (dict(scale=lambda k: 1.0), dict(scale=lambda k: 1000.0), dict(mode="optimizer"),
                   dict(scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))):
        assert accumulate(steps=12, micro=16, batches=3, **kwargs).report().stats.noise_scale == \
            pytest.approx(ref, rel=1e-9), kwargs


def test_autograd_grad_calls_are_no_micro_batches():
    ref = accumulate(steps=6, micro=16, batches=2).report().stats.noise_scale
    assert accumulate(steps=6, micro=16, batches=2, grad_calls=True).report().stats.noise_scale == \
        pytest.approx(ref, rel=1e-9)


def test_gradients_are_bit_identical_with_the_hooks():
    x, y, w = problem()
    grads = []
    for watched in (False, True):
        model = linear(w)
        watch = GradWatch(model, steps="manual", every=1, quiet=True, strict=True)
        if watched:
            watch.attach()
        for i in range(3):
            loss_of(model, x[i * 16:(i + 1) * 16], y[i * 16:(i + 1) * 16]).backward()
        grads.append(model.weight.grad.clone())
        watch.detach()
        assert not model.weight._backward_hooks and not model.weight._post_accumulate_grad_hooks  # all removed
    assert torch.equal(grads[0], grads[1])


def test_undefined_with_one_batch_size():
    """One process and one backward pass per step has a single batch size: no estimate, and no hooks."""
    x, y, w = problem()
    model = linear(w)
    with GradWatch(model, every=1, quiet=True, strict=True) as watch:  # steps="forward"
        for i in range(4):
            loss_of(model, x[i * 16:(i + 1) * 16], y[i * 16:(i + 1) * 16]).backward()
            assert not watch._collector.noise.handles
            model.zero_grad()
    st = watch.report().stats
    assert st.noise_scale is None and st.noise_scale_steps == 0 and st.batch_size is None
    assert "gradient noise scale" not in str(watch.report().summary())
    one = accumulate(steps=5, micro=16, batches=1)  # steps="manual", one micro-batch each
    assert one.report().stats.noise_scale is None and one.report().stats.noise_scale_steps == 0
    assert not one._collector.noise.active()  # no more hooks after GIVE_UP such steps


def test_micro_batches_of_different_sizes_give_no_estimate():
    assert accumulate(steps=4, micro=16, batches=2, sizes=[16, 8]).report().stats.noise_scale_steps == 0


@pytest.mark.slow
def test_a_batch_far_below_it_gets_one_note(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    exact = exact_noise_scale(*problem(sigma=3.0))
    assert exact > 3 * FAR_BELOW * 16  # batches of 16 samples are 30x below it
    small = accumulate(steps=SETTLED + 50, micro=4, batches=4, sigma=3.0)
    notes = [n for n in small.report().notes if "noise scale" in n]
    assert len(notes) == 1 and "the batch of 16 samples" in notes[0], notes
    # At the default sigma B_simple is about 80: batches of 256 are above it.
    large = accumulate(steps=SETTLED + 10, micro=64, batches=4, log_dir=tmp_path)
    assert not [n for n in large.report().notes if "noise scale" in n]
    st = large.report().stats
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    values = acc.Scalars("gradient.noise_scale")
    assert len(values) == SETTLED + 10 and values[-1].value == pytest.approx(st.noise_scale, rel=1e-6)
    assert f"gradient noise scale B_simple ~ {st.noise_scale:.3g} samples" in str(large.report().summary())


# ------------------------------------------------------------------ two DDP processes
DDP_SETTINGS = (("ddp", 64, 1, False), ("no_sync", 32, 2, True), ("synced", 32, 2, False))
"""(name, micro-batch size, micro-batches per rank, whether all but the last run under no_sync)."""


def ddp_worker(rank: int, world: int, port: int, out: dict, steps: int = 80, seed: int = 1,
               settings=DDP_SETTINGS, sigma: float = SIGMA) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y, w = problem(sigma=sigma)
        g = torch.Generator().manual_seed(seed + 1000 * rank)  # each rank its own samples
        results = {}
        for name, micro, batches, no_sync in settings:
            model = nn.parallel.DistributedDataParallel(linear(w))
            with GradWatch(model, steps="manual", every=1, quiet=True, strict=True) as watch:
                for _ in range(steps):
                    for i in range(batches):
                        idx = torch.randint(N, (micro,), generator=g)
                        with model.no_sync() if no_sync and i < batches - 1 else torch.enable_grad():
                            (loss_of(model, x[idx], y[idx]) / batches).backward()
                    watch.step()
                    model.zero_grad()
            st = watch.report().stats
            results[name] = (st.noise_scale, st.noise_scale_steps, st.batch_size)
        out[rank] = results
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_ddp_processes_agree_with_the_exact_noise_scale():
    """Each rank's micro-batch gradients against DDP's all-reduced one: plain DDP (B = 64 vs 128), and
    two micro-batches per rank with and without no_sync (B = 32 vs 128)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mp.Manager() as manager:
            out = manager.dict()
            mp.spawn(ddp_worker, args=(2, free_port(), out), nprocs=2, join=True)
            ranks = dict(out)
    exact = exact_noise_scale(*problem())
    assert ranks[0] == ranks[1]  # combined over the ranks: the same everywhere
    for name, (value, steps, batch) in ranks[0].items():
        assert steps == 80 and batch == 128, name
        assert value == pytest.approx(exact, rel=0.25), name
