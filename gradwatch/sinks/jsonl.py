"""Findings as JSON lines (``findings.jsonl`` in the log dir), and to the ``gradwatch`` logger.

A run's story survives without TensorBoard: one line per finding, appended as it happens
and flushed at once, so a crash loses nothing already found.

Several runs may write into one ``log_dir`` (a script run twice). Each run gets an id,
``<YYYYmmdd-HHMMSS>-<pid>`` (the same ingredients as TensorBoard's event-file names), that is
written into each of its findings and into its entry in ``gradwatch.json``, together with
the names of its TensorBoard event files. ``gradwatch report``/``compare`` read the latest
run unless asked for another (``--run ID``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Set

from ..render import Destination, Shown, destination
from .base import Sink

try:
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - not POSIX: the lock file below
    _fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from ..report import Finding, StepData

logger = logging.getLogger("gradwatch")
FINDINGS_FILE = "findings.jsonl"
META_FILE = "gradwatch.json"
LOCK_FILE = ".gradwatch.json.lock"
"""Without ``fcntl``: the lock file that exists while a process updates ``gradwatch.json``."""
LOCK_STALE_SECONDS = 10.0
"""Without ``fcntl``, a lock file older than this was left by a process that died holding it."""
FORMAT_VERSION = 1
"""Major version of the run-folder format; readers accept any run of the same major.

