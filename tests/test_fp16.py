"""fp16 overflow ahead of the NaN: the peak of float16 samples (``stats.sample_rows(peak=True)``), the
rule on plain numbers, and the finding through the public API under ``.half()`` and autocast; bfloat16
and float32 never get it."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradwatch import FP16OverflowWarning, GradWatch, Thresholds, stats
from gradwatch.collect.buffers import SampleLayout, SampleRows
from gradwatch.report import FindingKind, LayerStats, ParamStats, StepStats
from gradwatch.rules import evaluate
from gradwatch.rules.fp16_overflow import FP16_MAX

BOUND = 65504 / 8  # the default threshold: within 8x of float16's largest finite value


# ------------------------------------------------------------------ the peak of a sample
def test_the_peak_column_is_the_largest_magnitude_of_each_row():
    nan, inf = math.nan, math.inf
    x = torch.tensor([[1.0, -5.0, 3.0, nan], [0.5, nan, nan, nan], [2.0, -inf, nan, nan], [0.0, 0.0, nan, nan]])
    counts = torch.tensor([[3.0], [1.0], [2.0], [2.0]])
    plain = stats.sample_rows(x.clone(), counts)
    rows = stats.sample_rows(x.clone(), counts, peak=True)
    assert rows[:, -1].tolist() == [5.0, 0.5, inf, 0.0]  # the padding's NaN never counts; an Inf does
    assert torch.equal(rows[:, :-1], plain)  # the other columns as without it
    low, high = torch.full((4, 1), 0.01), torch.full((4, 1), 0.99)
    bounded = stats.sample_rows(x.clone(), counts, low, high, peak=True)
    assert torch.equal(bounded[:, :-1], stats.sample_rows(x.clone(), counts, low, high))
    assert bounded[:, -1].tolist() == [5.0, 0.5, inf, 0.0]


def _peak(t: torch.Tensor, max_elements: int = 1 << 15) -> float:
    rows = SampleRows("samples", max_elements, SampleLayout(1))
    ref = rows.add(t)
    rows.reduce()
    assert ref.chunk is not None and ref.chunk.peaks
    return ref.chunk.result[ref.index, -1].item()


def test_the_sample_sees_a_planted_outlier_feature_and_channel():
    g = torch.Generator().manual_seed(0)
    seq = torch.randn(8, 512, 64, generator=g)  # (batch, tokens, features): 262144 elements, 8x the sample
    seq[..., 37] = 9000.0  # one outlier feature over every token
    n, stride, _ = stats._plan(tuple(seq.shape), seq.stride(), True, 1 << 15)
    assert stride > 1 and math.gcd(stride, 64) == 1  # a stride of 8 would visit only features 0, 8, 16, ...
    assert 37 % 8 != 0 and _peak(seq.half()) == 9000.0
    img = torch.randn(16, 32, 24, 24, generator=g)  # (N, C, H, W): the sample walks memory, channel after channel
    img[:, 5] = -7000.0
    assert _peak(img.half()) == 7000.0
    assert _peak(img.half().to(memory_format=torch.channels_last)) == 7000.0


def test_float32_and_bfloat16_rows_get_no_peak_column():
    rows = SampleRows("samples", 64, SampleLayout(2))
    refs = [rows.add(torch.randn(10, 10)), rows.add(torch.randn(10, 10).bfloat16())]
    rows.reduce()
    assert all(not r.chunk.peaks for r in refs if r.chunk is not None)


# ------------------------------------------------------------------ the rule on plain numbers
def step(layers, params=()) -> StepStats:
    st = StepStats(step=4)
    for name, fields in layers.items():
        st.layers[name] = LayerStats(name=name, type="Linear", count=10, **fields)
    for p in params:
        st.params[p.name] = p
    return st


def fp16(st: StepStats, scaler: bool = False, headroom: float = 8.0):
    return [(f.layer, f.value, f.threshold, f.condition) for f in evaluate(st, Thresholds(fp16_headroom=headroom),
                                                                           scaler=scaler)
            if f.kind is FindingKind.FP16_OVERFLOW]


def test_an_activation_within_the_headroom_is_named_with_its_peak():
    assert FP16_MAX == torch.finfo(torch.float16).max
    st = step({"a": {"fp16_peak": 8188.0}, "b": {"fp16_peak": 8187.5}, "c": {"fp16_peak": 30000.0}})
    assert fp16(st) == [("a", 8188.0, 8188.0, "forward"), ("c", 30000.0, 8188.0, "forward")]
    assert fp16(st, headroom=2) == []  # 30000 < 65504 / 2 = 32752
    assert fp16(st, headroom=16) == [("a", 8188.0, 4094.0, "forward"), ("b", 8187.5, 4094.0, "forward"),
                                     ("c", 30000.0, 4094.0, "forward")]


def test_gradients_are_judged_only_where_no_loss_scaler_multiplies_them():
    half = [ParamStats("a.weight", "a", 10, 2e4, 1e4, 1.0, dtype="float16")]
    st = step({"a": {"fp16_peak": 3.0}}, half)
    assert fp16(st) == [("a", 1e4, 8188.0, "backward")]  # .half(): a GradScaler cannot be in use
    assert fp16(st, scaler=True) == []  # a scaler was given: activations only
    # Autocast (float32 parameters): the gradient at a float16 output, bounded by its L2 norm.
    layers = {"a": {"fp16_peak": 3.0, "output_grad_norm": 9000.0}}
    unscaled = [ParamStats("a.weight", "a", 10, 3.0, 1.0, 1.0, dtype="float32", applied_grad_norm=3.0)]
    assert fp16(step(layers, unscaled)) == [("a", 9000.0, 8188.0, "backward")]  # applied == end of backward
    scaled = [ParamStats("a.weight", "a", 10, 3.0, 1.0, 1.0, dtype="float32", applied_grad_norm=3.0 / 65536)]
    assert fp16(step(layers, scaled)) == []  # the optimizer got it divided: a GradScaler's scale
    unknown = [ParamStats("a.weight", "a", 10, 3.0, 1.0, 1.0, dtype="float32")]
    assert fp16(step(layers, unknown)) == []  # no optimizer=: a GradScaler may be scaling it
    assert fp16(step(layers, unscaled), scaler=True) == []


def test_bfloat16_and_float32_numbers_are_never_judged():
    params = [ParamStats("a.weight", "a", 10, 1e6, 1e6, 1.0, dtype="bfloat16", applied_grad_norm=1e6),
              ParamStats("b.weight", "b", 10, 1e6, 1e6, 1.0, dtype="float32", applied_grad_norm=1e6)]
    st = step({"a": {"output_grad_norm": 1e6}, "b": {"output_grad_norm": 1e6}}, params)  # no float16 output
    assert fp16(st) == []


# ------------------------------------------------------------------ through the public API
def outlier_model(value: float) -> nn.Sequential:
    """Linear, ReLU, Linear whose output feature 5 is ``value`` for every sample, Linear."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 4))
    with torch.no_grad():
        model[2].weight[5] = 0.0
        model[2].bias[5] = value
    return model


