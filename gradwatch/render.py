"""Rendering records for people: rich tables and panels, and their plain-text form.

Three views of a :class:`~gradwatch.report.Report`:

* the **summary** printed when a watch detaches: the findings and the few most extreme
  layers per statistic, a handful of lines whatever the model's size;
* the **default table** (``print(report)``, ``report.__rich__``): every layer for models
  up to :data:`MAX_ROWS` measured layers; above that, the layers with findings and the most
  extreme ones per statistic, saying how many are hidden;
* the **full table** (``report.table(full=True)``): every layer.

All render at the width of the console they are printed on; ``print()`` of any of them
renders plain text at the terminal's width (:func:`terminal_width`). Numbers are never cut.
When the terminal is too narrow for every column, whole columns are left out in the order of
:data:`DROP_ORDER` and the caption names them; the legend wraps; the summary's lists wrap
between entries, never inside a layer's ``name=value``.

A finding's full text is printed once per destination (a terminal, file or pipe): by its
warning panel, else by the ``gradwatch`` logger's handlers, else by the exit summary. The
summary and the table name a finding already shown where they print by its panel's title.
"""

from __future__ import annotations

import copy
import io
import math
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence, Tuple

from rich import box
from rich.console import Console, ConsoleOptions, RenderResult
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from .config import Thresholds
    from .report import Finding, LayerStats, Report

MAX_ROWS = 30
"""Above this many measured layers the default table shows only the layers worth a look."""

DROP_ORDER: Tuple[str, ...] = ("type", "zeros", "mean", "∇out", "attn H", "Δw/w", "satur.", "dead")
"""Columns left out first when the terminal is too narrow (context before the columns a rule
judges); ``layer`` and ``∇W`` always stay."""

CONCEPTS_LINK = "docs/concepts.md"

Destination = Tuple[Any, ...]
"""Where text ends up, comparable across file objects: a terminal, file or pipe by its device and
inode (stdout and stderr in one terminal are the same), any other object by its identity."""


Shown = Dict[Tuple["Finding", Destination], str]
"""Where each finding's full text was printed, and by what: ``"warning"`` (its panel), ``"log"``
(a logging handler) or ``"summary"`` (the exit summary)."""

_SHOWN_AS = {"warning": ("as a warning", "as warnings"), "log": ("in the log", "in the log"),
             "summary": ("in the summary", "in the summary")}


def destination(file: Any) -> Destination:
    """The :data:`Destination` of an open file object (``sys.stderr``, a ``StringIO``, a log file)."""
    try:
        st = os.fstat(file.fileno())
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return ("object", id(file))
    return ("file", st.st_dev, st.st_ino)


def terminal_width() -> int:
    """The width ``print()`` output is rendered at: ``COLUMNS`` when set, else the width of the
    terminal that stdin, stdout or stderr is attached to (rich's detection, so ``| tee log``
    keeps the terminal's width), else 80."""
    return Console(file=sys.stdout).width


# ---------------------------------------------------------------------------------- numbers
def _num(v: Optional[float], fmt: Optional[str] = None) -> str:
    """A number in at most 8 characters: 3 significant digits between 0.01 and 1000, else ``1.8e-05``."""
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if fmt is not None:
        return fmt.format(v)
    if v == 0:
        return "0"
    if 1e-2 <= abs(v) < 1e3:
        text = f"{v:.3g}"
        if "e" not in text:
            return text
    return f"{v:.1e}"


def _pct(v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.0%}"


def _frac(v: Optional[float], limit: float) -> Text:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return Text("-", style="dim")
    style = "bold red" if v > limit else ("yellow" if v > limit / 2 else "green")
    return Text(f"{v:.0%}", style=style)


def _pack(items: Sequence[Text], width: int, sep: str = " · ", indent: int = 0, first: int = 0) -> Text:
    """``items`` joined by ``sep`` into lines of at most ``width`` cells, a new line starting only
    *between* two items; lines after the first (and the first by ``first``) are indented by
    ``indent`` spaces. An item with line breaks of its own (:func:`_fold`) stands on its own lines."""
    out, col = Text(" " * first), 0
    for i, item in enumerate(items):
        if i and "\n" not in item.plain and col + len(sep) + item.cell_len <= width:
            out.append(sep, style="dim")
            col += len(sep)
        elif i:
            out.append("\n" + " " * indent)
            col = 0
        out.append_text(item)
        col = item.cell_len if "\n" not in item.plain else width
    return out


