"""Which watch holds which module: one watch per module at a time, held weakly both ways,
so that a forgotten watch (a notebook cell re-run) never keeps a model alive."""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn

from .exceptions import AlreadyWatchedError

_HELD: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def check_free(model: nn.Module, watch: Any) -> None:
    """Raise if ``model`` or one of its submodules is held by another attached watch."""
    for name, m in model.named_modules():
        ref = _HELD.get(m)
        other = ref() if ref is not None else None
        if other is not None and other is not watch:
            where = "the model" if not name else f"its submodule {name!r}"
            raise AlreadyWatchedError(f"{type(model).__name__}: {where} is already watched by {other!r}; "
                                      f"detach that GradWatch first (leave its `with` block or call .detach())")


def hold(model: nn.Module, watch: Any) -> None:
    ref = weakref.ref(watch)
    for m in model.modules():
        _HELD[m] = ref


def release(watch: Any) -> None:
    for m, ref in list(_HELD.items()):
        if ref() is watch or ref() is None:
            _HELD.pop(m, None)
