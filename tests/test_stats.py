"""Pure statistics against independent numpy references."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from gradwatch import stats


@pytest.fixture(autouse=True, params=["numpy", "torch"])
def cpu_path(request, monkeypatch):
    """Every test runs twice on the CPU: the NumPy reductions CPU tensors get, and the PyTorch
    ones every other device gets."""
    monkeypatch.setattr(stats, "HOST_ARRAYS", request.param == "numpy")
    return request.param


def row_of(t, lower=None, upper=None, margin=0.01, max_elements=1 << 15) -> list:
    """The row of ``t``'s sample on the path in force: ``stats.sample_rows_host`` for a CPU tensor
    NumPy reads, else ``stats.sample_rows`` on a one-row buffer padded with NaN."""
    limits = stats.saturation_limits(lower, upper, margin) if lower is not None or upper is not None else None
    a = stats.host_array(t)
    if a is not None:
        return stats.sample_rows_host(t, a, max_elements, limits)[0]
    s = stats.sample_view(t.detach(), max_elements)
    x = torch.cat([s.float().reshape(1, -1), torch.full((1, 3), float("nan"))], 1)
    low, high = (torch.tensor([[limits[0]]]), torch.tensor([[limits[1]]])) if limits else (None, None)
    return stats.sample_rows(x, torch.tensor([[float(s.numel())]]), low, high)[0].tolist()


@pytest.fixture
def x():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 10, generator=g)
    t[t.abs() < 0.3] = 0.0
    return t


def summary(t, *args, **kwargs) -> dict:
    m = stats.sample_size(t, kwargs.get("max_elements", 1 << 15))
    return stats.activation_moments(stats.activation_summary(t, *args, **kwargs).tolist(), t.numel(), m)


def test_activation_summary_matches_numpy(x):
    a = x.numpy().astype(np.float64)
    got = summary(x, -1.0, 1.0, margin=0.1)
    assert got["mean"] == pytest.approx(a.mean(), rel=1e-5)
    assert got["var"] == pytest.approx(a.var(), rel=1e-5)
    assert got["zeros"] == (a == 0).sum()
    assert got["nonfinite"] is False
    assert got["saturated"] == ((a < -1 + 0.2) | (a > 1 - 0.2)).sum()


def test_activation_summary_one_sided_and_unbounded(x):
    a = x.numpy().copy()
    upper_only = summary(x, None, 0.5, margin=0.1)["saturated"]
    assert upper_only == (a > 0.5 - 0.1).sum()
    lower_only = summary(x, -0.5, None, margin=0.1)["saturated"]
    assert lower_only == (a < -0.5 + 0.1).sum()
    assert summary(x)["saturated"] == 0
    np.testing.assert_array_equal(x.numpy(), a)  # scratch work never touches the input


def test_half_precision_is_summarised_in_float32():
    big = torch.full((1000,), 300.0, dtype=torch.float16)  # 300^2 * 1000 overflows fp16
    s = summary(big)
    assert s["mean"] == pytest.approx(300.0) and s["var"] == pytest.approx(0.0, abs=1e-3)
    assert s["nonfinite"] == 0


def test_large_tensors_are_summarised_from_a_sample_but_mean_and_nan_are_exact():
    g = torch.Generator().manual_seed(6)
    t = torch.relu(torch.randn(512, 300, generator=g))
    a = t.numpy().astype(np.float64)
    got = summary(t, 0.0, 2.0, margin=0.1, max_elements=4096)
    assert got["mean"] == pytest.approx(a.mean(), rel=1e-5)
    assert got["var"] == pytest.approx(a.var(), rel=0.05)
    assert got["zeros"] / a.size == pytest.approx((a == 0).mean(), abs=0.02)
    assert got["saturated"] / a.size == pytest.approx(((a < 0.2) | (a > 1.8)).mean(), abs=0.02)
    t[7, 11] = float("nan")  # almost surely not in the sample; the full-tensor sum still sees it
    assert summary(t, max_elements=4096)["nonfinite"]


def test_strided_sample_visits_every_feature():
    t = torch.arange(64 * 512).reshape(64, 512)
    s = stats.strided_sample(t, 4096)
    assert 2048 <= s.numel() <= 8192 and len(set((s % 512).tolist())) == 512
    assert stats.sample_size(t, 4096) == s.numel()


def test_large_mean_keeps_an_exact_variance():
    t = torch.tensor([1e4, 1e4 + 1, 1e4 + 2])
    assert summary(t)["var"] == pytest.approx(2 / 3, rel=1e-4)


def test_nonfinite_are_detected():
    t = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 2.0])
    assert summary(t)["nonfinite"] and summary(t[2:3])["nonfinite"]
    assert not summary(t[[0, 4]])["nonfinite"]


def test_slope_saturation_matches_the_analytic_derivative():
    g = torch.Generator().manual_seed(1)
    pre = torch.randn(4096, generator=g) * 5
    y = torch.tanh(pre)
    g_out = torch.randn(4096, generator=g)
    g_in = (1 - y * y) * g_out
    valid, sat, peak = stats.slope_saturation(y, g_in, g_out, slope=0.04).tolist()
    deriv = (1 - np.tanh(pre.numpy().astype(np.float64)) ** 2)
    ok = (g_out.numpy() != 0) & (y.numpy() != 0)
    assert valid == ok.sum()
    assert peak == pytest.approx(deriv[ok].max(), rel=1e-4)
    assert sat == pytest.approx(((deriv < 0.04 * deriv[ok].max()) & ok).sum(), abs=3)


def test_slope_saturation_ignores_a_rectifiers_zero_side():
    pre = torch.linspace(-3, 3, 601)
    y = pre.clamp(min=0)
    g_out = torch.ones_like(y)
    g_in = (pre > 0).float()
    valid, sat, peak = stats.slope_saturation(y, g_in, g_out, slope=0.04).tolist()
    assert sat == 0 and valid == (y != 0).sum().item() and peak == 1.0


def test_slope_saturation_uses_the_running_peak():
    y = torch.tensor([0.5, 0.6])
    g = torch.ones(2)
    _, sat, _ = stats.slope_saturation(y, 0.01 * g, g, slope=0.04, peak=torch.tensor(1.0)).tolist()
    assert sat == 2


@pytest.mark.parametrize("shape,dim", [((5, 7), 1), ((5, 4, 7), 2), ((5, 3, 6, 6), 1), ((2, 3, 4, 4, 4), 1)])
def test_active_units_reduce_all_but_the_unit_dim(shape, dim):
    g = torch.Generator().manual_seed(2)
    t = torch.relu(torch.randn(*shape, generator=g) - 1.5) * torch.sign(torch.randn(*shape, generator=g))
    a = t.numpy()
    axes = tuple(i for i in range(a.ndim) if i != dim)
    np.testing.assert_array_equal(stats.active_units(t).numpy(), (a != 0).any(axis=axes))


def test_active_units_needs_a_batch_dimension():
    assert stats.active_units(torch.ones(3)) is None


@pytest.mark.parametrize("shape,dim", [((5, 7), 1), ((5, 4, 7), 2), ((5, 3, 6, 6), 1), ((2, 3, 4, 4, 4), 1)])
def test_unit_sums_of_a_rectifier_give_its_active_units_and_its_total(shape, dim):
    g = torch.Generator().manual_seed(4)
    t = torch.relu(torch.randn(*shape, generator=g) - 1.0)
    t[(slice(None),) * dim + (0,)] = 0.0  # one unit never active
    a = t.numpy().astype(np.float64)
    axes = tuple(i for i in range(a.ndim) if i != dim)
    sums = stats.unit_sums(t)
    np.testing.assert_allclose(sums.numpy(), a.sum(axis=axes), rtol=1e-6)
    np.testing.assert_array_equal((sums > 0).numpy(), stats.active_units(t, nonnegative=True).numpy())
    assert not (sums > 0)[0]
    # The total from the sums summarises as the tensor's own does.
    given = summary(t, 0.0, None, nonnegative=True, total=sums.sum())
    assert given == pytest.approx(summary(t, 0.0, None, nonnegative=True), rel=1e-6)


def test_unit_sums_count_a_unit_with_a_nan_as_inactive_and_need_a_batch_dimension():
    t = torch.tensor([[0.0, 1.0, float("nan")], [0.0, 2.0, 1.0]])
    assert (stats.unit_sums(t) > 0).tolist() == [False, True, False] == stats.active_units(t, nonnegative=True).tolist()
    assert stats.unit_sums(torch.ones(3)) is None and stats.unit_sums(torch.ones(0, 3)) is None


@pytest.mark.parametrize("shape,dim,channels_first", [((5, 7), 1, None), ((5, 4, 7), 2, None), ((5, 3, 6, 6), 1, None),
                                                      ((5, 6, 6, 3), 3, False), ((5, 3, 8), 1, True),
                                                      ((2, 3, 4, 4, 4), 1, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_unit_max_matches_numpy_over_all_but_the_unit_dim(shape, dim, channels_first, dtype):
    g = torch.Generator().manual_seed(5)
    t = (torch.randn(*shape, generator=g) * 3 - 20).to(dtype)  # pre-activations pushed far negative
    t[(slice(None),) * dim + (1,)] += 25.0  # one unit alive
    a = t.float().numpy()
    axes = tuple(i for i in range(a.ndim) if i != dim)
    got = stats.unit_max(t, channels_first)
    assert got.dtype == dtype  # a maximum is exact in any precision
    np.testing.assert_array_equal(got.float().numpy(), a.max(axis=axes))
    kept = stats.unit_max(t, channels_first, keepdim=True)
    np.testing.assert_array_equal(kept.float().numpy(), a.max(axis=axes, keepdims=True))


def test_unit_max_of_a_unit_with_a_nan_is_nan_and_needs_a_batch_dimension():
    t = torch.tensor([[-20.0, 1.0, float("nan")], [-21.0, 2.0, 1.0]])
    got = stats.unit_max(t)
    assert got[:2].tolist() == [-20.0, 2.0] and math.isnan(got[2])  # NaN > cut-off is False: not active
    assert stats.unit_max(torch.ones(3)) is None and stats.unit_max(torch.ones(0, 3)) is None


def test_histogram_matches_numpy():
    g = torch.Generator().manual_seed(3)
    t = torch.randn(10_000, generator=g)
    h = stats.histogram(t, bins=20, max_elements=1 << 20).tolist()
    a = t.numpy().astype(np.float64)
    counts, _ = np.histogram(a, bins=20, range=(a.min(), a.max()))
    assert h[:5] == pytest.approx([a.min(), a.max(), a.size, a.sum(), (a * a).sum()], rel=1e-5)
    # Edges computed in float32 vs float64 may move a value sitting on a bin edge.
    assert np.abs(np.array(h[5:]) - counts).sum() <= 4


def test_histogram_skips_nonfinite_and_handles_constants():
    h = stats.histogram(torch.tensor([2.0, 2.0, float("nan")]), bins=4).tolist()
    assert h[:3] == [2.0, 2.0, 2.0] and sum(h[5:]) == 2


@pytest.mark.parametrize("values", [[1e30, -1e30, 2.0], [float("inf"), float("-inf")], [float("nan"), 1.0], [3.0]])
def test_sums_of_squares_of_nonfinite_or_overflowing_values_warn_of_nothing(values):
    # Under -W error a NumPy RuntimeWarning would raise in the user's training step.
    a = np.array(values * 10, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = stats.host_norm(a)
    assert got == pytest.approx(float(np.sqrt(np.sum(a.astype(np.float64) ** 2))), nan_ok=True) or \
        (math.isinf(got) and np.abs(a).max() ** 2 > np.finfo(np.float32).max)


@pytest.mark.parametrize("values", [[0.5, -2.0, 7.25, 3.0, 7.25], [1.0, float("nan"), 3.0, float("-inf")],
                                    [1e-310, 2e-310, 3e-310], [float("nan")], [3e38, 2.5e38, 1.0]])
@pytest.mark.parametrize("scale", [None, 0.5, 1e300])
def test_a_cpu_histogram_is_the_device_paths_bin_for_bin(values, scale):
    # The top value lands in the last bin, a range too narrow to divide (subnormal) puts all in the first.
    t = torch.tensor(values * 50, dtype=torch.float64)
    host = stats.histogram_host(t, t.numpy(), 16, scale=scale)
    x = stats.strided_sample(t, stats.HISTOGRAM_SAMPLES).reshape(1, -1) * (1.0 if scale is None else scale)
    device = stats.histogram_rows(x, 16)[0].tolist()
    np.testing.assert_allclose(host, device, rtol=1e-12)
    assert sum(host[4:-1]) + host[-1] == t.numel()


@pytest.mark.parametrize("values", [[1.0, float("nan"), 0.0, 3.0], [0.0, float("inf"), 2.0], [5.0, 5.0],
                                    [0.0, 1e-44, 2e-44]])
def test_both_paths_give_the_same_numbers(values, monkeypatch):
    t = torch.tensor(values * 100)
    total = float(t.sum())
    for args in [(), (0.0, 1.0), (None, 4.0), (-1.0, None)]:
        rows = []
        for host in (True, False):
            monkeypatch.setattr(stats, "HOST_ARRAYS", host)
            m = stats.sample_size(t, 1 << 15)
            moments = stats.row_moments(total, t.numel(), row_of(t, *args), m)
            rows.append(([moments[k] for k in ("mean", "var", "zeros", "nonfinite", "saturated")],
                         stats.histogram(t, bins=8).tolist()))
        for host, plain in zip(*rows):
            np.testing.assert_allclose(np.array(host, dtype=float), np.array(plain, dtype=float), rtol=1e-6,
                                       equal_nan=True)


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "expanded", "sliced", "float64", "empty", "scalar"])
def test_both_paths_agree_on_every_memory_layout(layout, monkeypatch):
    g = torch.Generator().manual_seed(9)
    base = torch.relu(torch.randn(16, 8, 12, 12, generator=g))
    t = {"channels_last": base.to(memory_format=torch.channels_last), "transposed": base[0, 0].t(),
         "expanded": base[:, :1].expand(16, 8, 12, 12), "sliced": base[::3, 1:5, ::2],
         "float64": base.double(), "empty": base[:0], "scalar": base[0, 0, 0, 0]}[layout]
    rows = []
    reference = summary(t, 0.0, 1.0, max_elements=256)
    for host in (True, False):
        monkeypatch.setattr(stats, "HOST_ARRAYS", host)
        m = stats.sample_size(t, 256)
        got = stats.row_moments(float(t.double().sum()), t.numel(), row_of(t, 0.0, 1.0, max_elements=256), m)
        if t.numel():
            assert got == pytest.approx(reference, rel=1e-5, abs=1e-6)  # the per-tensor reference
        rows.append(([got[k] for k in ("mean", "var", "zeros", "saturated")],
                     stats.histogram(t, bins=8, max_elements=128).tolist()))
    for host, plain in zip(*rows):
        np.testing.assert_allclose(np.array(host), np.array(plain), rtol=1e-5, atol=1e-6)


def test_huge_values_raise_no_numpy_warning_under_warnings_as_errors():
    import warnings

    t = torch.tensor([3e38, -3e38, 1e30, 0.0] * 50)  # sums and squares overflow float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning from NumPy would raise in the user's step
        summary_row = row_of(t, 0.0, 1.0)
        hist = stats.histogram(t, bins=4).tolist()
    var = stats.row_moments(float(t.sum()), t.numel(), summary_row, t.numel())["var"]
    assert math.isinf(var) or math.isnan(var)  # as PyTorch's float32 norm: overflowed, never a finite spread
    assert hist[2] == t.numel() and sum(hist[5:]) == t.numel()


def test_a_cpu_tensor_is_read_in_place_only_when_plain(monkeypatch):
    monkeypatch.setattr(stats, "HOST_ARRAYS", True)
    assert stats.host_array(torch.ones(3)) is not None
    assert stats.host_array(torch.ones(3, requires_grad=True)) is not None  # read detached
    assert stats.host_array(torch.ones(3, dtype=torch.float16)) is None  # NumPy sums float16 in float16
    assert stats.host_array(torch.ones(3).to_sparse()) is None
    assert stats.host_array(torch.nn.Parameter(torch.ones(3))) is not None


def test_histogram_samples_without_rng():
    t = torch.arange(1_000_000, dtype=torch.float32)
    state = torch.get_rng_state()
    h = stats.histogram(t, bins=10, max_elements=1000).tolist()
    assert torch.equal(state, torch.get_rng_state())
    assert 900 <= h[2] <= 1100  # about max_elements


def test_grad_summaries_match_numpy():
    g = torch.Generator().manual_seed(4)
    grads = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    weights = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    got = stats.grad_summaries(grads, weights).numpy()
    for i, (gr, w) in enumerate(zip(grads, weights)):
        assert got[0, i] == pytest.approx(np.linalg.norm(gr.numpy()), rel=1e-5)
        assert got[1, i] == pytest.approx(np.abs(gr.numpy()).max(), rel=1e-6)
        assert got[2, i] == pytest.approx(np.linalg.norm(w.numpy()), rel=1e-5)


@pytest.mark.parametrize("dtype,weight_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                                (torch.float64, torch.float64)])
def test_grad_summaries_in_other_dtypes_and_with_the_largest_entry_negative(dtype, weight_dtype):
    g = torch.Generator().manual_seed(7)
    grads = [torch.randn(40, 30, generator=g).to(dtype), torch.randn(30, generator=g).to(dtype)]
    grads[0][3, 4] = -9.0  # the largest magnitude is a negative entry
    weights = [torch.randn(40, 30, generator=g).to(weight_dtype), torch.randn(30, generator=g).to(weight_dtype)]
    got = stats.grad_summaries(grads, weights).numpy()
    for i, (gr, w) in enumerate(zip(grads, weights)):
        a, b = gr.double().numpy(), w.double().numpy()
        assert got[0, i] == pytest.approx(np.linalg.norm(a), rel=1e-3)
        assert got[1, i] == pytest.approx(np.abs(a).max(), rel=1e-6)
        assert got[2, i] == pytest.approx(np.linalg.norm(b), rel=1e-3)
    assert got[1, 0] == 9.0


def test_grad_summaries_flag_nonfinite():
    got = stats.grad_summaries([torch.tensor([1.0, float("nan")])], [torch.ones(2)])
    assert math.isnan(got[0, 0].item())


def test_merge_moments_matches_concatenation():
    g = np.random.default_rng(5)
    parts = [g.normal(i, 1 + i, size=n) for i, n in enumerate((10, 1, 300))]
    merged = stats.merge_moments([(len(p), p.mean(), p.var()) for p in parts])
    whole = np.concatenate(parts)
    assert merged[0] == whole.size
    assert merged[1] == pytest.approx(whole.mean()) and merged[2] == pytest.approx(whole.var())


def test_to_host_keeps_order_and_shapes_across_dtypes():
    ts = [torch.tensor([1.0, 2.0]), torch.tensor(3, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.float64),
          torch.tensor([0.5], dtype=torch.float16)]
    assert stats.to_host(ts) == [[1.0, 2.0], [3.0], [0.0, 0.0, 0.0, 0.0], [0.5]]


def layouts():
    """CPU tensors of every kind NumPy may be asked to read, by name."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(6, 4, 5, 5, generator=g)
    return {"contiguous": base, "channels_last": base.to(memory_format=torch.channels_last),
            "transposed": base[0, 0].t(), "expanded": base[:, :1].expand(6, 4, 5, 5), "sliced": base[::2, 1:3, ::2],
            "float64": base.double(), "empty": base[:0], "scalar": base[0, 0, 0, 0], "permuted": base.permute(3, 1, 0, 2),
            "requires_grad": base.clone().requires_grad_(), "non_leaf": base.clone().requires_grad_() * 2,
            "parameter": torch.nn.Parameter(base.clone()), "negative_bit": torch._neg_view(base),
            "float16": base.half(), "bfloat16": base.bfloat16()}