def _fold(pair: Text, width: int, indent: int = 0) -> Text:
    """A ``name=value`` wider than ``width``, folded inside the name onto lines indented by
    ``indent``: the value stays whole, on the line that ends the name."""
    plain = pair.plain
    if len(plain) <= width:
        return pair
    ends = list(range(width, plain.rindex("="), width))  # where full lines of the name end
    start = ends[-1] if ends else 0
    if len(plain) - start > width:  # the value would not fit after the name's last piece: move a piece down
        ends.append(len(plain) - width)
    bounds = [0] + ends + [len(plain)]
    return Text("\n" + " " * indent).join(pair[a:b] for a, b in zip(bounds, bounds[1:]) if b > a)


def _over(v: Optional[float], limit: float) -> Text:
    """A ratio coloured like the fraction columns: red at or above the rule's threshold."""
    if v is None:
        return Text("-", style="dim")
    style = "bold red" if not v < limit else ("yellow" if v >= limit / 2 else "green")
    return Text(_num(v), style=style)


# ---------------------------------------------------------------------------------- fitted tables
@dataclass(frozen=True)
class Column:
    """One column of a :class:`FittedTable`: header, legend text, and how it is aligned."""

    header: str
    legend: str = ""
    justify: str = "right"
    flexible: bool = False  # the one column that may fold (layer names); never a number column


def table_width(widths: Sequence[int]) -> int:
    """Rendered width of a ``box.SIMPLE_HEAD`` table with ``pad_edge=False`` and these column widths."""
    return sum(widths) + 3 * len(widths) - 1


