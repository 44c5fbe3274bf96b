"""Seeing activations called as functions (``F.relu(x)``, ``torch.sigmoid(x)``, ``x.tanh()``).

Module hooks cannot see them. With ``GradWatch(model, functional=True)``, on measured
steps only, gradwatch enters a ``torch.overrides.TorchFunctionMode`` for the duration of the
model's forward; each call of a known activation function is measured like an activation
module and attributed to the module whose ``forward`` made it, as ``"<module>:<function>"``
(e.g. ``"encoder.block0:relu"``). Other functions pass straight through.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .layers import ActivationKind, ActivationSpec

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
        if known is not None and isinstance(out, torch.Tensor) and out.is_floating_point():
            name, spec = known
            if func is F.hardtanh:
                lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0) if kwargs else (
                    args[1] if len(args) > 1 else -1.0)
                hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0) if kwargs else (
                    args[2] if len(args) > 2 else 1.0)
                spec = ActivationSpec(ActivationKind.BOUNDED, float(lo), float(hi))
            self.on_call(name, spec, out)
        return out
