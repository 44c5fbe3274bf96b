"""What the examples share (examples/common.py), both ways of starting them, and their committed results."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from examples import common, mnist_activations
from tests.examples.fakes import fake_idx_dataset

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ["mnist_activations", "cifar10_activations", "fashion_mnist_gradients", "activation_gallery", "demo",
            "ddp_watch"]


def _python(args: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", COLUMNS="100")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES)
def test_example_starts_as_a_file_and_as_a_module(example, tmp_path):
    as_file = _python([str(ROOT / "examples" / f"{example}.py"), "--help"], cwd=tmp_path)  # from elsewhere
    assert as_file.returncode == 0, as_file.stderr
    as_module = _python(["-m", f"examples.{example}", "--help"], cwd=ROOT)
    assert as_module.returncode == 0, as_module.stderr
    assert as_file.stdout.split("\n", 1)[1] == as_module.stdout.split("\n", 1)[1]  # same help but the program name


@pytest.mark.slow
def test_file_form_runs_the_checkouts_code_end_to_end(tmp_path):
    """``python examples/x.py`` imports examples and gradwatch from the checkout it sits in,
    not from examples/ itself (whose datasets.py would shadow a `datasets` package)."""
    data = fake_idx_dataset(tmp_path / "data", "mnist", 60, 20)
    # what `python examples/mnist_activations.py ...` does, then a look at what it imported
    probe = ("import runpy, sys; sys.argv = sys.argv[1:]; sys.path[0] = sys.argv[0].rsplit('/', 1)[0]; "
             "runpy.run_path(sys.argv[0], run_name='__main__'); import examples.common, gradwatch; "
             "print('FROM', sys.path[0], examples.common.__file__, gradwatch.__file__)")
    proc = _python(["-c", probe, str(ROOT / "examples" / "mnist_activations.py"), "--quick", "--steps", "2",
                    "--activations", "relu", "--data-dir", str(data), "--no-download", "--no-verify",
                    "--runs", "runs", "--threads", "1", "--device", "cpu"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "mnist_activations" / "results.json").is_file()
    first, *where = proc.stdout.rsplit("FROM", 1)[1].split()
    assert Path(first) == ROOT
    assert all(Path(p).resolve().is_relative_to(ROOT) for p in where), where

def _mnist(tmp_path: Path, *extra: str) -> dict:
    data = tmp_path / "data"
    if not data.exists():
        fake_idx_dataset(data, "mnist", 120, 40)
    return mnist_activations.main(["--quick", "--data-dir", str(data), "--no-verify", "--no-download",
                                   "--runs", str(tmp_path / "runs"), "--threads", "1", "--device", "cpu",
                                   "--eval-every", "2", *extra])


@pytest.mark.slow
def test_variants_trained_apart_merge_into_one_result(tmp_path, recwarn):
    parts = tmp_path / "parts"
    for act in ("sigmoid", "relu"):
        _mnist(tmp_path, "--steps", "4", "--activations", act, "--out", str(parts / act))
    together = _mnist(tmp_path, "--steps", "4", "--activations", "relu,sigmoid", "--out", str(tmp_path / "one"))
    merged = _mnist(tmp_path, "--merge", str(parts / "sigmoid"), str(parts / "relu"), "--out", str(tmp_path / "m"))
    written = json.loads((tmp_path / "m" / "results.json").read_text())
    assert list(written["activations"]) == ["relu", "sigmoid"]  # the example's order, not the folders'
    assert [p["activations"] for p in written["parts"]] == [["sigmoid"], ["relu"]]
    assert written["wall_seconds"] == max(p["wall_seconds"] for p in written["parts"])
    assert written["setup"]["steps"] == 4 and "--merge" in written["command"]
    assert (tmp_path / "m" / "test_curves.png").stat().st_size > 1000
    # the same seeds, the same batches: apart or together, the same numbers written
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    for act in ("relu", "sigmoid"):
        assert written["activations"][act]["curve"] == one["activations"][act]["curve"]
        assert merged["activations"][act]["test_accuracy"] == together["activations"][act]["test_accuracy"]
    assert set(merged["acceptance"]) == set(together["acceptance"])


def test_merge_refuses_parts_that_do_not_belong_together(tmp_path, recwarn):
    parts = tmp_path / "parts"
    _mnist(tmp_path, "--steps", "2", "--activations", "relu", "--out", str(parts / "a"))
    _mnist(tmp_path, "--steps", "3", "--activations", "tanh", "--out", str(parts / "b"))
    with pytest.raises(SystemExit, match=r"differ in \['steps'\]"):
        _mnist(tmp_path, "--merge", str(parts / "a"), str(parts / "b"), "--out", str(tmp_path / "m"))
    with pytest.raises(SystemExit, match="already came from"):
        _mnist(tmp_path, "--merge", str(parts / "a"), str(parts / "a"), "--out", str(tmp_path / "m"))
    with pytest.raises(SystemExit, match="no results.json"):
        _mnist(tmp_path, "--merge", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m"))


def test_arguments_are_checked_up_front(tmp_path, capsys):
    for bad, message in ((["--activations", "relu,swish"], "unknown activation"), (["--steps", "0"], "at least 1"),
                         (["--threads", "0"], "argument --threads: '0': must be 1 or more"),
                         (["--device", "foo"], "argument --device: 'foo' is not a device")):
        with pytest.raises(SystemExit):
            mnist_activations.main(["--runs", str(tmp_path), *bad])
        assert message in capsys.readouterr().err
    from examples import demo

    for bad in (["--steps", "0"], ["--threads", "-1"]):
        with pytest.raises(SystemExit):
            demo.main(["--runs", str(tmp_path), *bad])
        assert f"argument {bad[0]}" in capsys.readouterr().err


def test_results_files_are_strict_json_with_numbers_on_one_line(tmp_path):
    payload = {"curve": [0.5, float("nan"), 1], "nested": {"rows": [[1, 2], [3, 4]], "where": tmp_path},
               "names": ["a", "b"], "empty": [], "tuple": (1.5, 2)}
    path = common.write_results(tmp_path, payload)
    text = path.read_text()
    back = json.loads(text)  # strict: NaN became null
    assert back["curve"] == [0.5, None, 1] and back["nested"]["rows"] == [[1, 2], [3, 4]]
    assert back["nested"]["where"] == str(tmp_path) and back["tuple"] == [1.5, 2] and back["empty"] == []
    assert '"curve": [0.5, null, 1]' in text  # a list of numbers stays on one line
    assert set(back) >= {"written", "torch"}
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        common.write_results(tmp_path, {"x": object()})


def test_progress_prints_plain_lines_when_not_a_terminal(capsys):
    bar = common.progress()  # pytest captures stdout: not a terminal
    with bar:
        task = bar.add_task("  relu", total=100, status="")
        for step in range(1, 101):
            bar.update(task, completed=step, status=f"loss {1 / step:.3f}")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("relu:")]
    assert len(lines) == 10 and lines[0].startswith("relu: 10/100") and lines[-1].startswith("relu: 100/100")


def test_device_description_names_the_card():
    import torch

    assert common.describe_device(torch.device("cpu")) == "cpu"


COMMITTED = [ROOT / "docs" / "reproduction.md", *sorted((ROOT / "docs" / "results").rglob("*.json")),
             *sorted((ROOT / "examples").glob("*.py"))]
MACHINE_PATH = re.compile(r"(?<![\w.])/(work|tmp|home|root|Users)/")


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_committed_example_file_names_a_machine_path(path):
    hits = [ln.strip()[:120] for ln in path.read_text().splitlines() if MACHINE_PATH.search(ln)]
    assert not hits, hits


@pytest.mark.parametrize("path", sorted((ROOT / "docs" / "results").rglob("results.json")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_results_say_how_they_were_made(path):
    r = json.loads(path.read_text())
    assert r["command"].startswith("python -m examples.") and r["example"] in r["command"]
    assert isinstance(r.get("wall_seconds"), (int, float)) and math.isfinite(r["wall_seconds"])


def test_a_full_schedule_keeps_results_json_small(tmp_path):
    # 14,000 steps of two losses and 700 measured steps of five layers' norms, for five activations
    rng = np.random.default_rng(0)
    log = common.GradNormLog(["conv1", "conv2", "local3", "local4", "softmax_linear"])
    for step in range(0, 14_000, 20):
        log.steps.append(step)
        for n in log.norms:
            log.norms[n].append(float(rng.lognormal()))
    per_act = {"cross_entropy": common.block_means(list(rng.random(14_000) + 1.0)),
               "total_loss": common.block_means(list(rng.random(14_000) + 1.1)),
               "weight_grad_norm": log.thinned()}
    path = common.write_results(tmp_path, {"activations": {a: per_act for a in "abcde"}})
    assert path.stat().st_size < 200_000
    written = json.loads(path.read_text())["activations"]["a"]
    block = written["cross_entropy"]["block"]
    assert len(written["cross_entropy"]["mean"]) == math.ceil(14_000 / block) <= common.MAX_POINTS
    assert written["weight_grad_norm"]["steps"][-1] == 13_980  # the last measured step is kept
    assert len(written["weight_grad_norm"]["steps"]) == len(written["weight_grad_norm"]["conv1"])


def test_block_means_average_each_block_and_keep_the_tail():
    assert common.block_means([1.0, 3.0, 5.0, 7.0, 9.0], max_points=3) == {"block": 2, "mean": [2.0, 6.0, 9.0]}
    assert common.thin_indices(10, max_points=4) == [0, 3, 6, 9]
    assert common.thin_indices(11, max_points=4) == [0, 3, 6, 9, 10]
