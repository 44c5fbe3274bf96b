"""Handing each step to every sink, so that a failing output never stops training."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Iterator, List, Optional

from ..exceptions import GradWatchWarning
from .base import Sink

if TYPE_CHECKING:
    from ..report import Finding, Report, StepData


class Fanout:
    """The watch's sinks. A sink that raises (disk full, deleted folder, a rendering bug) is
    warned about once and dropped, the warnings sink included. Only a finding that the user's
    warning filters turn into an exception (``-W error``) passes through, and only after every
    other sink has the step: the finding that stopped the run is in ``findings.jsonl`` and
    TensorBoard. ``strict`` re-raises everything."""

    def __init__(self, sinks: List[Sink], strict: bool = False) -> None:
        self.sinks = list(sinks)
        self.strict = strict

    def __iter__(self) -> Iterator[Sink]:
        return iter(list(self.sinks))

    def open(self) -> None:
        for sink in list(self.sinks):
            self._call(sink, "open")

    def on_step(self, data: "StepData", new_findings: "List[Finding]") -> None:
        self._each("on_step", data, new_findings)

    def on_note(self, text: str) -> None:
        self._each("on_note", text)

    def close(self, report: "Report") -> None:
        self._each("close", report)

    def _each(self, method: str, *args: Any) -> None:
        raised: Optional[Warning] = None
        for sink in list(self.sinks):
            try:
                self._call(sink, method, *args)
            except Warning as w:  # the user's -W error: raised once every sink has the step
                raised = raised or w
        if raised is not None:
            raise raised

    def _call(self, sink: Sink, method: str, *args: Any) -> None:
        if self.strict:
            getattr(sink, method)(*args)
            return
        try:
            getattr(sink, method)(*args)
        except Warning:
            raise  # the user's warning filters made it an error: theirs to see
        except Exception as exc:  # noqa: BLE001
            if sink in self.sinks:
                self.sinks.remove(sink)
            warnings.warn(f"gradwatch: {type(sink).__name__} failed ({type(exc).__name__}: {exc}); it is "
                          f"switched off, training continues.", GradWatchWarning, stacklevel=3)
