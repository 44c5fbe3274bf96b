"""What a person reads in a terminal: the README's pattern run as a script, its output read back
as printed (a pipe with COLUMNS set, and a real pseudo-terminal), line by line."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
from rich.cells import cell_len

ROOT = Path(__file__).resolve().parents[1]

# The README's pattern on a model with two planted findings; the findings' messages and panel
# titles go to a file, so that what the test reads is only what a person would see.
SCRIPT = textwrap.dedent('''
    import json, logging, sys
    import torch
    from torch import nn
    from gradwatch import GradWatch
    from tests import models

    mode, record = sys.argv[1], sys.argv[2]
    if mode == "stderr":
        logging.basicConfig()  # the root logger prints to stderr: the terminal the panels are drawn on
    elif mode == "file":
        logging.basicConfig(filename=record + ".log")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Sigmoid(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    with torch.no_grad():
        model[0].weight.mul_(60.0)    # the sigmoid saturates
        model[2].bias.fill_(-100.0)   # the ReLU's units die
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with GradWatch(model, every=1, dead_window=1, optimizer=opt) as watch:
        models.train(model, 3)
    print(watch.report())
    print(watch.report().table(full=True))
    with open(record, "w") as f:
        json.dump([[w.message, f"{w.kind.category.__name__} · {w.layer} · step {w.step}"] for w in watch.findings], f)
''')

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)")


def _env(columns: Optional[int]) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "NO_COLOR")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONWARNINGS"] = "default"
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return env


def _script(tmp_path: Path) -> Tuple[Path, Path]:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    return script, tmp_path / "findings.json"


def run_piped(tmp_path: Path, columns: int, mode: str = "none") -> Tuple[str, str, List[List[str]]]:
    """stdout and stderr as two pipes (``python train.py > out 2> err``), COLUMNS set."""
    script, record = _script(tmp_path)
    done = subprocess.run([sys.executable, str(script), mode, str(record)], cwd=ROOT, env=_env(columns),
                          capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr, json.loads(record.read_text())


def run_in_terminal(tmp_path: Path, columns: int, mode: str = "none") -> Tuple[str, List[List[str]]]:
    """stdin, stdout and stderr on one pseudo-terminal ``columns`` wide, COLUMNS unset: what a
    person at an interactive terminal sees, colour codes taken out."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    script, record = _script(tmp_path)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = _env(None)
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen([sys.executable, str(script), mode, str(record)], cwd=ROOT, env=env,
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    try:
        while select.select([master], [], [], 300)[0]:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
        proc.wait(timeout=60)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")
    text = ANSI.sub("", b"".join(chunks).decode("utf-8", errors="replace")).replace("\r\n", "\n")
    return text, json.loads(record.read_text())


def too_wide(text: str, columns: int) -> List[str]:
    return [line for line in text.splitlines() if cell_len(line) > columns]


def flat(text: str) -> str:
    """Printed text as one line: panel borders and line breaks out, so a wrapped message reads whole."""
    return " ".join(text.replace("│", " ").split())


def check_width(text: str, columns: int, *, tables: bool = True) -> None:
    assert not too_wide(text, columns), f"wider than {columns} columns:\n" + "\n".join(too_wide(text, columns))
    if not tables:
        return
    assert "<gradwatch." not in text  # print(report.table(full=True)) prints the table, not an object's repr
    assert flat(text).count("gradwatch - step 2") == 2  # the default table and the full one
    assert ("left out at 60 columns" in flat(text)) == (columns == 60)  # whole columns go, named


terminal_only = pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")


@pytest.mark.parametrize("columns", [60, 80, 120])
def test_printed_lines_fit_the_width_columns_sets(tmp_path, columns):
    out, err, findings = run_piped(tmp_path, columns)
    check_width(out, columns)
    check_width(err, columns, tables=False)
    # Panels on stderr and the rest on stdout are two destinations: each gets every finding once in full.
    assert len(findings) == 2
    for message, title in findings:
        assert flat(err).count(message) == 1 and title in err
        assert flat(out).count(message) == 1  # in the exit summary; the tables after it name it
    assert flat(out).count("2 findings, shown above in the summary:") == 2


@terminal_only
@pytest.mark.parametrize("columns, logging", [(60, "none"), (80, "stderr"), (120, "file")])
def test_a_terminal_shows_each_finding_once_at_its_width(tmp_path, columns, logging):
    text, findings = run_in_terminal(tmp_path, columns, logging)
    check_width(text, columns)
    assert len(findings) == 2
    for message, title in findings:
        # In full once, in its warning panel; the exit summary and both tables name it by the panel's title.
        assert flat(text).count(message) == 1
        assert flat(text).count(title) == 4
    assert flat(text).count("2 findings, shown above as warnings:") == 3
    assert "WARNING:gradwatch" not in text  # basicConfig's handler writes to the same terminal: passed over
    if logging == "file":  # a handler elsewhere gets every finding
        log = (tmp_path / "findings.json.log").read_text()
        assert [log.count(m) for m, _ in findings] == [1, 1] and log.count("WARNING:gradwatch:") == 2


def test_print_renders_the_table_the_full_table_and_the_summary_as_text(capsys, monkeypatch):
    from tests.test_render import made_report

    monkeypatch.setenv("COLUMNS", "70")
    report = made_report(40)
    for view in (report, report.table(), report.table(full=True), report.summary()):
        print(view)
        out = capsys.readouterr().out
        assert "object at 0x" not in out and "gradwatch" in out
        assert max(cell_len(line) for line in out.splitlines()) <= 70
    print(report.table(full=True))
    out = capsys.readouterr().out
    assert "layers shown" not in out and len(re.findall(r"^ encoder\.layers\.\d+\.", out, re.M)) == 40


def test_the_flow_ratio_in_gradwatch_report_is_the_vanishing_rules(tmp_path, capsys, monkeypatch):
    """``gradwatch report``'s ratio column is each layer's gradient per weight (RMS) over the last
    layer's, the quantity the vanishing rule compares, at the step the legend names."""
    import warnings

    import torch
    from torch import nn

    from gradwatch import GradWatch
    from gradwatch.cli import main
    from tests import models

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Sigmoid(), nn.Linear(64, 64), nn.Sigmoid(), nn.Linear(64, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with GradWatch(model, every=2, log_dir=tmp_path / "run", quiet=True) as watch:
            models.train(model, 5)
    params = watch.report().params
    rms = {layer: math.sqrt(sum(p.grad_norm ** 2 for p in params.values() if p.layer == layer)
                            / sum(p.numel for p in params.values() if p.layer == layer)) for layer in ("0", "2", "4")}
    assert main(["report", str(tmp_path / "run"), "--json"]) == 0
    rows = {r["layer"]: r for r in json.loads(capsys.readouterr().out)["layers"]}
    for layer in ("0", "2", "4"):
        assert rows[layer]["grad_rms_ratio_to_last"] == pytest.approx(rms[layer] / rms["4"], rel=1e-4)
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["report", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    from gradwatch.render import _num

    assert re.search(rf"^ 0 .* {re.escape(_num(rms['0'] / rms['4']))} *$", out, re.M)
    assert f"over layer 4's, at step {watch.report().step}, the last logged" in flat(out)