@pytest.mark.parametrize("layout", list(layouts()))
def test_numpy_reads_a_cpu_tensor_in_place_without_a_pytorch_op(layout, cpu_path):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append(str(func))
            return func(*args, **(kwargs or {}))

    t = layouts()[layout]
    with Ops() as ops:
        a = stats.host_array(t)
    plain = t.dtype in (torch.float32, torch.float64) and not t.is_neg()
    if cpu_path == "torch" or not plain:
        assert a is None  # the PyTorch path (a negative bit, half precision: NumPy does not read them)
        return
    assert ops.calls == []
    assert a.shape == tuple(t.shape) and a.dtype == {torch.float32: np.float32, torch.float64: np.float64}[t.dtype]
    np.testing.assert_array_equal(a, t.detach().numpy())
    if t.numel():
        assert not a.flags.writeable  # never a way to change the user's tensor
        assert np.shares_memory(a, t.detach().numpy())
        np.testing.assert_array_equal(stats.host_flat(a), stats.flat_view(t.detach()).numpy())  # memory order


def test_an_array_keeps_its_tensor_alive(cpu_path):
    import gc

    t = torch.arange(1000, dtype=torch.float32) * 2
    a = stats.host_array(t)
    if a is None:
        return
    del t
    gc.collect()
    torch.ones(1000) * 7  # memory freed by now would be reused
    np.testing.assert_array_equal(a, np.arange(1000, dtype=np.float32) * 2)


