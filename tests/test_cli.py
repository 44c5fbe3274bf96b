"""The gradwatch command: report, compare, PNG charts, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

from gradwatch import DeadUnitsWarning, GradWatch
from gradwatch.cli import main
from tests import models


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for name, dead in (("healthy", False), ("dead", True)):
        torch.manual_seed(0)
        model = models.small_mlp(width=32)
        if dead:
            with torch.no_grad():
                model[2].bias.fill_(-100.0)
        with pytest.warns(DeadUnitsWarning) if dead else _nothing():
            with GradWatch(model, log_dir=root / name, every=1, histogram_every=2, dead_window=2, quiet=True):
                models.train(model, 4)
    return root


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_report_json_has_layers_in_forward_order_and_findings(runs, capsys):
    assert main(["report", str(runs / "dead"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["layer"] for r in out["layers"]] == ["0", "1", "2", "3", "4"]
    assert out["layers"][3]["dead_worst"] == 1.0
    assert {f["kind"] for f in out["findings"]} >= {"dead_units"}


def test_fail_on_exit_codes(runs, capsys):
    assert main(["report", str(runs / "dead"), "--fail-on", "dead_units"]) == 1
    assert main(["report", str(runs / "healthy"), "--fail-on", "dead_units,vanishing"]) == 0
    capsys.readouterr()
    assert main(["report", str(runs / "dead"), "--fail-on", "vanishing,dead_units,saturation"]) == 1
    assert capsys.readouterr().err.strip().endswith("of kind dead_units")  # the kinds found, not those asked for


def test_report_json_is_strict_json_with_null_for_non_finite_values(tmp_path, capsys):
    torch.manual_seed(0)
    model = models.small_mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with GradWatch(model, log_dir=tmp_path / "nan", every=1, quiet=True):
            models.train(model, 2)
    capsys.readouterr()
    assert main(["report", str(tmp_path / "nan"), "--json"]) == 0
    text = capsys.readouterr().out
    def no_constants(name):
        raise ValueError(name)
    out = json.loads(text, parse_constant=no_constants)  # NaN, Infinity: not JSON
    assert any(r["grad_norm"] is None for r in out["layers"])


def test_a_damaged_run_file_is_named_with_exit_code_2(runs, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs / "dead", run)
    lines = (run / "findings.jsonl").read_text().splitlines()
    (run / "findings.jsonl").write_text("\n".join(lines + ['{"kind": "dead_u']))  # cut short by a kill
    assert main(["report", str(run), "--json"]) == 0
    assert {f["kind"] for f in json.loads(capsys.readouterr().out)["findings"]} >= {"dead_units"}
    (run / "gradwatch.json").write_text("{bad")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "gradwatch.json" in err and "not JSON" in err


def test_an_unknown_fail_on_kind_is_a_usage_error_naming_the_valid_kinds(runs, capsys):
    # Exit 1 means "findings present"; a typo must not look like that.
    with pytest.raises(SystemExit) as exc:
        main(["report", str(runs / "healthy"), "--fail-on", "dead_units,sadness"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown finding kind(s) 'sadness'" in err
    from gradwatch.report import FindingKind

    assert "valid kinds: " + ", ".join(k.value for k in FindingKind) in err
    done = subprocess.run([sys.executable, "-m", "gradwatch", "report", str(runs / "healthy"), "--fail-on", "sad"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "valid kinds" in done.stderr


def test_a_folder_without_runs_is_named(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err


def test_compare_a_parent_folder_and_write_pngs(runs, tmp_path, capsys):
    flow, heat = tmp_path / "flow.png", tmp_path / "heat.png"
    assert main(["compare", str(runs), "--png", str(flow), "--heatmap", str(heat)]) == 0
    out = capsys.readouterr().out
    assert "dead" in out and "healthy" in out and "100%" in out
    for png in (flow, heat):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_python_dash_m_runs_the_cli(runs):
    done = subprocess.run([sys.executable, "-m", "gradwatch", "report", str(runs / "healthy")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "gradwatch report" in done.stdout


# ------------------------------------------------------------------ several runs in one folder
def train_into(folder, *, dead: bool, steps: int = 4):
    torch.manual_seed(0)
    model = models.small_mlp(width=32)
    if dead:
        with torch.no_grad():
            model[2].bias.fill_(-100.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with GradWatch(model, log_dir=folder, every=1, histogram_every=2, dead_window=2, quiet=True) as watch:
            models.train(model, steps)
    return watch


def report_json(capsys, *args) -> dict:
    capsys.readouterr()
    code = main(["report", *map(str, args), "--json"])
    assert code == 0
    return json.loads(capsys.readouterr().out)


def test_a_rerun_into_the_same_folder_is_its_own_run(tmp_path, capsys):
    folder = tmp_path / "relu"
    first = train_into(folder, dead=True)
    second = train_into(folder, dead=True)
    assert len(first.findings) == len(second.findings) > 0
    lines = [json.loads(line) for line in (folder / "findings.jsonl").read_text().splitlines()]
    ids = list(dict.fromkeys(line["run"] for line in lines))
    assert len(ids) == 2 and len(lines) == 2 * len(first.findings)
    meta = json.loads((folder / "gradwatch.json").read_text())
    assert [r["run"] for r in meta["runs"]] == ids and meta["run"] == ids[1]
    assert all(len(r["event_files"]) == 1 for r in meta["runs"])
    assert meta["runs"][0]["event_files"] != meta["runs"][1]["event_files"]
    # The report reads the latest run only: its findings once, not both runs' together.
    out = report_json(capsys, folder)
    assert out["run_id"] == ids[1] and out["run_ids"] == ids
    assert len(out["findings"]) == len(second.findings)
    assert out["layers"][3]["dead_worst"] == 1.0
    # `compare` of the folder counts one run's findings.
    capsys.readouterr()
    assert main(["compare", str(folder)]) == 0
    counts = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("relu"))
    from gradwatch.report import FindingKind

    assert counts.split()[1:] == [str(sum(f.kind is k for f in second.findings)) for k in FindingKind]


def test_report_and_compare_pick_a_run_by_id(tmp_path, capsys):
    folder = tmp_path / "net"
    train_into(folder, dead=False)
    sick = train_into(folder, dead=True)
    ids = [r["run"] for r in json.loads((folder / "gradwatch.json").read_text())["runs"]]
    assert report_json(capsys, folder, "--run", ids[0])["findings"] == []
    assert len(report_json(capsys, folder)["findings"]) == len(sick.findings)
    # Exit codes follow the run asked for.
    assert main(["report", str(folder), "--run", ids[0], "--fail-on", "dead_units"]) == 0
    assert main(["report", str(folder), "--fail-on", "dead_units"]) == 1
    # The table says which run it is and how to see the others.
    capsys.readouterr()
    main(["report", str(folder)])
    text = " ".join(capsys.readouterr().out.split())
    assert f"run {ids[1]} (the latest of 2 in this folder; others: {ids[0]}; pick one with --run ID)" in text
    # An unknown id is named, with the ones there are.
    assert main(["report", str(folder), "--run", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--run 'nope' is not a run" in err and ids[0] in err and ids[1] in err
    # compare: two runs of one folder, side by side, told apart by their ids.
    assert main(["compare", str(folder), "--run", ids[0], "--run", ids[1]]) == 0
    out = capsys.readouterr().out
    assert f"net@{ids[0]}" in out and f"net@{ids[1]}" in out
    assert main(["compare", str(folder), "--run", "nope"]) == 2


def test_a_folder_written_before_run_ids_still_reads(tmp_path, capsys):
    folder = tmp_path / "old"
    watch = train_into(folder, dead=True)
    # What older versions wrote: no run ids anywhere.
    lines = [json.loads(line) for line in (folder / "findings.jsonl").read_text().splitlines()]
    (folder / "findings.jsonl").write_text("".join(json.dumps({k: v for k, v in line.items() if k != "run"}) + "\n"
                                                   for line in lines))
    meta = json.loads((folder / "gradwatch.json").read_text())
    old = {k: meta[k] for k in ("format", "layers", "layer_types", "params")}
    (folder / "gradwatch.json").write_text(json.dumps(old))
    for f in folder.glob("events.out.tfevents.*"):  # ... from another process, as it would be
        parts = f.name.split(".")
        parts[-2] = "1"
        f.rename(folder / ".".join(parts))
    out = report_json(capsys, folder)
    assert out["run_id"] is None and len(out["findings"]) == len(watch.findings)
    assert [r["layer"] for r in out["layers"]] == ["0", "1", "2", "3", "4"]
    # A new run into the old folder: the new one is the latest; the old one stays readable.
    train_into(folder, dead=False)
    new = report_json(capsys, folder)
    assert new["findings"] == [] and new["run_ids"][0] == "legacy" and len(new["run_ids"]) == 2
    legacy = report_json(capsys, folder, "--run", "legacy")
    assert len(legacy["findings"]) == len(watch.findings) and legacy["layers"][3]["dead_worst"] == 1.0


@pytest.mark.parametrize("width", [40, 100])
def test_findings_keep_numbers_and_kinds_whole_at_any_width(runs, width):
    import io

    from rich.console import Console

    from gradwatch.cli import FindingsList
    from gradwatch.runs import find_runs, load_run

    run = load_run(find_runs([str(runs / "dead")])[0])
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None).print(FindingsList(run))
    out = buf.getvalue()
    assert all(len(line) <= width for line in out.splitlines())
    for f in run.findings:
        assert f["kind"] in out  # never "dead_" over "units"
    assert "dead_units" in out and ("message" in out) == (width >= 72)


def test_another_programs_run_beside_gradwatchs_is_skipped_under_a_parent_folder(runs, tmp_path, capsys):
    """The Hugging Face Trainer's layout: its own TensorBoard run beside gradwatch's, both under runs/."""
    import shutil

    from torch.utils.tensorboard import SummaryWriter

    parent = tmp_path / "runs"
    shutil.copytree(runs / "dead", parent / "gradwatch")
    with SummaryWriter(parent / "Dec07_trainer") as w:
        w.add_scalar("train/loss", 1.0, 1)
    capsys.readouterr()
    assert main(["report", str(parent), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["run"].endswith("gradwatch")
    assert "skipped" in captured.err and "Dec07_trainer" in captured.err
    assert main(["compare", str(parent)]) == 0
    assert main(["report", str(parent / "Dec07_trainer")]) == 2  # named itself, it must be a run


def test_a_file_and_a_run_without_a_measured_step_are_named_for_what_they_are(runs, tmp_path, capsys):
    event_file = next((runs / "healthy").glob("events.out.tfevents*"))
    assert main(["report", str(event_file)]) == 2
    assert "a file, not a folder" in capsys.readouterr().err
    model = models.small_mlp()
    with GradWatch(model, log_dir=tmp_path / "empty", quiet=True):
        pass  # attached and detached: no step ran
    assert main(["report", str(tmp_path / "empty")]) == 2  # (its event file holds no gradwatch tag)
    assert "no measured step was recorded" in capsys.readouterr().err



def test_a_reader_that_leaves_early_is_no_failure_and_no_traceback(runs, monkeypatch, capsys):
    """`gradwatch report RUN | head -1`: exit 141 (a closed pipe, as a shell reports it), never 1 (a
    --fail-on finding present), and no traceback. Here the pipe's reader is gone before the first write."""
    import os

    read, write = os.pipe()
    os.close(read)
    out = os.fdopen(write, "w")
    monkeypatch.setattr(sys, "stdout", out)
    try:
        assert main(["report", str(runs / "dead")]) == 141
    finally:
        monkeypatch.undo()
        out.close()
    assert "Traceback" not in capsys.readouterr().err
