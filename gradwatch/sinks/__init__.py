"""Emitting: each sink receives the same step data and findings and writes them somewhere.

No sink parses another's output: the warnings sink, the console and TensorBoard all
work from the same records.
"""

import os
from typing import TYPE_CHECKING, Callable, Iterable, List, Optional

from rich.console import Console

from .base import Sink
from .console import ConsoleSink
from .jsonl import JsonlSink, LoggingSink
from .tensorboard import TensorBoardSink
from .warn import WarningSink

if TYPE_CHECKING:
    from ..config import Options
    from ..render import Shown


def build_sinks(options: "Options", console: Optional[Console] = None,
                note: Optional[Callable[[str], None]] = None) -> List[Sink]:
    """The sinks a watch's options ask for: warnings and logging always; TensorBoard and
    ``findings.jsonl`` with a ``log_dir`` or ``writer``; the terminal table unless ``quiet``.
    ``note``: where a sink says something a person should know once (the watch's notes)."""
    shown: "Shown" = {}  # where each finding was printed in full: shared, so that none repeats another
    terminal = None if options.quiet else ConsoleSink(console, shown)
    notes_on = None if terminal is None else terminal.destination
    sinks: List[Sink] = [WarningSink(console, shown), LoggingSink(shown, notes_on)]
    if options.log_dir is not None or options.writer is not None:
        log_dir = None if options.log_dir is None else os.fspath(options.log_dir)
        sinks.append(TensorBoardSink(log_dir=log_dir, writer=options.writer, note=note))
        folder = log_dir if log_dir is not None else getattr(options.writer, "log_dir", None)
        if folder is not None:
            sinks.append(JsonlSink(os.fspath(folder)))
    if terminal is not None:
        sinks.append(terminal)
    return sinks


def shown(sinks: Iterable[Sink]) -> "Shown":
    """Where the sinks printed each finding in full so far (for :attr:`Report.shown`)."""
    return {key: how for sink in sinks for key, how in getattr(sink, "shown", {}).items()}


__all__ = ["build_sinks", "shown", "Sink", "ConsoleSink", "JsonlSink", "LoggingSink", "TensorBoardSink", "WarningSink"]
