"""The terminal: a short summary when the watch detaches, and notes as they come."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from rich.console import Console
from rich.text import Text

from ..render import Destination, Shown, destination, report_summary
from .base import Sink

if TYPE_CHECKING:
    from ..report import Report


class ConsoleSink(Sink):
    """Prints a short summary (findings, the most extreme layers per statistic) when the
    watch detaches; the full table is ``print(watch.report())``. Plain text when not a TTY
    (rich decides). Notes (an interval that changed, what cannot be measured) print dimmed.

    The summary names a finding already printed in full where it prints (``shown``, shared with
    the warnings and logging sinks) by its title, and enters those it prints in full there."""

    def __init__(self, console: Optional[Console] = None, shown: "Optional[Shown]" = None) -> None:
        self.console = console or Console()
        self.shown: "Shown" = {} if shown is None else shown

    def destination(self) -> Destination:
        """Where it prints now (a Console without a file follows ``sys.stdout``)."""
        return destination(self.console.file)

    def on_note(self, text: str) -> None:
        self.console.print(Text(text, style="dim"))  # never markup: notes name the user's layers

    def close(self, report: "Report") -> None:
        summary = report_summary(report)
        self.console.print(summary)
        here = self.destination()
        for f in report.findings[:summary.max_findings]:
            self.shown.setdefault((f, here), "summary")
