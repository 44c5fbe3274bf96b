"""The terminal: the table and warning panels, rendered into a StringIO console."""

from __future__ import annotations

import io
import warnings

import torch
from rich.console import Console

from gradwatch import GradWatch
from gradwatch.sinks import warn as warn_sink
from tests import models


def console(color: bool = False) -> tuple:
    buf = io.StringIO()
    return Console(file=buf, width=100, force_terminal=color, color_system="standard" if color else None), buf


def test_table_at_exit_lists_layers_and_findings():
    con, buf = console()
    model = models.small_mlp()
    with torch.no_grad():
        model[2].bias.fill_(-100.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with GradWatch(model, every=1, dead_window=1, console=con):
            models.train(model, 2)
    out = buf.getvalue()
    assert "gradwatch - step 1" in out
    for col in ("layer", "type", "zeros", "dead", "∇W"):
        assert col in out
    assert "ReLU" in out and "100%" in out
    assert "DeadUnitsWarning 3:" in out
    assert "\x1b[" not in out  # no colour codes when not a terminal


def test_quiet_prints_no_table():
    con, buf = console()
    model = models.small_mlp()
    with GradWatch(model, every=1, console=con, quiet=True):
        models.train(model, 1)
    assert buf.getvalue() == ""


def test_str_of_report_is_plain_text():
    model = models.small_mlp()
    with GradWatch(model, every=1, quiet=True) as watch:
        models.train(model, 1)
    text = str(watch.report())
    assert "Linear" in text and "\x1b[" not in text


def test_findings_are_drawn_as_panels_when_python_would_print_them(monkeypatch):
    con, buf = console(color=True)
    printed = []
    model = models.small_mlp()
    with torch.no_grad():
        model[2].bias.fill_(-100.0)
    # Simulate a plain terminal session: the stdlib printer active, no recording context.
    monkeypatch.setattr(warn_sink, "_stdlib_printer_active", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = warnings._showwarning_orig  # as outside pytest
        monkeypatch.setattr(warnings, "_showwarnmsg_impl", lambda msg: printed.append(msg))
        with GradWatch(model, every=1, dead_window=1, console=con, quiet=True):
            models.train(model, 1)
            warnings.warn("someone else's warning")
        assert warnings.showwarning is warnings._showwarning_orig  # restored on exit
    out = buf.getvalue()
    assert "DeadUnitsWarning" in out and "LeakyReLU" in out and "\x1b[" in out
    assert [str(m.message) for m in printed] == ["someone else's warning"]


def test_report_renders_as_html_for_notebooks():
    model = models.small_mlp()
    with GradWatch(model, every=1, quiet=True) as watch:
        models.train(model, 1)
    html = watch.report()._repr_html_()
    assert html.startswith("<pre") and "Linear" in html and "style=" in html


def test_findings_are_not_printed_twice_by_the_logging_last_resort(capfd):
    import logging

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()  # an application that configured no logging (pytest's capture removed)
    try:
        model = models.small_mlp()
        with torch.no_grad():
            model[2].bias.fill_(-100.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with GradWatch(model, every=1, dead_window=1, quiet=True) as watch:
                models.train(model, 1)
    finally:
        root.handlers[:] = saved
    assert watch.findings and "units produced no" not in capfd.readouterr().err