Additions within format 1: ``runs`` (one entry per run: ``run``, ``started``, ``pid``,
``event_files``, ``layers``, ``layer_types``, ``params``, ``param_numel``) and ``run`` (the
latest run's id) in ``gradwatch.json``; ``run`` in each line of ``findings.jsonl``. The
top-level ``layers``/``layer_types``/``params`` repeat the latest run's, as before."""

EVENT_FILE = re.compile(r"^events\.out\.tfevents\.(?P<time>\d+)\.(?P<host>.+)\.(?P<pid>\d+)\.(?P<uid>\d+)")


def event_file_pid(name: str) -> Optional[int]:
    """The process id in a TensorBoard event-file name (``events.out.tfevents.<time>.<host>.<pid>.<n>``)."""
    m = EVENT_FILE.match(name)
    return int(m.group("pid")) if m else None


def read_meta(log_dir: str) -> Dict[str, Any]:
    path = os.path.join(log_dir, META_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        return {}
    return meta if isinstance(meta, dict) else {}


@contextlib.contextmanager
def meta_lock(log_dir: str) -> Iterator[None]:
    """Hold the folder's ``gradwatch.json`` lock: processes writing one ``log_dir`` at once
    update it one after another, so none overwrites another's run entry with what it read
    before. On POSIX, ``fcntl.flock`` on the folder itself (no file left behind; released by
    the system if the process dies); elsewhere a lock file, :data:`LOCK_FILE`, created
    exclusively, removed when released, and taken over once older than
    :data:`LOCK_STALE_SECONDS`."""
    if _fcntl is not None:
        fd = os.open(log_dir, os.O_RDONLY)
        try:
            _fcntl.flock(fd, _fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock
        return
    path = os.path.join(log_dir, LOCK_FILE)
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                if time.time() - os.path.getmtime(path) > LOCK_STALE_SECONDS:
                    os.unlink(path)
                    continue
            except OSError:  # released meanwhile
                continue
            time.sleep(0.005)
    try:
        yield
    finally:
        os.close(fd)
        os.unlink(path)


class JsonlSink(Sink):
    """Appends each new finding, tagged with the run id, to ``<log_dir>/findings.jsonl``, and
    keeps this run's entry in ``gradwatch.json`` (layers in forward order, parameter ->
    layer and size, event files) for ``gradwatch report``."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.path = os.path.join(log_dir, FINDINGS_FILE)
        self.run_id: Optional[str] = None
        self._entry: Dict[str, Any] = {}
        self._file: Optional[Any] = None
        self._meta_written = False

    def open(self) -> None:
        if self.run_id is None:  # attach, detach, attach again: still the same run
            with meta_lock(self.log_dir):
                meta = read_meta(self.log_dir)
                taken = {r.get("run") for r in meta.get("runs", [])}
                base = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
                run_id, n = base, 1
                while run_id in taken:
                    n += 1
                    run_id = f"{base}-{n}"
                self.run_id = run_id
                self._entry = {"run": run_id, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "pid": os.getpid(), "event_files": []}
                self._save(locked=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def on_step(self, data: "StepData", new_findings: "List[Finding]") -> None:
        if self._file is None:
            return
        if not self._meta_written and data.stats.layers:
            self._entry.update({
                "layers": list(data.stats.layers),
                "layer_types": {n: ls.type for n, ls in data.stats.layers.items()},
                "params": {n: p.layer for n, p in data.stats.params.items()},
                "param_numel": {n: p.numel for n, p in data.stats.params.items()},
            })
            self._save()
            self._meta_written = True
        for f in new_findings:
            self._file.write(json.dumps({**f.to_dict(), "run": self.run_id}) + "\n")
        if new_findings:
            self._file.flush()

    def close(self, report: Any) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            if not self._entry.get("event_files"):
                self._save(last=True)  # the event file may have appeared after open

    def _save(self, *, last: bool = False, locked: bool = False) -> None:
        """Write this run's entry into ``gradwatch.json``: under the folder's lock, read it,
        update this run's entry, write a temporary file and rename it over the old one (a
        reader sees the old file or the new one, never half of one)."""
        if not locked:
            with meta_lock(self.log_dir):
                self._save(last=last, locked=True)
            return
        meta = read_meta(self.log_dir)
        runs: List[Dict[str, Any]] = [r for r in meta.get("runs", []) if r.get("run") != self.run_id]
        if not self._entry.get("event_files"):
            self._entry["event_files"] = self._my_event_files(runs, shared_ok=last)
        runs.append(self._entry)
        meta.update({"format": FORMAT_VERSION, "run": self.run_id, "runs": runs})
        for key in ("layers", "layer_types", "params"):  # what readers of older versions look at
            if key in self._entry:
                meta[key] = self._entry[key]
        tmp = os.path.join(self.log_dir, f".{META_FILE}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=1)
            os.replace(tmp, os.path.join(self.log_dir, META_FILE))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _my_event_files(self, others: List[Dict[str, Any]], *, shared_ok: bool) -> List[str]:
        """Event files this process writes here that no earlier run has claimed.

        TensorBoard names each file after the writing process, so files of another process
        (or of an earlier run of this one) are never taken. A ``writer=`` shared by two runs
        in one process gives them one file: both claim it (``shared_ok``, when the run ends).
        """
        claimed = {name for r in others for name in r.get("event_files", [])}
        try:
            names = sorted(os.listdir(self.log_dir))
        except OSError:
            return []
        mine = [n for n in names if event_file_pid(n) == os.getpid()]
        fresh = [n for n in mine if n not in claimed]
        return fresh or (mine[-1:] if shared_ok else [])


class LoggingSink(Sink):
    """Each new finding also goes to the ``gradwatch`` logger (WARNING), and each note (INFO),
    so they reach whatever handlers an application already has. gradwatch attaches no handler
    itself, and logs only when some handler exists: otherwise Python's last-resort handler would
    print every finding a second time next to the warning.

    A person reads each finding once per place it is printed: a handler that writes where the
    finding's warning panel was drawn (``shown``, shared with the other sinks;
    ``logging.basicConfig()``'s stderr handler in a terminal) is passed over for it, and a
    stream it is logged to is entered in ``shown``; a handler that writes where the console
    prints notes (``notes_on``) is passed over for notes. Every other handler (a file, a log
    collector) gets every record."""

    def __init__(self, shown: "Optional[Shown]" = None,
                 notes_on: "Optional[Callable[[], Optional[Destination]]]" = None) -> None:
        self.shown: "Shown" = {} if shown is None else shown
        self.notes_on = notes_on

    def on_step(self, data: "StepData", new_findings: "List[Finding]") -> None:
        if not new_findings or not logger.hasHandlers():
            return
        for f in new_findings:
            skip = {where for (g, where) in self.shown if g == f}
            for where in _log(logging.WARNING, f, {"gradwatch_finding": f.to_dict()}, skip):
                self.shown.setdefault((f, where), "log")

    def on_note(self, text: str) -> None:
        if logger.hasHandlers():
            here = self.notes_on() if self.notes_on is not None else None
            _log(logging.INFO, text, None, set() if here is None else {here})


def _log(level: int, what: Any, extra: Optional[Dict[str, Any]], skip: "Set[Destination]") -> "List[Destination]":
    """``logger.log(level, "%s", what)``, passing over the handlers that write to a destination in
    ``skip`` (the same walk up the logger tree as ``Logger.callHandlers``). Returns the
    destinations of the stream handlers that took the record."""
    if logger.disabled or not logger.isEnabledFor(level):
        return []
    fn, lno, func, sinfo = logger.findCaller()
    record = logger.makeRecord(logger.name, level, fn, lno, "%s", (what,), None, func, extra, sinfo)
    if not logger.filter(record):
        return []
    took: List[Destination] = []
    node: Optional[logging.Logger] = logger
    while node is not None:
        for handler in node.handlers:
            where = _writes_to(handler)
            if record.levelno >= handler.level and where not in skip:
                handler.handle(record)
                if where is not None:
                    took.append(where)
        node = node.parent if node.propagate else None
    return took


def _writes_to(handler: logging.Handler) -> "Optional[Destination]":
    """Where a handler writes: a ``StreamHandler``'s (or ``FileHandler``'s) stream, a rich
    ``RichHandler``'s console; None when it cannot be told."""
    stream = getattr(handler, "stream", None)
    if stream is None:
        stream = getattr(getattr(handler, "console", None), "file", None)
    return None if stream is None else destination(stream)
