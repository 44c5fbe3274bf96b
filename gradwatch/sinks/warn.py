"""Findings as Python warnings, drawn as rich panels when they would be printed anyway."""

from __future__ import annotations

import os
import sys
import warnings
from typing import TYPE_CHECKING, Any, List, Optional

from rich.console import Console

from ..exceptions import GradWatchWarning
from ..render import Shown, destination, finding_panel
from .base import Sink

if TYPE_CHECKING:
    from ..report import Finding, StepData

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_DIR = os.path.dirname(os.path.abspath(__import__("torch").__file__))


def _user_stacklevel() -> int:
    """Stack level of the first frame outside gradwatch and torch: the user's line that ran the model."""
    frame, level = sys._getframe(1), 1
    while frame is not None:
        fname = os.path.abspath(frame.f_code.co_filename)
        if not (fname.startswith(_PACKAGE_DIR) or fname.startswith(_TORCH_DIR)):
            return level
        frame, level = frame.f_back, level + 1
    return 1


def warning_for(finding: "Finding") -> GradWatchWarning:
    """The warning instance for a finding; it carries the finding as ``.finding``."""
    text = (f"{finding.layer}: {finding.message} {finding.advice} "
            f"(step {finding.step}, value {finding.value:.3g}, threshold {finding.threshold:.3g})")
    w = finding.kind.category(text)
    w.finding = finding  # type: ignore[attr-defined]
    return w


def _stdlib_printer_active() -> bool:
    # Inside warnings.catch_warnings(record=True) (pytest.warns, pytest's own capture) the
    # low-level printer is replaced by a list's append: then warnings must be recorded, not drawn.
    impl = getattr(warnings, "_showwarnmsg_impl", None)
    return getattr(impl, "__module__", None) == "warnings" and getattr(impl, "__name__", "") == "_showwarnmsg_impl"


class WarningSink(Sink):
    """Issues one warning per new finding. While attached, gradwatch's own warnings that
    Python would print are drawn as rich panels instead; every other warning, and any
    recording context (``pytest.warns``), is left exactly as it was. Each panel drawn is
    entered in ``shown``, so that other outputs to the same place do not repeat it."""

    def __init__(self, console: Optional[Console] = None, shown: "Optional[Shown]" = None) -> None:
        self._console = console
        self._previous: Any = None
        self.shown: "Shown" = {} if shown is None else shown

    def open(self) -> None:
        if warnings.showwarning is getattr(warnings, "_showwarning_orig", None):
            self._previous = warnings.showwarning
            warnings.showwarning = self._show

    def close(self, report: Any) -> None:
        if self._previous is not None:
            if warnings.showwarning == self._show:
                warnings.showwarning = self._previous
            self._previous = None

    def on_step(self, data: "StepData", new_findings: "List[Finding]") -> None:
        for f in new_findings:
            warnings.warn(warning_for(f), stacklevel=_user_stacklevel())

    def _show(self, message: Any, category: Any, filename: str, lineno: int,
              file: Any = None, line: Optional[str] = None) -> None:
        finding = getattr(message, "finding", None)
        if finding is not None and file is None and _stdlib_printer_active():
            console = self._console or Console(stderr=True)
            console.print(finding_panel(finding))
            self.shown.setdefault((finding, destination(console.file)), "warning")
            return
        self._previous(message, category, filename, lineno, file, line)
