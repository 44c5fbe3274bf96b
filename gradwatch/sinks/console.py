"""The terminal: a short summary when the watch detaches, and notes as they come."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from rich.console import Console
from rich.text import Text

from ..render import report_summary
from .base import Sink

if TYPE_CHECKING:
    from ..report import Report


class ConsoleSink(Sink):
    """Prints a short summary (findings, the most extreme layers per statistic) when the
    watch detaches; the full table is ``print(watch.report())``. Plain text when not a TTY
    (rich decides). Notes (an interval that changed, what cannot be measured) print dimmed."""

    def __init__(self, console: Optional[Console] = None) -> None:
        self.console = console or Console()

    def on_note(self, text: str) -> None:
        self.console.print(Text(text, style="dim"))  # never markup: notes name the user's layers

    def close(self, report: "Report") -> None:
        self.console.print(report_summary(report))