def train(model: nn.Module, mode: str, steps: int = 2, compiled: bool = False, **watch_kwargs):
    x, y = torch.randn(64, 32, generator=torch.Generator().manual_seed(1)), torch.arange(64) % 4
    if mode == "half":
        model, x = model.half(), x.half()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    if compiled:
        torch._dynamo.reset()
    run = torch.compile(model, backend="eager") if compiled else model
    autocast = {"autocast": torch.float16, "bf16": torch.bfloat16}.get(mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradWatch(model, every=1, quiet=True, strict=True, **watch_kwargs) as watch:
            for _ in range(steps):
                with torch.autocast("cpu", dtype=autocast or torch.float16, enabled=autocast is not None):
                    out = run(x)
                loss = F.cross_entropy(out.float(), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
    fp16_warnings = [w for w in caught if issubclass(w.category, FP16OverflowWarning)]
    return watch, [f for f in watch.findings if f.kind is FindingKind.FP16_OVERFLOW], fp16_warnings


@pytest.mark.parametrize("host", [True, False], ids=["cpu-path", "device-path"])
@pytest.mark.parametrize("mode", ["half", "autocast"])
def test_a_planted_outlier_feature_is_named_at_its_layer_and_step(mode, host, monkeypatch):
    monkeypatch.setattr(stats, "HOST_ARRAYS", host)
    watch, found, caught = train(outlier_model(9000.0), mode)
    assert [(f.layer, f.step, f.value, f.threshold) for f in found] == [("2", 0, 9000.0, BOUND)]
    assert len(caught) == 1 and "9e+03" in str(caught[0].message)
    layers = watch.report().layers
    assert layers["2"].fp16_peak == 9000.0
    assert layers["1"].fp16_peak is not None and 0 < layers["1"].fp16_peak < 10  # ReLU of a float16 input
    watch, found, _ = train(outlier_model(8000.0), mode)  # below 8188: silent
    assert found == [] and watch.report().layers["2"].fp16_peak == 8000.0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["half", "autocast"])
def test_a_compiled_model_names_the_outlier_feature_from_its_graph(mode):
    """Inside a compiled graph a float16 output's peak is one more value of its graph summary."""
    watch, found, _ = train(outlier_model(9000.0), mode, compiled=True)
    assert [(f.layer, f.step, f.value) for f in found] == [("2", 0, 9000.0)]
    layers = watch.report().layers
    assert layers["2"].fp16_peak == 9000.0 and layers["2"].count > 0
    eager, _, _ = train(outlier_model(9000.0), mode)
    assert layers["1"].fp16_peak is not None  # every element in the graph, a sample in eager mode:
    assert layers["1"].fp16_peak >= eager.report().layers["1"].fp16_peak  # the graph's peak is the larger
    watch, found, _ = train(outlier_model(8000.0), mode, compiled=True)
    assert found == [] and watch.report().layers["2"].fp16_peak == 8000.0


@pytest.mark.parametrize("mode", ["bf16", "fp32"])
def test_bfloat16_and_float32_runs_never_get_it(mode):
    watch, found, caught = train(outlier_model(1e5), mode)  # past float16's range
    assert found == [] and caught == []
    assert all(ls.fp16_peak is None for ls in watch.report().layers.values())


def test_a_half_models_parameter_gradient_is_judged():
    # y = w x + b with x = 100 and a loss of 100 * sum(y): dL/dw = 100 * 100 = 10000 for every weight
    model = nn.Sequential(nn.Linear(4, 2)).half()
    x = torch.full((1, 4), 100.0, dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with GradWatch(model, every=1, quiet=True, strict=True) as watch:
            (100 * model(x).float().sum()).backward()
    found = [f for f in watch.findings if f.kind is FindingKind.FP16_OVERFLOW]
    assert [(f.layer, f.value, f.condition) for f in found] == [("0", 10000.0, "backward")]
    assert "0.weight" in found[0].message and watch.report().params["0.weight"].dtype == "float16"


def test_autocast_output_gradients_are_judged_only_when_known_unscaled():
    # A loss 4e4 x cross-entropy: the gradient at the last layer's float16 output has an L2 norm over 8188
    # (its elements, at most 4e4 / 8 = 5000, stay far from float16's limit: the norm is a bound).
    def run(optimizer: bool, scaler: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        kwargs = {"optimizer": opt} if optimizer else {}
        if scaler:
            kwargs["scaler"] = torch.amp.GradScaler("cpu", init_scale=1.0)  # given, scaling by 1: still not judged
        x, y = torch.randn(8, 8), torch.arange(8) % 4
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with GradWatch(model, every=1, quiet=True, strict=True, **kwargs) as watch:
                with torch.autocast("cpu", dtype=torch.float16):
                    out = model(x)
                (4e4 * F.cross_entropy(out.float(), y)).backward()
                opt.step()
        norm = watch.report().layers["1"].output_grad_norm
        return norm, [(f.layer, f.condition) for f in watch.findings if f.kind is FindingKind.FP16_OVERFLOW]

    norm, found = run(optimizer=True, scaler=False)
    assert norm > BOUND and found == [("1", "backward")]  # the optimizer applied what backward gave: unscaled
    assert run(optimizer=False, scaler=False)[1] == []  # no optimizer=: a GradScaler may have multiplied it
    assert run(optimizer=True, scaler=True)[1] == []  # a scaler given: activations only


def test_a_graph_summary_ends_with_the_largest_magnitude_when_asked():
    from gradwatch.collect.traced import graph_summary

    x = torch.tensor([-3.0, 1.0, 2.0], dtype=torch.float16)
    assert graph_summary(x, peak=True).tolist()[-1] == 3.0 and len(graph_summary(x)) == 3
    assert len(graph_summary(x, 0.0, 1.0, peak=True)) == 5  # after the saturated count
    assert len(graph_summary(torch.empty(0, dtype=torch.float16), peak=True)) == 4


def test_with_a_loss_scaler_the_gradients_at_layer_outputs_are_read_unscaled():
    """scaler=: the gradient at a layer's output is divided by the loss scale its backward ran with, as the
    parameters' are (also when update() changes the scale in place before the step's numbers are read)."""
    def norms(scale):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
        scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale is not None else None
        with GradWatch(model, every=1, quiet=True, scaler=scaler) as watch:
            loss = nn.functional.cross_entropy(model(x), y)
            if scaler is None:
                loss.backward()
            else:
                scaler.scale(loss).backward()
                scaler._scale.mul_(0.5)  # as update() after a skipped step: in place, before the numbers are read
        st = watch.report()
        return {n: ls.output_grad_norm for n, ls in st.layers.items()}, {n: p.grad_norm for n, p in st.params.items()}

    plain, scaled = norms(None), norms(2.0 ** 16)
    for measured, unscaled in zip(scaled, plain):
        assert measured.keys() == unscaled.keys()
        for name in measured:
            assert measured[name] == pytest.approx(unscaled[name], rel=1e-5), name
