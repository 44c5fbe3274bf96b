"""TensorBoard output, read back with TensorBoard's own reader."""

from __future__ import annotations

import json
import math
import re
import warnings

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator

from gradwatch import DeadUnitsWarning, GradWatch
from tests import models


def load(log_dir) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0,
                                                                         "tensors": 0, "images": 0})
    acc.Reload()
    return acc


def test_documented_tags_are_written(tmp_path):
    model = models.small_mlp(models.Sigmoid)
    with GradWatch(model, log_dir=tmp_path / "run", every=1, histogram_every=2, quiet=True):
        models.train(model, 3)
    acc = load(tmp_path / "run")
    scalars = set(acc.Tags()["scalars"])
    for tag in ("activation.mean/0", "activation.std/1", "activation.zero_fraction/1",
                "activation.saturated_fraction/1", "activation.dead_fraction/1", "gradient.output_norm/1",
                "gradient.layer_norm/0", "gradient.norm/0.weight", "gradient.max_abs/0.weight",
                "gradient.ratio/4.bias", "gradient.global_norm"):
        assert tag in scalars, tag
    assert [e.step for e in acc.Scalars("activation.mean/0")] == [0, 1, 2]
    hists = set(acc.Tags()["histograms"])
    assert {"activation/0", "activation/1", "gradient/0.weight"} <= hists
    h = acc.Histograms("gradient/0.weight")
    assert [e.step for e in h] == [0, 2]
    assert h[0].histogram_value.num == model[0].weight.numel()


def test_scalar_values_match_the_report(tmp_path):
    model = models.small_mlp()
    with GradWatch(model, log_dir=tmp_path, every=1, quiet=True) as watch:
        models.train(model, 1, lr=0.0)
    acc = load(tmp_path)
    rep = watch.report()
    assert acc.Scalars("gradient.norm/2.weight")[0].value == pytest.approx(rep.params["2.weight"].grad_norm,
                                                                          rel=1e-6)
    assert acc.Scalars("activation.zero_fraction/1")[0].value == pytest.approx(rep.layers["1"].zero_fraction)


def test_findings_and_custom_scalars_layout(tmp_path):
    model = models.small_mlp()
    with torch.no_grad():
        model[2].bias.fill_(-100.0)
    with pytest.warns(DeadUnitsWarning):
        with GradWatch(model, log_dir=tmp_path, every=1, dead_window=1, quiet=True):
            models.train(model, 1)
    acc = load(tmp_path)
    assert "findings/dead_units" in acc.Tags()["scalars"]
    assert any("gradwatch/findings" in t for t in acc.Tags()["tensors"])
    from tensorboard.plugins.custom_scalar import metadata
    assert metadata.CONFIG_SUMMARY_TAG in acc.Tags()["tensors"]


