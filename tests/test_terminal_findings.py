"""Findings drawn the way users see them: a script in its own process, no warning capture, a real
terminal (a pty) at 80 and 120 columns, for every finding kind and every step mode. pytest captures
warnings, so in-process tests never draw a panel; a rendering bug there (rich markup in a title or
a layer name) stopped users' training while every test passed.

The script is tests/terminal_script.py: per width, each kind's planted model trains a few steps.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from rich.cells import cell_len

from gradwatch import FindingKind, cli
from tests.terminal_script import KINDS, planted

SCRIPT = Path(__file__).with_name("terminal_script.py")
WIDTHS = (80, 120)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def run_in_terminal(args, columns: int, timeout: float = 300.0):
    """Run ``args`` with stdin, stdout and stderr on a new pty of ``columns`` columns; returns
    (exit status, what it printed, without colour codes and carriage returns)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "PYTHONWARNINGS"))}
    env.update(COLUMNS=str(columns), TERM="xterm-256color")
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=SCRIPT.parent.parent,
                            start_new_session=True)
    os.close(slave)
    out, deadline = bytearray(), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 1 << 16)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
        rc = proc.wait(timeout=30)
    finally:
        os.close(master)
    return rc, ANSI.sub("", out.decode("utf-8", "replace")).replace("\r", "")


@pytest.mark.parametrize("mode", ["forward", "optimizer", "manual"])
def test_every_finding_kind_draws_in_a_terminal_and_training_goes_on(mode, tmp_path, capsys):
    rc, text = run_in_terminal([sys.executable, str(SCRIPT), mode, str(tmp_path), *map(str, WIDTHS)], WIDTHS[0])
    assert rc == 0, text[-3000:]
    assert text.rstrip().endswith("all trained"), text[-3000:]
    for bad in ("Traceback", "MarkupError", "internal error", "failed (", "switched off"):
        assert bad not in text, text[max(0, text.find(bad) - 2000):text.find(bad) + 500]
    segments = re.split(r"^trained (\w+) (\d+)$", text, flags=re.M)
    # segments: [before first, kind, width, after, kind, width, ...]: what each run printed comes before its marker
    printed = {(segments[i], int(segments[i + 1])): segments[i - 1] for i in range(1, len(segments) - 1, 3)}
    assert set(printed) == {(k, w) for k in KINDS for w in WIDTHS}
    for (kind, width), shown in printed.items():
        category = FindingKind(kind).category.__name__
        titles = [line for line in shown.splitlines() if line.startswith(f"╭─ {category} · ")]
        assert titles, f"no {category} panel at {width} columns in mode {mode}:\n{shown}"
        assert all(cell_len(line) == width for line in titles), titles  # drawn at the terminal's width
        layer = planted(kind)[4]
        if layer:  # names holding rich markup print as they are: in the panel, and in the summary naming it
            assert f"╭─ {category} · {layer} · step" in shown and shown.count(f"{category} · {layer} · step") >= 2
        records = [json.loads(line) for line in (tmp_path / f"{kind}-{width}" / "findings.jsonl").read_text()
                   .splitlines()]
        found = [r for r in records if r.get("kind") == kind]
        assert found, f"{kind} not in findings.jsonl ({mode}, {width} columns): {records}"
        if layer:
            assert layer in {r["layer"] for r in found}
    if mode == "forward":  # and `gradwatch report` prints those names too (exploding: a note names it as well)
        for kind in ("dead_units", "exploding"):
            assert cli.main(["report", str(tmp_path / f"{kind}-80")]) == 0
            assert planted(kind)[4] in capsys.readouterr().out
