"""The rich per-layer table in the terminal."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from rich.console import Console

from ..render import report_table
from .base import Sink

if TYPE_CHECKING:
    from ..report import Report


class ConsoleSink(Sink):
    """Prints the per-layer table when the watch detaches. Plain text when not a TTY (rich decides)."""

    def __init__(self, console: Optional[Console] = None) -> None:
        self.console = console or Console()

    def on_note(self, text: str) -> None:
        self.console.print(f"[dim]{text}[/dim]", highlight=False)

    def close(self, report: "Report") -> None:
        self.console.print(report_table(report))
