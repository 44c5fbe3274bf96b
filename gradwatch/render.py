"""Rendering records for people: rich tables and panels, and their plain-text form."""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Optional

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from .config import Thresholds
    from .report import Finding, Report

_KIND_STYLE = {"vanishing": "magenta", "exploding": "red", "dead_units": "yellow",
               "saturation": "yellow", "non_finite": "bold red"}


def _num(v: Optional[float], fmt: Optional[str] = None) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if fmt is None:
        fmt = "{:.2g}" if v == 0 or 1e-2 <= abs(v) < 1e3 else "{:.1e}"
    return fmt.format(v)


def _frac(v: Optional[float], limit: float) -> Text:
    if v is None:
        return Text("-", style="dim")
    style = "bold red" if v > limit else ("yellow" if v > limit / 2 else "green")
    return Text(f"{v:.0%}", style=style)


def report_table(report: "Report", thresholds: "Optional[Thresholds]" = None) -> Group:
    """The per-layer table (forward order) and the findings so far."""
    th = thresholds or report.thresholds
    layers = report.layers
    table = Table(title=f"gradwatch - step {report.step}" if report.stats else "gradwatch",
                  caption=None if report.stats else "nothing measured yet: no training-mode forward was seen "
                  "(eval forwards are skipped unless include_eval=True)",
                  header_style="bold", title_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    table.caption = table.caption or "∇out: gradient norm at the layer's output; ∇W: its parameters' gradient norm"
    width = max([len(n) for n in layers] + [5])
    table.add_column("layer", no_wrap=True, min_width=min(width, 24), max_width=40)
    # Narrow enough for 80 columns; std and grad/weight ratios are in to_dict() and TensorBoard.
    for col in ("type", "mean", "zeros", "satur.", "dead", "∇out", "∇W"):
        table.add_column(col, justify="left" if col == "type" else "right", no_wrap=True, min_width=len(col))
    flagged = {f.layer for f in report.findings}
    for ls in layers.values():
        name = Text(ls.name, style="bold red" if ls.name in flagged else "")
        mean = Text(_num(ls.mean), style="bold red" if ls.nonfinite else "")
        table.add_row(name, ls.type[:12], mean, _num(ls.zero_fraction, "{:.0%}"),
                      _frac(ls.saturated_fraction, th.saturated_fraction),
                      _frac(ls.dead_fraction, th.dead_fraction),
                      _num(ls.output_grad_norm), _num(ls.grad_norm))
    parts = [table]
    if report.findings:
        parts.append(Text(f"{len(report.findings)} finding(s):", style="bold"))
        for f in report.findings:
            parts.append(finding_text(f))
    else:
        parts.append(Text("no findings", style="green"))
    return Group(*parts)


def finding_text(f: "Finding") -> Text:
    t = Text()
    t.append(f"step {f.step} ", style="dim")
    t.append(f"{f.kind.category.__name__} ", style=_KIND_STYLE.get(f.kind.value, ""))
    t.append(f"{f.layer}: ", style="bold")
    t.append(f.message)
    return t


def finding_panel(f: "Finding") -> Panel:
    body = Text()
    body.append(f.message + "\n")
    body.append(f"value {_num(f.value)}  threshold {_num(f.threshold)}\n", style="dim")
    body.append("→ " + f.advice, style="italic")
    return Panel(body, title=f"[{_KIND_STYLE.get(f.kind.value, '')}]{f.kind.category.__name__}[/] · {f.layer} · "
                             f"step {f.step}", title_align="left", border_style=_KIND_STYLE.get(f.kind.value, ""))


def to_text(renderable: object, width: int = 120) -> str:
    """Render without colour, e.g. for ``str(report)`` and logs."""
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False).print(renderable)
    return buf.getvalue()


def to_html(renderable: object, width: int = 120) -> str:
    """Render as an HTML fragment with inline styles (notebooks)."""
    console = Console(record=True, file=io.StringIO(), width=width, force_terminal=True, color_system="truecolor")
    console.print(renderable)
    return console.export_html(inline_styles=True, code_format="<pre style=\"font-family:monospace\">{code}</pre>")
