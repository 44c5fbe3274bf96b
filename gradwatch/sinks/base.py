from __future__ import annotations

from typing import TYPE_CHECKING, List

if TYPE_CHECKING:
    from ..report import Finding, Report, StepData


class Sink:
    """A destination for gradwatch's output. Every method is an optional no-op."""

    def open(self) -> None:
        """Called when the watch attaches."""

    def on_step(self, data: "StepData", new_findings: "List[Finding]") -> None:
        """Called once per logging step with the step's numbers and its *new* findings."""

    def on_note(self, text: str) -> None:
        """Called once for something a person should know that is not a finding (an interval
        that changed, a part of the model that cannot be measured)."""

    def close(self, report: "Report") -> None:
        """Called when the watch detaches, with the final report."""
