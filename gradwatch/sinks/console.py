"""The terminal: a short summary when the watch detaches."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from rich.console import Console

from ..render import report_summary
from .base import Sink

if TYPE_CHECKING:
    from ..config import Thresholds
    from ..report import Report


class ConsoleSink(Sink):
    """Prints a short summary (findings, the most extreme layers per statistic) when the
    watch detaches; the full table is ``print(watch.report())``. Plain text when not a TTY
    (rich decides)."""

    def __init__(self, console: Optional[Console] = None, thresholds: "Optional[Thresholds]" = None) -> None:
        self.console = console or Console()
        self.thresholds = thresholds

    def close(self, report: "Report") -> None:
        self.console.print(report_summary(report, self.thresholds))
