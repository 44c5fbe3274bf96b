"""Seeing functions that module hooks cannot see: activations (``F.relu(x)``, ``x.tanh()``) and SDPA.

On measured forwards of the model, gradwatch enters a ``torch.overrides.TorchFunctionMode``
for the duration of the model's forward, and forward pre- and post-hooks on every module keep
the stack of modules whose ``forward`` is running; a call of a function of interest is handed,
after it has returned, to its handler with the module that made it (the innermost one running).
Other functions pass straight through. Two users:

- ``GradWatch(model, functional=True)``: each call of a known activation function is measured
  like an activation module, as ``"<module>:<function>"`` (e.g. ``"encoder.block0:relu"``; a
  second call in the same forward is ``...:relu#2``). A function called inside a module that is
  itself an activation (a hand-written GELU using ``tanh``, Mish, Swish) belongs to that
  activation and is not a layer of its own.
- :mod:`.sdpa`: ``F.scaled_dot_product_attention``, on by default (see there for when the mode
  is entered for it).

Inside a region that ``torch.compile`` traces, the mode and the stack hooks do nothing: what the
compiled code runs is not measured by them. The mode's presence on measured steps makes their
graph one of its own, as the measuring taps' flag does already (:mod:`.traced`), and the hooks
are the same at every measured step, so steps neither break nor recompile it.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from ..layers import ActivationKind, ActivationSpec, Layer, activation_spec, call_flat_side, display_name, is_wrapper
from .buffers import Reduction, StepBuffers, in_backward, site_name
from .guard import Guard
from .hooks import forward_hook, forward_pre_hook
from .traced import compiling, inside_compiled_call

_RECT = ActivationSpec(ActivationKind.RECTIFIER)
# The torch-function mode stack (private API; without it gradwatch's work simply runs under the tap).
_stack_len = getattr(torch._C, "_len_torch_function_stack", None)
_stack_at = getattr(torch._C, "_get_function_stack_at", None)
_stack_pop = getattr(torch._C, "_pop_torch_function_stack", None)
_stack_push = getattr(torch._C, "_push_on_torch_function_stack", None)
_STACK = None not in (_stack_len, _stack_at, _stack_pop, _stack_push)
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


Handler = Callable[[nn.Module, Callable[..., Any], Tuple[Any, ...], Dict[str, Any], Any], None]
"""Called after a function of interest returned: (calling module, function, args, kwargs, output)."""


class FunctionalTap(TorchFunctionMode):
    """Calls ``handlers[func](owner(), func, args, kwargs, output)`` after each call of a function
    in ``handlers``; everything else passes straight through."""

    def __init__(self, handlers: Dict[Callable[..., Any], Handler], owner: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.handlers = handlers
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not compiling():  # traced by torch.compile: nothing of gradwatch's in the graph
            handler = self.handlers.get(func)
            if handler is not None:
                handler(self.owner(), func, args, kwargs, out)
        return out


class FunctionalTaps:
    """Enters :class:`FunctionalTap` for each measured forward of the model that needs it, with
    the module stack it attributes calls by. Records each known activation function's output as
    the site ``"<module>:<function>"`` when ``activations`` (``functional=True``); other handlers
    are added with :meth:`add`."""

    def __init__(self, model: nn.Module, how: Reduction, guard: Guard,
                 current: Callable[[], Optional[StepBuffers]], activations: bool = True) -> None:
        wrapped = is_wrapper(model)
        self.model = model
        self.how = how
        self.guard = guard
        self.current = current
        self.activations = activations
        self.layers: Dict[str, Layer] = {}  # discovered layers: "<module>:<function>", SDPA callers
        self.handles: List[RemovableHandle] = []
        self.names = {m: display_name(n, wrapped) for n, m in model.named_modules()}
        # Functions inside a module that is an activation itself belong to that activation.
        self._inside_activation = {m for m in self.names
                                   if activations and activation_spec(m).kind is not ActivationKind.NONE}
        self._stack: List[nn.Module] = []
        self._calls: Dict[str, int] = {}
        self._tap: Optional[FunctionalTap] = None
        self._handlers: Dict[Callable[..., Any], Handler] = (
            {fn: self._on_activation for fn in KNOWN} if activations else {})
        self._users: List[Any] = []  # objects with wanted() and left(compiled)
        self._armed = False  # the running step is measured

    def add(self, funcs: List[Callable[..., Any]], handler: Handler, user: Any) -> None:
        """Hand calls of ``funcs`` to ``handler``; ``user.wanted()`` says whether a measured forward
        needs the mode for them, ``user.left(compiled)`` hears when such a forward ends."""
        for fn in funcs:
            self._handlers[fn] = handler
        self._users.append(user)

    def register(self) -> None:
        """A measured step begins: the mode may be entered at the model's next forwards."""
        self._armed = True

    def remove(self) -> None:
        self.leave()
        self._armed = False
        self._unhook()

    def _unhook(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _wanted(self) -> bool:
        return self.activations or any(u.wanted() for u in self._users)

    def enter(self) -> None:
        """The model's forward begins on a measured step (called from the root's pre-hook)."""
        if self._tap is not None or not self._armed or self.current() is None:
            return
        if not self._wanted():
            self._unhook()
            return
        if inside_compiled_call():  # its layers run in a graph (see traced.inside_compiled_call)
            return
        if not self.handles:  # kept while steps are measured
            for module in self.names:  # track which module's forward is running
                if isinstance(module, torch.jit.ScriptModule):  # takes no hooks (see blind.scripted)
                    continue
                # Not always_call: torch.compile guards on the ids of such hooks, and these come and go
                # with measured steps (the number of hooks it guards on stays the same on measured steps).
                self.handles.append(forward_pre_hook(module, self._push))
                self.handles.append(forward_hook(module, self._pop))
        self._stack.clear()
        self._calls.clear()
        self._tap = FunctionalTap(self._handlers, self.owner)
        self._tap.__enter__()

    def leave(self, compiled: bool = False) -> None:
        """The model's forward ended (``compiled``: torch.compile traced its layers)."""
        if self._tap is not None:
            tap, self._tap = self._tap, None
            tap.__exit__(None, None, None)
            for user in self._users:
                user.left(compiled)

    def apart(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` with the tap off while it runs: gradwatch's own work in a layer's hook (a
        measured output's sums, sample and records) calls dozens of tensor functions and methods,
        each of which would otherwise be a Python call of the tap. Only when the tap is the
        innermost mode (another mode entered inside the model's forward stays as it is)."""
        tap = self._tap
        if tap is None or not _STACK or _stack_len() == 0 or _stack_at(_stack_len() - 1) is not tap:
            return fn(*args)
        _stack_pop()
        try:
            return fn(*args)
        finally:
            _stack_push(tap)

    def owner(self) -> nn.Module:
        """The module whose ``forward`` is running (the model itself outside any child)."""
        return self._stack[-1] if self._stack else self.model

    def _push(self, module: nn.Module, args: Any) -> None:  # must return None: a value replaces the input
        if not compiling():
            self._stack.append(module)

    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:  # None: a value replaces the output
        if not compiling():
            for i in range(len(self._stack) - 1, -1, -1):  # (what a forward that raised left above it goes too)
                if self._stack[i] is module:
                    del self._stack[i:]
                    break

    def _on_activation(self, owner: nn.Module, func: Callable[..., Any], args: Tuple[Any, ...],
                       kwargs: Dict[str, Any], out: Any) -> None:
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return
        fn_name, spec = KNOWN[func]
        if func is F.hardtanh:  # other bounds than (-1, 1): measured with those bounds
            lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
            hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
            spec = ActivationSpec(ActivationKind.BOUNDED, float(lo), float(hi))
        buf = self.current()
        if buf is None or owner in self._inside_activation or in_backward():
            return
        name = f"{self.names.get(owner, display_name(''))}:{fn_name}"
        if name in self.guard.broken:
            return
        if name not in self.layers:
            flat = self.guard(name, call_flat_side, fn_name, args, kwargs)  # a smooth rectifier's, as called
            if flat is not None:
                spec = ActivationSpec(ActivationKind.SMOOTH, flat=flat)
            self.layers[name] = Layer(name, owner, spec, function=fn_name)
        call = self._calls[name] = self._calls.get(name, 0) + 1
        pre = args[0] if args and isinstance(args[0], torch.Tensor) and args[0] is not out else None
        self.guard(name, buf.record, site_name(name, call), out, self.layers[name].spec, self.how, None, pre)