class FittedTable:
    """A table that fits the console it is printed on by leaving out whole columns
    (first those named first in ``drop_order``), never by cutting a cell short.

    Renders the table, a caption naming any columns left out, and a legend of the
    columns shown.
    """

    def __init__(self, columns: Sequence[Column], rows: Sequence[Sequence[Text]], *, title: Optional[str] = None,
                 caption: Optional[str] = None, drop_order: Sequence[str] = DROP_ORDER,
                 legend_extra: Optional[str] = None, legend_link: Optional[str] = CONCEPTS_LINK,
                 flexible_min: int = 12, flexible_preferred: int = 30) -> None:
        self.columns = list(columns)
        self.rows = [list(r) for r in rows]
        self.title = title
        self.caption = caption
        self.drop_order = [h for h in drop_order if any(c.header == h for c in self.columns)]
        self.legend_extra = legend_extra
        self.legend_link = legend_link
        self.flexible_min = flexible_min
        self.flexible_preferred = flexible_preferred

    def _natural(self) -> List[int]:
        widths = []
        for i, col in enumerate(self.columns):
            cells = [r[i].cell_len for r in self.rows if i < len(r)]
            widths.append(max([len(col.header)] + cells))
        return widths

    def _empty(self) -> List[int]:
        """Number columns with no value in any row (all "-"): they say nothing."""
        return [i for i, col in enumerate(self.columns) if col.justify == "right" and self.rows
                and all(r[i].plain.strip() in ("-", "") for r in self.rows if i < len(r))]

    def fit(self, width: int) -> Tuple[List[int], List[str]]:
        """Indices of the columns that fit in ``width``, and the headers left out (in drop order)."""
        natural = self._natural()
        empty = self._empty()
        keep = [i for i in range(len(self.columns)) if i not in empty]
        dropped: List[str] = []

        def needed() -> int:
            # Names up to `flexible_preferred` characters are worth more than a low-priority
            # column; longer ones fold onto a second line rather than cost a column.
            return table_width([min(natural[i], self.flexible_preferred) if self.columns[i].flexible
                                else natural[i] for i in keep])

        for header in self.drop_order:
            if needed() <= width:
                break
            if any(self.columns[i].header == header for i in keep):  # (an empty column is gone already)
                keep = [i for i in keep if self.columns[i].header != header]
                dropped.append(header)
        return keep, dropped

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        keep, dropped = self.fit(width)
        natural = self._natural()
        fixed = sum(natural[i] for i in keep if not self.columns[i].flexible)
        if self.title:  # above the table, not as its title: a title would wrap at the table's width
            yield Text(self.title, style="bold")
        table = Table(header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
        for i in keep:
            col = self.columns[i]
            if col.flexible:
                room = width - table_width([0] * len(keep)) - fixed
                w = max(min(natural[i], room), min(natural[i], self.flexible_min))
                table.add_column(col.header, justify="left", overflow="fold", width=w)
            else:
                # Exactly as wide as its widest cell: rich never has to shorten a number.
                table.add_column(col.header, justify=col.justify, no_wrap=True, width=natural[i])  # type: ignore
        for r in self.rows:
            table.add_row(*[r[i] for i in keep])
        yield table
        notes: List[Text] = []
        if self.caption:
            notes.append(Text(self.caption, style="dim"))
        empty = self._empty()
        if empty:
            notes.append(Text(f"no value in any row, so not shown: {', '.join(self.columns[i].header for i in empty)}",
                              style="dim"))
        if dropped:
            notes.append(Text(f"left out at {width} columns: {', '.join(dropped)} (a wider terminal shows them)",
                              style="dim"))
        legend = [f"{self.columns[i].header}: {self.columns[i].legend}" for i in keep if self.columns[i].legend]
        if self.legend_extra:
            legend.append(self.legend_extra)
        if legend:
            tail = f" · more in {self.legend_link}" if self.legend_link else ""
            notes.append(Text(" · ".join(legend) + tail, style="dim"))
        for note in notes:
            yield note


# ---------------------------------------------------------------------------------- per-layer statistics
@dataclass(frozen=True)
class _Stat:
    header: str
    attr: str
    legend: str
    extremes: Tuple[str, ...]  # "high", "low" or "abs": which end of the scale is worth a look
    optional: bool = False  # a column only where measured (optimizer=, attention layers), never said missing


def _stats(th: "Thresholds") -> List[_Stat]:
    return [
        _Stat("mean", "mean", "average output", ("abs",)),
        _Stat("zeros", "zero_fraction", "outputs exactly 0", ("high",)),
        _Stat("satur.", "saturated_fraction",
              f"outputs where the activation is flat (flagged above {th.saturated_fraction:.0%})", ("high",)),
        _Stat("dead", "dead_fraction",
              f"units silent on every sample of the dead-unit window (flagged above {th.dead_fraction:.0%})",
              ("high",)),
        _Stat("∇out", "output_grad_norm", "L2 norm of the gradient at the layer's output", ("low", "high")),
        _Stat("∇W", "grad_norm", "L2 norm of the gradient of the layer's parameters", ("low", "high")),
        _Stat("Δw/w", "update_ratio",
              f"‖Δw‖/‖w‖ of the layer's weight in one optimizer step, as the learning-rate rule judges it "
              f"(biases and norm scales left out; red from {th.update_ratio_high:g})", ("high",), optional=True),
        _Stat("attn H", "attention_entropy_normalised", "attention entropy / log(keys): 1 uniform, 0 one key",
              ("low", "high"), optional=True),
    ]


def _value(ls: "LayerStats", attr: str) -> Optional[float]:
    v = getattr(ls, attr)
    if attr in ("mean", "zero_fraction") and ls.count == 0:
        return None  # no floating-point output was measured: there is no mean to show
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return float(v)


def _cell(ls: "LayerStats", stat: _Stat, th: "Thresholds") -> Text:
    v = _value(ls, stat.attr)
    if stat.attr == "saturated_fraction":
        return _frac(v, th.saturated_fraction)
    if stat.attr == "dead_fraction":
        return _frac(v, th.dead_fraction)
    if stat.attr == "update_ratio":
        return _over(v, th.update_ratio_high)
    if stat.attr == "zero_fraction":
        return Text(_pct(v), style="dim" if v is None else "")
    if stat.attr == "mean":
        return Text("nan" if ls.nonfinite and v is not None and math.isnan(ls.mean) else _num(v),
                    style="bold red" if ls.nonfinite else ("dim" if v is None else ""))
    style = "bold red" if stat.attr == "output_grad_norm" and ls.output_grad_nonfinite else ""
    return Text(_num(v), style=style or ("dim" if v is None else ""))


def extremes(report: "Report", *, top: int = 3) -> List[Tuple[_Stat, str, List[Tuple[str, float]]]]:
    """Per statistic and end of its scale, the ``top`` most extreme layers as ``(name, value)``.

    Fractions list only layers that show as at least 1% (a column of zeros has no extreme
    worth showing).
    """
    th = _thresholds(report)
    out = []
    layers = list(report.layers.values())
    for stat in _stats(th):
        values = [(ls.name, v) for ls in layers for v in [_value(ls, stat.attr)] if v is not None]
        finite = [(n, v) for n, v in values if math.isfinite(v)]
        nonfinite = [(n, v) for n, v in values if not math.isfinite(v)]
        ranked = nonfinite + sorted(finite, key=lambda nv: -abs(nv[1]) if "abs" in stat.extremes else -nv[1])
        if stat.extremes == ("high",):
            chosen = ranked[:top]
            if stat.attr.endswith("fraction"):
                chosen = [(n, v) for n, v in chosen if v >= 0.005]  # shows as at least 1%
            if chosen:
                out.append((stat, "high", chosen))
        elif stat.extremes == ("abs",):
            if ranked:
                out.append((stat, "abs", ranked[:top]))
        else:
            # Both ends, without listing a layer twice: with few layers the highest half goes
            # to "highest" and the rest to "lowest".
            # A value equal to the smallest is not "highest" (and vice versa).
            lo = min((v for _, v in finite), default=math.inf)
            hi = max((v for _, v in finite), default=-math.inf)
            high = [nv for nv in ranked if not nv[1] <= lo or lo == hi][:min(top, (len(ranked) + 1) // 2)]
            taken = {n for n, _ in high}
            low = [nv for nv in sorted(finite, key=lambda nv: nv[1]) if nv[0] not in taken and nv[1] < hi][:top]
            if low:
                out.append((stat, "low", low))
            if high:
                out.append((stat, "high", high))
    return out


def _thresholds(report: "Report", given: "Optional[Thresholds]" = None) -> "Thresholds":
    return given or report.thresholds


def _end_label(stat: _Stat, end: str) -> str:
    if len(stat.extremes) == 1:
        return stat.header
    return f"{stat.header} {'lowest' if end == 'low' else 'highest'}"


def _format(stat: _Stat, v: float) -> str:
    return _pct(v) if stat.attr.endswith("fraction") else _num(v)


# ---------------------------------------------------------------------------------- report views
class _View:
    """A view of a report: rich renders it at its console's width; ``print()`` (``str``) renders
    plain text at the terminal's width, as printed to stdout.

    ``here``: the :data:`Destination` it is printed to, for findings shown there already
    (default: the console's file; for ``str``, stdout)."""

    report: "Report"
    here: Optional[Destination] = None

    def _here(self, console: Console) -> Destination:
        return self.here if self.here is not None else destination(console.file)

    def __str__(self) -> str:
        view = copy.copy(self)
        if view.here is None:
            view.here = destination(sys.stdout)
        return to_text(view, width=terminal_width()).rstrip("\n")


class ReportTable(_View):
    """The per-layer table (forward order), then the findings.

    ``full=False`` (the default view) shows every layer up to ``max_rows`` measured layers;
    above that, only the layers with findings and the ``top`` most extreme layers per
    statistic, and says how many are hidden.
    """

    def __init__(self, report: "Report", *, full: bool = False, thresholds: "Optional[Thresholds]" = None,
                 top: int = 3, max_rows: int = MAX_ROWS, here: Optional[Destination] = None) -> None:
        self.report = report
        self.full = full
        self.thresholds = _thresholds(report, thresholds)
        self.top = top
        self.max_rows = max_rows
        self.here = here

    def _rows(self) -> Tuple[List[str], Dict[str, set]]:
        """Names of the layers to show (forward order) and, per name, the statistics it is extreme in."""
        names = list(self.report.layers)
        marks: Dict[str, set] = {}
        for stat, _end, chosen in extremes(self.report, top=self.top):
            for n, _ in chosen:
                marks.setdefault(n, set()).add(stat.header)
        if self.full or len(names) <= self.max_rows:
            return names, marks
        keep = set(marks)
        for f in self.report.findings:  # layers with findings next, as long as there is room
            if len(keep) >= self.max_rows:
                break
            if f.layer in self.report.layers:
                keep.add(f.layer)
        return [n for n in names if n in keep], marks

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        report, th = self.report, self.thresholds
        if not report.stats:
            yield Text("gradwatch: nothing measured yet: no training forward was seen "
                       "(eval and torch.no_grad() forwards are skipped unless include_eval=True)")
            yield from _findings(report, self._here(console))
            return
        layers = report.layers
        stats = [s for s in _stats(th) if not s.optional or any(_value(ls, s.attr) is not None for ls in layers.values())]
        names = list(layers)
        shown, marks = self._rows()
        columns = [Column("layer", justify="left", flexible=True),
                   Column("type", justify="left")] + [Column(s.header, s.legend) for s in stats]
        flagged = {f.layer for f in report.findings}
        rows: List[List[Text]] = []
        previous = -1
        index = {n: i for i, n in enumerate(layers)}
        if len(shown) < len(names):
            # A gap of one row takes a line either way: show the row instead of "⋮ 1 more".
            shown_set = set(shown)
            shown = [n for i, n in enumerate(names) if n in shown_set or (
                0 < i < len(names) - 1 and names[i - 1] in shown_set and names[i + 1] in shown_set)
                or (i == len(names) - 1 and names[i - 1] in shown_set) or (i == 0 and names[1] in shown_set)]
        for name in shown:
            gap = index[name] - previous - 1
            if gap > 0:
                rows.append([Text(f"⋮ {gap} more", style="dim")] + [Text("")] * (len(columns) - 1))
            previous = index[name]
            ls = layers[name]
            cells = []
            for s in stats:
                c = _cell(ls, s, th)
                if s.header in marks.get(name, ()) and not self.full and len(shown) < len(layers):
                    c.stylize("bold")
                cells.append(c)
            rows.append([Text(name, style="bold red" if name in flagged else ""), Text(ls.type)] + cells)
        gap = len(layers) - previous - 1
        if gap > 0:
            rows.append([Text(f"⋮ {gap} more", style="dim")] + [Text("")] * (len(columns) - 1))
        caption = None
        if len(shown) < len(layers):
            caption = (f"{len(shown)} of {len(layers)} layers shown: those with findings and the {self.top} most "
                       f"extreme per statistic; {len(layers) - len(shown)} hidden. "
                       f"report.table(full=True) shows all {len(layers)}.")
        title = f"gradwatch - step {report.step}"
        yield FittedTable(columns, rows, title=title, caption=caption, legend_extra="-: does not apply to "
                          "this layer (saturation of a Linear, ∇W of a layer without parameters)")
        yield from _findings(report, self._here(console))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _findings(report: "Report", here: Destination, limit: Optional[int] = None) -> Iterable[Text]:
    """The findings: in full, except those shown ``here`` already (:data:`Shown`), which are
    named by their warning panel's title."""
    findings = report.findings
    if not findings:
        yield Text("no findings", style="green")
        return
    above = {f: report.shown[(f, here)] for f in findings if (f, here) in report.shown}
    n = len(findings)
    how = set(above.values())
    said = _SHOWN_AS[how.pop()][n > 1] if len(how) == 1 else ""
    yield Text(f"{_plural(n, 'finding')}, shown above{' ' + said if said else ''}:" if len(above) == n else
               f"{_plural(n, 'finding')}, {len(above)} of them shown above:" if above else
               f"{_plural(n, 'finding')}:", style="bold")
    shown = findings if limit is None else findings[:limit]
    for f in shown:
        yield finding_reference(f) if f in above else finding_text(f)
    if len(shown) < len(findings):
        yield Text(f"... and {len(findings) - len(shown)} more (watch.findings lists them all)", style="dim")


class ReportSummary(_View):
    """A few lines for the end of a run: the findings, then per statistic the ``top``
    most extreme layers, then where the full table is."""

    def __init__(self, report: "Report", *, top: int = 3, max_findings: int = 10,
                 thresholds: "Optional[Thresholds]" = None, here: Optional[Destination] = None) -> None:
        self.report = report
        self.top = top
        self.max_findings = max_findings
        self.thresholds = thresholds
        self.here = here

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        report = self.report
        if not report.stats:
            yield Text("gradwatch: nothing measured yet: no training forward was seen "
                       "(eval and torch.no_grad() forwards are skipped unless include_eval=True)")
            yield from _findings(report, self._here(console), self.max_findings)
            return
        yield Text(f"gradwatch summary - step {report.step}, {_plural(len(report.layers), 'layer')} measured",
                   style="bold")
        yield from _findings(report, self._here(console), self.max_findings)
        th = _thresholds(report, self.thresholds)
        rows: List[Tuple[str, List[Text]]] = []
        for stat, end, chosen in extremes(report, top=self.top):
            if stat.header in ("mean", "zeros"):
                continue  # context, not diagnosis: in the full table
            pairs = []
            for name, v in chosen:
                # name=value as one word: a layer named "0" and its value never read as two numbers
                value = Text(_format(stat, v))
                if stat.attr == "dead_fraction" and v > th.dead_fraction or \
                        stat.attr == "saturated_fraction" and v > th.saturated_fraction or \
                        stat.attr == "update_ratio" and not v < th.update_ratio_high or not math.isfinite(v):
                    value.stylize("bold red")
                pairs.append(Text.assemble(name, ("=", "dim"), value))
            rows.append((_end_label(stat, end), pairs))
        if rows:
            yield Text(f"most extreme layers ({self.top} per statistic):")
            width = options.max_width
            label = max(len(lbl) for lbl, _ in rows) + 2
            for lbl, pairs in rows:
                if max(p.cell_len for p in pairs) <= width - label:  # beside the statistic's name
                    yield Text.assemble((lbl.ljust(label), "dim"), _pack(pairs, width - label, indent=label))
                else:  # long layer names: under it, one pair per line, a name folded before its value
                    yield Text(lbl, style="dim")
                    yield _pack([_fold(p, width - 2, indent=2) for p in pairs], width - 2, indent=2, first=2)
        st = report.stats
        if st.noise_scale is not None:  # steps with two batch sizes (accumulation, DDP): gradwatch.noise_scale
            batch = f"; batch {st.batch_size:,}" if st.batch_size else ""
            yield Text(f"gradient noise scale B_simple ~ {_num(st.noise_scale)} samples (averaged over "
                       f"{_plural(st.noise_scale_steps, 'measured step')}{batch})")
        yield Text("full table: print(watch.report()), or print(watch.report().table(full=True)) for every layer; "
                   f"columns explained in {CONCEPTS_LINK}", style="dim")


def report_table(report: "Report", thresholds: "Optional[Thresholds]" = None, *, full: bool = False) -> ReportTable:
    """The default table view of a report (``full=True``: every layer)."""
    return ReportTable(report, full=full, thresholds=thresholds)


def report_summary(report: "Report", thresholds: "Optional[Thresholds]" = None, *, top: int = 3) -> ReportSummary:
    """The few lines printed when a watch detaches."""
    return ReportSummary(report, top=top, thresholds=thresholds)


def finding_text(f: "Finding") -> Text:
    t = Text()
    t.append(f"step {f.step} ", style="dim")
    t.append(f"{f.kind.category.__name__} ", style=f.kind.style)
    t.append(f"{f.layer}: ", style="bold")
    t.append(f.message)
    return t


def finding_reference(f: "Finding") -> Text:
    """A finding named as its warning panel's title says it (``DeadUnitsWarning · 3 · step 5``)."""
    return Text.assemble((f.kind.category.__name__, f.kind.style), f" · {f.layer} · step {f.step}")


class FindingPanel:
    """A finding as a panel: titled ``DeadUnitsWarning · 3 · step 5`` (:func:`finding_reference`), its
    message, value and advice inside. Where the terminal is too narrow for the title (a long layer
    name), the title gives the kind alone and the body's first line the layer and step, which rich
    would otherwise crop from the title."""

    def __init__(self, f: "Finding") -> None:
        self.finding = f
        self.title = finding_reference(f)  # built from Text, never markup: ``blocks[0]`` prints as it is

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        f = self.finding
        body = Text()
        title = self.title
        if title.cell_len + 6 > options.max_width:  # "╭─ " + title + " ─╮"
            title = Text(f.kind.category.__name__, style=f.kind.style)
            body.append(f"{f.layer} · step {f.step}\n", style="bold")
        body.append(f.message + "\n")
        body.append(f"value {_num(f.value)}  threshold {_num(f.threshold)}\n", style="dim")
        body.append("→ " + f.advice, style="italic")
        yield Panel(body, title=title, title_align="left", border_style=f.kind.style)


def finding_panel(f: "Finding") -> FindingPanel:
    return FindingPanel(f)


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


