"""The step's buffers (``gradwatch.collect.buffers``): per-unit dead-unit counters, and the batched
statistics of samples (``SampleRows``) against the per-tensor reference (``stats.activation_summary``),
on both paths: NumPy layer by layer on the CPU, and the rows of all layers reduced together (the
path GPUs take, forced on the CPU with ``stats.HOST_ARRAYS = False``)."""

from __future__ import annotations

import gc
import math
import weakref

import numpy as np
import pytest
import torch
from torch import nn

from gradwatch import stats
from gradwatch.collect import buffers
from gradwatch.collect.buffers import SampleLayout, SampleRows, UnitHistory
from gradwatch.layers import activation_spec


def fold(batches):
    history = UnitHistory(window=3)
    return [(seen, flags.tolist()) for seen, flags in (history.update("relu", np.asarray(b)) for b in batches)]


def test_a_unit_is_dead_when_idle_over_the_whole_window_seen_so_far():
    alive = [[True, False, False], [False, False, True], [False, False, False], [False, False, False],
             [True, False, False]]
    expected = [(1, [0.0, 1.0, 1.0]),  # one batch seen: idle in it is dead so far
                (2, [0.0, 1.0, 0.0]),  # unit 0 was active in the window, unit 2 now
                (3, [0.0, 1.0, 0.0]),
                (3, [1.0, 1.0, 0.0]),  # the window holds 3 batches: unit 0 idle in all of them
                (3, [0.0, 1.0, 1.0])]
    assert fold(alive) == expected


