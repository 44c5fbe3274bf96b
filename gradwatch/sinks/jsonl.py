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
    from ..report import Finding, StepData

logger = logging.getLogger("gradwatch")
FINDINGS_FILE = "findings.jsonl"
META_FILE = "gradwatch.json"
FORMAT_VERSION = 1
"""Major version of the run-folder format; readers accept any run of the same major."""


class JsonlSink(Sink):
    """Appends each new finding to ``<log_dir>/findings.jsonl``, and writes ``gradwatch.json``
    (format version, layers in forward order, parameter -> layer) for ``gradwatch report``."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.path = os.path.join(log_dir, FINDINGS_FILE)
        self._file: Optional[Any] = None
        self._meta_written = False

    def open(self) -> None:
        self._file = open(self.path, "a", encoding="utf-8")

    def on_step(self, data: "StepData", new_findings: "List[Finding]") -> None:
        if self._file is None:
            return
        if not self._meta_written and data.stats.layers:
            meta = {"format": FORMAT_VERSION, "layers": list(data.stats.layers),
                    "layer_types": {n: ls.type for n, ls in data.stats.layers.items()},
                    "params": {n: p.layer for n, p in data.stats.params.items()}}
            with open(os.path.join(self.log_dir, META_FILE), "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=1)
            self._meta_written = True
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
    whatever handlers an application already has. gradwatch attaches no handler itself,
    and logs only when some handler exists: otherwise Python's last-resort handler would
    print every finding a second time next to the warning."""

    def on_step(self, data: "StepData", new_findings: "List[Finding]") -> None:
        if not new_findings or not logger.hasHandlers():
            return
        for f in new_findings:
            logger.warning("%s", f, extra={"gradwatch_finding": f.to_dict()})

    def on_note(self, text: str) -> None:
        if logger.hasHandlers():
            logger.info("%s", text)