def test_a_users_writer_is_flushed_not_closed(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(tmp_path)
    model = models.small_mlp()
    with GradWatch(model, writer=writer, every=1, quiet=True):
        models.train(model, 1)
    writer.add_scalar("user/loss", 1.0, 0)  # still open
    writer.close()
    tags = load(tmp_path).Tags()["scalars"]
    assert "user/loss" in tags and "gradient.global_norm" in tags


def test_findings_are_appended_to_jsonl_and_logged(tmp_path, caplog):
    import json
    import logging

    model = models.small_mlp()
    with torch.no_grad():
        model[2].bias.fill_(-100.0)
    with caplog.at_level(logging.WARNING, logger="gradwatch"), pytest.warns(DeadUnitsWarning):
        with GradWatch(model, log_dir=tmp_path, every=1, dead_window=1, quiet=True) as watch:
            models.train(model, 2)
    lines = [json.loads(line) for line in (tmp_path / "findings.jsonl").read_text().splitlines()]
    run_id = json.loads((tmp_path / "gradwatch.json").read_text())["run"]
    assert lines == [{**f.to_dict(), "run": run_id} for f in watch.findings]
    logged = [r.getMessage() for r in caplog.records if r.name == "gradwatch"]
    assert logged == [str(f) for f in watch.findings] and "] 3: " in logged[0]


def _train_through_a_failure(tmp_path, monkeypatch, fail) -> tuple:
    """Train 2 steps, call ``fail()``, train 3 more; return the watch, gradwatch's warnings
    and any exception raised in a background thread."""
    import threading
    import warnings

    from gradwatch import GradWatchWarning

    thread_errors: list = []
    monkeypatch.setattr(threading, "excepthook", lambda args: thread_errors.append(args.exc_value))
    model = models.small_mlp()
    with torch.no_grad():
        model[2].bias.fill_(-100.0)  # findings keep coming, so findings.jsonl has something to write
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradWatch(model, log_dir=tmp_path / "run", every=1, dead_window=1, quiet=True) as watch:
            models.train(model, 2)
            fail()
            models.train(model, 3)
    ours = [w for w in caught if issubclass(w.category, GradWatchWarning) and "TensorBoard" in str(w.message)]
    return watch, ours, thread_errors


def test_a_log_folder_removed_mid_run_gives_one_warning_and_training_goes_on(tmp_path, monkeypatch):
    import shutil

    watch, warned, thread_errors = _train_through_a_failure(
        tmp_path, monkeypatch, lambda: shutil.rmtree(tmp_path / "run"))
    assert watch.steps == 5 and watch.report().step == 4  # measured to the end
    assert thread_errors == []  # no traceback from TensorBoard's writer thread
    assert len(warned) == 1
    message = str(warned[0].message)
    assert str(tmp_path / "run") in message and "FileNotFoundError" in message
    assert "TensorBoard output stops here, training and the other outputs continue" in message


def test_a_full_disk_gives_one_warning_and_the_findings_file_goes_on(tmp_path, monkeypatch):
    import errno
    import json

    from tensorboard.compat.tensorflow_stub.io import gfile

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    watch, warned, thread_errors = _train_through_a_failure(
        tmp_path, monkeypatch, lambda: monkeypatch.setattr(gfile.GFile, "write", full))
    assert thread_errors == [] and len(warned) == 1 and "No space left on device" in str(warned[0].message)
    assert watch.steps == 5
    lines = (tmp_path / "run" / "findings.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [f.step for f in watch.findings]


def test_a_steps_scalars_and_histograms_are_one_event(tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    model = models.small_mlp()
    with GradWatch(model, log_dir=tmp_path / "run", every=1, histogram_every=1, quiet=True):
        models.train(model, 4)
    files = list((tmp_path / "run").glob("events.out.tfevents.*"))
    events = [e for f in files for e in EventFileLoader(str(f)).Load() if e.HasField("summary")]
    per_step = {}
    for e in events:
        if any(v.tag.startswith("activation.mean/") for v in e.summary.value):
            per_step.setdefault(e.step, []).append(e)
    assert sorted(per_step) == [0, 1, 2, 3]
    for step, found in per_step.items():
        assert len(found) == 1  # every number of the step in one record, not one record per tag
        tags = {v.tag for v in found[0].summary.value}
        assert {"activation.mean/0", "gradient.norm/0.weight", "activation/1", "gradient/0.weight"} <= tags


def test_records_are_framed_byte_for_byte_as_tensorboard_frames_them():
    import io
    import random

    from tensorboard.summary.writer.record_writer import RecordWriter

    from gradwatch.sinks.tensorboard import frame_record

    rng = random.Random(0)
    for data in (b"", b"\x00", bytes(rng.getrandbits(8) for _ in range(5000))):
        theirs = io.BytesIO()
        RecordWriter(theirs).write(data)
        assert frame_record(data) == theirs.getvalue()


def test_the_event_file_of_a_long_run_reads_back_whole(tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    model = models.small_mlp()
    with GradWatch(model, log_dir=tmp_path / "run", every=1, histogram_every=1, quiet=True):
        models.train(model, 30)
    files = list((tmp_path / "run").glob("events.out.tfevents.*"))
    steps = sorted({e.step for f in files for e in EventFileLoader(str(f)).Load()  # checks each record's CRC
                    if e.HasField("summary") and any(v.tag.startswith("activation/") for v in e.summary.value)})
    assert steps == list(range(30))


def test_gradwatchs_own_writer_never_checksums_in_python(tmp_path, monkeypatch):
    from tensorboard.summary.writer import record_writer

    calls = []
    slow = record_writer.masked_crc32c
    model = models.small_mlp()
    with GradWatch(model, log_dir=tmp_path / "run", every=1, histogram_every=1, quiet=True):
        # (the writer's first record, its file version, is written before gradwatch can step in)
        monkeypatch.setattr(record_writer, "masked_crc32c", lambda data: calls.append(len(data)) or slow(data))
        models.train(model, 3)
    assert calls == []


def test_a_writer_that_is_not_pytorchs_gets_one_call_per_value():
    np = pytest.importorskip("numpy")
    pytest.importorskip("matplotlib")

    class Recorder:  # tensorboardX, or a logger's wrapper: the SummaryWriter methods, nothing more
        def __init__(self):
            self.calls = []

        def add_custom_scalars(self, layout):
            self.calls.append(("layout", None, None))

        def add_scalar(self, tag, value, step):
            self.calls.append(("scalar", tag, step))

        def add_histogram_raw(self, tag, global_step, **fields):
            assert fields["num"] > 0 and len(fields["bucket_limits"]) == len(fields["bucket_counts"])
            self.calls.append(("histogram", tag, global_step))

        def add_text(self, *args, **kwargs):
            pass

        def add_image(self, tag, img, step, dataformats):
            assert dataformats == "HWC" and img.dtype == np.uint8 and img.shape[2] in (3, 4) and img.max() > 0
            self.calls.append(("image", tag, step))

        def flush(self):
            pass

    writer = Recorder()
    model = models.small_mlp()
    with GradWatch(model, writer=writer, every=1, histogram_every=2, quiet=True):
        models.train(model, 3)
    assert ("scalar", "activation.mean/0", 2) in writer.calls
    assert ("histogram", "gradient/0.weight", 2) in writer.calls
    assert not any(kind == "histogram" and step == 1 for kind, _, step in writer.calls)
    assert ("image", "gradient.flow", 0) in writer.calls


# ------------------------------------------------------------------ read as TensorBoard's server reads
def provider(root):
    """TensorBoard's own data provider over the runs under ``root``, as its server builds it
    (``--load_fast false``)."""
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(root))
    multiplexer.Reload()
    return multiplexer, data_provider.MultiplexerDataProvider(multiplexer, str(root))


def served_layout(root) -> dict:
    """The custom-scalars layout as TensorBoard's custom-scalars plugin serves it."""
    from tensorboard import context
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.custom_scalar.custom_scalars_plugin import CustomScalarsPlugin

    multiplexer, data = provider(root)
    plugin = CustomScalarsPlugin(base_plugin.TBContext(data_provider=data, multiplexer=multiplexer,
                                                       logdir=str(root)))
    served = plugin.layout_impl(context.RequestContext(), "")
    return json.loads(served) if isinstance(served, str) else served


def two_dead_layers():
    model = models.small_mlp()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # layer 1 dead
        model[2].bias.fill_(-100.0)  # layer 3 dead
    return model


def test_every_finding_of_a_step_is_in_the_one_text_of_that_step(tmp_path):
    with pytest.warns(DeadUnitsWarning):
        with GradWatch(two_dead_layers(), log_dir=tmp_path, every=1, dead_window=1, quiet=True) as watch:
            models.train(watch.model, 3)
    at_zero = [f for f in watch.findings if f.step == 0]
    assert {f.layer for f in at_zero} == {"1", "3"}  # two findings at one step
    acc = load(tmp_path)
    texts = acc.Tensors("gradwatch/findings/text_summary")
    steps = [e.step for e in texts]
    assert steps == sorted(set(steps)) == sorted({f.step for f in watch.findings})  # one record per step
    for event in texts:
        text = event.tensor_proto.string_val[0].decode()
        for f in (f for f in watch.findings if f.step == event.step):
            assert f"**{f.kind.category.__name__}** `{f.layer}`: {f.message}" in text and f.advice in text
    assert acc.Scalars("findings/dead_units")[0].value == 2.0  # how many were raised at the step


def test_custom_scalars_layout_charts_what_the_run_writes_under_unique_titles(tmp_path):
    from tests.test_attention import make

    model = models.small_mlp()
    with GradWatch(model, log_dir=tmp_path / "mlp", every=1, histogram_every=None, quiet=True):
        models.train(model, 3)
    transformer = make()
    opt = torch.optim.Adam(transformer.parameters(), lr=1e-3)
    x = torch.randint(0, 20, (4, 12), generator=torch.Generator().manual_seed(0))
    with GradWatch(transformer, log_dir=tmp_path / "attn", optimizer=opt, every=1, histogram_every=None,
                   quiet=True):
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(transformer(x).reshape(-1, 20), x.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    for run in ("mlp", "attn"):
        acc = load(tmp_path / run)
        written = acc.Tags()["scalars"]
        layout = served_layout(tmp_path / run)
        charts = [c for cat in layout["category"] for c in cat["chart"]]
        titles = [c["title"] for c in charts]
        assert len(titles) == len(set(titles)), titles
        for chart in charts:
            for regex in chart["multiline"]["tag"]:
                assert any(re.search(regex, tag) for tag in written), (run, chart["title"], regex)
        uncharted = [t for t in written if not any(re.search(r, t) for c in charts for r in c["multiline"]["tag"])]
        assert uncharted == []
        categories = {cat["title"] for cat in layout["category"]}
        if run == "mlp":
            assert "gradwatch: attention" not in categories and "gradwatch: updates" not in categories
        else:
            assert {"gradient.ratio", "update.ratio", "attention.saturated_fraction"} <= set(titles)


def test_the_layout_grows_when_a_new_family_first_appears(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), models.NanAt(), torch.nn.Linear(16, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with GradWatch(model, log_dir=tmp_path, every=1, quiet=True, include=["*"]):
            models.train(model, 2, lr=0.0)
            model[2].armed = True
            models.train(model, 2, lr=0.0)
    acc = load(tmp_path)
    nonfinite = [t for t in acc.Tags()["scalars"] if t.startswith("activation.nonfinite/")]
    # Written only where an output held NaN/Inf: from step 2 on (the NaN gradients then reach the weights).
    assert [e.step for e in acc.Scalars("activation.nonfinite/2")] == [2, 3]
    assert all(e.step >= 2 and e.value == 1.0 for t in nonfinite for e in acc.Scalars(t))
    titles = [c["title"] for cat in served_layout(tmp_path)["category"] for c in cat["chart"]]
    assert "activation.nonfinite" in titles and "findings" in titles


def test_a_healthy_run_writes_no_nonfinite_charts(tmp_path):
    model = models.small_mlp()
    with GradWatch(model, log_dir=tmp_path, every=1, quiet=True):
        models.train(model, 3)
    assert not [t for t in load(tmp_path).Tags()["scalars"] if t.startswith("activation.nonfinite")]


def test_a_healthy_run_writes_no_nan_scalar(tmp_path):
    """A zero-initialised bias has no gradient-to-weight ratio at its first step, and a layer whose
    output holds no floating-point element has no sampled shares: nothing is written for them, where
    a NaN line would read as a non-finite value."""
    class IntegerOut(torch.nn.Module):  # a watched module whose output is not floating point
        def forward(self, x):
            return (x > 0).long()

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.flag = models.small_mlp(), IntegerOut()

        def forward(self, x):
            self.flag(x)
            return self.body(x)

    model = Net()
    with torch.no_grad():
        model.body[0].bias.zero_()
    with GradWatch(model, log_dir=tmp_path, every=1, quiet=True, include=["body.*", IntegerOut]) as watch:
        models.train(model, 3)
    acc = load(tmp_path)
    scalars = acc.Tags()["scalars"]
    nan = [t for t in scalars if any(math.isnan(e.value) for e in acc.Scalars(t))]
    assert nan == []
    assert [e.step for e in acc.Scalars("gradient.ratio/body.0.bias")] == [1, 2]  # from its first update on
    assert "flag" in watch.report().stats.layers and not [t for t in scalars if t.endswith("/flag")
                                                           and "fraction" in t]


def test_a_dead_layers_histogram_is_drawn_around_its_value(tmp_path):
    from tensorboard import context

    model = two_dead_layers()
    with pytest.warns(DeadUnitsWarning):
        with GradWatch(model, log_dir=tmp_path / "run", every=1, histogram_every=1, dead_window=1, quiet=True):
            models.train(model, 2)
    _, data = provider(tmp_path)
    served = data.read_tensors(context.RequestContext(), experiment_id="", plugin_name="histograms",
                               downsample=100, run_tag_filter=None)["run"]
    dead = served["activation/3"][0].numpy  # [[left, right, count], ...] as the histograms plugin serves it
    assert dead[:, 2].sum() == 32 * 16
    filled = dead[dead[:, 2] > 0]
    assert len(filled) == 1 and filled[0, 0] < 0.0 < filled[0, 1] and filled[0, 1] - filled[0, 0] <= 1.0
    assert -0.5 <= dead[:, 0].min() and dead[:, 1].max() <= 0.5
    proto = load(tmp_path / "run").Histograms("activation/3")[0].histogram_value
    limits = list(proto.bucket_limit)
    assert proto.min < 0.0 < proto.max and limits == sorted(limits) and limits[-1] == proto.max
    lefts = [proto.min] + limits[:-1]  # as TensorBoard's data server reads it: no bucket runs backwards
    assert all(left < right for left, right in zip(lefts, limits))
    alive = served["activation/0"][0].numpy  # a layer with spread keeps its range
    assert alive[0, 0] < alive[-1, 1]


# ------------------------------------------------------------------ the gradient-flow image
def png_size(png: bytes):
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def test_the_gradient_flow_figure_is_an_image_on_histogram_steps(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from gradwatch import figures
    from gradwatch.sinks import flow_image

    monkeypatch.setattr(flow_image, "IMAGE_BUDGET", None)  # an image on every histogram step, whatever it costs
    drawn = []
    real = figures.gradient_flow
    monkeypatch.setattr(figures, "gradient_flow", lambda runs, path, **kw: drawn.append(runs[0]) or real(runs, path, **kw))
    model = models.small_mlp()
    with GradWatch(model, log_dir=tmp_path / "relu", every=1, histogram_every=2, quiet=True):
        models.train(model, 5)
    images = load(tmp_path / "relu").Images("gradient.flow")
    assert [e.step for e in images] == [0, 2, 4]
    for e in images:
        assert png_size(e.encoded_image_string) == (e.width, e.height) and e.width >= 600
    # Each image: the measured steps since the previous one, per layer with parameters, as `compare --png`.
    assert [sorted({s for series in run.layer_scalars["gradient.layer_norm"].values() for s, _ in series})
            for run in drawn] == [[0], [1, 2], [3, 4]]
    assert drawn[1].name == "relu, steps 1-2" and drawn[1].weighted_layers() == ["0", "2", "4"]
    assert drawn[1].layer_numel("0") == model[0].weight.numel() + model[0].bias.numel()


def test_the_gradient_norms_kept_for_the_next_image_stay_bounded(tmp_path, monkeypatch):
    """Histograms off (no image is ever drawn), every step measured: the norms kept for an image are the
    latest FLOW_STEPS per layer, not one more each step for ever."""
    from gradwatch.sinks import flow_image

    monkeypatch.setattr(flow_image, "FLOW_STEPS", 4)
    model = models.small_mlp()
    with GradWatch(model, log_dir=tmp_path, every=1, histogram_every=None, quiet=True) as watch:
        models.train(model, 12)
        (sink,) = [s for s in watch.sinks.sinks if getattr(s, "_flow", None) is not None]
        kept = {name: [step for step, _ in series] for name, series in sink._flow.norms.items()}
    assert kept and all(steps == [7, 8, 9, 10] for steps in kept.values())  # (step 11 is handed on at detach)


def test_images_keep_within_their_share_of_the_training_time(monkeypatch):
    from gradwatch.sinks import flow_image

    clock = [100.0]
    monkeypatch.setattr(flow_image.time, "perf_counter", lambda: clock[0])
    image = flow_image.FlowImage("run")
    assert image.due()  # the first histogram step always gets one
    image.drawn_at, image.draw_seconds = clock[0], 0.0  # ... and the next (the first also loaded matplotlib)
    assert image.due()
    image.drawn_at, image.draw_seconds = clock[0], 0.2
    clock[0] += 0.2 / flow_image.IMAGE_BUDGET * 0.9
    assert not image.due()
    clock[0] += 0.2 / flow_image.IMAGE_BUDGET * 0.2
    assert image.due()


def test_without_matplotlib_the_image_is_left_out_and_said_once(tmp_path, monkeypatch):
    import io
    import sys

    from rich.console import Console

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = io.StringIO()
    model = models.small_mlp()
    with GradWatch(model, log_dir=tmp_path, every=1, histogram_every=1, console=Console(file=out, width=200)) as w:
        models.train(model, 4)
    from gradwatch.sinks.flow_image import MISSING

    assert w.report().notes.count(MISSING) == 1 and " ".join(out.getvalue().split()).count(MISSING) == 1
    acc = load(tmp_path)
    assert acc.Tags()["images"] == [] and len(acc.Histograms("activation/1")) == 4


def test_drawing_the_image_leaves_the_users_matplotlib_backend_alone(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        model = models.small_mlp()
        with GradWatch(model, log_dir=tmp_path, every=1, histogram_every=1, quiet=True):
            models.train(model, 2)
        assert matplotlib.get_backend() == "svg"
        assert load(tmp_path).Images("gradient.flow")
    finally:
        matplotlib.use(before)


def test_an_image_of_gradients_that_are_all_non_finite_is_still_drawn():
    from gradwatch.report import LayerStats, ParamStats, StepStats
    from gradwatch.sinks import flow_image

    image = flow_image.FlowImage("run")
    nan = float("nan")
    image.add(StepStats(step=0, layers={n: LayerStats(n, "Linear", grad_norm=nan) for n in ("a", "b")},
                        params={f"{n}.weight": ParamStats(f"{n}.weight", n, 4, nan, nan, 1.0) for n in ("a", "b")}))
    png = image.png()
    assert png is not None and flow_image.png_shape(png)[0] > 100
