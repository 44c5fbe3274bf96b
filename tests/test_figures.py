"""The PNG charts of ``gradwatch compare``: their size, what they draw, what they say."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from gradwatch.figures import activation_heatmaps, gradient_flow, png_size  # noqa: E402
from gradwatch.runs import Run  # noqa: E402


_SHAPES = {}


def histogram(step: int, seed: int, buckets: int = 30):
    if (seed % 7, buckets) not in _SHAPES:
        counts, edges = np.histogram(np.random.default_rng(seed % 7).normal(size=2000), bins=buckets)
        _SHAPES[seed % 7, buckets] = list(edges[1:]), list(counts.astype(float))
    return (step, *_SHAPES[seed % 7, buckets])


def fake_run(name: str, *, depth: int = 4, hist_steps=(0, 50, 100), norms=None, numel=None) -> Run:
    """A run with ``depth`` Linear layers (every one with a histogram) and known gradient norms."""
    layers = [f"layer{i}" for i in range(depth)]
    norms = norms or {n: 1.0 for n in layers}
    numel = numel or {n: 100 for n in layers}
    run = Run(path=Path(name), layers=layers, layer_types={n: "Linear" for n in layers},
              param_layer={f"{n}.weight": n for n in layers},
              param_numel={f"{n}.weight": numel[n] for n in layers})
    run.layer_scalars["gradient.layer_norm"] = {n: [(s, norms[n]) for s in (0, 10, 20)] for n in layers}
    run.histograms = {n: [histogram(s, i + s) for s in hist_steps] for i, n in enumerate(layers)}
    return run


def test_heatmap_size_is_capped_for_deep_models_and_long_runs(tmp_path):
    run = fake_run("long", depth=52, hist_steps=range(0, 100_000, 50))  # 2,000 histogram steps
    path = tmp_path / "heat.png"
    fig = activation_heatmaps([run], str(path))
    w, h = png_size(str(path))
    assert w <= 2400 and h <= 1680  # was 12,694 px wide
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels][0] == "layer0" and panels[-1].get_title() == "layer51"
    assert len(panels) == 12
    mesh = panels[0].collections[0]
    assert mesh.get_array().shape[1] == 120  # 2,000 steps averaged into 120 columns
    caption = " ".join(t.get_text() for t in fig.texts).replace("\n", " ")
    assert "12 of 52 layers, evenly spaced by depth" in caption
    assert "each column averages 17 logged steps" in caption


def test_one_histogram_step_is_drawn_as_bars_not_left_blank(tmp_path):
    path = tmp_path / "one.png"
    fig = activation_heatmaps([fake_run("short", hist_steps=(0,))], str(path))
    ax = fig.axes[0]
    heights = [p.get_width() for p in ax.patches]  # horizontal bars: counts along x
    assert len(heights) == 40 and sum(heights) == pytest.approx(2000)
    assert "count at step 0" in ax.get_xlabel()
    assert "bars: a run with a single histogram step" in " ".join(t.get_text() for t in fig.texts).replace("\n", " ")
    assert png_size(str(path))[0] <= 2400


def test_gradient_flow_plots_rms_per_element_so_layer_size_makes_no_zigzag(tmp_path):
    # Every element's gradient has the same size; the layers differ only in how many there are.
    numel = {"layer0": 100, "layer1": 10_000, "layer2": 100, "layer3": 10_000}
    norms = {n: 0.01 * math.sqrt(k) for n, k in numel.items()}
    fig = gradient_flow([fake_run("a", norms=norms, numel=numel)], str(tmp_path / "flow.png"))
    ax = fig.axes[0]
    assert list(ax.lines[0].get_ydata()) == pytest.approx([0.01] * 4)
    assert "RMS" in ax.get_ylabel()
    caption = " ".join(t.get_text() for t in fig.texts).replace("\n", " ")
    assert "RMS per element (L2 norm / √number of elements), median over the logged steps" in caption


def test_layers_without_gradient_are_drawn_and_marked(tmp_path):
    norms = {"layer0": 0.0, "layer1": 0.0, "layer2": 0.3, "layer3": 1.0}
    fig = gradient_flow([fake_run("dead", norms=norms), fake_run("ok")], str(tmp_path / "flow.png"))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["layer0", "layer1", "layer2", "layer3"]
    crosses = [c for c in ax.collections if len(c.get_offsets())]
    assert len(crosses) == 1 and [x for x, _ in crosses[0].get_offsets()] == [0, 1]
    y_floor = ax.get_ylim()[0]
    positive = min(y for y in fig.axes[0].lines[1].get_ydata())
    assert all(y_floor < y < positive for _, y in crosses[0].get_offsets())
    assert "gradient exactly 0" in " ".join(t.get_text() for t in ax.get_legend().get_texts())
    caption = " ".join(t.get_text() for t in fig.texts).replace("\n", " ")
    assert "×: the layer received no gradient at all" in caption


def test_old_run_folders_without_sizes_fall_back_to_norms_and_say_so(tmp_path):
    run = fake_run("old")
    run.param_numel = {}
    fig = gradient_flow([run], str(tmp_path / "flow.png"))
    assert "L2 norm" in fig.axes[0].get_ylabel()
    assert "not recorded" in " ".join(t.get_text() for t in fig.texts).replace("\n", " ")


def test_gradient_flow_of_a_deep_model_keeps_a_sensible_size_and_readable_labels(tmp_path):
    path = tmp_path / "flow.png"
    fig = gradient_flow([fake_run("deep", depth=155, hist_steps=(0,))], str(path))
    w, h = png_size(str(path))
    assert w <= 2400 and h <= 700
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert 20 <= len(labels) <= 40 and labels[0] == "layer0"


def test_a_dead_layers_histogram_is_drawn_around_its_value_in_old_and_new_run_folders(tmp_path):
    import torch
    from torch.utils.tensorboard import SummaryWriter

    from gradwatch import GradWatch
    from gradwatch.runs import load_run
    from tests import models

    model = models.small_mlp()
    with torch.no_grad():
        model[2].bias.fill_(-100.0)  # layer 3: every output 0
    with pytest.warns(Warning):
        with GradWatch(model, log_dir=tmp_path / "new", every=1, histogram_every=1, dead_window=1, quiet=True):
            models.train(model, 3)
    old = tmp_path / "old"  # as earlier versions wrote it: min == max == 0, bucket limits 1, 2, ..., 64
    with SummaryWriter(old) as w:
        for step in range(3):
            w.add_scalar("gradient.layer_norm/3", 0.0, step)
            w.add_histogram_raw("activation/3", min=0.0, max=0.0, num=512, sum=0.0, sum_squares=0.0,
                                bucket_limits=[float(i) for i in range(1, 65)], bucket_counts=[512.0] + [0.0] * 63,
                                global_step=step)
    runs = [load_run(tmp_path / "new"), load_run(old)]
    for run in runs:
        for _, limits, counts in run.histograms["3"]:
            assert -0.5 < limits[0] and limits[-1] == 0.5 and sum(counts) == 512
    fig = activation_heatmaps(runs, str(tmp_path / "heat.png"))
    columns = len(fig.axes) // 2  # rows: the two runs; columns: layers 0-4
    assert fig.axes[3].get_title() == "3"
    for ax in (fig.axes[3], fig.axes[columns + 3]):  # layer 3 of each run: its value axis around 0
        assert ax.get_ylim() == pytest.approx((-0.5, 0.5))


def test_a_run_without_gradients_leaves_the_others_drawn_per_element(tmp_path):
    """A run whose steps had no backward records no parameter sizes: it has nothing to compare, and the
    runs beside it are still drawn per element (not as an "older gradwatch" folder's raw norms)."""
    forward_only = fake_run("forward-only")
    forward_only.param_numel, forward_only.layer_scalars = {}, {}
    fig = gradient_flow([fake_run("trained"), forward_only], str(tmp_path / "flow.png"))
    assert "per parameter element" in fig.axes[0].get_ylabel()
    assert "not recorded" not in " ".join(t.get_text() for t in fig.texts)


def test_steps_with_non_finite_gradients_left_out_of_the_flow_are_said(tmp_path):
    late = fake_run("late")
    for series in late.layer_scalars["gradient.layer_norm"].values():
        series[-1] = (series[-1][0], math.nan)  # the last of three logged steps went NaN
    gone = fake_run("gone", norms={f"layer{i}": math.nan for i in range(4)})
    fig = gradient_flow([late, gone], str(tmp_path / "flow.png"))
    caption = " ".join(t.get_text() for t in fig.texts).replace("\n", " ")
    assert "late: 1 of 3 logged steps had NaN/Inf gradients, left out." in caption
    assert "gone: every logged step's gradient is NaN/Inf, nothing to draw." in caption
