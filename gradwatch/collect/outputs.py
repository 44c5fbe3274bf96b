"""Finding the tensors inside whatever a module returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Iterator

from torch import Tensor


def iter_tensors(value: Any) -> Iterator[Tensor]:
    """Every tensor inside a module output: tensors, tuples and namedtuples, lists, mappings
    (``ModelOutput``-like), dataclasses, nested. gradwatch measures the floating-point ones;
    the others are skipped and named in the layer's note."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from iter_tensors(v)
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from iter_tensors(v)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from iter_tensors(getattr(value, f.name, None))