@pytest.mark.parametrize("layout", list(layouts()))
def test_sample_rows_histograms_and_norms_agree_with_the_reference_on_every_layout(layout):
    t = layouts()[layout]
    x = t.detach().double()
    if t.numel():
        reference = summary(t, -1.0, 1.0, max_elements=64)
        got = stats.row_moments(float(x.sum()), t.numel(), row_of(t, -1.0, 1.0, max_elements=64),
                                stats.sample_size(t, 64))
        assert got == pytest.approx(reference, rel=1e-2 if t.dtype in (torch.float16, torch.bfloat16) else 1e-5,
                                    abs=1e-5)
        expected = stats.strided_sample(t, 64).double().numpy()
        h = stats.histogram(t, bins=8, max_elements=64).tolist()
        assert h[2] == expected.size and h[3] == pytest.approx(expected.sum(), rel=1e-5, abs=1e-5)
    norm = stats.l2_norm_now(t)
    assert float(norm) == pytest.approx(float(torch.linalg.vector_norm(x)), rel=1e-3, abs=1e-6)
    assert isinstance(norm, float) == (stats.host_array(t) is not None)


@pytest.mark.parametrize("layout", list(layouts()))
def test_grad_summaries_match_numpy_on_every_layout(layout):
    t = layouts()[layout]
    x = t.detach().double().numpy()
    w = t.detach().flip(0) if t.dim() else t.detach()
    grads, weights = [t.detach(), torch.randn(7)], [w, torch.ones(7)]
    got = stats.grad_summaries(grads, weights).numpy()
    rel = 1e-2 if t.dtype in (torch.float16, torch.bfloat16) else 1e-5
    assert got[0, 0] == pytest.approx(np.linalg.norm(x), rel=rel, abs=1e-6)
    assert got[1, 0] == pytest.approx(np.abs(x).max() if x.size else 0.0, rel=1e-6)
    assert got[2, 0] == pytest.approx(np.linalg.norm(w.double().numpy()), rel=rel, abs=1e-6)
    assert got[:, 1] == pytest.approx([np.linalg.norm(grads[1].numpy()), grads[1].abs().max().item(), 7 ** 0.5],
                                      rel=1e-6)


