"""Which forwards make one step: the forwards before the backward pass that follows them.

With the default step mode a step is one training forward of the model or several: a GAN
discriminator on a real and a fake batch, the two views of a siamese pair, micro-batches whose
losses are summed before one ``backward()``. A training forward joins the running step unless
that step is *complete*:

- a backward pass has reached the output of one of its forwards (``loss.backward()``, also
  ``torch.autograd.grad`` through the output);
- one of its forwards can no longer get a backward: its outputs need no gradient, or they and
  the graph behind them are gone, dropped unused -- so a loop that never calls backward still
  advances, one step per forward whose output it lets go;
- it has had :data:`MAX_FORWARDS` forwards (outputs kept alive and never backpropagated).

How it is seen: one small pre-hook object per forward, on the autograd nodes of its outputs.
The nodes hold it, so it lives exactly as long as a backward through those outputs can still
come (a weak reference tells), and it notes when one does: a few microseconds a forward.

Forwards inside a ``torch.func`` transform are no training forwards (:func:`transformed`).
"""

from __future__ import annotations

import weakref
from typing import Any, List

import torch
from torch import Tensor

from .outputs import iter_tensors

MAX_FORWARDS = 256
"""Forwards in one step at most when none of them gets a backward while their outputs live."""
MAX_OUTPUTS = 16
"""Output tensors of one forward whose autograd nodes are hooked (the first ones)."""


_interpreters = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)


def transformed() -> bool:
    """Whether a torch.func transform (vmap, grad, jacrev, functionalize, ...) is running: its
    tensors are batched or wrapped, and reading a number from them fails."""
    return _interpreters is not None and _interpreters() is not None


class _Group:
    """The running step's forwards."""

    __slots__ = ("forwards", "backward", "dropped", "outputs")

    def __init__(self) -> None:
        self.forwards = 0
        self.backward = False  # a backward pass reached one of their outputs
        self.dropped = False  # one of them had no output a backward could start from
        self.outputs: List["weakref.ref[_Reached]"] = []  # one per forward: dead once no backward can come


class _Reached:
    """Pre-hook on the autograd nodes of one forward's outputs: a backward pass reached them."""

    __slots__ = ("group", "__weakref__")

    def __init__(self, group: _Group) -> None:
        self.group = group

    def __call__(self, grad_outputs: Any) -> None:  # None: the gradients are left as they are
        self.group.backward = True


class ForwardGroup:
    """The forwards of the running step, and whether the next training forward opens a new one."""

    def __init__(self) -> None:
        self._group = _Group()

    def start(self) -> None:
        """A step opens: it has no forward yet."""
        self._group = _Group()

    @property
    def complete(self) -> bool:
        """The running step takes no further forward: a backward reached it, or one of its
        forwards can get none, or it is full."""
        g = self._group
        return g.backward or g.dropped or g.forwards >= MAX_FORWARDS or any(r() is None for r in g.outputs)

    def add(self, output: Any) -> None:
        """A forward of the running step returned ``output``."""
        g = self._group
        if g.forwards >= MAX_FORWARDS:
            return
        g.forwards += 1
        tensors = [output] if type(output) is Tensor else iter_tensors(output)
        nodes = []
        for t in tensors:
            node = t.grad_fn if isinstance(t, Tensor) else None
            if node is not None:
                nodes.append(node)
                if len(nodes) == MAX_OUTPUTS:
                    break
        if not nodes:  # nothing a backward could start from (no_grad inside, integer or frozen outputs)
            g.dropped = True
            return
        reached = _Reached(g)
        for node in nodes:
            node.register_prehook(reached)
        g.outputs.append(weakref.ref(reached))
