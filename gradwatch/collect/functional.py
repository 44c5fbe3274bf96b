"""Seeing activations called as functions (``F.relu(x)``, ``torch.sigmoid(x)``, ``x.tanh()``).

Module hooks cannot see them. With ``GradWatch(model, functional=True)``, on measured
steps only, gradwatch enters a ``torch.overrides.TorchFunctionMode`` for the duration of the
model's forward; each call of a known activation function is measured like an activation
module and attributed to the module whose ``forward`` made it, as ``"<module>:<function>"``
(e.g. ``"encoder.block0:relu"``; a second call in the same forward is ``...:relu#2``).
Other functions pass straight through. A function called inside a module that is itself an
activation (a hand-written GELU using ``tanh``, Mish, Swish) belongs to that activation and
is not a layer of its own.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from ..layers import ActivationKind, ActivationSpec, Layer, activation_spec, display_name, is_wrapper
from .buffers import Reduction, StepBuffers, in_backward, site_name
from .guard import Guard
from .hooks import forward_hook, forward_pre_hook
from .traced import compiling

_RECT = ActivationSpec(ActivationKind.RECTIFIER)
_SMOOTH = ActivationSpec(ActivationKind.SMOOTH)


def _known() -> Dict[Callable[..., Any], tuple]:
    table = {
        "relu": (_RECT, [torch.relu, torch.relu_, F.relu, F.relu_, torch.Tensor.relu, torch.Tensor.relu_]),
        "relu6": (ActivationSpec(ActivationKind.RECTIFIER, None, 6.0), [F.relu6]),
        "sigmoid": (ActivationSpec(ActivationKind.BOUNDED, 0.0, 1.0),
                    [torch.sigmoid, F.sigmoid, torch.Tensor.sigmoid, torch.Tensor.sigmoid_]),
        "tanh": (ActivationSpec(ActivationKind.BOUNDED, -1.0, 1.0),
                 [torch.tanh, F.tanh, torch.Tensor.tanh, torch.Tensor.tanh_]),
        "hardtanh": (ActivationSpec(ActivationKind.BOUNDED, -1.0, 1.0), [F.hardtanh]),
        "hardsigmoid": (ActivationSpec(ActivationKind.BOUNDED, 0.0, 1.0), [F.hardsigmoid]),
        "softsign": (ActivationSpec(ActivationKind.BOUNDED, -1.0, 1.0), [F.softsign]),
        "gelu": (_SMOOTH, [F.gelu]),
        "silu": (_SMOOTH, [F.silu]),
        "elu": (_SMOOTH, [F.elu]),
        "leaky_relu": (_SMOOTH, [F.leaky_relu]),
        "mish": (_SMOOTH, [F.mish]),
        "softplus": (_SMOOTH, [F.softplus]),
    }
    out: Dict[Callable[..., Any], tuple] = {}
    for name, (spec, funcs) in table.items():
        for fn in funcs:
            out[fn] = (name, spec)
    return out


KNOWN = _known()


class FunctionalTap(TorchFunctionMode):
    """Calls ``on_call(function name, spec, output)`` for every known activation function."""

    def __init__(self, on_call: Callable[[str, ActivationSpec, torch.Tensor], None]) -> None:
        super().__init__()
        self.on_call = on_call

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        known = KNOWN.get(func)
        # F.hardtanh with other bounds than (-1, 1) is measured without saturation bounds.
        # Not inside a graph torch.compile traces: the measuring is eager code (see traced.py).
        if known is not None and isinstance(out, torch.Tensor) and out.is_floating_point() and not compiling():
            name, spec = known
            if func is F.hardtanh:
                lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0) if kwargs else (
                    args[1] if len(args) > 1 else -1.0)
                hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0) if kwargs else (
                    args[2] if len(args) > 2 else 1.0)
                spec = ActivationSpec(ActivationKind.BOUNDED, float(lo), float(hi))
            self.on_call(name, spec, out)
        return out


class FunctionalTaps:
    """Enters :class:`FunctionalTap` for each measured forward of the model and records each
    known activation function's output as the site ``"<module>:<function>"``."""

    def __init__(self, model: nn.Module, how: Reduction, guard: Guard,
                 current: Callable[[], Optional[StepBuffers]]) -> None:
        wrapped = is_wrapper(model)
        self.model = model
        self.how = how
        self.guard = guard
        self.current = current
        self.layers: Dict[str, Layer] = {}  # discovered "<module>:<function>" layers
        self.handles: List[RemovableHandle] = []
        self._names = {m: display_name(n, wrapped) for n, m in model.named_modules()}
        # Functions inside a module that is an activation itself belong to that activation.
        self._inside_activation = {m for m in self._names if activation_spec(m).kind is not ActivationKind.NONE}
        self._stack: List[nn.Module] = []
        self._calls: Dict[str, int] = {}
        self._tap: Optional[FunctionalTap] = None

    def register(self) -> None:
        if self.handles:
            return
        for module in self._names:  # track which module's forward is running
            if isinstance(module, torch.jit.ScriptModule):  # takes no hooks (see blind.scripted)
                continue
            self.handles.append(forward_pre_hook(module, self._push))
            self.handles.append(forward_hook(module, self._pop, always_call=True))

    def remove(self) -> None:
        self.leave()
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def enter(self) -> None:
        """The model's forward begins on a measured step."""
        if self._tap is None and self.handles and self.current() is not None:
            self._stack.clear()
            self._calls.clear()
            self._tap = FunctionalTap(self._on_function)
            self._tap.__enter__()

    def leave(self) -> None:
        if self._tap is not None:
            tap, self._tap = self._tap, None
            tap.__exit__(None, None, None)

    def _push(self, module: nn.Module, args: Any) -> None:  # must return None: a value replaces the input
        self._stack.append(module)

    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:  # None: a value replaces the output
        if self._stack:
            self._stack.pop()

    def _on_function(self, fn_name: str, spec: ActivationSpec, out: torch.Tensor) -> None:
        buf = self.current()
        owner = self._stack[-1] if self._stack else self.model
        if buf is None or owner in self._inside_activation or in_backward():
            return
        name = f"{self._names.get(owner, display_name(''))}:{fn_name}"
        if name in self.guard.broken:
            return
        if name not in self.layers:
            self.layers[name] = Layer(name, owner, spec, function=fn_name)
        call = self._calls[name] = self._calls.get(name, 0) + 1
        self.guard(name, buf.record, site_name(name, call), out, self.layers[name].spec, self.how)
