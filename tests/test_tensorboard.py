"""TensorBoard output, read back with TensorBoard's own reader."""

from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator

from gradwatch import DeadUnitsWarning, GradWatch
from tests import models


def load(log_dir) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0,
                                                                         "tensors": 0})
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

        def flush(self):
            pass

    writer = Recorder()
    model = models.small_mlp()
    with GradWatch(model, writer=writer, every=1, histogram_every=2, quiet=True):
        models.train(model, 3)
    assert ("scalar", "activation.mean/0", 2) in writer.calls
    assert ("histogram", "gradient/0.weight", 2) in writer.calls
    assert not any(kind == "histogram" and step == 1 for kind, _, step in writer.calls)
