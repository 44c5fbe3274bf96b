from __future__ import annotations

from typing import TYPE_CHECKING, List

if TYPE_CHECKING:
    from ..hooks import StepData
    from ..report import Finding, Report


class Sink:
    """A destination for gradwatch's output. Every method is an optional no-op."""

    def open(self) -> None:
        """Called when the watch attaches."""

    def on_step(self, data: "StepData", new_findings: "List[Finding]") -> None:
        """Called once per logging step with the step's numbers and its *new* findings."""

    def close(self, report: "Report") -> None:
        """Called when the watch detaches, with the final report."""
