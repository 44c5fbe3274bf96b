"""Findings as JSON lines (``findings.jsonl`` in the log dir), and to the ``gradwatch`` logger.

A run's story survives without TensorBoard: one line per finding, appended as it happens
and flushed at once, so a crash loses nothing already found.
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any, List, Optional

from .base import Sink

if TYPE_CHECKING:
    from ..hooks import StepData
    from ..report import Finding

logger = logging.getLogger("gradwatch")
FINDINGS_FILE = "findings.jsonl"


class JsonlSink(Sink):
    """Appends each new finding to ``<log_dir>/findings.jsonl``."""

    def __init__(self, log_dir: str) -> None:
        self.path = os.path.join(log_dir, FINDINGS_FILE)
        self._file: Optional[Any] = None

    def open(self) -> None:
        self._file = open(self.path, "a", encoding="utf-8")

    def on_step(self, data: "StepData", new_findings: "List[Finding]") -> None:
        if self._file is None:
            return
        for f in new_findings:
            self._file.write(json.dumps(f.to_dict()) + "\n")
        if new_findings:
            self._file.flush()

    def close(self, report: Any) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class LoggingSink(Sink):
    """Each new finding also goes to the ``gradwatch`` logger (WARNING), so it reaches
    whatever handlers an application already has. gradwatch attaches no handler itself."""

    def on_step(self, data: "StepData", new_findings: "List[Finding]") -> None:
        for f in new_findings:
            logger.warning("%s", f, extra={"gradwatch_finding": f.to_dict()})
