"""The terminal: the table and warning panels, rendered into a StringIO console."""

from __future__ import annotations

import io
import math
import re
import warnings

import pytest
import torch
from rich.console import Console

from gradwatch import GradWatch
from gradwatch.render import finding_panel, finding_text
from gradwatch.report import Finding, FindingKind, LayerStats, Report, StepStats
from gradwatch.sinks import warn as warn_sink
from tests import models


def console(color: bool = False) -> tuple:
    buf = io.StringIO()
    return Console(file=buf, width=100, force_terminal=color, color_system="standard" if color else None), buf


def test_exit_prints_one_summary_and_the_table_comes_on_request():
    # The README's own pattern: the table must appear once (from the print), not twice.
    con, buf = console()
    model = models.small_mlp()
    with torch.no_grad():
        model[2].bias.fill_(-100.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with GradWatch(model, every=1, dead_window=1, console=con) as watch:
            models.train(model, 2)
        at_exit = buf.getvalue()
        con.print(watch.report())
    out = buf.getvalue()
    assert out.count("gradwatch - step 1") == 1 and "gradwatch - step" not in at_exit
    assert [f.kind.value for f in watch.findings] == ["dead_units"]  # the vanishing gradient below it is its consequence
    assert at_exit.count("gradwatch summary - step 1, 5 layers measured\n1 finding:\n") == 1
    assert "DeadUnitsWarning 3:" in at_exit  # warnings ignored: no panel drawn, so the summary gives it in full
    assert re.search(r"^dead +3=100%", at_exit, re.M)  # the dead layer is the extreme of "dead"
    assert "print(watch.report())" in at_exit and len(at_exit.splitlines()) <= 16
    table = out[len(at_exit):]
    for col in ("layer", "type", "zeros", "dead", "∇W"):
        assert col in table
    assert "ReLU" in table and "100%" in table
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


# ------------------------------------------------------------------ tables built from known numbers
def made_report(n: int, *, name: str = "encoder.layers.{i}.attention.output_projection", findings=()):
    """A report of ``n`` layers alternating Linear / Sigmoid, with known numbers: gradients
    shrink from the last layer to the first (1.8e-05 at the first), layer 7 is saturated."""
    layers = {}
    for i in range(n):
        lname = name.format(i=i)
        if i % 2 == 0:
            ls = LayerStats(lname, "Linear", calls=1, count=100, mean=-0.0123, std=1.0, zero_fraction=0.0,
                            output_grad_norm=1.8e-5 * 2 ** (i / 2), grad_norm=1.8e-5 * 2 ** (i / 2))
        else:
            ls = LayerStats(lname, "Sigmoid", calls=1, count=100, mean=0.5, std=0.2, zero_fraction=0.0,
                            saturated_fraction=0.9 if i == 7 else 0.01 * (i % 5),
                            output_grad_norm=1.7e-5 * 2 ** (i / 2))
        layers[lname] = ls
    return Report(step=99, stats=StepStats(step=99, layers=layers), findings=list(findings), steps_seen=100,
                  every=1)


def render(renderable, width: int) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None).print(renderable)
    return buf.getvalue()


@pytest.mark.parametrize("width", [60, 80, 120])
def test_numbers_are_never_cut_whole_columns_go_instead(width):
    report = made_report(12)
    out = render(report.table(full=True), width)
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= width
    dropped = {60: ["type", "zeros", "mean", "∇out"], 80: ["type"], 120: []}[width]
    header = next(line for line in out.splitlines() if line.startswith(" layer"))
    assert header.split() == [h for h in ("layer", "type", "mean", "zeros", "satur.", "∇out", "∇W")
                              if h not in dropped]
    if dropped:  # the reader is told which columns are missing, in the documented order
        assert f"left out at {width} columns: {', '.join(dropped)} (a wider terminal shows them)" in flat(out)
    else:
        assert "left out" not in out
    # Every number of the columns shown is printed in full, digits and exponent.
    for ls in report.layers.values():
        if ls.grad_norm is not None:
            assert render_num(ls.grad_norm) in out
        if "∇out" not in dropped:
            assert render_num(ls.output_grad_norm) in out
    assert "1.8e-05" in out and "90%" in out


def flat(text: str) -> str:
    """Wrapped lines joined back into one, to look for a phrase whatever the width."""
    return " ".join(text.split())


def render_num(v: float) -> str:
    from gradwatch.render import _num

    return _num(v)


def test_legend_explains_the_columns_shown_and_links_the_concepts_page():
    out = flat(render(made_report(6).table(), 120))
    assert "∇W: L2 norm of the gradient of the layer's parameters" in out
    assert "satur.: outputs where the activation is flat (flagged above 25%)" in out
    assert "-: does not apply to this layer" in out and "docs/concepts.md" in out
    # No layer has a dead-unit verdict, so the column would be all "-": it is left out, and said so.
    assert "no value in any row, so not shown: dead" in out and "dead:" not in out


