"""The gradwatch command: report, compare, PNG charts, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

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
    with pytest.raises(SystemExit, match="unknown kind"):
        main(["report", str(runs / "healthy"), "--fail-on", "sadness"])


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
