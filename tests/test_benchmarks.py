"""``benchmarks/ops.py`` at a tiny size: it runs, and the kernel counts a measured step adds keep the
formula the code promises (op counts are deterministic: a behaviour, not a timing)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import ops


@pytest.fixture(scope="module")
def device_rows():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ops.measure(ops.QUICK, device_path=True)
    finally:
        torch.set_num_threads(threads)


def test_a_measured_step_adds_a_fixed_number_of_kernels_and_a_few_per_layer_output(device_rows):
    assert {r["model"] for r in device_rows} == set(ops.QUICK) and all(r["layers"] > 0 for r in device_rows)
    for r in device_rows:
        if r["variant"] == "every step":
            bound = ops.KERNELS_PER_LAYER * r["layers"] + ops.KERNELS_FIXED
            assert 0 < r["added"].kernels <= bound, r
            assert r["added"].top >= r["added"].kernels and r["added"].all >= r["added"].top, r


def test_deeper_models_add_at_most_the_per_layer_kernels(device_rows):
    """The fixed part does not grow with depth: between the two quick models, the kernels added per
    extra watched output stay within the per-layer bound (parameters included: read in fused kernels)."""
    every = sorted((r for r in device_rows if r["variant"] == "every step"), key=lambda r: r["layers"])
    small, large = every[0], every[-1]
    extra = large["added"].kernels - small["added"].kernels
    assert large["layers"] > small["layers"]
    assert extra <= ops.KERNELS_PER_LAYER * (large["layers"] - small["layers"])


@pytest.fixture(scope="module")
def cpu_rows():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ops.measure(ops.QUICK, device_path=False)
    finally:
        torch.set_num_threads(threads)


def test_the_cpu_path_adds_at_most_a_sum_per_layer_output(cpu_rows):
    """On the CPU, NumPy reads tensors without PyTorch ops: what a measured step adds is a sum per
    watched output at most, and a fixed few, also with histograms."""
    assert len(cpu_rows) == len(ops.QUICK) * len(ops.VARIANTS)
    for r in cpu_rows:
        assert r["layers"] > 0 and r["plain"] > 0, r
        assert 0 < r["added"].all <= ops.CPU_OPS_PER_LAYER * r["layers"] + ops.CPU_OPS_FIXED, r


def test_python_calls_a_step_adds_stay_within_a_fixed_part_and_a_few_per_layer():
    """The interpreted code a step adds, counted: a step that is not measured adds a few calls per
    layer over a fixed part, a measured one more; a deeper model adds at most the per-layer calls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = ops.python_calls(ops.QUICK)
    finally:
        torch.set_num_threads(threads)
    assert [r["model"] for r in rows] == list(ops.QUICK)
    for r in rows:
        n = r["layers"]
        assert n > 0 and r["plain"] > 0, r
        assert 0 < r["unmeasured"] <= ops.UNMEASURED_CALLS_PER_LAYER * n + ops.UNMEASURED_CALLS_FIXED, r
        assert r["unmeasured"] < r["measured"] <= ops.MEASURED_CALLS_PER_LAYER * n + ops.MEASURED_CALLS_FIXED, r
        assert r["measured"] < r["histograms"], r  # binning and the TensorBoard event come on top
    small, large = sorted(rows, key=lambda r: r["layers"])
    more = large["layers"] - small["layers"]
    assert large["unmeasured"] - small["unmeasured"] <= ops.UNMEASURED_CALLS_PER_LAYER * more
    assert large["measured"] - small["measured"] <= ops.MEASURED_CALLS_PER_LAYER * more


def test_overhead_runs_another_checkouts_gradwatch_beside_this_one(tmp_path):
    from pathlib import Path

    from benchmarks import overhead

    import gradwatch

    root = Path(gradwatch.__file__).resolve().parent.parent
    variants = overhead.with_baseline(str(root))
    watch = variants["defaults (baseline)"](torch.nn.Sequential(torch.nn.Linear(2, 2)), None)
    try:  # the same code, imported a second time under another name: a class of its own
        assert type(watch).__name__ == "GradWatch" and type(watch) is not gradwatch.GradWatch
        assert type(watch).__module__.startswith("gradwatch_baseline")
    finally:
        watch.detach()
    with pytest.raises(SystemExit, match="--baseline .*git worktree add"):
        overhead.load_baseline(str(tmp_path))