def test_a_big_model_shows_findings_and_extremes_and_says_how_to_see_everything(monkeypatch):
    from gradwatch.report import Finding, FindingKind

    monkeypatch.setenv("COLUMNS", "120")  # str() renders at the terminal's width
    finding = Finding(FindingKind.SATURATION, "encoder.layers.7.attention.output_projection", 50, 0.9, 0.25,
                      "90% of outputs saturated.", "Use ReLU.")
    report = made_report(155, findings=[finding])
    out = str(report)
    assert "gradwatch - step 99" in out
    assert re.search(r"\d+ of 155 layers shown: those with findings and the 3 most extreme per statistic; "
                     r"\d+ hidden\. report\.table\(full=True\) shows all 155\.", " ".join(out.split()))
    body = [line for line in out.splitlines() if line.startswith(" encoder") or line.startswith(" ⋮")]
    assert len(body) < 40
    assert " encoder.layers.0.attention.output_projection " in out  # smallest gradients
    assert " encoder.layers.154.attention.output_projection " in out  # largest
    assert " encoder.layers.7.attention.output_projection " in out and "90%" in out  # finding, most saturated
    assert " encoder.layers.80.attention.output_projection " not in out  # unremarkable middle
    assert "⋮" in out and "1 finding:" in out
    full = render(report.table(full=True), 120)
    assert all(f" {n} " in full for n in report.layers) and "layers shown" not in full


def test_a_small_model_shows_every_row_by_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    report = made_report(30)
    out = str(report)
    assert all(f" {n} " in out for n in report.layers) and "hidden" not in out


def test_summary_of_a_big_model_stays_short():
    report = made_report(155)
    out = render(report.summary(), 80)
    assert len(out.splitlines()) <= 20
    assert "gradwatch summary - step 99, 155 layers measured\nno findings" in out
    assert re.search(r"∇W lowest +encoder\.layers\.0\.attention\.output_projection=1\.8e-05", out)
    assert re.search(r"satur\. +encoder\.layers\.7\.attention\.output_projection=90%", out)
    with pytest.raises(ValueError, match="top must be a positive int"):
        report.summary(top=0)


def test_numbers_keep_three_significant_digits_without_exponents_for_everyday_values():
    from gradwatch.render import _num

    assert [_num(v) for v in (-100.0, 0.0983, 12.34, 1.8e-5, 2.5e4, 0.0, math.inf)] == \
        ["-100", "0.0983", "12.3", "1.8e-05", "2.5e+04", "0", "inf"]


@pytest.mark.parametrize("kind", list(FindingKind))
def test_every_finding_kind_draws_as_a_panel_and_names_are_never_markup(kind):
    con, buf = console(color=True)
    finding = Finding(kind, "blocks[0].attn[/]", 3, 0.5, 0.1, "message [bold]as written[/]", "advice [x]")
    con.print(finding_panel(finding))
    con.print(finding_text(finding))
    out = buf.getvalue()
    assert kind.category.__name__ in out and "blocks[0].attn[/]" in out and "[bold]as written[/]" in out
    assert kind.style  # every kind has a style of its own


# ------------------------------------------------------------------ what the summary and the table say
def sequential_report(**extra):
    """An nn.Sequential's layer names ("0", "1", ...): names that look like numbers."""
    layers = {}
    for i in range(9):
        ls = LayerStats(str(i), "Linear" if i % 2 == 0 else "Sigmoid", calls=1, count=100, mean=0.1, std=1.0,
                        zero_fraction=0.0, output_grad_norm=0.0 if i < 3 else 1e-4 * 3 ** i,
                        saturated_fraction=None if i % 2 == 0 else 0.02 * i,
                        grad_norm=1e-4 * 3 ** i if i % 2 == 0 else None)
        layers[ls.name] = ls
    return Report(step=9, stats=StepStats(step=9, layers=layers), findings=[], steps_seen=10, every=1, **extra)


@pytest.mark.parametrize("width", [60, 80])
def test_summary_pairs_each_layer_with_its_value_on_one_line(width):
    from gradwatch.render import extremes

    for report in (sequential_report(), made_report(40)):
        out = render(report.summary(), width)
        assert max(len(line) for line in out.splitlines()) <= width
        lines = out.splitlines()
        for stat, _end, chosen in extremes(report):
            if stat.header in ("mean", "zeros"):
                continue
            for name, v in chosen:
                pair = f"{name}={render_num(v) if not stat.attr.endswith('fraction') else f'{v:.0%}'}"
                # whole, on one line, and not the tail of a longer name ("10=..." is not "0=...")
                assert any(re.search(rf"(^|\s){re.escape(pair)}(\s|$)", line) for line in lines), (pair, out)
    out = render(sequential_report().summary(), 80)
    assert re.search(r"^∇out lowest +0=0 · 1=0 · 2=0 *$", out, re.M)


