"""Containing gradwatch's own errors, without swallowing the user's.

A bug inside gradwatch must never break training: it is reported once as a
``GradWatchWarning`` and the part that failed stops measuring. But a *warning* raised
as an exception is the user's wish (``python -W error``, ``simplefilter("error")``):
that passes straight through, and so does everything in ``strict`` mode.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Set

from ..exceptions import GradWatchWarning


class Guard:
    """Runs gradwatch's code for a named part; times it (``spent``) for the overhead budget."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.broken: Set[str] = set()
        self.spent = 0.0  # seconds of gradwatch's own host work since the last reset

    def __call__(self, where: str, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        except Warning:
            raise  # a warning turned into an error by the user's filters: theirs to see
        except Exception as exc:  # noqa: BLE001 - isolation is the point
            if self.strict:
                raise
            if where in self.broken:
                return None
            self.broken.add(where)  # taps of this part check it and stop measuring
            warnings.warn(f"gradwatch: internal error in {where} ({type(exc).__name__}: {exc}); "
                          f"gradwatch stops measuring it, training continues unaffected.",
                          GradWatchWarning, stacklevel=3)
            return None
        finally:
            self.spent += time.perf_counter() - t0