def test_counters_start_afresh_when_the_number_of_units_changes():
    history = UnitHistory(window=4)
    history.update("relu", np.array([False, True]))
    seen, flags = history.update("relu", np.array([False, True, True]))
    assert seen == 1 and flags.tolist() == [1.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------- batched samples
def _tensors():
    """Random tensors of mixed shapes, dtypes and memory layouts, some with exact zeros and values
    near the saturation bounds (0.01, 0.99), one with a NaN and one with an Inf."""
    g = torch.Generator().manual_seed(21)
    base = torch.rand(16, 8, 12, 12, generator=g) * 1.2 - 0.1
    base[base < 0.05] = 0.0
    mlp = torch.randn(256, 300, generator=g)
    mlp[mlp < 0] = 0.0
    nan = torch.rand(40, 30, generator=g)
    nan[3, 4] = float("nan")
    inf = torch.rand(50, generator=g)
    inf[7] = float("inf")
    return {
        "float32": mlp, "float64": mlp.double()[:100], "float16": base.half(), "bfloat16": base.bfloat16(),
        "channels_last": base.to(memory_format=torch.channels_last), "transposed": mlp.t(),
        "expanded": base[:, :1].expand(16, 8, 12, 12), "sliced": base[::3, 1:5, ::2], "empty": base[:0],
        "scalar": base[0, 0, 0, 0], "large": torch.rand(300, 700, generator=g), "nan": nan, "inf": inf,
    }


def _reference(t, limits, max_elements):
    lower, upper = (0.0, 1.0) if limits else (None, None)
    raw = stats.activation_summary(t, lower, upper, 0.01, max_elements).tolist()
    return stats.activation_moments(raw, t.numel(), stats.sample_size(t, max_elements))


@pytest.mark.parametrize("host", [True, False], ids=["numpy", "batched"])
@pytest.mark.parametrize("chunk", [1 << 20, 2000], ids=["one-buffer", "many-buffers"])
def test_the_batched_rows_give_the_per_tensor_reference_numbers(host, chunk, monkeypatch):
    monkeypatch.setattr(stats, "HOST_ARRAYS", host)
    monkeypatch.setattr(buffers, "CHUNK_ELEMENTS", chunk)  # small buffers: full ones are reduced as rows arrive
    max_elements = 4096
    rows = SampleRows("samples", max_elements, SampleLayout(3))
    tensors = _tensors()
    limits = {name: (i % 2 == 0) for i, name in enumerate(tensors)}
    refs = {name: rows.add(t, stats.saturation_limits(0.0, 1.0, 0.01) if limits[name] else None)
            for name, t in tensors.items()}
    rows.reduce()
    for name, t in tensors.items():
        ref = _reference(t, limits[name], max_elements)
        if t.numel() == 0:
            assert refs[name] is None
            continue
        row = refs[name].values if refs[name].values is not None else refs[name].chunk.result[refs[name].index].tolist()
        total = float(stats.full_sum(t).double().sum())
        got = stats.row_moments(total, t.numel(), row, refs[name].count)
        assert refs[name].count == stats.sample_size(t, max_elements)
        assert got["nonfinite"] == ref["nonfinite"] == (name in ("nan", "inf")), name
        if ref["nonfinite"]:  # with NaN/Inf present, no share of zero or saturated values is known
            assert math.isnan(got["var"]) and not math.isfinite(got["mean"]), name
            assert all(math.isnan(v) for v in (got["zeros"], ref["zeros"], got["saturated"], ref["saturated"]))
            continue
        assert got["zeros"] == ref["zeros"], name  # counts are exact: the same elements of the same sample
        assert got["saturated"] == ref["saturated"], name
        assert got["mean"] == pytest.approx(ref["mean"], rel=1e-5, abs=1e-7), name
        assert got["var"] == pytest.approx(ref["var"], rel=1e-4, abs=1e-7), name


@pytest.mark.parametrize("host", [True, False], ids=["numpy", "batched"])
def test_batched_histograms_match_numpy_on_each_sample(host, monkeypatch):
    monkeypatch.setattr(stats, "HOST_ARRAYS", host)
    rows = SampleRows("act_hist", 512, SampleLayout(2), bins=16)
    tensors = {k: v for k, v in _tensors().items() if v.numel()}
    refs = {name: rows.add(t) for name, t in tensors.items()}
    rows.reduce()
    for name, t in tensors.items():
        ref = refs[name]
        row = ref.values if ref.values is not None else ref.chunk.result[ref.index].tolist()
        h = stats.histogram_fields(row)
        s = stats.strided_sample(t, 512).double().numpy()
        s = s[np.isfinite(s)]
        counts, _ = np.histogram(s, bins=16, range=(s.min(), s.max()))
        assert h[:5] == pytest.approx([s.min(), s.max(), s.size, s.sum(), (s * s).sum()], rel=1e-5), name
        assert np.abs(np.array(h[5:]) - counts).sum() <= 4, name  # edges computed apart may move a value


@pytest.mark.parametrize("host", [True, False], ids=["numpy", "batched"])
def test_an_activations_histogram_is_binned_from_every_kth_element_of_its_statistics_sample(host, monkeypatch):
    """With both wanted, a tensor's histogram sample is nested in its statistics' sample (on the CPU
    both come from one copy): the histogram is the reference's of ``within=`` that sample's size,
    the statistics row is the one ``add`` alone gives, and the nested stride stays coprime with the
    features."""
    monkeypatch.setattr(stats, "HOST_ARRAYS", host)
    layout = SampleLayout(2)
    samples, alone = SampleRows("samples", 2048, layout), SampleRows("samples", 2048, SampleLayout(2))
    hists = SampleRows("act_hist", 256, layout, bins=16, within=2048)
    tensors = {k: v for k, v in _tensors().items() if v.numel() and v.dtype in (torch.float32, torch.float64)}
    refs = {name: samples.add_with_histogram(t, (0.01, 0.99), hists) for name, t in tensors.items()}
    plain = {name: alone.add(t, (0.01, 0.99)) for name, t in tensors.items()}
    for rows in (samples, alone, hists):
        rows.reduce()

    def values(ref):
        return ref.values if ref.values is not None else ref.chunk.result[ref.index].tolist()

    for name, t in tensors.items():
        row, hist = refs[name]
        assert values(row) == pytest.approx(values(plain[name]), rel=1e-6, nan_ok=True), name
        want = stats.histogram(t, 16, 256, within=2048).tolist()
        got = stats.histogram_fields(values(hist))
        assert got[:5] == pytest.approx(want[:5], rel=1e-6), name
        assert np.abs(np.array(got[5:]) - np.array(want[5:])).sum() <= 2, name  # edges computed apart
        nested, outer = stats.strided_sample(t, 256, within=2048), stats.strided_sample(t, 2048)
        plan = (tuple(t.shape), t.stride(), t.is_contiguous())
        k = stats._plan(*plan, 256, 2048)[1] // stats._plan(*plan, 2048)[1]
        assert torch.equal(nested, outer[::k]) and hist.count == nested.numel() <= 256 * 1.5, name
    for name in ("float32", "large"):  # the nested stride stays coprime with the features: none is skipped
        t = tensors[name]
        assert math.gcd(stats.nested_stride(t.numel(), t.shape[-1], 2048, 256), t.shape[-1]) == 1, name


def test_a_sample_is_a_copy_the_layer_output_is_freed_as_without_gradwatch(monkeypatch):
    monkeypatch.setattr(stats, "HOST_ARRAYS", False)
    rows = SampleRows("samples", 64, SampleLayout(2))
    t = torch.rand(32, 40)
    alive = weakref.ref(t)
    ref = rows.add(t)
    del t
    gc.collect()
    assert alive() is None  # nothing of gradwatch keeps the tensor: checkpointing and freeing work as before
    rows.reduce()
    assert ref.chunk.result is not None and ref.chunk.buf is None  # the buffer goes once reduced


@pytest.mark.parametrize("host", [True, False], ids=["numpy", "torch"])
@pytest.mark.parametrize("channels_first", [True, False])
def test_rectifier_units_give_their_activity_and_the_exact_total(monkeypatch, host, channels_first):
    """NumPy's per-unit sums of a CPU tensor (an array, the total read at once) and PyTorch's (a
    tensor with kept dimensions, summed later) say the same."""
    monkeypatch.setattr(stats, "HOST_ARRAYS", host)
    spec = buffers.ActivationSpec(buffers.ActivationKind.RECTIFIER)
    t = torch.relu(torch.randn(8, 5, 3, 3))
    t[:, 2] = 0.0
    t[..., 1] = 0.0
    how = buffers.Reduction(0.01, 64, 8)
    with torch.no_grad():
        part, alive, _ = buffers.reduce_output(t, spec, how, SampleRows("samples", 64, SampleLayout(1)), channels_first,
                                            True)
    expected = [True, True, False, True, True] if channels_first else [True, False, True]
    assert isinstance(alive, np.ndarray if host else torch.Tensor)
    assert (np.asarray(alive).reshape(-1) > 0).tolist() == expected
    assert isinstance(part.total, float) == host
    total = part.total if host else float(part.total.sum())
    assert total == pytest.approx(float(t.double().sum()), rel=1e-6)


@pytest.mark.parametrize("module", [nn.SiLU(), nn.GELU(), nn.ELU(), nn.Softplus()], ids=lambda m: type(m).__name__)
def test_smooth_rectifier_units_are_alive_when_their_largest_pre_activation_passes_the_cut_off(module):
    """Four units: pre-activations at -20, just below the cut-off, just above it, and around 0. Read
    from the input (SiLU, GELU: their output does not say) or, where f increases strictly, the output."""
    spec = activation_spec(module)
    how = buffers.Reduction(0.01, 64, 8, slope=0.04)
    c = spec.flat.cutoff(0.04)
    x = torch.tensor([-20.0, c - 1e-3, c + 1e-3, 0.0]).repeat(6, 1)
    x[:3, :3] -= 5.0  # the maximum is what counts, not the mean
    y = module(x)
    site = buffers.SiteBuffer()
    with torch.no_grad():
        site.add_output(y, spec, how, SampleRows("samples", 64, SampleLayout(1)), None, pre=x)
    (alive,) = site.alive
    assert site.cutoff == c and (alive.reshape(-1) > site.alive_above).tolist() == [False, False, True, True]
    assert (site.alive_above == c) is spec.reads_input  # else the output at the cut-off
    part = site.parts[0]
    assert float(torch.as_tensor(part.total).sum()) == pytest.approx(float(y.sum()), rel=1e-6)


def test_a_smooth_rectifier_read_from_its_input_needs_it():
    """Without the input (an in-place module overwrote it) nothing is said about its units."""
    spec = activation_spec(nn.SiLU())
    with torch.no_grad():
        _, alive, _ = buffers.reduce_output(torch.zeros(4, 3), spec, buffers.Reduction(0.01, 64, 8),
                                         SampleRows("samples", 64, SampleLayout(1)), None, True)
    assert alive is None


def test_the_batched_reduction_for_tensors_held_at_once_gives_the_same_rows(monkeypatch):
    """``stats.activation_rows``: what a compiled graph, holding every layer output, can call once."""
    monkeypatch.setattr(stats, "HOST_ARRAYS", False)
    tensors = [t for t in _tensors().values() if t.numel() and t.dim()]
    limits = [stats.saturation_limits(0.0, 1.0, 0.01) if i % 2 else None for i in range(len(tensors))]
    batched = stats.activation_rows(tensors, 4096, limits)
    rows = SampleRows("samples", 4096, SampleLayout(len(tensors)))
    refs = [rows.add(t, lim) for t, lim in zip(tensors, limits)]
    rows.reduce()
    for i, ref in enumerate(refs):
        expected = ref.chunk.result[ref.index, :batched.shape[1]]  # (a float16 row's peak column is not in it)
        got = batched[i, :expected.numel()]
        assert torch.allclose(got, expected.to(got.dtype), rtol=1e-5, atol=1e-5, equal_nan=True), i
