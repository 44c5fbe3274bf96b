"""Handing each step to every sink, so that a failing output never stops training."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Iterator, List

from ..exceptions import GradWatchWarning
from .base import Sink
from .warn import WarningSink

if TYPE_CHECKING:
    from ..report import Finding, Report, StepData


class Fanout:
    """The watch's sinks. A sink that raises (disk full, deleted folder) is warned about once
    and dropped; the warnings sink is exempt, since ``-W error`` turning a finding into an
    exception is the user's wish (and so is ``strict``)."""

    def __init__(self, sinks: List[Sink], strict: bool = False) -> None:
        self.sinks = list(sinks)
        self.strict = strict

    def __iter__(self) -> Iterator[Sink]:
        return iter(list(self.sinks))

    def open(self) -> None:
        for sink in list(self.sinks):
            self._call(sink, "open")

    def on_step(self, data: "StepData", new_findings: "List[Finding]") -> None:
        for sink in list(self.sinks):
            self._call(sink, "on_step", data, new_findings)

    def on_note(self, text: str) -> None:
        for sink in list(self.sinks):
            self._call(sink, "on_note", text)

    def close(self, report: "Report") -> None:
        for sink in list(self.sinks):
            self._call(sink, "close", report)

    def _call(self, sink: Sink, method: str, *args: Any) -> None:
        if isinstance(sink, WarningSink) or self.strict:
            getattr(sink, method)(*args)
            return
        try:
            getattr(sink, method)(*args)
        except Exception as exc:  # noqa: BLE001
            if sink in self.sinks:
                self.sinks.remove(sink)
            warnings.warn(f"gradwatch: {type(sink).__name__} failed ({type(exc).__name__}: {exc}); it is "
                          f"switched off, training continues.", GradWatchWarning, stacklevel=3)