# max |g| in one pass (small), two passes (large), PyTorch's dot (from stats.DOT_ELEMENTS) and aminmax (from
# stats.AMINMAX_ELEMENTS)
@pytest.mark.parametrize("n", [8, 1 << 16, stats.DOT_ELEMENTS + 3, stats.AMINMAX_ELEMENTS + 5])
def test_grad_summaries_of_overflowing_and_nonfinite_gradients(n):
    big = torch.full((n,), 1e19)
    big[3] = -3e19  # the largest magnitude is negative
    nan = torch.randn(n)
    nan[n // 2] = float("nan")
    inf = torch.zeros(n)
    inf[1] = -float("inf")
    got = stats.grad_summaries([big, nan, inf], [torch.ones(n)] * 3).numpy()
    exact = np.linalg.norm(big.double().numpy())
    assert got[0, 0] == pytest.approx(exact, rel=1e-6)  # the float32 sum of squares overflowed: scaled
    assert got[1, 0] == -big[3].item()
    assert math.isnan(got[0, 1]) and math.isnan(got[1, 1])
    assert math.isinf(got[0, 2]) and got[1, 2] == math.inf
    assert got[2].tolist() == pytest.approx([n ** 0.5] * 3)


@pytest.mark.parametrize("values", [[3e38, 3e38, 1.0], [float("inf"), float("-inf"), 2.0], [float("nan"), 1.0, 0.0]])
def test_numpy_reductions_of_nonfinite_or_overflowing_values_warn_of_nothing_and_leave_numpys_error_state(values):
    # Under -W error a NumPy RuntimeWarning would raise in the user's training step; the error state
    # gradwatch sets for its own reductions is NumPy's again afterwards.
    t = torch.tensor(values * 20)
    with np.errstate(all="ignore"):
        doubled = t.numpy() * 2
    before = np.geterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = stats.grad_summaries([t, t[:7]], [t, t[:7]]).numpy()
        row, _ = stats.sample_rows_host(t, t.numpy(), 32768, limits=(-1.0, 1.0))
        scaled, nested = stats.sample_rows_host(t, t.numpy(), 32768, scale=1e30)  # the copy's multiply overflows
        _, nested = stats.sample_rows_host(t, t.numpy(), 32, bins=16, histogram_elements=8)  # with its histogram
        total = stats.host_sum(t.numpy().reshape(6, 10))
        hist = stats.histogram_host(t, t.numpy(), 16, scale=1e300)  # scaled past float64's range too
        ratios = stats.update_norms([t.numpy()], [doubled], [1.0])
    assert np.geterr() == before
    assert len(hist) == 4 + 16 + 1 and hist[-1] > 0  # the non-finite elements are left out, and counted
    assert ratios.shape == (2, 1)
    exact = t.double().numpy()
    assert rows[0, 0] == pytest.approx(np.linalg.norm(exact), rel=1e-6, nan_ok=True)  # scaled where it overflowed
    assert rows[1, 0] == pytest.approx(np.abs(exact).max(), nan_ok=True)
    assert not math.isfinite(total) and not math.isfinite(row[0])  # float32 sums: overflowed, or NaN
    assert not math.isfinite(scaled[0]) and nested is not None and len(nested) == 4 + 16 + 1
    with pytest.warns(RuntimeWarning):  # NumPy's own state, as the user left it, still warns
        np.add.reduce(np.array([3e38, 3e38], dtype=np.float32))


def test_grad_summaries_of_a_gradient_read_from_main_memory_match_numpy():
    g = torch.Generator().manual_seed(13)
    grads = [torch.randn(1100, 1000, generator=g), torch.randn(1000, 1100, generator=g).t()]  # dense; strided
    grads[0][700, 3] = -11.0
    grads[1][5, 900] = 12.0
    weights = [torch.randn(1100, 1000, generator=g), torch.randn(1000, 1100, generator=g)]
    got = stats.grad_summaries(grads, weights).numpy()
    assert got[1].tolist() == [11.0, 12.0]
    for i, (gr, w) in enumerate(zip(grads, weights)):
        assert got[0, i] == pytest.approx(np.linalg.norm(gr.double().numpy()), rel=1e-5)
        # (the device path sums a weight's squares in float32: over a million elements, 1e-5 apart)
        assert got[2, i] == pytest.approx(np.linalg.norm(w.double().numpy()), rel=1e-4)


def test_grad_summaries_mix_tensors_numpy_reads_with_ones_it_does_not():
    g = torch.Generator().manual_seed(12)
    grads = [torch.randn(30, 20, generator=g), torch.randn(20, generator=g).bfloat16(), torch.randn(5, generator=g)]
    weights = [torch.randn(30, 20, generator=g), torch.randn(20, generator=g).bfloat16(), torch.randn(5, generator=g).half()]
    got = stats.grad_summaries(grads, weights).numpy()
    for i, (gr, w) in enumerate(zip(grads, weights)):
        a, b = gr.double().numpy(), w.double().numpy()
        assert got[:, i] == pytest.approx([np.linalg.norm(a), np.abs(a).max(), np.linalg.norm(b)], rel=1e-3)


def test_to_host_reads_cpu_tensors_in_place_and_takes_numbers_as_they_are():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    ts = [t.t(), 2.5, t[:, 1:2].double(), torch.tensor([True, False]), t.sum((0, 1), keepdim=True)]
    assert stats.to_host(ts) == [t.t().reshape(-1).tolist(), [2.5], [1.0, 5.0, 9.0], [1.0, 0.0], [66.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_update_norms_of_numpy_samples_match_the_pytorch_ones(dtype, cpu_path):
    g = torch.Generator().manual_seed(13)
    before = [torch.randn(50, generator=g).to(dtype), torch.randn(3, generator=g).to(dtype)]
    after = [b + 0.01 * torch.randn(b.shape, generator=g).to(dtype) for b in before]
    expected = stats.update_norms(before, after, [2.0, 1.0]).numpy()
    arrays = [stats.host_array(b) for b in before]
    if any(a is None for a in arrays):
        return
    got = stats.update_norms([a.copy() for a in arrays], [stats.host_array(a) for a in after], [2.0, 1.0]).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    d = (after[0] - before[0]).double().numpy()
    assert got[0, 0] == pytest.approx(2 * np.linalg.norm(d), rel=1e-6)


def test_numpy_declines_tensors_without_memory_of_their_own():
    seen = []

    def f(x):
        seen.append(stats.host_array(x))
        return (x * 2).sum()
    torch.func.grad(f)(torch.ones(3))
    torch.func.functionalize(f)(torch.ones(3))
    torch.vmap(f)(torch.ones(2, 3))
    assert seen == [None, None, None]


def test_sum_squares_matches_numpy_and_the_numpy_path_calls_no_blas():
    import inspect
    import re

    rng = np.random.default_rng(0)
    for n in (0, 1, 8192, 401_408):
        a = rng.standard_normal(n).astype(np.float32)
        assert stats.sum_squares(a) == pytest.approx(float((a.astype(np.float64) ** 2).sum()), rel=1e-5, abs=1e-6)
    # BLAS spreads a long dot product over threads that keep spinning after the call, taking the
    # cores from PyTorch's own threads: gradwatch's NumPy reductions stay on the calling thread.
    source = inspect.getsource(stats)
    assert not re.search(r"np\.(dot|vdot|inner|matmul|tensordot)\(|np\.linalg\.|\w @ \w", source)


@pytest.mark.parametrize("dense", [True, False])
def test_large_cpu_tensors_reduced_by_pytorch_match_numpy(dense):
    """From stats.DOT_ELEMENTS, dense tensors' norms and extremes come from PyTorch's dot and aminmax;
    strided ones stay in NumPy: the same numbers either way."""
    g = torch.Generator().manual_seed(21)
    n = stats.DOT_ELEMENTS
    grad = 3 * torch.randn(n // 64, 128 if not dense else 64, generator=g)
    grad = grad if dense else grad[:, ::2]
    weight = torch.randn(grad.shape, generator=g)
    assert grad.is_contiguous() == dense and grad.numel() == n
    a, w = grad.double().numpy(), weight.double().numpy()
    got = stats.grad_summaries([grad], [weight]).numpy()[:, 0]
    assert got == pytest.approx([np.linalg.norm(a), np.abs(a).max(), np.linalg.norm(w)], rel=1e-5)
    assert stats.l2_norm_now(grad) == pytest.approx(np.linalg.norm(a), rel=1e-5)
