"""Non-finite values at the step they appear: one cheap finiteness check on every step.

Measured steps see every layer; the steps between them are checked too, so a NaN or Inf is
reported at the step it first appears rather than at the next measured step (by then the
optimizer has spread it into the weights, and the first layer with a NaN output is the wrong
one to blame). Per unmeasured step this costs one reduction of the model's output, one of a
small gradient near the input (non-finite gradients flow down to it), and one Python call per
layer that keeps a reference to the layer's output until the forward returns (or lets go of
one that only gradwatch holds, see ``taps._let_go``).

On the CPU the check is read at once: when it trips, the step becomes a measured one on the
spot, its layers' outputs (still referenced) are measured in forward order and its gradients
are read at the end of its backward, so the report names the first non-finite layer or
parameter at that very step. On an accelerator, reading a flag at once would wait for the
device, so each step's flag is copied to the host without blocking and looked at a step
later: the report then says at which step the values first appeared, and the following
step is measured (the layer named there may be a later one than where the values arose).
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor

from .outputs import iter_tensors

_PLAIN = (torch.float32, torch.float64)
_RING = 4  # pinned host flags in flight (an accelerator runs at most a step or two ahead)


def _sum(t: Tensor) -> Tensor:
    """A float sum over every element: non-finite exactly when a NaN/Inf is present (half
    precision is summed in float32, so large finite values do not overflow it)."""
    return t.detach().sum(dtype=torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None)


class Sentinel:
    """Per-step finiteness flags of the model's output and of one gradient."""

    def __init__(self) -> None:
        self.pending: List[Tuple[int, str, Tensor, Any]] = []  # (step, what, host flag, event) in flight
        self._ring: List[Tensor] = []
        self._next = 0
        self.said = False  # the late finding was said (once)

    def check(self, value: Any, step: Optional[int], what: str) -> Optional[bool]:
        """False when ``value`` (a tensor or a module output) holds a NaN/Inf, True when it does
        not; None when the answer comes later (:meth:`poll`) or there is nothing to check."""
        if type(value) is Tensor and value.is_cpu and value.dtype in _PLAIN:  # the usual case: one sum, read at once
            # (``.data``, not ``detach()``: the same memory without autograd, and no op of its own)
            return math.isfinite((value.data if value.requires_grad else value).sum().item())
        tensors = [t for t in iter_tensors(value) if t.is_floating_point() and t.numel()]
        if not tensors:
            return None
        device = tensors[0].device
        if device.type == "cpu":  # reading a CPU number costs no synchronisation: one sum and one read
            return all(math.isfinite(_sum(t).item()) for t in tensors)
        if step is None or not hasattr(torch, device.type):
            return None
        sums = [_sum(t) for t in tensors]
        bad = ~torch.isfinite(sums[0] if len(sums) == 1 else torch.stack([s.to(sums[0].dtype) for s in sums]).sum())
        host = self._slot()
        host.copy_(bad, non_blocking=True)
        event = getattr(torch, device.type).Event()
        event.record()
        self.pending.append((step, what, host, event))
        del self.pending[:-_RING]  # never more flags in flight than pinned slots
        return None

    def poll(self) -> Optional[Tuple[int, str]]:
        """(step, what) of the earliest flag that the device has finished and found non-finite."""
        while self.pending and self.pending[0][3].query():
            step, what, host, _ = self.pending.pop(0)
            if bool(host):
                self.pending.clear()
                return step, what
        return None

    def _slot(self) -> Tensor:
        if len(self._ring) < _RING:
            self._ring.append(torch.zeros((), dtype=torch.bool, pin_memory=torch.cuda.is_available()))
        slot = self._ring[self._next % len(self._ring)]
        self._next += 1
        return slot


def smallest_near_input(params: List[Tuple[str, str, Tensor]]) -> Optional[Tensor]:
    """The smallest trainable parameter of the first layer that has any: a non-finite gradient
    anywhere upstream reaches it, and checking it costs next to nothing (a bias, usually)."""
    if not params:
        return None
    first = params[0][1]
    return min((p for _, layer, p in params if layer == first), key=lambda p: p.numel())