def test_update_ratio_column_is_red_above_the_learning_rate_threshold_and_says_what_it_is():
    report = made_report(4)
    report.layers[report_names(report)[0]].update_ratio = 0.185
    report.layers[report_names(report)[2]].update_ratio = 0.0012
    con, buf = console(color=True)
    con.print(report.table())
    out = buf.getvalue()
    assert re.search(r"\x1b\[1;31m *0\.185", out)  # bold red: at or above update_ratio_high (0.1)
    assert re.search(r"\x1b\[32m *1\.2e-03", out)  # green, as the fraction columns below their threshold
    text = flat(render(report.table(), 120))
    assert "Δw/w: ‖Δw‖/‖w‖ of the layer's weight in one optimizer step, as the learning-rate rule judges it " \
           "(biases and norm scales left out; red from 0.1)" in text
    con, buf = console(color=True)
    con.print(report.summary())
    assert re.search(r"Δw/w.*=.*\x1b\[1;31m0\.185", buf.getvalue())  # red in the summary too


def report_names(report):
    return list(report.layers)


@pytest.mark.parametrize("panels", [True, False])
def test_a_finding_is_printed_in_full_once_per_destination(monkeypatch, panels):
    """The README pattern with a logging handler on the same stream as the console, and one
    elsewhere. With panels: the panel is the full text, the log passes over that stream. Warnings
    ignored: the log handler prints it, and the summary and table name it."""
    import logging

    con, buf = console()
    elsewhere = io.StringIO()
    same, other = logging.StreamHandler(buf), logging.StreamHandler(elsewhere)
    log = logging.getLogger("gradwatch")
    monkeypatch.setattr(warn_sink, "_stdlib_printer_active", lambda: True)
    model = models.small_mlp()
    with torch.no_grad():
        model[2].bias.fill_(-100.0)
    log.addHandler(same)
    log.addHandler(other)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always" if panels else "ignore")
            warnings.showwarning = warnings._showwarning_orig  # as outside pytest
            with GradWatch(model, every=1, dead_window=1, console=con) as watch:
                models.train(model, 2)
            con.print(watch.report())
    finally:
        log.removeHandler(same)
        log.removeHandler(other)
    out = flat(buf.getvalue().replace("│", " "))
    (finding,) = watch.findings
    title = "DeadUnitsWarning · 3 · step 0"
    assert out.count(finding.message) == 1
    assert out.count(title) == (3 if panels else 2)  # the panel's title; the summary and the table name it
    assert out.count("1 finding, shown above " + ("as a warning:" if panels else "in the log:")) == 2
    assert elsewhere.getvalue().count(finding.message) == 1  # a handler elsewhere gets every finding


def test_budget_notes_give_the_default_half_percent():
    import types

    from gradwatch.clock import StepClock
    from gradwatch.schedule import Schedule

    s = Schedule()
    for k in range(1, 100):
        s.record(0.001 + (0.05 if s.measures(k) else 0.0), s.measures(k), k)  # measuring costs 50 plain steps
    notes: list = []
    StepClock(s, types.SimpleNamespace(spent=0.0), notes.append)._adapt(100)
    assert s.budget == 0.005 and len(notes) == 2
    assert "(budget 0.5% of the step time)" in notes[0] and "(budget 0.5%)" in notes[1]


def test_finding_reference_is_the_panel_title():
    from gradwatch.render import finding_reference

    f = Finding(FindingKind.DEAD_UNITS, "blocks[0]", 7, 1.0, 0.5, "m", "a")
    title = finding_panel(f).title
    assert finding_reference(f).plain == title.plain == "DeadUnitsWarning · blocks[0] · step 7"



@pytest.mark.parametrize("width", [40, 80])
def test_a_panel_too_narrow_for_its_title_names_the_layer_and_step_inside(width):
    name = "encoder.block_number_0.activation_function_sigmoid"
    f = Finding(FindingKind.SATURATION, name, 12, 0.9, 0.5, "m", "a")
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None).print(finding_panel(f))
    lines = buf.getvalue().splitlines()
    assert all(len(line) <= width for line in lines)
    assert lines[0].startswith("╭─ SaturationWarning ")
    inside = "".join(line.strip("│╭╰─╮╯ ") for line in lines[1:])
    assert inside.startswith(name[:10])  # the layer first, before the message
    assert name in inside.replace(" ", "") and "step12" in inside.replace(" ", "")


def test_a_column_with_no_value_is_not_also_listed_as_left_out_for_width():
    from rich.text import Text

    from gradwatch.render import Column, FittedTable

    cols = [Column("layer", justify="left", flexible=True), Column("a", "first"), Column("b", "second")]
    rows = [[Text("some.rather.long.layer.name." * 2), Text("1.5"), Text("-")]]
    table = FittedTable(cols, rows, drop_order=("b", "a"))
    keep, dropped = table.fit(30)
    assert "b" not in dropped  # empty: said once, as having no value