def test_the_one_read_reference_reads_each_output_its_gradient_and_each_parameter_once():
    from benchmarks import overhead

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    outputs = []
    for m in model:
        m.register_forward_hook(lambda mod, args, out: outputs.append(out.detach().clone()))
    reader = overhead.OneReadPerTensor(model)
    model(torch.randn(5, 4)).sum().backward()
    assert len(reader.sums) == 2 * len(outputs)  # each output, then (in backward) the gradient at it
    assert [s.item() for s in reader.sums[:3]] == pytest.approx([o.sum().item() for o in outputs])
    assert reader.sums[3].item() == pytest.approx(3 * 5)  # d(sum)/d(last output) is all ones
    reader.after_step(None)
    assert reader.sums == []
    reader.detach()
    model(torch.randn(5, 4))
    assert reader.sums == []


def test_reductions_compares_numpy_and_pytorch_at_each_size():
    from benchmarks import reductions

    for in_step in (False, True):
        rows = reductions.measure([256, 4096], repeat=3, in_step=in_step)
        assert [r["elements"] for r in rows] == [256, 4096]
        for r in rows:
            assert set(r) == {"elements", "numpy sum (einsum)", "torch sum", "numpy per-unit sums",
                              "torch per-unit sums", "numpy sum of squares (einsum)", "torch.dot",
                              "numpy max and min", "torch.aminmax"}
            assert all(v > 0 for k, v in r.items() if k != "elements")


def test_breakdown_replays_one_measured_steps_summary_here_and_in_a_baseline(capsys):
    from pathlib import Path

    from benchmarks import breakdown

    import gradwatch

    root = Path(gradwatch.__file__).resolve().parent.parent
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    breakdown.replay_summary(lambda: torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)),
                             x, y, baseline=str(root))
    lines = [line for line in capsys.readouterr().out.splitlines() if "us per step" in line]
    assert len(lines) == 2 and "this checkout" in lines[0] and "baseline" in lines[1]
    assert all("(3 layers, 4 parameters)" in line for line in lines)
    assert all(float(line.split("us per step")[0].split()[-1]) > 0 for line in lines)


def test_breakdown_times_steps_not_measured_on_one_model_watched_and_unwatched_in_turns(capsys):
    from pathlib import Path

    from benchmarks import breakdown

    import gradwatch

    root = Path(gradwatch.__file__).resolve().parent.parent
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    breakdown.between_same_model(2, x, y, baseline=str(root), make=lambda: model)
    lines = [line for line in capsys.readouterr().out.splitlines() if "us per step" in line]
    assert [line.split(" us per step")[0].rsplit(None, 1)[0].strip() for line in lines] == [
        "gradwatch, no step measured", "without the finiteness check", "without the layers' hooks",
        "the baseline's gradwatch, no step measured"]
    assert not model._forward_hooks and not model._forward_pre_hooks  # every watch detached
    assert all(not m._forward_hooks for m in model.modules())


def test_breakdown_fresh_splits_a_fresh_watchs_extra_time_by_kind_of_step(capsys):
    from benchmarks import breakdown

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    breakdown.fresh_watches(1, x, y, make=lambda: torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(),
                                                                      torch.nn.Linear(5, 3)))
    out = capsys.readouterr().out
    assert "watched / unwatched: median" in out
    kinds = [line.strip().split("  ")[0] for line in out.splitlines() if line.rstrip().endswith("%")]
    assert kinds == ["attach", "step 0", "steps 1-9 (the dense start)", "steps 20, 40, 60, 80 (measured)",
                     "the 86 steps not measured", "detach"]


def test_breakdown_parts_switches_each_part_off_in_its_own_copy_and_back(capsys):
    from benchmarks import breakdown

    from gradwatch import stats
    from gradwatch.collect import Collector

    before = {part: getattr(owner, name) for part, (owner, name, _) in breakdown.PARTS.items()}
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    watch = breakdown.WithoutParts(model, ("summary, rules and sinks",))
    model(torch.randn(4, 6)).sum().backward()
    assert Collector.end is not before["summary, rules and sinks"]  # switched while this copy trains
    assert stats.l2_norm_now is before["output gradients' norms"]
    watch.after_step(None)
    assert Collector.end is before["summary, rules and sinks"]
    watch.detach()

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    breakdown.parts_in_step(lambda: torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)),
                            x, y, rounds=1, block=2, name="tiny MLP")
    out = capsys.readouterr().out
    assert all(f"without {part}" in out for part in breakdown.PARTS) and "without all four (the rest)" in out
    assert {part: getattr(owner, name) for part, (owner, name, _) in breakdown.PARTS.items()} == before


def test_overheads_small_gpt_calls_sdpa_and_gives_flat_logits(monkeypatch):
    from benchmarks import overhead

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    logits = overhead.SmallGPT()(torch.randint(0, 256, (2, 10)))
    assert logits.shape == (20, 256) and len(calls) == 4  # one attention call per layer
