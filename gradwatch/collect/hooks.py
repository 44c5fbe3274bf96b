"""gradwatch's hooks on the user's modules, and what copies of a watched model get of them.

Users copy watched models: ``copy.deepcopy`` (EMA and teacher copies, ``AveragedModel``),
``pickle`` and ``torch.save(model)``. PyTorch copies a module's hook dictionaries with it, so
the copy would carry gradwatch's hooks (closures, which fail to pickle; bound methods, which
deep-copy the whole collector). Parameters are not a concern: their gradient hooks are not
copied by ``Parameter.__deepcopy__`` nor pickled.

Two layers make every copy clean:

1. While a watch is attached, each module of the model carries an instance-level
   ``__getstate__`` (:class:`CleanState`), which ``pickle``, ``copy.copy`` and ``copy.deepcopy``
   consult: the state it returns is the module's own, minus gradwatch's hooks and minus
   itself. A copy holds no gradwatch hook and no reference to gradwatch at all (a model
   saved with ``torch.save`` loads where gradwatch is not installed). ``detach`` removes it.
2. Every hook gradwatch registers is a :class:`Hook`, which copies and pickles as
   :class:`Unhooked`: a no-op that takes itself off the module the first time it
   is called. This covers copies that do not go through ``__getstate__`` (a module class with its
   own ``__reduce__`` or ``__deepcopy__``, a hook dictionary copied by hand).

Under ``torch.compile`` a :class:`Hook` is traced into the graph of the module that calls it (the
layers' hooks, :mod:`.traced`); an :class:`EagerHook` (the root module's hooks) never is.
"""

from __future__ import annotations

import functools
import weakref
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Set

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_EXTRA_DICTS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


class Unhooked:
    """What a copy of a gradwatch hook is: does nothing, and removes itself from the module
    it is called on (module hooks receive the module first)."""

    __slots__ = ()

    def __call__(self, module: Any = None, *args: Any, **kwargs: Any) -> None:
        # Every copied gradwatch hook of the module goes at once: the root's forward hook
        # (``always_call``) is then gone before PyTorch could iterate over its dict in the
        # error path of a forward that raises, where removing an entry would break the loop.
        if isinstance(module, nn.Module):
            _drop(module.__dict__, lambda hook: isinstance(hook, Unhooked))
        return None

    def __reduce__(self) -> Any:
        return (Unhooked, ())


class Hook(functools.partial):
    """A gradwatch hook: calls ``fn``; copied or pickled, it becomes :class:`Unhooked`.

    A ``functools.partial`` (C code) rather than a class with a Python ``__call__``: torch.compile
    traces a module's hooks into its graph, and a wrapper frame per hook and layer would be one
    more function for it to trace and guard."""

    __slots__ = ()

    def __new__(cls, fn: Callable[..., Any]) -> "Hook":
        return super().__new__(cls, fn)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (Unhooked, ())

    def __deepcopy__(self, memo: Dict[int, Any]) -> Unhooked:
        return Unhooked()

    def __copy__(self) -> Unhooked:
        return Unhooked()


class WeakHook:
    """Calls a bound method while its object lives. For hooks on parameters: PyTorch's garbage
    collector cannot see through a parameter's hook dictionary, so a strong reference from it
    back to the watch (which holds the model) would keep a forgotten model alive for ever.
    (A weak reference to the object and the method's name: ``weakref.WeakMethod`` is a Python
    call of its own, on every backward pass.)"""

    __slots__ = ("owner", "name")

    def __init__(self, method: Callable[..., Any]) -> None:
        self.owner = weakref.ref(method.__self__)  # type: ignore[attr-defined]
        self.name = method.__name__

    def __call__(self, *args: Any) -> Any:
        owner = self.owner()
        return None if owner is None else getattr(owner, self.name)(*args)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (Unhooked, ())


_dynamo_callback = getattr(getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None), "get_eval_frame_callback",
                           None)


def eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Keep torch.compile from tracing into ``fn``: gradwatch's eager code (step boundaries,
    records of a step) runs at the compiled graph's edges only, never inside it.

    ``torch.compiler.disable``'s wrapper costs about eight Python calls per call (it switches
    Dynamo's frame callback off and on). Where no compiled code is running, that callback is unset
    and ``fn`` is called directly; the one frame that decides is itself never compiled (``skip``),
    and a traced caller breaks its graph at the call, as at a disabled function."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    if disable is None:
        return fn
    disabled = disable(fn)  # (imports torch._dynamo: at attach, not when gradwatch is imported)
    skip = getattr(getattr(getattr(torch, "_dynamo", None), "decorators", None), "skip", None)
    if _dynamo_callback is None or skip is None:
        return disabled

    def run(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if _dynamo_callback() is None else disabled(*args, **kwargs)
    return skip(functools.wraps(fn)(run))


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def _dispatcher() -> Callable[..., Any]:
    """``call(fn, *args)``: ``fn(*args)``, with Dynamo switched off around it where compiled code is
    running (:func:`eager`'s frame, taking the hook as its first argument: one Python frame a call)."""
    disabled = eager(_call)  # (where Dynamo cannot be reached, eager gives what calls directly)
    skip = getattr(getattr(getattr(torch, "_dynamo", None), "decorators", None), "skip", None)
    if _dynamo_callback is None or skip is None:
        return disabled

    def call(fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args) if _dynamo_callback() is None else disabled(fn, *args)
    return skip(call)


_untraced_call: Optional[Callable[..., Any]] = None  # _dispatcher(), made at the first use (imports Dynamo)


def untraced(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` for a hook that runs during backward or ``optimizer.step()`` (a tensor or gradient
    hook, a callback at the end of backward, an optimizer hook), never traced by torch.compile.
    A training step compiled whole (``torch.compile(train_step)`` calling ``loss.backward()``)
    leaves Dynamo's frame callback set while its backward runs, and every Python frame of such a
    hook would be compiled: graph breaks at its reads, recompiles on its arguments' types. One
    eager dispatcher (:func:`eager`) serves every such hook, through a ``functools.partial`` (C
    code): where no compiled code runs, ``fn`` is called directly, one Python call later."""
    global _untraced_call
    if _untraced_call is None:
        _untraced_call = _dispatcher()
    return functools.partial(_untraced_call, fn)


class EagerHook(Hook):
    """A gradwatch hook that torch.compile never traces: ``eager(fn)``, called through the
    ``functools.partial`` of :class:`Hook`, so that calling it opens no Python frame of gradwatch's.

    ``torch.compile(model)`` runs the root module's hooks outside Dynamo and compiles any Python
    frame they open as a graph of its own: a wrapper frame would be compiled, broken at the call
    of ``fn`` and recompiled for each grad mode and each hook signature. Called from a traced
    caller (``model.compile()``, a compiled training step), the graph breaks at the call, in
    PyTorch's module code."""

    __slots__ = ()

    def __new__(cls, fn: Callable[..., Any]) -> "EagerHook":
        return super().__new__(cls, eager(fn))


def eager_forward_hook(module: nn.Module, fn: Callable[..., Any], **kwargs: Any) -> RemovableHandle:
    return module.register_forward_hook(EagerHook(fn), **kwargs)


def eager_forward_pre_hook(module: nn.Module, fn: Callable[..., Any], **kwargs: Any) -> RemovableHandle:
    return module.register_forward_pre_hook(EagerHook(fn), **kwargs)


def forward_hook(module: nn.Module, fn: Callable[..., Any], **kwargs: Any) -> RemovableHandle:
    return module.register_forward_hook(Hook(fn), **kwargs)


def forward_pre_hook(module: nn.Module, fn: Callable[..., Any], **kwargs: Any) -> RemovableHandle:
    return module.register_forward_pre_hook(Hook(fn), **kwargs)


def _drop(state: Dict[str, Any], ours: Callable[[Any], bool]) -> Dict[str, Any]:
    """Remove the hooks ``ours`` selects from a module's ``__dict__``-like ``state`` in place;
    returns it."""
    removed: Set[int] = set()
    for key in _HOOK_DICTS:
        hooks = state.get(key)
        if hooks:
            for hid in [hid for hid, hook in hooks.items() if ours(hook)]:
                del hooks[hid]
                removed.add(hid)
    if removed:
        for key in _EXTRA_DICTS:
            extra = state.get(key)
            if extra:
                for hid in removed & set(extra):
                    del extra[hid]
    return state


class CleanState:
    """A watched module's ``__getstate__``: its state without gradwatch's hooks (or itself).
    The hook dictionaries that held a gradwatch hook are copied, never changed in place."""

    def __init__(self, module: nn.Module) -> None:
        self.module = weakref.ref(module)

    def __call__(self) -> Any:
        module = self.module()
        if module is None:  # pragma: no cover - the module is the caller
            return {}
        own = getattr(type(module), "__getstate__", None)  # object.__getstate__ on Python >= 3.11
        state = own(module) if own is not None else module.__dict__
        if isinstance(state, tuple) and state and isinstance(state[0], dict):
            return (self._clean(state[0]),) + state[1:]
        return self._clean(state) if isinstance(state, dict) else state

    def _clean(self, state: Dict[str, Any]) -> Dict[str, Any]:
        state = {k: v for k, v in state.items() if not (k == "__getstate__" and isinstance(v, CleanState))}
        for key in _HOOK_DICTS + _EXTRA_DICTS:
            if isinstance(state.get(key), dict):
                state[key] = OrderedDict(state[key])
        return _drop(state, lambda hook: isinstance(hook, Hook))


class CleanCopies:
    """Installs :class:`CleanState` on every module of a model, and takes it off again."""

    def __init__(self) -> None:
        self._modules: List["weakref.ref[nn.Module]"] = []

    def install(self, model: nn.Module) -> None:
        for m in model.modules():
            # Never shadow one the user set on the instance; TorchScript modules copy their own way.
            if "__getstate__" not in m.__dict__ and not isinstance(m, torch.jit.ScriptModule):
                m.__dict__["__getstate__"] = CleanState(m)
                self._modules.append(weakref.ref(m))

    def remove(self) -> None:
        for ref in self._modules:
            m = ref()
            if m is not None and isinstance(m.__dict__.get("__getstate__"), CleanState):
                del m.__dict__["__getstate__"]
        self._modules.clear()
