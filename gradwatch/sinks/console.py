"""The rich per-layer table in the terminal."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from rich.console import Console

from ..render import report_table
from .base import Sink

if TYPE_CHECKING:
    from ..config import Thresholds
    from ..report import Report


class ConsoleSink(Sink):
    """Prints the per-layer table when the watch detaches. Plain text when not a TTY (rich decides)."""

    def __init__(self, console: Optional[Console] = None, thresholds: "Optional[Thresholds]" = None) -> None:
        self.console = console or Console()
        self.thresholds = thresholds

    def close(self, report: "Report") -> None:
        self.console.print(report_table(report, self.thresholds))
