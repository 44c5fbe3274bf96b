"""Emitting: each sink receives the same step data and findings and writes them somewhere.

No sink parses another's output: the warnings sink, the console and TensorBoard all
work from the same records.
"""

from .base import Sink
from .console import ConsoleSink
from .jsonl import JsonlSink, LoggingSink
from .tensorboard import TensorBoardSink
from .warn import WarningSink

__all__ = ["Sink", "ConsoleSink", "JsonlSink", "LoggingSink", "TensorBoardSink", "WarningSink"]
